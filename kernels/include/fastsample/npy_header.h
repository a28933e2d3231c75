// The .npy header dictionary, parsed without libtorch (so the AddressSanitizer build tests it
// alone): {'descr': '<f4', 'fortran_order': False, 'shape': (d0, d1, ...), }

#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastsample {

constexpr int64_t kMaxNpyHeader = 10000;     // bytes, numpy's own bound on what it reads
constexpr int64_t kMaxNpyDims = 16;
constexpr int64_t kMaxNpyNumel = 1LL << 32;  // elements (16 GiB of float32)

struct NpyHeader {
  std::vector<int64_t> shape;
  int64_t numel = 1;
};

// Only float32 little-endian C order is accepted; every dimension a non-negative decimal
// integer, at most kMaxNpyDims of them, their product at most kMaxNpyNumel. Throws
// fastsample::Error naming PATH.
NpyHeader parse_npy_header(const std::string& header, const std::string& path);

}  // namespace fastsample
