// The sampler loop over an AOTInductor package: the C++ twin of run_table
// (fastsample/samplers/plan.py), same rows, same noise order, same float32 step math.

#include "fastsample/sampler.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <filesystem>
#include <sstream>

#include "fastsample/error.h"
#include "fastsample/npy.h"
#include "fastsample/steps.h"
#ifdef FASTSAMPLE_WITH_CUDA
#include "fastsample/steps.cuh"
#endif

namespace fs = std::filesystem;

namespace fastsample {
namespace {

std::string first_line(const std::string& s) {
  const auto end = s.find('\n');
  return end == std::string::npos ? s : s.substr(0, end);
}

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream ss;
  ss << "(";
  for (size_t i = 0; i < shape.size(); ++i) ss << (i ? ", " : "") << shape[i];
  ss << (shape.size() == 1 ? ",)" : ")");
  return ss.str();
}

std::vector<int64_t> cat_shape(std::vector<int64_t> head, const std::vector<int64_t>& tail) {
  head.insert(head.end(), tail.begin(), tail.end());
  return head;
}

}  // namespace

//----------------------------------------------------------------------------------------------
// Loading.

Sampler::Sampler(const std::string& artifact_dir, c10::Device device)
    : dir_(artifact_dir), device_(device) {
  if (!fs::is_directory(dir_)) throw Error(dir_ + ": not an artifact directory (does not exist)");
  for (const char* name : {"schedule.txt", "model.pt2", "manifest.json"})
    if (!fs::is_regular_file(fs::path(dir_) / name))
      throw Error(dir_ + ": not an artifact directory (no " + name + ")");
  // Nothing is read from schedule.txt or model.pt2 before their hashes match the manifest.
  manifest_ = Manifest::read((fs::path(dir_) / "manifest.json").string());
  manifest_.verify_files(dir_, {"schedule.txt", "model.pt2"});
  schedule_ = Schedule::read((fs::path(dir_) / "schedule.txt").string());
  manifest_.check_schedule(schedule_);
  if (device_.is_cuda()) {
#ifndef FASTSAMPLE_WITH_CUDA
    throw Error("--device cuda: this build has no CUDA support (CPU-only libtorch or "
                "FASTSAMPLE_CUDA=OFF)");
#endif
  }
  if (manifest_.device.rfind(c10::DeviceTypeName(device_.type(), true), 0) != 0)
    throw Error(manifest_.where + ": exported for device '" + manifest_.device +
                "', asked to run on " + c10::DeviceTypeName(device_.type(), true));
  const std::string pt2 = (fs::path(dir_) / "model.pt2").string();
  std::string pkg_device;
  try {
    auto meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(pt2, "model");
    pkg_device = meta.count("AOTI_DEVICE_KEY") ? meta["AOTI_DEVICE_KEY"] : "";
  } catch (const std::exception& e) {
    throw Error(pt2 + ": cannot read the AOTInductor package (" + first_line(e.what()) + ")");
  }
  if (!pkg_device.empty() && pkg_device != c10::DeviceTypeName(device_.type(), true))
    throw Error(pt2 + ": compiled for " + pkg_device + ", asked to run on " +
                c10::DeviceTypeName(device_.type(), true));
  try {
    loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        pt2, "model", false, 1, device_.has_index() ? device_.index() : -1);
  } catch (const std::exception& e) {
    throw Error(pt2 + ": cannot load the AOTInductor package (" + first_line(e.what()) + ")");
  }
}

Sampler::~Sampler() = default;

//----------------------------------------------------------------------------------------------
// Noise.

Noise Sampler::draw_noise(int64_t num, uint64_t seed) const {
  if (num < 1) throw Error("--num must be >= 1, got " + std::to_string(num));
  const auto& s = schedule_;
  // Bound the draws' memory before allocating: x_T (+ v_T), z, noise.
  const double per_sample = static_cast<double>(s.sample_numel()) *
                                static_cast<double>(1 + (s.kind == "cld") + s.total_draws()) +
                            static_cast<double>(s.nfe) * static_cast<double>(s.z_dim);
  if (per_sample * static_cast<double>(num) > static_cast<double>(kMaxNoiseElements))
    throw Error("--num " + std::to_string(num) + ": the draws would take " +
                std::to_string(static_cast<long long>(per_sample * 4 * num / (1 << 20))) +
                " MiB, more than the " + std::to_string(kMaxNoiseElements * 4 >> 20) +
                " MiB this runtime allows; sample in several runs");
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto opt = at::TensorOptions().dtype(at::kFloat);
  Noise n;
  const auto& ss = s.state_shape();
  n.x_T = at::randn(cat_shape({num}, ss), gen, opt);
  if (s.kind == "cld") n.v_T = at::randn(cat_shape({num}, ss), gen, opt);
  if (s.kind == "ddgan") n.z = at::randn({s.nfe, num, s.z_dim}, gen, opt);
  n.noise = at::randn(cat_shape({s.total_draws(), num}, ss), gen, opt);
  return n;
}

Noise Sampler::load_noise(const std::string& dir, int64_t num) const {
  if (!fs::is_directory(dir)) throw Error(dir + ": no such noise directory");
  const auto& s = schedule_;
  auto load = [&](const char* name, const std::vector<int64_t>& want) {
    const std::string path = (fs::path(dir) / name).string();
    auto t = read_npy(path);
    if (t.sizes() != at::IntArrayRef(want))
      throw Error(path + ": shape " + shape_str(t.sizes()) + ", expected " + shape_str(want) +
                  " for this artifact's schedule");
    if (!at::isfinite(t).all().item<bool>())
      throw Error(path + ": holds NaN or infinite values");
    return t;
  };
  Noise n;
  if (num < 0) {
    auto x = read_npy((fs::path(dir) / "x_T.npy").string());
    num = x.dim() > 0 ? x.size(0) : 0;
    if (num < 1) throw Error((fs::path(dir) / "x_T.npy").string() + ": no samples");
  }
  const auto& ss = s.state_shape();
  n.x_T = load("x_T.npy", cat_shape({num}, ss));
  if (s.kind == "cld") n.v_T = load("v_T.npy", cat_shape({num}, ss));
  if (s.kind == "ddgan") n.z = load("z.npy", {s.nfe, num, s.z_dim});
  n.noise = load("noise.npy", cat_shape({s.total_draws(), num}, ss));
  return n;
}

//----------------------------------------------------------------------------------------------
// The loop.

std::vector<at::Tensor> Sampler::call_net(std::vector<at::Tensor> inputs, int64_t n) {
  // The model reads its inputs as compiled: a shape other than the manifest's would make it
  // read past their end. (AOTInductor's own checks: kernels/README.md.)
  const auto want_in = manifest_.input_shapes(n);
  for (size_t k = 0; k < inputs.size(); ++k)
    if (k >= want_in.size() || inputs[k].sizes() != at::IntArrayRef(want_in[k]) ||
        inputs[k].scalar_type() != at::kFloat || !inputs[k].is_contiguous())
      throw Error(dir_ + "/model.pt2: input " + std::to_string(k) + " would be " +
                  shape_str(inputs[k].sizes()) + ", the manifest says " +
                  (k < want_in.size() ? shape_str(want_in[k]) : "no such input"));
  if (inputs.size() != want_in.size())
    throw Error(dir_ + "/model.pt2: " + std::to_string(inputs.size()) + " inputs, the manifest "
                "lists " + std::to_string(want_in.size()));
  std::vector<at::Tensor> out;
  try {
    out = loader_->run(inputs);
  } catch (const std::exception& e) {
    throw Error(dir_ + "/model.pt2: the model refused its inputs (" + first_line(e.what()) + ")");
  }
  const auto want_out = manifest_.output_shapes(n);
  bool ok = out.size() == want_out.size();
  for (size_t k = 0; ok && k < out.size(); ++k) ok = out[k].sizes() == at::IntArrayRef(want_out[k]);
  if (!ok)
    throw Error(dir_ + "/model.pt2: returned " + std::to_string(out.size()) + " output(s)" +
                (out.empty() ? "" : " (first " + shape_str(out[0].sizes()) + ")") +
                ", the manifest says " + std::to_string(want_out.size()) + " (first " +
                shape_str(want_out[0]) + ")");
  for (auto& t : out) t = t.to(at::kFloat).contiguous();
  return out;
}

void Sampler::step1(at::Tensor& x, const at::Tensor& e, const at::Tensor* n0,
                    size_t row) {
  const auto c = Affine1Coeffs::from_double(schedule_.rows[row][2], schedule_.rows[row][1],
                                            schedule_.rows[row][3]);
  const float* np = n0 ? n0->data_ptr<float>() : nullptr;
  if (x.is_cuda()) {
#ifdef FASTSAMPLE_WITH_CUDA
    const int rc = cuda::affine1(x.numel(), x.data_ptr<float>(), e.data_ptr<float>(), np, c);
    if (rc) throw std::runtime_error(std::string("affine1 launch: ") + cuda::error_string(rc));
    return;
#else
    throw Error("a CUDA tensor in a build without CUDA support");
#endif
  }
  affine1(x.numel(), x.data_ptr<float>(), e.data_ptr<float>(), np, c);
}

void Sampler::step2(at::Tensor& x, at::Tensor& v, const at::Tensor* alpha,
                    const at::Tensor* n0, const at::Tensor* n1, size_t row) {
  const auto& r = schedule_.rows[row];
  Affine2Coeffs c;
  c.k_v = static_cast<float>(r[2]);
  c.k_alpha = static_cast<float>(r[3]);
  c.T_xx = static_cast<float>(r[4]);
  c.T_xv = static_cast<float>(r[5]);
  c.T_vx = static_cast<float>(r[6]);
  c.T_vv = static_cast<float>(r[7]);
  c.K11 = static_cast<float>(r[8]);
  c.K21 = static_cast<float>(r[9]);
  c.K22 = static_cast<float>(r[10]);
  c.D_xv = static_cast<float>(r[11]);
  const float* ap = alpha ? alpha->data_ptr<float>() : nullptr;
  const float* p0 = n0 ? n0->data_ptr<float>() : nullptr;
  const float* p1 = n1 ? n1->data_ptr<float>() : nullptr;
  if (x.is_cuda()) {
#ifdef FASTSAMPLE_WITH_CUDA
    const int rc = cuda::affine2(x.numel(), x.data_ptr<float>(), v.data_ptr<float>(), ap, p0,
                                 p1, c);
    if (rc) throw std::runtime_error(std::string("affine2 launch: ") + cuda::error_string(rc));
    return;
#else
    throw Error("a CUDA tensor in a build without CUDA support");
#endif
  }
  affine2(x.numel(), x.data_ptr<float>(), v.data_ptr<float>(), ap, p0, p1, c);
}

at::Tensor Sampler::run(const Noise& noise, int64_t start, int64_t count) {
  c10::InferenceMode guard;
  const auto& s = schedule_;
  const auto draws = s.noise_draws();
  auto on_dev = [&](const at::Tensor& t) {
    return t.narrow(0, start, count).to(device_, at::kFloat).contiguous();
  };
  auto opt = at::TensorOptions().dtype(at::kFloat).device(device_);
  if (whole_graph()) {
    // A latent family's graph ends with the decoder step and the postprocess rule: its
    // `samples` output (1) is the result; a pixel ddgan's is x0 (0), postprocessed later.
    const size_t result = s.latent() ? 1 : 0;
    const auto& ss = s.state_shape();
    if (s.kind == "cld") {
      // latent-cld --what sampler: (x_T, v_T, noise (n, R, 2, ...)) -> (x0, samples),
      // batch-first like the ddgan graph; the draws of the R noisy rows are (n0, n1) pairs, in
      // row order, stored (2R, N, ...) in the noise files, hence the move of the batch axis.
      auto v = (on_dev(noise.v_T) * s.prior_v_scale).contiguous();
      auto nz = noise.noise.narrow(1, start, count).to(device_, at::kFloat).contiguous()
                    .view(cat_shape({s.total_draws() / 2, 2, count}, ss))
                    .movedim(2, 0).contiguous();
      return call_net({on_dev(noise.x_T), v, nz}, count)[result];
    }
    // ddgan --what sampler: (x_T (n, ...), z (n, T, z_dim), noise (n, T, ...)) -> (x0,
    // samples), batch-first so that servers can concatenate requests; the noise files keep the
    // loop's (T, N, ...) order, so z is transposed here. The graph reads noise[:, k] for every
    // row; rows that draw none (sigma = 0) get zeros.
    const auto T = static_cast<int64_t>(s.rows.size());
    auto z = noise.z.narrow(1, start, count).transpose(0, 1).to(device_, at::kFloat).contiguous();
    auto nz = at::zeros(cat_shape({count, T}, ss), opt);
    int64_t d = 0;
    for (int64_t k = 0; k < T; ++k)
      if (draws[static_cast<size_t>(k)]) nz.select(1, k).copy_(on_dev(noise.noise[d++]));
    return call_net({on_dev(noise.x_T), z, nz}, count)[result];
  }
  // Time inputs built before the loop: the loop itself allocates only net outputs.
  std::vector<at::Tensor> times;
  for (size_t k = 0; k < s.rows.size(); ++k)
    times.push_back(at::full({count}, static_cast<float>(s.rows[k][s.kind == "ddgan" ? 0 : 1]),
                                opt));
  auto x = on_dev(noise.x_T).clone();
  int64_t d = 0;   // next draw in noise.noise
  if (s.kind == "ddgan") {
    for (size_t k = 0; k < s.rows.size(); ++k) {
      // x0' = G(x, z_k, i); x <- c0 x0' + c1 x + sigma n
      auto x0 = call_net({x, on_dev(noise.z[static_cast<int64_t>(k)]), times[k]}, count)[0];
      at::Tensor n0;
      if (draws[k]) n0 = on_dev(noise.noise[d++]);
      step1(x, x0, draws[k] ? &n0 : nullptr, k);
    }
    return x;
  }
  // v = prior_v_scale * N(0, I), rounded as torch rounds `v * math.sqrt(M)`
  auto v = (on_dev(noise.v_T) * s.prior_v_scale).contiguous();
  for (size_t k = 0; k < s.rows.size(); ++k) {
    at::Tensor alpha, n0, n1;
    if (s.rows[k][0] != 0.0) alpha = call_net({x, v, times[k]}, count)[0];
    if (draws[k]) {
      n0 = on_dev(noise.noise[d++]);
      n1 = on_dev(noise.noise[d++]);
    }
    step2(x, v, alpha.defined() ? &alpha : nullptr, draws[k] ? &n0 : nullptr,
          draws[k] ? &n1 : nullptr, k);
  }
  return x;
}

at::Tensor Sampler::sample(const Noise& noise, int64_t batch) {
  const int64_t num = noise.num();
  if (batch < 1) throw Error("--batch must be >= 1, got " + std::to_string(batch));
  // Every network call's batch within the exported range, before the first call.
  const int64_t lo = manifest_.batch_min, hi = manifest_.batch_max;
  for (int64_t start = 0; start < num; start += batch) {
    const int64_t n = std::min(batch, num - start);
    if (n < lo || n > hi)
      throw Error("--batch " + std::to_string(batch) + " with " + std::to_string(num) +
                  " samples makes a network call of " + std::to_string(n) + ", outside the " +
                  "batch range " + std::to_string(lo) + ".." + std::to_string(hi) +
                  " this artifact was exported for (manifest.json)");
  }
  // Off the CPU, the whole run's noise moves to the device once, not per step.
  Noise dev = noise;
  if (!device_.is_cpu())
    for (auto* t : {&dev.x_T, &dev.v_T, &dev.z, &dev.noise})
      if (t->defined()) *t = t->to(device_);
  std::vector<at::Tensor> outs;
  for (int64_t start = 0; start < num; start += batch)
    outs.push_back(run(dev, start, std::min(batch, num - start)).to(at::kCPU));
  return at::cat(outs);
}

at::Tensor Sampler::postprocess(const at::Tensor& x) const {
  c10::InferenceMode guard;
  const auto xf = x.to(at::kFloat);
  if (schedule_.latent()) return xf;   // the latent graph's samples are already data
  if (schedule_.postprocess == "quantize17")
    return at::floor((xf + 1) / 2 * 17).clamp(0, 16) / 16;
  if (schedule_.postprocess == "clamp01") return ((xf + 1) / 2).clamp(0, 1);
  return xf.clone();
}

}  // namespace fastsample
