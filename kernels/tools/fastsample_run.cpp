// fastsample-run: sample from an exported artifact directory with the C++ runtime.
//
//   fastsample-run ARTIFACT_DIR --num N [--seed S] [--out samples.npy] [--noise DIR]
//                  [--batch B] [--device cpu|cuda] [--repeat R] [--threads T]
//
// Exit status: 0 success, 2 bad input (one line on stderr), 1 anything else.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "fastsample/error.h"
#include "fastsample/npy.h"
#include "fastsample/sampler.h"

namespace {

const char* kUsage =
    "usage: fastsample-run ARTIFACT_DIR --num N [--seed S] [--out samples.npy] [--noise DIR]\n"
    "                      [--batch B] [--device cpu|cuda] [--repeat R] [--threads T]\n"
    "\n"
    "Runs the sampler loop of an exported artifact (model.pt2 + schedule.txt + manifest.json)\n"
    "and writes data-space samples (float32 .npy, (N, *data_shape)).\n"
    "\n"
    "  --num N         samples (required; 1..2^32, and the draws at most 4 GiB)\n"
    "  --seed S        seed of this runtime's own normal draws, 0..2^64-1 (default 0; not\n"
    "                  Python's stream)\n"
    "  --out PATH      write the samples here (.npy); without it nothing is written\n"
    "  --noise DIR     read the draws from DIR (x_T.npy, v_T.npy, z.npy, noise.npy; see\n"
    "                  kernels/README.md) instead of drawing them; N must match their batch\n"
    "  --batch B       samples per network call (default: N, at most the artifact's max\n"
    "                  batch); every call must lie in the exported batch range\n"
    "  --device D      cpu (default) or cuda (CUDA builds with a CUDA artifact only)\n"
    "  --repeat R      run the whole sampling R times (default 1, at most 100000); p50/p99\n"
    "                  over runs 2..R\n"
    "  --threads T     intra-op threads, 1..1024 (default: libtorch's choice)\n"
    "\n"
    "Prints the NFE and the latency per run and per sample. Before loading anything it\n"
    "verifies the sha256 of every file manifest.json lists, and before the first model call\n"
    "every input shape against the manifest. Exit 2 on bad input (one line on stderr).\n";

struct Args {
  std::string dir, out, noise, device = "cpu";
  int64_t num = -1, batch = -1, repeat = 1, threads = -1;
  uint64_t seed = 0;
};

// A decimal integer in [min, max] (digits only, no sign), else one line naming the flag.
uint64_t to_uint(const std::string& flag, const std::string& s, uint64_t min, uint64_t max) {
  bool ok = !s.empty() && s.size() <= 20;
  for (char c : s) ok = ok && c >= '0' && c <= '9';
  uint64_t v = 0;
  if (ok) {
    errno = 0;
    char* end = nullptr;
    v = std::strtoull(s.c_str(), &end, 10);
    ok = *end == '\0' && errno != ERANGE && v >= min && v <= max;
  }
  if (!ok)
    throw fastsample::Error(flag + ": expected an integer in " + std::to_string(min) + ".." +
                            std::to_string(max) + ", got '" + s + "'");
  return v;
}

int64_t to_int(const std::string& flag, const std::string& s, int64_t min, int64_t max) {
  return static_cast<int64_t>(
      to_uint(flag, s, static_cast<uint64_t>(min), static_cast<uint64_t>(max)));
}

constexpr int64_t kMaxNum = 1LL << 32;
constexpr int64_t kMaxRepeat = 100000;
constexpr int64_t kMaxThreads = 1024;

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw fastsample::Error(f + ": missing value");
      return argv[++i];
    };
    if (f == "-h" || f == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (f == "--num") {
      a.num = to_int(f, value(), 1, kMaxNum);
    } else if (f == "--seed") {
      a.seed = to_uint(f, value(), 0, UINT64_MAX);
    } else if (f == "--out") {
      a.out = value();
    } else if (f == "--noise") {
      a.noise = value();
    } else if (f == "--batch") {
      a.batch = to_int(f, value(), 1, kMaxNum);
    } else if (f == "--device") {
      a.device = value();
      if (a.device != "cpu" && a.device != "cuda")
        throw fastsample::Error("--device: expected cpu|cuda, got '" + a.device + "'");
    } else if (f == "--repeat") {
      a.repeat = to_int(f, value(), 1, kMaxRepeat);
    } else if (f == "--threads") {
      a.threads = to_int(f, value(), 1, kMaxThreads);
    } else if (f.size() > 1 && f[0] == '-') {
      throw fastsample::Error("unknown option '" + f + "' (see --help)");
    } else {
      pos.push_back(f);
    }
  }
  if (pos.size() != 1)
    throw fastsample::Error("expected one ARTIFACT_DIR, got " + std::to_string(pos.size()) +
                            " positional arguments (see --help)");
  a.dir = pos[0];
  if (a.num < 0 && a.noise.empty()) throw fastsample::Error("--num is required (see --help)");
  return a;
}

int run(const Args& a) {
  if (a.threads > 0) at::set_num_threads(static_cast<int>(a.threads));
  fastsample::Sampler sampler(a.dir, c10::Device(a.device));
  const auto& s = sampler.schedule();
  auto noise = a.noise.empty() ? sampler.draw_noise(a.num, a.seed)
                               : sampler.load_noise(a.noise, a.num);
  const int64_t num = noise.num();
  // Default: as few calls as the artifact's batch range allows.
  const int64_t batch = a.batch > 0 ? std::min(a.batch, num)
                                    : std::min(num, sampler.manifest().batch_max);
  std::printf("fastsample-run: %s %s, nfe %lld, %lld samples in batches of %lld on %s "
              "(%d threads)\n",
              s.family.c_str(), s.sampler.c_str(), static_cast<long long>(s.nfe),
              static_cast<long long>(num), static_cast<long long>(batch), a.device.c_str(),
              at::get_num_threads());
  at::Tensor x;
  std::vector<double> ms;
  for (int64_t r = 0; r < a.repeat; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    x = sampler.sample(noise, batch);   // returns on the CPU: the device work is finished
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    std::printf("run %lld: %.3f ms, %.4f ms/sample\n", static_cast<long long>(r + 1), ms.back(),
                ms.back() / static_cast<double>(num));
  }
  // The first run pays one-time costs (page faults, thread pool start): with R > 1 the
  // percentiles are over runs 2..R (nearest rank).
  std::vector<double> timed(a.repeat > 1 ? ms.begin() + 1 : ms.begin(), ms.end());
  std::sort(timed.begin(), timed.end());
  auto pct = [&](double q) {
    const auto rank = static_cast<size_t>(std::ceil(q * static_cast<double>(timed.size())));
    return timed[std::min(timed.size() - 1, rank > 0 ? rank - 1 : 0)];
  };
  std::printf("latency: p50 %.3f ms p99 %.3f ms per run of %lld samples (runs %s), "
              "%.4f ms per sample at p50, nfe %lld\n",
              pct(0.5), pct(0.99), static_cast<long long>(num),
              a.repeat > 1 ? ("2.." + std::to_string(a.repeat)).c_str() : "1",
              pct(0.5) / static_cast<double>(num), static_cast<long long>(s.nfe));
  if (!a.out.empty()) {
    fastsample::write_npy(a.out, sampler.postprocess(x));
    std::printf("wrote %s\n", a.out.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const fastsample::Error& e) {
    // One line, whatever a path or a message carried.
    std::string msg = e.what();
    for (char& c : msg)
      if (c == '\n' || c == '\r') c = ' ';
    std::cerr << "fastsample-run: error: " << msg << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::cerr << "fastsample-run: internal error: " << msg.substr(0, msg.find('\n')) << "\n";
    return 1;
  }
}
