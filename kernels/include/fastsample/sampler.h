// fastsample::Sampler: an exported artifact (model.pt2 + schedule.txt) and its sampler loop.
//
//   fastsample::Sampler s("export/artifacts/ddgan");          // throws fastsample::Error
//   auto noise = s.draw_noise(64, /*seed=*/0);                 // or s.load_noise(dir, 64)
//   at::Tensor x = s.sample(noise, /*batch=*/64);           // model space, (64, *data_shape)
//   at::Tensor samples = s.postprocess(x);                  // data space
//
// The loop is the C++ twin of run_table in fastsample/samplers/plan.py; the step math is
// steps.h (CPU) or steps.cuh (CUDA builds).

#pragma once

#include <memory>
#include <string>

#include <ATen/ATen.h>

#include "fastsample/manifest.h"
#include "fastsample/schedule.h"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace fastsample {

// The most float32 elements draw_noise allocates for one run (4 GiB): --num beyond it is an
// error, not an allocation failure.
constexpr int64_t kMaxNoiseElements = 1LL << 30;

// Every standard-normal draw a run of `num` samples consumes, on the CPU (kernels/README.md):
struct Noise {
  at::Tensor x_T;     // (num, *data_shape)
  at::Tensor v_T;     // (num, *data_shape), cld only; unscaled (the loop multiplies it by
                         // prior_v_scale)
  at::Tensor z;       // (nfe, num, z_dim), ddgan only; z[k] feeds the k-th row
  at::Tensor noise;   // (total_draws, num, *data_shape): the rows' draws in loop order
  int64_t num() const { return x_T.size(0); }
};

class Sampler {
 public:
  // Reads DIR/manifest.json, verifies the sha256 of every file it lists (schedule.txt and
  // model.pt2 must be among them) before loading anything, then loads DIR/schedule.txt, checks
  // the manifest's I/O contract against it (family, what, data_shape, z_dim, nfe, float32) and
  // loads DIR/model.pt2. device: where the loop runs; the package must have been compiled for
  // that device type. A `--what sampler` artifact (ddgan) runs as one graph call per batch.
  explicit Sampler(const std::string& artifact_dir, c10::Device device = at::kCPU);
  ~Sampler();
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  const Schedule& schedule() const { return schedule_; }
  const Manifest& manifest() const { return manifest_; }
  // The artifact is the whole sampler loop in one graph (ddgan --what sampler).
  bool whole_graph() const { return manifest_.what == "sampler"; }
  const std::string& dir() const { return dir_; }
  c10::Device device() const { return device_; }

  // This runtime's own draws for `num` samples from one CPU generator seeded with `seed`, in
  // the order x_T, v_T, z, noise. Not Python's stream (README); independent of the batch size.
  Noise draw_noise(int64_t num, uint64_t seed) const;
  // Reads x_T.npy, v_T.npy (cld), z.npy (ddgan), noise.npy from DIR and checks every shape
  // against the schedule; num = -1 takes x_T's batch size.
  Noise load_noise(const std::string& dir, int64_t num = -1) const;

  // Runs the loop on samples [start, start + count) of `noise`; returns model-space x on the
  // sampler's device.
  at::Tensor run(const Noise& noise, int64_t start, int64_t count);
  // All of noise.num() samples, `batch` at a time; model space, (num, *data_shape), on the CPU.
  // Every batch (the last one too) must lie in the manifest's batch range: checked before the
  // first model call.
  at::Tensor sample(const Noise& noise, int64_t batch);
  // Model space -> data space (the schedule's postprocess; float32, same op order as Python).
  at::Tensor postprocess(const at::Tensor& x) const;

 private:
  std::vector<at::Tensor> call_net(std::vector<at::Tensor> inputs, int64_t n);
  void step1(at::Tensor& x, const at::Tensor& e, const at::Tensor* n0, size_t row);
  void step2(at::Tensor& x, at::Tensor& v, const at::Tensor* alpha,
             const at::Tensor* n0, const at::Tensor* n1, size_t row);

  std::string dir_;
  c10::Device device_;
  Schedule schedule_;
  Manifest manifest_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

}  // namespace fastsample
