// Deterministic test inputs shared by the CPU and CUDA step tests.
#pragma once

#include <vector>

namespace fastsample_test {

// Irregular values in [-2, 2] from a linear congruential sequence (no library RNG needed, so
// the CPU and CUDA tests can feed identical inputs).
inline std::vector<float> values(int n, unsigned salt, unsigned base = 12345u) {
  std::vector<float> out(n);
  unsigned s = base + salt * 7919u;
  for (auto& v : out) {
    s = s * 1664525u + 1013904223u;
    v = static_cast<float>((s >> 8) % 40001) / 10000.0f - 2.0f;
  }
  return out;
}

}  // namespace fastsample_test
