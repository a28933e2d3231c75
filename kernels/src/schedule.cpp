// schedule.txt reader: the C++ twin of Table.parse in fastsample/samplers/plan.py, with the
// extra checks the loop relies on (the family's columns, z_dim / prior_v_scale, nfe vs rows).

#include "fastsample/schedule.h"

#include <cerrno>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "fastsample/error.h"

namespace fastsample {
namespace {

const std::vector<std::string> kDdganColumns = {"i", "c0", "c1", "sigma"};
const std::vector<std::string> kCldColumns = {"net", "t", "k_v", "k_alpha", "T_xx", "T_xv",
                                              "T_vx", "T_vv", "K11", "K21", "K22", "D_xv"};
constexpr int64_t kFormatVersion = 1;

// A line's own error: "WHERE:N: bad 'KEY' line (WHY)".
struct LineError {
  std::string why;
};

int64_t to_int(const std::string& s) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno == ERANGE)
    throw LineError{"invalid integer '" + s + "'"};
  return v;
}

double to_double(const std::string& s) {
  double v = 0.0;
  std::string why;
  if (!parse_schedule_value(s, &v, &why)) throw LineError{why};
  return v;
}

// An integer in [lo, hi].
int64_t to_int_in(const std::string& s, int64_t lo, int64_t hi, const char* what) {
  const int64_t v = to_int(s);
  if (v < lo || v > hi)
    throw LineError{std::string(what) + " " + s + " not in " + std::to_string(lo) + ".." +
                    std::to_string(hi)};
  return v;
}

// data_shape / latent_shape: 1..kMaxDims dimensions in 1..kMaxDim, product <= kMaxSampleNumel.
std::vector<int64_t> to_shape(const std::vector<std::string>& vals) {
  if (vals.empty()) throw LineError{"no dimensions"};
  if (static_cast<int64_t>(vals.size()) > kMaxDims)
    throw LineError{std::to_string(vals.size()) + " dimensions, at most " +
                    std::to_string(kMaxDims)};
  std::vector<int64_t> shape;
  int64_t numel = 1;
  for (const auto& v : vals) {
    const int64_t d = to_int(v);
    if (d < 1) throw LineError{"dimension " + v + " < 1"};
    if (d > kMaxDim) throw LineError{"dimension " + v + " > " + std::to_string(kMaxDim)};
    numel *= d;   // <= 65536^8 would overflow: checked per step
    if (numel > kMaxSampleNumel)
      throw LineError{"more than " + std::to_string(kMaxSampleNumel) + " elements per sample"};
    shape.push_back(d);
  }
  return shape;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : " ") + s;
  return out;
}

bool digit(char c) { return c >= '0' && c <= '9'; }

std::string fmt_g(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

bool parse_schedule_value(const std::string& tok, double* out, std::string* why) {
  // [+-]? (D+ (. D*)? | . D+) ([eE] [+-]? D+)?
  size_t i = 0;
  const size_t n = tok.size();
  if (i < n && (tok[i] == '+' || tok[i] == '-')) ++i;
  size_t mant = 0;
  while (i < n && digit(tok[i])) ++i, ++mant;
  if (i < n && tok[i] == '.') {
    ++i;
    while (i < n && digit(tok[i])) ++i, ++mant;
  }
  bool ok = mant > 0;
  if (ok && i < n && (tok[i] == 'e' || tok[i] == 'E')) {
    ++i;
    if (i < n && (tok[i] == '+' || tok[i] == '-')) ++i;
    size_t ex = 0;
    while (i < n && digit(tok[i])) ++i, ++ex;
    ok = ex > 0;
  }
  if (!ok || i != n) {
    *why = "invalid number '" + tok + "' (plain decimal only: no hex, inf or nan)";
    return false;
  }
  // The grammar is a subset of strtod's, which rounds correctly as Python's float() does.
  errno = 0;
  const double v = std::strtod(tok.c_str(), nullptr);
  if (!std::isfinite(v) || std::fabs(v) > static_cast<double>(FLT_MAX)) {
    *why = "number '" + tok + "' overflows float32";
    return false;
  }
  *out = v;
  return true;
}

Schedule Schedule::parse(const std::string& text, const std::string& where) {
  Schedule s;
  int64_t version = -1;
  std::set<std::string> seen;
  std::vector<int> row_lines;
  std::istringstream lines(text);
  std::string line;
  for (int n = 1; std::getline(lines, line); ++n) {
    std::istringstream ts(line);
    std::vector<std::string> tok;
    for (std::string t; ts >> t;) tok.push_back(t);
    if (tok.empty() || tok[0][0] == '#') continue;
    const std::string& key = tok[0];
    const std::vector<std::string> vals(tok.begin() + 1, tok.end());
    try {
      auto one = [&]() -> const std::string& {
        if (vals.size() != 1)
          throw LineError{"1 value expected, got " + std::to_string(vals.size())};
        return vals[0];
      };
      if (key == "row") {
        if (s.columns.empty()) throw LineError{"a row before the columns line"};
        if (static_cast<int64_t>(s.rows.size()) >= kMaxRows)
          throw LineError{"more than " + std::to_string(kMaxRows) + " rows"};
        if (vals.size() != s.columns.size())
          throw LineError{std::to_string(vals.size()) + " values, " +
                          std::to_string(s.columns.size()) + " columns"};
        std::vector<double> row;
        for (const auto& v : vals) row.push_back(to_double(v));
        s.rows.push_back(std::move(row));
        row_lines.push_back(n);
      } else if (key == "columns") {
        s.columns = vals;
      } else if (key == "fastsample-schedule") {
        version = to_int(one());
      } else if (key == "family") {
        s.family = one();
        if (s.family != "ddgan" && s.family != "cld" && s.family != "latent-ddgan" &&
            s.family != "latent-cld")
          throw LineError{"unknown family '" + s.family +
                          "'; this runtime runs ddgan|cld|latent-ddgan|latent-cld"};
        s.kind = s.family.rfind("latent-", 0) == 0 ? s.family.substr(7) : s.family;
      } else if (key == "sampler") {
        s.sampler = one();
      } else if (key == "nfe") {
        s.nfe = to_int_in(one(), 1, kMaxRows, "nfe");
      } else if (key == "data_shape") {
        s.data_shape = to_shape(vals);
      } else if (key == "latent_shape") {
        s.latent_shape = to_shape(vals);
      } else if (key == "z_dim") {
        s.z_dim = to_int_in(one(), 1, kMaxDim, "z_dim");
      } else if (key == "prior_v_scale") {
        s.prior_v_scale = to_double(one());
        if (!(s.prior_v_scale > 0.0)) throw LineError{"prior_v_scale must be > 0"};
      } else if (key == "postprocess") {
        s.postprocess = one();
        if (s.postprocess != "quantize17" && s.postprocess != "clamp01" && s.postprocess != "none")
          throw LineError{"unknown postprocess '" + s.postprocess + "'; quantize17|clamp01|none"};
      }  // other header keys (grid, ...) are informational
      seen.insert(key);
    } catch (const LineError& e) {
      throw Error(where + ":" + std::to_string(n) + ": bad '" + key + "' line (" + e.why + ")");
    }
  }
  if (version != kFormatVersion)
    throw Error(where + ": not a fastsample schedule of format 1 (first line must be "
                "'fastsample-schedule 1')");
  for (const char* key : {"family", "sampler", "nfe", "data_shape", "postprocess", "columns"})
    if (!seen.count(key)) throw Error(where + ": the '" + std::string(key) + "' line is missing");
  if (s.rows.empty()) throw Error(where + ": no rows");
  if (s.latent() != (s.kind != s.family))
    throw Error(where + ": a 'latent_shape' line belongs to the latent families, and only to "
                "them (family '" + s.family + "')");
  const auto& want = s.kind == "ddgan" ? kDdganColumns : kCldColumns;
  if (s.columns != want)
    throw Error(where + ": " + s.family + " columns must be '" + join(want) + "', got '" +
                join(s.columns) + "'");
  int64_t calls = 0;
  if (s.kind == "ddgan") {
    if (s.sampler != "posterior") throw Error(where + ": ddgan sampler must be posterior");
    if (!seen.count("z_dim")) throw Error(where + ": the 'z_dim' line is missing (ddgan)");
    calls = static_cast<int64_t>(s.rows.size());
  } else {
    if (s.sampler != "sscs" && s.sampler != "em")
      throw Error(where + ": cld sampler must be sscs|em, got '" + s.sampler + "'");
    if (!seen.count("prior_v_scale"))
      throw Error(where + ": the 'prior_v_scale' line is missing (cld)");
    for (const auto& r : s.rows) {
      if (r[0] != 0.0 && r[0] != 1.0) throw Error(where + ": cld column 'net' must be 0 or 1");
      calls += r[0] != 0.0;
    }
  }
  if (calls != s.nfe)
    throw Error(where + ": nfe " + std::to_string(s.nfe) + " but the rows call the net " +
                std::to_string(calls) + " times");
  if (s.kind == "ddgan") {
    // i is the generator's step index: an integer in 1..nfe (= T)
    for (size_t k = 0; k < s.rows.size(); ++k) {
      const double i = s.rows[k][0];
      if (i != std::floor(i) || i < 1.0 || i > static_cast<double>(s.rows.size()))
        throw Error(where + ":" + std::to_string(row_lines[k]) + ": ddgan step index i = " + fmt_g(i) +
                    " is not an integer in 1.." +
                    std::to_string(s.rows.size()) + " (T, the rows)");
    }
  }
  return s;
}

Schedule Schedule::read(const std::string& path) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (!ec && size > static_cast<uintmax_t>(kMaxScheduleBytes))
    throw Error(path + ": " + std::to_string(size) + " bytes, more than a schedule may hold (" +
                std::to_string(kMaxScheduleBytes) + ")");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot read the schedule (missing or unreadable)");
  std::ostringstream ss;
  ss << f.rdbuf();
  return parse(ss.str(), path);
}

std::vector<int> Schedule::noise_draws() const {
  std::vector<int> out;
  for (const auto& r : rows) {
    if (kind == "ddgan")
      out.push_back(r[3] != 0.0 ? 1 : 0);
    else
      out.push_back(r[8] != 0.0 || r[9] != 0.0 || r[10] != 0.0 ? 2 : 0);
  }
  return out;
}

int64_t Schedule::total_draws() const {
  int64_t n = 0;
  for (int d : noise_draws()) n += d;
  return n;
}

int64_t Schedule::sample_numel() const {
  int64_t n = 1;
  for (int64_t d : state_shape()) n *= d;
  return n;
}

double Schedule::at(size_t k, const std::string& name) const {
  for (size_t j = 0; j < columns.size(); ++j)
    if (columns[j] == name) return rows.at(k)[j];
  throw Error("schedule has no column '" + name + "'");
}

}  // namespace fastsample
