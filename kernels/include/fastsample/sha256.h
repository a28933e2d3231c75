// SHA-256 (FIPS 180-4), self-contained: the runtime verifies the files an artifact's
// manifest.json lists before it loads any of them (kernels/README.md).

#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fastsample {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  // The digest as 64 lowercase hex digits; the object is spent afterwards.
  std::string hex();

 private:
  void block(const unsigned char* p);
  uint32_t h_[8];
  unsigned char buf_[64];
  size_t used_ = 0;
  uint64_t bytes_ = 0;
};

std::string sha256_hex(const std::string& data);
// Streams PATH; throws fastsample::Error naming the file when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace fastsample
