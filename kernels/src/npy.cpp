#include "fastsample/npy.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "fastsample/error.h"
#include "fastsample/npy_header.h"

namespace fastsample {

at::Tensor read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open (missing or unreadable)");
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw Error(path + ": not a .npy file");
  const int major = static_cast<unsigned char>(magic[6]);
  uint32_t hlen = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!f.read(reinterpret_cast<char*>(b), 2)) throw Error(path + ": truncated .npy header");
    hlen = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!f.read(reinterpret_cast<char*>(b), 4)) throw Error(path + ": truncated .npy header");
    hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  } else {
    throw Error(path + ": unsupported .npy version " + std::to_string(major));
  }
  if (hlen > kMaxNpyHeader)
    throw Error(path + ": .npy header of " + std::to_string(hlen) + " bytes (at most " +
                std::to_string(kMaxNpyHeader) + ")");
  std::string header(hlen, '\0');
  if (!f.read(header.data(), hlen)) throw Error(path + ": truncated .npy header");
  const NpyHeader h = parse_npy_header(header, path);
  // The data must be exactly numel floats: checked against the file size before allocating.
  const auto data_start = f.tellg();
  f.seekg(0, std::ios::end);
  const auto end = f.tellg();
  f.seekg(data_start);
  const int64_t bytes = h.numel * static_cast<int64_t>(sizeof(float));
  if (data_start < 0 || end < 0 || static_cast<int64_t>(end - data_start) != bytes)
    throw Error(path + ": " + std::to_string(static_cast<int64_t>(end - data_start)) +
                " data bytes, the header's shape needs " + std::to_string(bytes) +
                (static_cast<int64_t>(end - data_start) < bytes ? " (truncated)" : ""));
  auto t = at::empty(h.shape, at::kFloat);
  if (bytes && !f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(bytes)))
    throw Error(path + ": truncated data (" + std::to_string(bytes) + " bytes expected)");
  return t;
}

void write_npy(const std::string& path, const at::Tensor& t) {
  auto c = t.detach().to(at::kCPU, at::kFloat).contiguous();
  std::string shape = "(";
  for (int64_t d = 0; d < c.dim(); ++d) shape += std::to_string(c.size(d)) + ", ";
  if (c.dim() > 1) shape.resize(shape.size() - 2);
  if (c.dim() == 1) shape.resize(shape.size() - 1);
  shape += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  // magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64
  const size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw Error(path + ": cannot write");
    const uint16_t hlen = static_cast<uint16_t>(header.size());
    const char lenb[2] = {static_cast<char>(hlen & 0xff), static_cast<char>(hlen >> 8)};
    f.write("\x93NUMPY\x01\x00", 8);
    f.write(lenb, 2);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    f.write(static_cast<const char*>(c.data_ptr()),
            static_cast<std::streamsize>(c.numel() * sizeof(float)));
    if (!f) {
      std::remove(tmp.c_str());
      throw Error(path + ": write failed");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error(path + ": cannot rename " + tmp + " into place");
  }
}

}  // namespace fastsample
