// Parity: the C++ loop on a fixture case (kernels/tests/make_fixture.py) vs the Python loop.
//
//   test_parity CASE_DIR [--batch B]
//
// Runs CASE_DIR's artifact on CASE_DIR/noise and compares with CASE_DIR/expected:
//   x_aoti / samples_aoti  run_table on the same model.pt2 in Python: isolates the C++ loop,
//                          max abs <= 1e-5 in model space, equal in data space (*_b3.npy: the
//                          same in batches of 3, for --batch 3)
//   x / samples            run_table on the eager net (the sampler's oracle): max abs <= 1e-4 in
//                          model space (the AOTInductor-vs-eager error of the net itself is ~1e-5
//                          after a few steps), data space equal except at quantisation boundaries
// A latent family's graph (latent-ddgan | latent-cld --what sampler) ends with the decoder step:
// the runtime returns its data-space samples, so these compare samples_aoti (equal) and samples
// (the eager loop + decoder step: max abs <= 1e-4, i.e. the same decoder levels).
// Prints the measured max abs differences.

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <ATen/Parallel.h>

#include "fastsample/error.h"
#include "fastsample/npy.h"
#include "fastsample/sampler.h"

namespace fs = std::filesystem;

namespace {

double max_abs(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

// Data-space elements that differ although the model-space value is > tol from every quantiser
// step edge of quantize17 (floor(17 (x + 1) / 2): edges at x = 2 k / 17 - 1).
int64_t unexplained_flips(const at::Tensor& got, const at::Tensor& want,
                          const at::Tensor& x_ref, double tol) {
  const auto u = (x_ref.to(at::kDouble) + 1) / 2 * 17;
  const auto dist_to_edge = (u - u.round()).abs() * 2 / 17;
  return ((got != want) & (dist_to_edge > tol)).sum().item<int64_t>();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: test_parity CASE_DIR [--batch B]\n");
    return 2;
  }
  const std::string dir = argv[1];
  int64_t batch = -1;
  if (argc == 4 && std::string(argv[2]) == "--batch") batch = std::atoll(argv[3]);
  try {
    at::set_num_threads(1);
    fastsample::Sampler sampler(dir);
    const auto noise = sampler.load_noise((fs::path(dir) / "noise").string());
    const auto x = sampler.sample(noise, batch > 0 ? batch : noise.num());
    const auto samples = sampler.postprocess(x);
    const bool latent = sampler.schedule().latent();
    auto expected = [&](const char* name) {
      return fastsample::read_npy((fs::path(dir) / "expected" / name).string());
    };
    // A compiled net's rounding may depend on the batch size: compare a split run with the
    // Python loop split the same way.
    const std::string sfx = batch > 0 && batch < noise.num() ? "_b" + std::to_string(batch) : "";
    const auto s_aoti = expected(("samples_aoti" + sfx + ".npy").c_str());
    const auto s_eager = expected("samples.npy");
    // a latent graph's result is its samples (x.npy there: the latent z_0, not comparable)
    const auto x_aoti = latent ? s_aoti : expected(("x_aoti" + sfx + ".npy").c_str());
    const auto x_eager = latent ? s_eager : expected("x.npy");
    const double d_aoti = max_abs(x, x_aoti), ds_aoti = max_abs(samples, s_aoti);
    const double d_eager = max_abs(x, x_eager), ds_eager = max_abs(samples, s_eager);
    const int64_t flips = unexplained_flips(samples, s_eager, x_eager, 2 * d_eager + 1e-7);
    std::printf("%s (%s %s, nfe %lld, %lld samples, batch %lld)\n", dir.c_str(),
                sampler.schedule().family.c_str(), sampler.schedule().sampler.c_str(),
                static_cast<long long>(sampler.schedule().nfe),
                static_cast<long long>(noise.num()), static_cast<long long>(batch));
    if (latent) {
      std::printf("  vs python graph on model.pt2: max abs %.3g (data space)\n", ds_aoti);
      std::printf("  vs python loop + decoder on eager nets: max abs %.3g (data space)\n",
                  ds_eager);
    } else {
      std::printf("  vs python loop on model.pt2: max abs %.3g (model space), %.3g (data "
                  "space)\n", d_aoti, ds_aoti);
      std::printf("  vs python loop on eager net: max abs %.3g (model space), %.3g (data "
                  "space)\n", d_eager, ds_eager);
    }
    bool ok = latent ? ds_aoti == 0.0 && ds_eager <= 1e-4
                     : d_aoti <= 1e-5 && ds_aoti == 0.0 && d_eager <= 1e-4 && flips == 0;
    if (!latent && sampler.schedule().postprocess != "quantize17") ok = ok && ds_eager <= 1e-4;
    std::printf("%s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "test_parity: %s\n", e.what());
    return 1;
  }
}
