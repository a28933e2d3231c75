// Unit tests without a model: the step functions against closed forms (float and double),
// the schedule reader's errors, the .npy round trip. Plain asserts: exit 0 = pass.

#include "expect.h"
#include "test_values.h"
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "fastsample/error.h"
#include "fastsample/npy.h"
#include "fastsample/schedule.h"
#include "fastsample/steps.h"

namespace {

using fastsample_test::failures;
using fastsample_test::values;

void test_affine1() {
  const int n = 37;
  auto x = values(n, 1), e = values(n, 2), z = values(n, 3);
  const double c_x = 0.11185234299498835, c_e = 0.057821542117799218, sigma = 0.99199834416104182;
  const auto c = fastsample::Affine1Coeffs::from_double(c_x, c_e, sigma);
  auto got = x;
  fastsample::affine1(n, got.data(), e.data(), z.data(), c);
  for (int i = 0; i < n; ++i) {
    // bit-exact vs the float32 expression in the Python order
    const float want32 = (c.c_x * x[i] + c.c_e * e[i]) + c.sigma * z[i];
    EXPECT(got[i] == want32);
    // and within float rounding of the exact (double) value
    const double exact = c_x * x[i] + c_e * e[i] + sigma * z[i];
    EXPECT(std::fabs(got[i] - exact) < 1e-6);
  }
  auto nonoise = x;
  fastsample::affine1(n, nonoise.data(), e.data(), nullptr,
                      fastsample::Affine1Coeffs::from_double(1.0, 0.0, 0.0));
  EXPECT(nonoise == x);   // identity map
}

void test_affine2() {
  const int n = 29;
  auto x = values(n, 4), v = values(n, 5), a = values(n, 6), n0 = values(n, 7), n1 = values(n, 8);
  fastsample::Affine2Coeffs c;
  const double kv = 0.97, ka = -0.031, Txx = 0.93, Txv = 0.12, Tvx = -0.21, Tvv = 0.81,
               K11 = 0.05, K21 = 0.02, K22 = 0.3, Dxv = 0.01;
  c.k_v = kv; c.k_alpha = ka; c.T_xx = Txx; c.T_xv = Txv; c.T_vx = Tvx; c.T_vv = Tvv;
  c.K11 = K11; c.K21 = K21; c.K22 = K22; c.D_xv = Dxv;
  auto xg = x, vg = v;
  fastsample::affine2(n, xg.data(), vg.data(), a.data(), n0.data(), n1.data(), c);
  for (int i = 0; i < n; ++i) {
    const double vs = kv * v[i] + ka * a[i];
    const double xe = Txx * x[i] + Txv * vs + Dxv * v[i] + K11 * n0[i];
    const double ve = Tvx * x[i] + Tvv * vs + K21 * n0[i] + K22 * n1[i];
    EXPECT(std::fabs(xg[i] - xe) < 1e-6);
    EXPECT(std::fabs(vg[i] - ve) < 1e-6);
    const float vs32 = c.k_v * v[i] + c.k_alpha * a[i];
    EXPECT(xg[i] == ((c.T_xx * x[i] + c.T_xv * vs32) + c.D_xv * v[i]) + c.K11 * n0[i]);
    EXPECT(vg[i] == ((c.T_vx * x[i] + c.T_vv * vs32) + c.K21 * n0[i]) + c.K22 * n1[i]);
  }
  // A rotation by theta with no score and no noise: (x, v) -> R (x, v), twice -> R(2 theta).
  const double th = 0.3;
  fastsample::Affine2Coeffs r;
  r.T_xx = std::cos(th); r.T_xv = -std::sin(th); r.T_vx = std::sin(th); r.T_vv = std::cos(th);
  float px = 1.0f, pv = 0.0f;
  fastsample::affine2(1, &px, &pv, nullptr, nullptr, nullptr, r);
  fastsample::affine2(1, &px, &pv, nullptr, nullptr, nullptr, r);
  EXPECT(std::fabs(px - std::cos(2 * th)) < 1e-6 && std::fabs(pv - std::sin(2 * th)) < 1e-6);
}

void expect_error(const std::string& text, const std::string& part) {
  try {
    fastsample::Schedule::parse(text, "s.txt");
    std::fprintf(stderr, "no error for a schedule expected to fail with '%s'\n", part.c_str());
    ++failures;
  } catch (const fastsample::Error& e) {
    if (std::string(e.what()).find(part) == std::string::npos) {
      std::fprintf(stderr, "error '%s' lacks '%s'\n", e.what(), part.c_str());
      ++failures;
    }
  }
}

void test_schedule() {
  const std::string head =
      "fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe 2\ndata_shape 1 2 2\n"
      "z_dim 3\npostprocess none\ncolumns i c0 c1 sigma\n";
  auto s = fastsample::Schedule::parse(head + "# comment\n\nrow 2 0.5 0.25 0.1\nrow 1 1 0 0\n",
                                       "s.txt");
  EXPECT(s.family == "ddgan" && s.nfe == 2 && s.z_dim == 3 && s.sample_numel() == 4);
  EXPECT((s.noise_draws() == std::vector<int>{1, 0}) && s.total_draws() == 1);
  EXPECT(s.at(0, "c1") == 0.25);
  expect_error("fastsample-schedule 2\n", "format 1");
  expect_error(head + "row 2 0.5 0.25\n", "s.txt:9: bad 'row' line");
  expect_error(head + "row 2 0.5 0.25 nan\n", "invalid number 'nan'");
  expect_error(head + "row 2 0.5 0.25 x\n", "invalid number 'x'");
  expect_error("fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe x\n",
               "s.txt:4: bad 'nfe' line");
  expect_error(head + "row 2 0.5 0.25 0.1\n", "nfe 2 but the rows call the net 1 times");
  expect_error(head, "no rows");
  expect_error("fastsample-schedule 1\nfamily lsgm\n", "unknown family 'lsgm'");
  expect_error("fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe 1\ndata_shape 2\n"
               "z_dim 1\ncolumns i c0 c1 sigma\nrow 1 1 0 0\n", "'postprocess' line is missing");
  expect_error("fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe 1\ndata_shape 2\n"
               "z_dim 1\npostprocess none\ncolumns i c0 c1\nrow 1 1 0\n", "columns must be");
  expect_error("fastsample-schedule 1\nfamily cld\nsampler sscs\nnfe 1\ndata_shape 2\n"
               "postprocess none\ncolumns net t k_v k_alpha T_xx T_xv T_vx T_vv K11 K21 K22 D_xv\n"
               "row 1 0 1 0 1 0 0 1 0 0 0 0\n", "'prior_v_scale' line is missing");
}

void test_npy(const std::string& tmp) {
  auto t = at::arange(24, at::kFloat).reshape({2, 3, 4}) / 7;
  fastsample::write_npy(tmp, t);
  auto back = fastsample::read_npy(tmp);
  EXPECT(back.sizes() == t.sizes() && at::equal(back, t));
  auto one = at::full({5}, 2.5f);
  fastsample::write_npy(tmp, one);
  EXPECT(at::equal(fastsample::read_npy(tmp), one));
  bool threw = false;
  try {
    fastsample::read_npy(tmp + ".missing");
  } catch (const fastsample::Error&) {
    threw = true;
  }
  EXPECT(threw);
  std::filesystem::remove(tmp);
}

}  // namespace

int main(int argc, char** argv) {
  test_affine1();
  test_affine2();
  test_schedule();
  test_npy(argc > 1 ? argv[1] : "test_steps_tmp.npy");
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("steps, schedule and npy checks passed\n");
  return 0;
}
