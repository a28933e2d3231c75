// The check macro the C++ test programs share: a failed EXPECT prints where and what, counts,
// and the test goes on, so one run reports every broken case; main returns non-zero when
// fastsample_test::failures is.
#pragma once

#include <cstdio>

namespace fastsample_test {
inline int failures = 0;
}  // namespace fastsample_test

#define EXPECT(cond)                                                                \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++fastsample_test::failures;                                                  \
    }                                                                               \
  } while (0)
