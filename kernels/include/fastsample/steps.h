// Sampler step math, header-only: the C++ twins of fastsample/kernels/affine.py.
//
// affine1 (DDGAN posterior, ddgan.md sec. 1 and 4), on one tensor x and the net output e:
//     x' = c_x x + c_e e + sigma n0
// affine2 (CLD, cld.md sec. 5), on the pair (x, v) and the net output alpha:
//     v_s = k_v v + k_alpha alpha
//     x'  = T_xx x + T_xv v_s + D_xv v + K11 n0
//     v'  = T_vx x + T_vv v_s + K21 n0 + K22 n1
//
// Arithmetic is float32, one rounding per operation, in the order of the Python loop
// (fastsample/samplers/plan.py run_table): products first, then left-to-right sums. The
// coefficients arrive as doubles from schedule.txt and are rounded to float once, as torch rounds
// a python float multiplied into a float32 tensor. Build with -ffp-contract=off (nvcc:
// --fmad=false) so the compiler does not fuse a product and a sum into one FMA (one rounding
// less). Under those flags the CPU functions reproduce the torch expressions bit for bit.
//
// The per-element functions are __host__ __device__ under nvcc; the CUDA kernels that use them
// are in kernels/src/steps_cuda.cu (declared in steps.cuh).

#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTSAMPLE_HD __host__ __device__ __forceinline__
#else
#define FASTSAMPLE_HD inline
#endif

namespace fastsample {

//----------------------------------------------------------------------------------------------
// Coefficients of one step, rounded to float.

struct Affine1Coeffs {
  float c_x = 1.0f;      // on the state x
  float c_e = 0.0f;      // on the net output e
  float sigma = 0.0f;    // on the noise n0; 0 turns the noise off

  static Affine1Coeffs from_double(double c_x, double c_e, double sigma) {
    return {static_cast<float>(c_x), static_cast<float>(c_e), static_cast<float>(sigma)};
  }
};

struct Affine2Coeffs {
  float k_v = 1.0f, k_alpha = 0.0f;                              // S part on v
  float T_xx = 1.0f, T_xv = 0.0f, T_vx = 0.0f, T_vv = 1.0f;      // linear map on (x, v_s)
  float K11 = 0.0f, K21 = 0.0f, K22 = 0.0f;                      // noise Cholesky factor
  float D_xv = 0.0f;                                             // x drift on the pre-step v (EM)

  bool has_noise() const { return K11 != 0.0f || K21 != 0.0f || K22 != 0.0f; }
};

//----------------------------------------------------------------------------------------------
// One element.

FASTSAMPLE_HD float affine1_elem(float x, float e, const Affine1Coeffs& c) {
  const float ax = c.c_x * x;
  const float ae = c.c_e * e;
  return ax + ae;
}

FASTSAMPLE_HD float affine1_noise_elem(float x, float e, float n0, const Affine1Coeffs& c) {
  const float s = affine1_elem(x, e, c);
  const float an = c.sigma * n0;
  return s + an;
}

// Writes (x', v') for one element; alpha = 0 where the row calls no net.
FASTSAMPLE_HD void affine2_elem(float x, float v, float alpha, float n0, float n1, bool noise,
                                const Affine2Coeffs& c, float* x_out, float* v_out) {
  // S part: Euler on v with the mixed score
  const float kv = c.k_v * v;
  const float ka = c.k_alpha * alpha;
  const float v_s = kv + ka;
  // exact linear part A
  const float txx = c.T_xx * x;
  const float txv = c.T_xv * v_s;
  const float dxv = c.D_xv * v;
  float xn = txx + txv;
  xn = xn + dxv;
  const float tvx = c.T_vx * x;
  const float tvv = c.T_vv * v_s;
  float vn = tvx + tvv;
  if (noise) {
    const float k11 = c.K11 * n0;
    const float k21 = c.K21 * n0;
    const float k22 = c.K22 * n1;
    xn = xn + k11;
    vn = vn + k21;
    vn = vn + k22;
  }
  *x_out = xn;
  *v_out = vn;
}

//----------------------------------------------------------------------------------------------
// Whole arrays on the host, in place (contiguous float32, n elements each).

// x <- c_x x + c_e e + sigma n0; n0 may be null iff c.sigma == 0.
inline void affine1(int64_t n, float* x, const float* e, const float* n0,
                    const Affine1Coeffs& c) {
  if (c.sigma != 0.0f) {
    for (int64_t i = 0; i < n; ++i) x[i] = affine1_noise_elem(x[i], e[i], n0[i], c);
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = affine1_elem(x[i], e[i], c);
  }
}

// (x, v) <- the CLD map; alpha may be null (no net call: alpha = 0), n0 and n1 may be null iff
// !c.has_noise().
inline void affine2(int64_t n, float* x, float* v, const float* alpha, const float* n0,
                    const float* n1, const Affine2Coeffs& c) {
  const bool noise = c.has_noise();
  for (int64_t i = 0; i < n; ++i) {
    affine2_elem(x[i], v[i], alpha ? alpha[i] : 0.0f, noise ? n0[i] : 0.0f,
                 noise ? n1[i] : 0.0f, noise, c, &x[i], &v[i]);
  }
}

}  // namespace fastsample
