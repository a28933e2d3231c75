#include "fastsample/manifest.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "fastsample/error.h"
#include "fastsample/json.h"
#include "fastsample/sha256.h"

namespace fs = std::filesystem;

namespace fastsample {
namespace {

const Json& member(const Json& j, const std::string& key, const std::string& where) {
  const Json* m = j.get(key);
  if (!m) throw Error(where + ": no '" + key + "' key");
  return *m;
}

std::string str_member(const Json& j, const std::string& key, const std::string& where) {
  const Json& m = member(j, key, where);
  if (m.type != Json::Type::String) throw Error(where + ": '" + key + "' must be a string");
  return m.string;
}

int64_t int_member(const Json& j, const std::string& key, const std::string& where) {
  const Json& m = member(j, key, where);
  if (!m.is_integer()) throw Error(where + ": '" + key + "' must be an integer");
  return static_cast<int64_t>(m.number);
}

std::vector<ManifestTensor> tensors(const Json& j, const std::string& key,
                                    const std::string& where) {
  const Json& list = member(j, key, where);
  if (list.type != Json::Type::Array || list.array.empty() || list.array.size() > 16)
    throw Error(where + ": '" + key + "' must be a list of 1..16 tensors");
  std::vector<ManifestTensor> out;
  for (const auto& t : list.array) {
    const std::string w = where + ": " + key + "[" + std::to_string(out.size()) + "]";
    if (t.type != Json::Type::Object) throw Error(w + " must be an object");
    ManifestTensor mt;
    mt.name = str_member(t, "name", w);
    mt.dtype = str_member(t, "dtype", w);
    const Json& shape = member(t, "shape", w);
    if (shape.type != Json::Type::Array || shape.array.size() > 16)
      throw Error(w + ": 'shape' must be a list of at most 16 dimensions");
    for (const auto& d : shape.array) {
      if (d.type == Json::Type::String && d.string == "batch") {
        mt.shape.push_back(kBatchAxis);
      } else if (d.is_integer() && d.number >= 1 && d.number <= static_cast<double>(kMaxDim) * 16) {
        mt.shape.push_back(static_cast<int64_t>(d.number));
      } else {
        throw Error(w + ": 'shape' entries must be integers in 1.." +
                    std::to_string(kMaxDim * 16) + " or \"batch\"");
      }
    }
    out.push_back(std::move(mt));
  }
  return out;
}

bool safe_relative(const std::string& p) {
  if (p.empty() || p.size() > 4096 || p.find('\0') != std::string::npos) return false;
  const fs::path path(p);
  if (path.is_absolute() || path.has_root_name() || path.has_root_directory()) return false;
  for (const auto& part : path)
    if (part == ".." || part == ".") return false;
  return true;
}

}  // namespace

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream ss;
  ss << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    ss << (i ? ", " : "");
    if (shape[i] == kBatchAxis) ss << "batch";
    else ss << shape[i];
  }
  ss << (shape.size() == 1 ? ",)" : ")");
  return ss.str();
}

Manifest Manifest::parse(const std::string& text, const std::string& where) {
  const Json j = Json::parse(text, where);
  if (j.type != Json::Type::Object) throw Error(where + ": not a JSON object");
  Manifest m;
  m.where = where;
  const int64_t version = int_member(j, "manifest_version", where);
  if (version != 1)
    throw Error(where + ": manifest_version " + std::to_string(version) + ", this runtime "
                "reads 1");
  m.family = str_member(j, "family", where);
  m.what = str_member(j, "what", where);
  m.format = str_member(j, "format", where);
  m.dtype = str_member(j, "dtype", where);
  m.device = str_member(j, "device", where);
  m.inputs = tensors(j, "inputs", where);
  m.outputs = tensors(j, "outputs", where);
  const Json& batch = member(j, "batch", where);
  if (batch.type != Json::Type::Object) throw Error(where + ": 'batch' must be an object");
  m.batch_min = int_member(batch, "min", where + ": batch");
  m.batch_max = int_member(batch, "max", where + ": batch");
  if (m.batch_min < 1 || m.batch_max < m.batch_min || m.batch_max > kMaxBatch)
    throw Error(where + ": batch range " + std::to_string(m.batch_min) + ".." +
                std::to_string(m.batch_max) + " is not within 1.." + std::to_string(kMaxBatch));
  const Json& files = member(j, "files", where);
  if (files.type != Json::Type::Object || files.object.empty())
    throw Error(where + ": 'files' must be a non-empty object of sha256 digests");
  for (const auto& kv : files.object) {
    if (!safe_relative(kv.first))
      throw Error(where + ": files: '" + kv.first + "' is not a relative path inside the "
                  "artifact directory");
    const Json& h = kv.second;
    bool hex = h.type == Json::Type::String && h.string.size() == 64;
    for (char c : hex ? h.string : "") hex = hex && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
    if (!hex) throw Error(where + ": files: '" + kv.first + "' has no sha256 (64 hex digits)");
    m.files.emplace_back(kv.first, h.string);
  }
  return m;
}

Manifest Manifest::read(const std::string& path) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec) throw Error(path + ": cannot read the manifest (missing or unreadable)");
  if (size > static_cast<uintmax_t>(kMaxManifestBytes))
    throw Error(path + ": " + std::to_string(size) + " bytes, more than a manifest may hold (" +
                std::to_string(kMaxManifestBytes) + ")");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot read the manifest (missing or unreadable)");
  std::ostringstream ss;
  ss << f.rdbuf();
  return parse(ss.str(), path);
}

void Manifest::verify_files(const std::string& dir,
                            const std::vector<std::string>& required) const {
  for (const auto& name : required) {
    bool listed = false;
    for (const auto& kv : files) listed = listed || kv.first == name;
    if (!listed)
      throw Error(where + ": files lists no sha256 for " + name + "; refusing to load it "
                  "unverified");
  }
  for (const auto& kv : files) {
    const std::string path = (fs::path(dir) / kv.first).string();
    if (fs::is_symlink(path) || !fs::is_regular_file(path))
      throw Error(path + ": listed in manifest.json but missing or not a regular file");
    if (sha256_file(path) != kv.second)
      throw Error(path + ": sha256 does not match manifest.json (modified, corrupt or swapped "
                  "file); refusing to load the artifact");
  }
}

void Manifest::check_schedule(const Schedule& s) const {
  const std::string w = where + ": ";
  if (format != "aoti")
    throw Error(w + "format '" + format + "'; fastsample-run runs AOTInductor (aoti) artifacts");
  if (family != s.family)
    throw Error(w + "family '" + family + "' but schedule.txt says '" + s.family + "'");
  const bool ok_what = (family == "ddgan" && (what == "generator" || what == "sampler")) ||
                       (family == "cld" && what == "score") ||
                       (s.latent() && what == "sampler");
  if (!ok_what)
    throw Error(w + "what '" + what + "'; this runtime runs ddgan generator|sampler, cld "
                "score and latent-ddgan|latent-cld sampler");
  if (dtype != "fp32")
    throw Error(w + "dtype '" + dtype + "'; this runtime feeds float32 (export with --dtype "
                "fp32)");
  auto check = [&](const std::vector<ManifestTensor>& got,
                   const std::vector<std::pair<std::string, std::vector<int64_t>>>& want,
                   const char* kind) {
    if (got.size() != want.size())
      throw Error(w + std::to_string(got.size()) + " " + kind + ", a " + family + " " + what +
                  " has " + std::to_string(want.size()));
    for (size_t k = 0; k < want.size(); ++k) {
      const auto& t = got[k];
      if (t.dtype != "float32")
        throw Error(w + kind + " '" + t.name + "' is " + t.dtype + ", expected float32");
      bool same = t.name == want[k].first && t.shape.size() == want[k].second.size();
      for (size_t d = 0; same && d < t.shape.size(); ++d) {
        const int64_t g = t.shape[d], e = want[k].second[d];
        // a static export names its batch size where the dynamic one says "batch"
        same = g == e || (e == kBatchAxis && batch_min == batch_max && g == batch_min);
      }
      if (!same)
        throw Error(w + kind + " " + std::to_string(k) + " is '" + t.name + "' " +
                    shape_string(t.shape) + ", schedule.txt needs '" + want[k].first + "' " +
                    shape_string(want[k].second));
    }
  };
  const int64_t B = kBatchAxis;
  auto with = [](std::vector<int64_t> head, const std::vector<int64_t>& tail) {
    head.insert(head.end(), tail.begin(), tail.end());
    return head;
  };
  const auto& ds = s.data_shape;
  const auto& ls = s.state_shape();
  if (s.kind == "ddgan" && what == "sampler") {
    // The whole-sampler graphs are batch-first (servers concatenate requests on axis 0); a
    // latent family's state is its latent, its samples are decoded into the data shape.
    check(inputs, {{"x_T", with({B}, ls)}, {"z", {B, s.nfe, s.z_dim}},
                   {"noise", with({B, s.nfe}, ls)}}, "inputs");
    check(outputs, {{"x0", with({B}, ls)}, {"samples", with({B}, ds)}}, "outputs");
  } else if (s.latent()) {
    check(inputs, {{"x_T", with({B}, ls)}, {"v_T", with({B}, ls)},
                   {"noise", with({B, s.total_draws() / 2, 2}, ls)}}, "inputs");
    check(outputs, {{"x0", with({B}, ls)}, {"samples", with({B}, ds)}}, "outputs");
  } else if (family == "ddgan") {
    check(inputs, {{"x_t", with({B}, ds)}, {"z", {B, s.z_dim}}, {"t", {B}}}, "inputs");
    check(outputs, {{"x0", with({B}, ds)}}, "outputs");
  } else {
    check(inputs, {{"x", with({B}, ds)}, {"v", with({B}, ds)}, {"t", {B}}}, "inputs");
    check(outputs, {{"alpha", with({B}, ds)}}, "outputs");
  }
}

namespace {
std::vector<std::vector<int64_t>> concrete(const std::vector<ManifestTensor>& ts, int64_t n) {
  std::vector<std::vector<int64_t>> out;
  for (const auto& t : ts) {
    auto s = t.shape;
    for (auto& d : s)
      if (d == kBatchAxis) d = n;
    out.push_back(std::move(s));
  }
  return out;
}
}  // namespace

std::vector<std::vector<int64_t>> Manifest::input_shapes(int64_t n) const {
  return concrete(inputs, n);
}
std::vector<std::vector<int64_t>> Manifest::output_shapes(int64_t n) const {
  return concrete(outputs, n);
}

}  // namespace fastsample
