// CUDA launchers of the step functions in steps.h (kernels/src/steps_cuda.cu, compiled by nvcc
// when CMake finds a CUDA toolkit; see kernels/README.md for what is verified where).
//
// Plain C++ declarations: a .cpp file may include this header without nvcc. Pointers are device
// pointers to contiguous float32 arrays of n elements; stream is a cudaStream_t (null: the
// legacy default stream). The launchers return cudaGetLastError() as an int (0 = success).

#pragma once

#include <cstdint>

#include "fastsample/steps.h"

namespace fastsample::cuda {

int affine1(int64_t n, float* x, const float* e, const float* n0, const Affine1Coeffs& c,
            void* stream = nullptr);

int affine2(int64_t n, float* x, float* v, const float* alpha, const float* n0, const float* n1,
            const Affine2Coeffs& c, void* stream = nullptr);

// cudaGetErrorString of a launcher's return value.
const char* error_string(int code);

}  // namespace fastsample::cuda
