// schedule.txt reader: the C++ twin of Table.parse in fastsample/samplers/plan.py, with the
// extra checks the loop relies on (the family's columns, z_dim / prior_v_scale, nfe vs rows).

#include "fastsample/schedule.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
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
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0') throw LineError{"invalid number '" + s + "'"};
  if (!std::isfinite(v)) throw LineError{"non-finite number '" + s + "'"};
  return v;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : " ") + s;
  return out;
}

}  // namespace

Schedule Schedule::parse(const std::string& text, const std::string& where) {
  Schedule s;
  int64_t version = -1;
  std::set<std::string> seen;
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
        if (vals.size() != s.columns.size())
          throw LineError{std::to_string(vals.size()) + " values, " +
                          std::to_string(s.columns.size()) + " columns"};
        std::vector<double> row;
        for (const auto& v : vals) row.push_back(to_double(v));
        s.rows.push_back(std::move(row));
      } else if (key == "columns") {
        s.columns = vals;
      } else if (key == "fastsample-schedule") {
        version = to_int(one());
      } else if (key == "family") {
        s.family = one();
        if (s.family != "ddgan" && s.family != "cld")
          throw LineError{"unknown family '" + s.family + "'; this runtime runs ddgan|cld"};
      } else if (key == "sampler") {
        s.sampler = one();
      } else if (key == "nfe") {
        s.nfe = to_int(one());
      } else if (key == "data_shape") {
        if (vals.empty()) throw LineError{"no dimensions"};
        s.data_shape.clear();
        for (const auto& v : vals) {
          const int64_t d = to_int(v);
          if (d < 1) throw LineError{"dimension " + v + " < 1"};
          s.data_shape.push_back(d);
        }
      } else if (key == "z_dim") {
        s.z_dim = to_int(one());
        if (s.z_dim < 1) throw LineError{"z_dim must be >= 1"};
      } else if (key == "prior_v_scale") {
        s.prior_v_scale = to_double(one());
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
  const auto& want = s.family == "ddgan" ? kDdganColumns : kCldColumns;
  if (s.columns != want)
    throw Error(where + ": " + s.family + " columns must be '" + join(want) + "', got '" +
                join(s.columns) + "'");
  int64_t calls = 0;
  if (s.family == "ddgan") {
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
  return s;
}

Schedule Schedule::read(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot read the schedule (missing or unreadable)");
  std::ostringstream ss;
  ss << f.rdbuf();
  return parse(ss.str(), path);
}

std::vector<int> Schedule::noise_draws() const {
  std::vector<int> out;
  for (const auto& r : rows) {
    if (family == "ddgan")
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
  for (int64_t d : data_shape) n *= d;
  return n;
}

double Schedule::at(size_t k, const std::string& name) const {
  for (size_t j = 0; j < columns.size(); ++j)
    if (columns[j] == name) return rows.at(k)[j];
  throw Error("schedule has no column '" + name + "'");
}

}  // namespace fastsample
