// CUDA kernels of the step functions: one thread per element, the per-element math of steps.h
// (compile with --fmad=false to keep the CPU functions' rounding).

#include <cuda_runtime.h>

#include "fastsample/steps.cuh"

namespace fastsample::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void affine1_kernel(int64_t n, float* x, const float* e, const float* n0,
                               Affine1Coeffs c) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  x[i] = n0 ? affine1_noise_elem(x[i], e[i], n0[i], c) : affine1_elem(x[i], e[i], c);
}

__global__ void affine2_kernel(int64_t n, float* x, float* v, const float* alpha,
                               const float* n0, const float* n1, Affine2Coeffs c, bool noise) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  affine2_elem(x[i], v[i], alpha ? alpha[i] : 0.0f, noise ? n0[i] : 0.0f,
               noise ? n1[i] : 0.0f, noise, c, &x[i], &v[i]);
}

unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

int affine1(int64_t n, float* x, const float* e, const float* n0, const Affine1Coeffs& c,
            void* stream) {
  if (n <= 0) return 0;
  affine1_kernel<<<blocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      n, x, e, c.sigma != 0.0f ? n0 : nullptr, c);
  return static_cast<int>(cudaGetLastError());
}

int affine2(int64_t n, float* x, float* v, const float* alpha, const float* n0, const float* n1,
            const Affine2Coeffs& c, void* stream) {
  if (n <= 0) return 0;
  affine2_kernel<<<blocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      n, x, v, alpha, n0, n1, c, c.has_noise());
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace fastsample::cuda
