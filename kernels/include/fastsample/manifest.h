// manifest.json as the C++ runtime reads it (export/README.md): what was exported, the I/O
// contract, the batch range and the sha256 of every file. Torch-free.

#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fastsample/schedule.h"

namespace fastsample {

constexpr int64_t kMaxManifestBytes = 64LL << 20;
constexpr int64_t kMaxBatch = 1LL << 20;
constexpr int64_t kBatchAxis = -1;   // the dynamic "batch" entry of a manifest shape

struct ManifestTensor {
  std::string name;
  std::vector<int64_t> shape;   // kBatchAxis where the manifest says "batch"
  std::string dtype;
};

struct Manifest {
  std::string family, what, format, dtype, device;
  std::vector<ManifestTensor> inputs, outputs;
  int64_t batch_min = 0, batch_max = 0;
  std::vector<std::pair<std::string, std::string>> files;   // relative path, sha256 hex

  // Parses the text; every key above must be present and well-formed. Throws fastsample::Error
  // naming `where`.
  static Manifest parse(const std::string& text, const std::string& where);
  static Manifest read(const std::string& path);

  // Every file of `files` exists under DIR and has its sha256; `required` must be among them.
  // Throws one line naming the first file that does not match.
  void verify_files(const std::string& dir, const std::vector<std::string>& required) const;

  // The manifest describes a model this runtime can drive with the schedule: aoti, float32,
  // the schedule's family, ddgan generator|sampler or cld score, and inputs/outputs of exactly
  // the shapes the loop feeds (data_shape, z_dim, nfe). Throws one line naming the mismatch.
  void check_schedule(const Schedule& s) const;

  // The shapes the loop will feed the model for a batch of n (inputs, in order) and expects
  // back (outputs).
  std::vector<std::vector<int64_t>> input_shapes(int64_t n) const;
  std::vector<std::vector<int64_t>> output_shapes(int64_t n) const;

  std::string where;   // the manifest's path, for messages
};

// "(4, 1, 8, 8)" (-1 prints as "batch").
std::string shape_string(const std::vector<int64_t>& shape);

}  // namespace fastsample
