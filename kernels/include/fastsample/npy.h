// Minimal .npy (format 1.0/2.0/3.0) reader and writer for float32 little-endian C-order arrays,
// the only kind the runtime exchanges with the Python side (kernels/README.md).

#pragma once

#include <string>

#include <ATen/ATen.h>

namespace fastsample {

// Reads PATH as a float32 CPU tensor; throws fastsample::Error naming the file for anything else
// (missing, truncated, other dtype, Fortran order, big-endian).
at::Tensor read_npy(const std::string& path);

// Writes t (any float tensor, converted to contiguous float32 on the CPU) as a version 1.0 .npy
// file; writes PATH.tmp then renames, so a failed write leaves no half-written PATH.
void write_npy(const std::string& path, const at::Tensor& t);

}  // namespace fastsample
