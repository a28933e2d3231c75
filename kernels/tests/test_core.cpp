// Unit tests of the torch-free core (built and run under AddressSanitizer too): SHA-256 on
// known vectors, the JSON and manifest readers, the .npy header parser, the schedule reader's
// bounds and values. Plain checks: exit 0 = pass.
//
//   test_core                       all unit tests
//   test_core --grammar CASES.txt   kernels/tests/schedule_grammar_cases.txt: every token
//                                   accepted or rejected as the file says (Python runs the same
//                                   file in tests/test_schedule_grammar.py)

#include "expect.h"
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "fastsample/error.h"
#include "fastsample/json.h"
#include "fastsample/manifest.h"
#include "fastsample/npy_header.h"
#include "fastsample/schedule.h"
#include "fastsample/sha256.h"

namespace {

using fastsample_test::failures;

// f() must throw fastsample::Error whose message contains `part`.
void expect_error(const std::function<void()>& f, const std::string& part, int line) {
  try {
    f();
    std::fprintf(stderr, "line %d: no error, expected one with '%s'\n", line, part.c_str());
    ++failures;
  } catch (const fastsample::Error& e) {
    if (std::string(e.what()).find(part) == std::string::npos) {
      std::fprintf(stderr, "line %d: error '%s' lacks '%s'\n", line, e.what(), part.c_str());
      ++failures;
    }
  }
}
#define EXPECT_ERROR(expr, part) expect_error([&] { expr; }, part, __LINE__)

void test_sha256() {
  using fastsample::sha256_hex;
  // FIPS 180-4 / NIST example vectors
  EXPECT(sha256_hex("") ==
         "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT(sha256_hex("abc") ==
         "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT(sha256_hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmno"
                    "pqklmnopqrlmnopqrsmnopqrstnopqrstu") ==
         "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
  EXPECT(sha256_hex(std::string(1000000, 'a')) ==
         "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // streaming in odd pieces equals one piece; 55/56/63/64-byte edges of the padding
  for (size_t n : {55u, 56u, 63u, 64u, 65u, 127u, 1000u}) {
    std::string msg(n, '\0');
    for (size_t i = 0; i < n; ++i) msg[i] = static_cast<char>(i * 131 + 7);
    fastsample::Sha256 h;
    for (size_t i = 0; i < n; i += 3) h.update(msg.data() + i, std::min<size_t>(3, n - i));
    EXPECT(h.hex() == sha256_hex(msg));
  }
}

void test_json() {
  using fastsample::Json;
  const auto j = Json::parse(
      R"({"a": [1, -2.5e3, true, false, null], "s": "x\"\\\/\n\u00e9\ud83d\ude00", "o": {}})",
      "j");
  EXPECT(j.type == Json::Type::Object && j.get("a")->array.size() == 5);
  EXPECT(j.get("a")->array[1].number == -2500.0 && j.get("a")->array[0].is_integer());
  EXPECT(j.get("s")->string == "x\"\\/\n\xc3\xa9\xf0\x9f\x98\x80");
  EXPECT(!j.get("missing"));
  for (const char* bad : {"", "{", "[1,]", "{\"a\":1,}", "{\"a\" 1}", "01", "1.", "-", "1e",
                          "\"\\x\"", "\"\\ud800\"", "\"a", "nul", "[1] x", "{\"a\":1,\"a\":2}",
                          "NaN", "Infinity", "1e999", "\"\x01\"", "\"\\u12\""})
    EXPECT_ERROR(Json::parse(bad, "j"), "j: invalid JSON");
  EXPECT_ERROR(Json::parse(std::string(100, '[') + std::string(100, ']'), "j"), "deeper than 64");
  EXPECT_ERROR(Json::parse(std::string(100000, '['), "j"), "deeper than 64");
}

const char* kManifest = R"({"manifest_version": 1, "family": "ddgan", "what": "generator",
 "format": "aoti", "dtype": "fp32", "device": "cpu",
 "inputs": [{"name": "x_t", "shape": ["batch", 1, 8, 8], "dtype": "float32"},
            {"name": "z", "shape": ["batch", 32], "dtype": "float32"},
            {"name": "t", "shape": ["batch"], "dtype": "float32"}],
 "outputs": [{"name": "x0", "shape": ["batch", 1, 8, 8], "dtype": "float32"}],
 "batch": {"min": 1, "max": 256, "dynamic": true},
 "files": {"model.pt2": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
           "schedule.txt": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}})";

const std::string kDdgan =
    "fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe 2\ndata_shape 1 8 8\n"
    "z_dim 32\npostprocess quantize17\ncolumns i c0 c1 sigma\nrow 2 0.5 0.25 0.1\nrow 1 1 0 0\n";

std::string replace(std::string s, const std::string& from, const std::string& to) {
  const auto p = s.find(from);
  if (p == std::string::npos) {
    std::fprintf(stderr, "test bug: '%s' not found\n", from.c_str());
    ++failures;
    return s;
  }
  return s.replace(p, from.size(), to);
}

void test_manifest(const std::string& tmp) {
  using fastsample::Manifest;
  using fastsample::Schedule;
  const auto m = Manifest::parse(kManifest, "m.json");
  EXPECT(m.family == "ddgan" && m.what == "generator" && m.batch_min == 1 && m.batch_max == 256);
  EXPECT(m.inputs.size() == 3 && m.inputs[1].shape == (std::vector<int64_t>{-1, 32}));
  EXPECT(m.input_shapes(5)[0] == (std::vector<int64_t>{5, 1, 8, 8}));
  EXPECT(m.files.size() == 2);
  const auto s = Schedule::parse(kDdgan, "s.txt");
  m.check_schedule(s);   // consistent: no throw
  // mismatches with the schedule: z_dim, data_shape, family, what, dtype, format
  auto sched = [&](const std::string& from, const std::string& to) {
    return Schedule::parse(replace(kDdgan, from, to), "s.txt");
  };
  EXPECT_ERROR(m.check_schedule(sched("z_dim 32", "z_dim 16")),
               "inputs 1 is 'z' (batch, 32), schedule.txt needs 'z' (batch, 16)");
  EXPECT_ERROR(m.check_schedule(sched("z_dim 32", "z_dim 1")), "needs 'z' (batch, 1)");
  EXPECT_ERROR(m.check_schedule(sched("data_shape 1 8 8", "data_shape 1 4 4")),
               "inputs 0 is 'x_t' (batch, 1, 8, 8)");
  auto man = [&](const std::string& from, const std::string& to) {
    return Manifest::parse(replace(kManifest, from, to), "m.json");
  };
  EXPECT_ERROR(man("\"family\": \"ddgan\"", "\"family\": \"cld\"").check_schedule(s),
               "family 'cld' but schedule.txt says 'ddgan'");
  EXPECT_ERROR(man("\"generator\"", "\"decoder\"").check_schedule(s), "what 'decoder'");
  EXPECT_ERROR(man("\"generator\"", "\"sampler\"").check_schedule(s),
               "inputs 0 is 'x_t' (batch, 1, 8, 8), schedule.txt needs 'x_T'");
  EXPECT_ERROR(man("\"fp32\"", "\"fp16\"").check_schedule(s), "dtype 'fp16'");
  EXPECT_ERROR(man("\"aoti\"", "\"onnx\"").check_schedule(s), "format 'onnx'");
  EXPECT_ERROR(man("[\"batch\", 32], \"dtype\": \"float32\"", "[\"batch\", 32], \"dtype\": \"float16\"")
                   .check_schedule(s), "'z' is float16");
  // a static export names its batch where the dynamic one says "batch"
  {
    std::string st = kManifest;
    for (int k = 0; k < 3; ++k) st = replace(st, "\"batch\", ", "4, ");
    st = replace(st, "[\"batch\"]", "[4]");
    st = replace(st, "\"min\": 1, \"max\": 256", "\"min\": 4, \"max\": 4");
    Manifest::parse(st, "m.json").check_schedule(s);
  }
  // malformed manifests
  EXPECT_ERROR(man("\"manifest_version\": 1", "\"manifest_version\": 2"), "manifest_version 2");
  EXPECT_ERROR(man("\"max\": 256", "\"max\": 0"), "batch range 1..0");
  EXPECT_ERROR(man("\"max\": 256", "\"max\": 1e12"), "batch range 1..1000000000000");
  EXPECT_ERROR(man("\"max\": 256", "\"max\": 2.5"), "'max' must be an integer");
  EXPECT_ERROR(man("\"model.pt2\"", "\"../model.pt2\""), "not a relative path");
  EXPECT_ERROR(man("\"model.pt2\"", "\"/etc/passwd\""), "not a relative path");
  EXPECT_ERROR(man("\"e3b0c442", "\"E3B0C442"), "has no sha256");
  EXPECT_ERROR(man("\"device\": \"cpu\",", ""), "no 'device' key");
  EXPECT_ERROR(man("[\"batch\", 32]", "[\"batch\", -32]"), "'shape' entries must be");
  EXPECT_ERROR(man("[\"batch\", 32]", "[\"batch\", 1e300]"), "'shape' entries must be");
  EXPECT_ERROR(Manifest::parse("[]", "m.json"), "not a JSON object");
  EXPECT_ERROR(Manifest::parse("{}", "m.json"), "no 'manifest_version' key");
  // verify_files: hashes of files on disk
  namespace fs = std::filesystem;
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  std::ofstream(tmp + "/model.pt2", std::ios::binary) << "";
  std::ofstream(tmp + "/schedule.txt", std::ios::binary) << "abc";
  m.verify_files(tmp, {"model.pt2", "schedule.txt"});
  EXPECT_ERROR(m.verify_files(tmp, {"model.pt2", "other.bin"}), "no sha256 for other.bin");
  std::ofstream(tmp + "/schedule.txt", std::ios::binary) << "abd";
  EXPECT_ERROR(m.verify_files(tmp, {"model.pt2"}), "schedule.txt: sha256 does not match");
  fs::remove(tmp + "/schedule.txt");
  EXPECT_ERROR(m.verify_files(tmp, {"model.pt2"}), "schedule.txt: listed in manifest.json but");
  fs::remove_all(tmp);
}

void test_npy_header() {
  using fastsample::parse_npy_header;
  auto h = parse_npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 1, 8, 8), }",
                            "a.npy");
  EXPECT((h.shape == std::vector<int64_t>{4, 1, 8, 8}) && h.numel == 256);
  h = parse_npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }", "a.npy");
  EXPECT(h.shape == std::vector<int64_t>{5} && h.numel == 5);
  h = parse_npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", "a.npy");
  EXPECT(h.shape.empty() && h.numel == 1);
  h = parse_npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }", "a.npy");
  EXPECT(h.numel == 0);
  const std::string pre = "{'descr': '<f4', 'fortran_order': False, 'shape': ";
  EXPECT_ERROR(parse_npy_header(pre + "(-4, 1, 8, 8), }", "a.npy"), "a.npy: negative dimension");
  EXPECT_ERROR(parse_npy_header(pre + "(4, -1), }", "a.npy"), "negative dimension");
  EXPECT_ERROR(parse_npy_header(pre + "(99999999999999999999, 1), }", "a.npy"),
               "dimension too large");
  EXPECT_ERROR(parse_npy_header(pre + "(4294967296, 2), }", "a.npy"), "more than");
  EXPECT_ERROR(parse_npy_header(pre + "(65536, 65536, 65536), }", "a.npy"), "more than");
  EXPECT_ERROR(parse_npy_header(pre + "(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1), }",
                                "a.npy"), "more than 16 dimensions");
  EXPECT_ERROR(parse_npy_header(pre + "(4 1), }", "a.npy"), "bad shape");
  EXPECT_ERROR(parse_npy_header(pre + "(4, x), }", "a.npy"), "bad shape");
  EXPECT_ERROR(parse_npy_header(pre + "(4,", "a.npy"), "bad shape");
  EXPECT_ERROR(parse_npy_header(pre + "4, }", "a.npy"), "bad shape");
  EXPECT_ERROR(parse_npy_header("{'descr': '<f8', 'fortran_order': False, 'shape': (4,), }",
                                "a.npy"), "float32");
  EXPECT_ERROR(parse_npy_header("{'descr': '<f4', 'fortran_order': True, 'shape': (4,), }",
                                "a.npy"), "C order");
  EXPECT_ERROR(parse_npy_header("{'descr': '<f4', 'fortran_order': False}", "a.npy"), "no shape");
  EXPECT_ERROR(parse_npy_header("", "a.npy"), "float32");
}

void test_schedule_bounds() {
  using fastsample::Schedule;
  auto sched = [&](const std::string& from, const std::string& to) {
    return Schedule::parse(replace(kDdgan, from, to), "s.txt");
  };
  EXPECT_ERROR(sched("row 2 0.5 0.25 0.1", "row 2 1e39 0.25 0.1"), "s.txt:9: bad 'row' line");
  EXPECT_ERROR(sched("row 2 0.5 0.25 0.1", "row 2 1e39 0.25 0.1"), "overflows float32");
  EXPECT_ERROR(sched("row 2 0.5 0.25 0.1", "row 2 0.5 0.25 -1e39"), "overflows float32");
  EXPECT_ERROR(sched("row 2 0.5 0.25 0.1", "row 2 0x1p-1 0.25 0.1"), "invalid number '0x1p-1'");
  EXPECT_ERROR(sched("row 2 0.5 0.25 0.1", "row 2 0.5 inf 0.1"), "invalid number 'inf'");
  EXPECT_ERROR(sched("row 2 0.5 0.25 0.1", "row 2 nan 0.25 0.1"), "invalid number 'nan'");
  // the ddgan step index: an integer in 1..T
  EXPECT_ERROR(sched("row 2 0.5", "row 3 0.5"), "s.txt:9: ddgan step index i = 3 is not an "
                                                "integer in 1..2");
  EXPECT_ERROR(sched("row 1 1 0 0", "row 0 1 0 0"), "s.txt:10: ddgan step index i = 0");
  EXPECT_ERROR(sched("row 1 1 0 0", "row -1 1 0 0"), "step index i = -1");
  EXPECT_ERROR(sched("row 1 1 0 0", "row 1.5 1 0 0"), "step index i = 1.5");
  EXPECT_ERROR(sched("row 2 0.5", "row 1e30 0.5"), "step index");
  // header bounds
  EXPECT_ERROR(sched("z_dim 32", "z_dim 65537"), "z_dim 65537 not in 1..65536");
  EXPECT_ERROR(sched("z_dim 32", "z_dim 0"), "z_dim 0 not in 1..65536");
  EXPECT_ERROR(sched("z_dim 32", "z_dim 99999999999999999999"), "invalid integer");
  EXPECT_ERROR(sched("nfe 2", "nfe 100001"), "nfe 100001 not in 1..100000");
  EXPECT_ERROR(sched("nfe 2", "nfe -2"), "nfe -2 not in");
  EXPECT_ERROR(sched("data_shape 1 8 8", "data_shape 1 8 65537"), "dimension 65537 > 65536");
  EXPECT_ERROR(sched("data_shape 1 8 8", "data_shape 4096 4096 2"),
               "more than 16777216 elements per sample");
  EXPECT_ERROR(sched("data_shape 1 8 8", "data_shape 65536 65536 65536 65536"),
               "more than 16777216 elements");
  EXPECT_ERROR(sched("data_shape 1 8 8", "data_shape 1 1 1 1 1 1 1 1 1"),
               "9 dimensions, at most 8");
  EXPECT_ERROR(sched("data_shape 1 8 8", "data_shape 1 -8 8"), "dimension -8 < 1");
  EXPECT_ERROR(sched("z_dim 32", "z_dim 32\nlatent_shape 4 0 4"), "bad 'latent_shape' line");
  EXPECT_ERROR(sched("z_dim 32", "z_dim 32\nlatent_shape 65536 65536"), "elements per sample");
  // row cap: kMaxRows rows parse, one more does not
  {
    std::string head = "fastsample-schedule 1\nfamily cld\nsampler em\nnfe 1\ndata_shape 2\n"
                       "prior_v_scale 1\npostprocess none\ncolumns net t k_v k_alpha T_xx T_xv "
                       "T_vx T_vv K11 K21 K22 D_xv\nrow 1 0 1 0 1 0 0 1 0 0 0 0\n";
    std::string rows;
    for (int64_t k = 1; k < fastsample::kMaxRows; ++k) rows += "row 0 0 1 0 1 0 0 1 0 0 0 0\n";
    const auto s = Schedule::parse(head + rows, "s.txt");
    EXPECT(static_cast<int64_t>(s.rows.size()) == fastsample::kMaxRows);
    EXPECT_ERROR(Schedule::parse(head + rows + "row 0 0 1 0 1 0 0 1 0 0 0 0\n", "s.txt"),
                 "s.txt:100009: bad 'row' line (more than 100000 rows)");
  }
  EXPECT_ERROR(Schedule::parse(replace(kDdgan, "family ddgan", "family cld") + "", "s.txt"),
               "cld columns must be");
}

int run_grammar(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    return 1;
  }
  int n = 0, cases = 0, accepted = 0;
  for (std::string line; std::getline(f, line);) {
    ++n;
    std::istringstream ls(line);
    std::string verdict, tok, extra;
    if (!(ls >> verdict) || verdict[0] == '#') continue;
    if (!(ls >> tok) || (ls >> extra) || (verdict != "accept" && verdict != "reject")) {
      std::fprintf(stderr, "%s:%d: bad case line\n", path.c_str(), n);
      ++failures;
      continue;
    }
    ++cases;
    double v = 0.0;
    std::string why;
    const bool ok = fastsample::parse_schedule_value(tok, &v, &why);
    accepted += ok;
    if (ok != (verdict == "accept")) {
      std::fprintf(stderr, "%s:%d: '%s' %s, the cases file says %s\n", path.c_str(), n,
                   tok.c_str(), ok ? "accepted" : ("rejected: " + why).c_str(), verdict.c_str());
      ++failures;
    }
    // the same through the whole reader (a row value)
    bool parsed = true;
    try {
      fastsample::Schedule::parse(replace(kDdgan, "row 2 0.5 0.25", "row 2 " + tok + " 0.25"),
                                  "s.txt");
    } catch (const fastsample::Error&) {
      parsed = false;
    }
    if (parsed != ok) {
      std::fprintf(stderr, "%s:%d: Schedule::parse disagrees with parse_schedule_value on '%s'\n",
                   path.c_str(), n, tok.c_str());
      ++failures;
    }
  }
  std::printf("%d grammar cases (%d accepted), %d failure(s)\n", cases, accepted, failures);
  return failures || cases < 20 ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--grammar") return run_grammar(argv[2]);
  test_sha256();
  test_json();
  test_manifest(argc > 1 ? argv[1] : "test_core_tmp");
  test_npy_header();
  test_schedule_bounds();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("sha256, json, manifest, npy header and schedule bound checks passed\n");
  return 0;
}
