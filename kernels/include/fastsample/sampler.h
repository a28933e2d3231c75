// fastsample::Sampler: an exported artifact (model.pt2 + schedule.txt) and its sampler loop.
//
//   fastsample::Sampler s("export/artifacts/ddgan");          // throws fastsample::Error
//   auto noise = s.draw_noise(64, /*seed=*/0);                 // or s.load_noise(dir, 64)
//   at::Tensor x = s.sample(noise, /*batch=*/64);           // model space, (64, *data_shape)
//   at::Tensor samples = s.postprocess(x);                  // data space
//
// The loop is the C++ twin of run_table in fastsample/export/schedule.py; the step math is
// steps.h (CPU) or steps.cuh (CUDA builds).

#pragma once

#include <memory>
#include <string>

#include <ATen/ATen.h>

#include "fastsample/schedule.h"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace fastsample {

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
  // Loads DIR/schedule.txt and DIR/model.pt2 (and checks DIR/manifest.json exists). device:
  // where the loop runs; the package must have been compiled for that device type.
  explicit Sampler(const std::string& artifact_dir, c10::Device device = at::kCPU);
  ~Sampler();
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  const Schedule& schedule() const { return schedule_; }
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
  at::Tensor sample(const Noise& noise, int64_t batch);
  // Model space -> data space (the schedule's postprocess; float32, same op order as Python).
  at::Tensor postprocess(const at::Tensor& x) const;

 private:
  at::Tensor call_net(std::vector<at::Tensor> inputs);
  void step1(at::Tensor& x, const at::Tensor& e, const at::Tensor* n0, size_t row);
  void step2(at::Tensor& x, at::Tensor& v, const at::Tensor* alpha,
             const at::Tensor* n0, const at::Tensor* n1, size_t row);

  std::string dir_;
  c10::Device device_;
  Schedule schedule_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

}  // namespace fastsample
