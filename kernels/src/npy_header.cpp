#include "fastsample/npy_header.h"

#include "fastsample/error.h"

namespace fastsample {
namespace {

struct Cursor {
  const std::string& s;
  const std::string& path;
  size_t i = 0;
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
  }
  bool eat(char c) {
    ws();
    if (i < s.size() && s[i] == c) {
      ++i;
      return true;
    }
    return false;
  }
};

// Position just after "'KEY':" in the header, or npos.
size_t after_key(const std::string& h, const std::string& key) {
  const std::string k = "'" + key + "'";
  const size_t p = h.find(k);
  if (p == std::string::npos) return p;
  size_t i = p + k.size();
  while (i < h.size() && h[i] == ' ') ++i;
  if (i >= h.size() || h[i] != ':') return std::string::npos;
  return i + 1;
}

}  // namespace

NpyHeader parse_npy_header(const std::string& header, const std::string& path) {
  const std::string short_h = header.substr(0, 120);
  size_t p = after_key(header, "descr");
  {
    Cursor c{header, path, p == std::string::npos ? header.size() : p};
    c.ws();
    const bool ok = p != std::string::npos && header.compare(c.i, 5, "'<f4'") == 0;
    if (!ok)
      throw Error(path + ": dtype must be float32 little-endian ('<f4'), header: " + short_h);
  }
  p = after_key(header, "fortran_order");
  {
    Cursor c{header, path, p == std::string::npos ? header.size() : p};
    c.ws();
    if (p == std::string::npos || header.compare(c.i, 5, "False") != 0)
      throw Error(path + ": must be C order (fortran_order False)");
  }
  p = after_key(header, "shape");
  if (p == std::string::npos) throw Error(path + ": no shape in the .npy header");
  Cursor c{header, path, p};
  if (!c.eat('(')) throw Error(path + ": bad shape in the .npy header");
  NpyHeader out;
  while (true) {
    if (c.eat(')')) break;
    c.ws();
    if (c.i < header.size() && header[c.i] == '-')
      throw Error(path + ": negative dimension in the .npy shape");
    size_t digits = 0;
    int64_t d = 0;
    while (c.i < header.size() && header[c.i] >= '0' && header[c.i] <= '9') {
      if (d > kMaxNpyNumel) throw Error(path + ": dimension too large in the .npy shape");
      d = d * 10 + (header[c.i] - '0');
      ++c.i, ++digits;
    }
    if (!digits) throw Error(path + ": bad shape in the .npy header");
    if (d > kMaxNpyNumel) throw Error(path + ": dimension too large in the .npy shape");
    if (static_cast<int64_t>(out.shape.size()) >= kMaxNpyDims)
      throw Error(path + ": more than " + std::to_string(kMaxNpyDims) + " dimensions");
    out.shape.push_back(d);
    if (d != 0 && out.numel > kMaxNpyNumel / d)
      throw Error(path + ": more than " + std::to_string(kMaxNpyNumel) + " elements");
    out.numel *= d;
    if (c.eat(')')) break;
    if (!c.eat(',')) throw Error(path + ": bad shape in the .npy header");
  }
  return out;
}

}  // namespace fastsample
