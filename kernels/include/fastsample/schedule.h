// schedule.txt: the sampler as a plain-text table (format: fastsample/samplers/plan.py).

#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastsample {

// Bounds on what a schedule may ask for (kernels/README.md); beyond them: fastsample::Error.
constexpr int64_t kMaxScheduleBytes = 64LL << 20;   // schedule.txt file size
constexpr int64_t kMaxRows = 100000;                 // rows (loop steps); also bounds nfe
constexpr int64_t kMaxDims = 8;                      // data_shape / latent_shape dimensions
constexpr int64_t kMaxDim = 65536;                   // one dimension, z_dim
constexpr int64_t kMaxSampleNumel = 1LL << 24;       // product of data_shape / latent_shape

// The one number grammar of schedule.txt values, shared with Python's parse_value in
// fastsample/samplers/plan.py and tested on both sides from kernels/tests/
// schedule_grammar_cases.txt: plain decimal floats
//     [+-]? (D+ (. D*)? | . D+) ([eE] [+-]? D+)?      D = ASCII 0-9
// (no hex, inf, nan, underscores or non-ASCII digits) whose value fits float32
// (|v| <= FLT_MAX; underflow to 0 is fine). Returns false and sets `why` otherwise.
bool parse_schedule_value(const std::string& tok, double* out, std::string* why);

struct Schedule {
  std::string family;                  // ddgan | cld | latent-ddgan | latent-cld
  std::string kind;                    // the rows' kind: ddgan (posterior) | cld (affine2); a
                                       // latent family runs its base family's rows
  std::vector<int64_t> latent_shape;   // latent families: the loop's state (data_shape: the
                                       // decoder's output, which the exported graph ends with)
  std::string sampler;                 // ddgan: posterior; cld: sscs | em
  int64_t nfe = 0;                     // network calls per sample (checked against the rows)
  std::vector<int64_t> data_shape;     // one sample's shape, e.g. {1, 8, 8}
  int64_t z_dim = 0;                   // ddgan: the generator's latent width
  double prior_v_scale = 1.0;          // cld: v_T = prior_v_scale * N(0, I)
  std::string postprocess;             // quantize17 | clamp01 | none
  std::vector<std::string> columns;
  std::vector<std::vector<double>> rows;

  // Parse the text; `where` names the file in errors ("WHERE:LINE: ..."). Throws fastsample::Error.
  static Schedule parse(const std::string& text, const std::string& where);
  static Schedule read(const std::string& path);

  // Per row, how many standard-normal tensors of the state's shape it consumes (0, 1 or 2).
  std::vector<int> noise_draws() const;
  int64_t total_draws() const;
  // Elements of one sample's loop state (the product of state_shape()).
  int64_t sample_numel() const;
  bool latent() const { return !latent_shape.empty(); }
  // The shape the loop and its noise run on: the latent for a latent family, else data_shape.
  const std::vector<int64_t>& state_shape() const { return latent() ? latent_shape : data_shape; }
  // Value of column `name` in row k.
  double at(size_t k, const std::string& name) const;
};

}  // namespace fastsample
