// The CUDA step kernels vs the CPU step functions (bit-exact under --fmad=false). Needs a GPU:
// exits 77 (ctest: skipped) when cudaGetDeviceCount finds none.

#include "test_values.h"
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include "fastsample/steps.cuh"

namespace {

std::vector<float> values(int n, unsigned salt) {
  return fastsample_test::values(n, salt, 777u);
}

float* to_device(const std::vector<float>& h) {
  float* d = nullptr;
  cudaMalloc(&d, h.size() * sizeof(float));
  cudaMemcpy(d, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice);
  return d;
}

std::vector<float> to_host(const float* d, int n) {
  std::vector<float> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost);
  return h;
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  const int n = 100003;   // not a multiple of the block size
  auto x = values(n, 1), e = values(n, 2), v = values(n, 3), n0 = values(n, 4), n1 = values(n, 5);
  int bad = 0;

  const auto c1 = fastsample::Affine1Coeffs::from_double(0.19300080886168722, 0.26919088944188801,
                                                         0.94032039410331092);
  float *dx = to_device(x), *de = to_device(e), *dn0 = to_device(n0);
  bad += fastsample::cuda::affine1(n, dx, de, dn0, c1) != 0;
  auto want1 = x;
  fastsample::affine1(n, want1.data(), e.data(), n0.data(), c1);
  bad += to_host(dx, n) != want1;

  fastsample::Affine2Coeffs c2;
  c2.k_v = 0.97f; c2.k_alpha = -0.031f; c2.T_xx = 0.93f; c2.T_xv = 0.12f; c2.T_vx = -0.21f;
  c2.T_vv = 0.81f; c2.K11 = 0.05f; c2.K21 = 0.02f; c2.K22 = 0.3f; c2.D_xv = 0.01f;
  cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  float *dv = to_device(v), *dn1 = to_device(n1);
  bad += fastsample::cuda::affine2(n, dx, dv, de, dn0, dn1, c2) != 0;
  auto wx = x, wv = v;
  fastsample::affine2(n, wx.data(), wv.data(), e.data(), n0.data(), n1.data(), c2);
  bad += to_host(dx, n) != wx;
  bad += to_host(dv, n) != wv;
  bad += cudaDeviceSynchronize() != cudaSuccess;
  std::printf(bad ? "FAIL\n" : "CUDA step kernels match the CPU functions bit for bit\n");
  return bad ? 1 : 0;
}
