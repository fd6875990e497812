// detail::exp_neg (csrc/cpu/vector_exp.cpp), the swish gate's exp, on the vector path and the
// scalar one, against exp in float64.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "cpu/vector_exp.h"

namespace {

using retention::detail::exp_neg_on;

// glibc documents 1 ulp for its vector and scalar expf on x86-64; the bound is 2 ulp of the
// result (relative 2^-22), and results below FLT_MIN are within one denormal step.
void expect_close(const std::vector<float>& x, const std::vector<float>& e) {
  for (size_t j = 0; j < x.size(); ++j) {
    const double ref = std::exp(-static_cast<double>(x[j]));
    if (std::isnan(x[j])) {
      EXPECT_TRUE(std::isnan(e[j])) << "x " << x[j];
    } else if (ref > std::numeric_limits<float>::max()) {
      EXPECT_EQ(e[j], std::numeric_limits<float>::infinity()) << "x " << x[j];
    } else {
      const double tol = std::max(std::ldexp(std::abs(ref), -22), double(std::numeric_limits<float>::denorm_min()));
      EXPECT_LE(std::abs(e[j] - ref), tol) << "x " << x[j] << " at " << j;
    }
  }
}

class ExpNeg : public ::testing::TestWithParam<bool> {};

TEST_P(ExpNeg, MatchesFloat64AtEveryLengthAndPosition) {
  std::mt19937 g(7);
  std::uniform_real_distribution<float> u(-30.f, 30.f);
  for (int64_t n : {1, 3, 7, 8, 9, 15, 16, 17, 48, 63, 64}) {
    std::vector<float> x(n), e(n, std::nanf(""));  // poisoned
    for (auto& v : x) v = u(g);
    if (!exp_neg_on(GetParam(), x.data(), e.data(), n)) GTEST_SKIP() << "no AVX2 on this CPU";
    expect_close(x, e);
    // A value does not depend on its place in the block (the tail runs the same call).
    for (int64_t j = 0; j < n; ++j) {
      float one;
      exp_neg_on(GetParam(), &x[j], &one, 1);
      EXPECT_EQ(one, e[j]) << "n " << n << " j " << j;
    }
  }
}

TEST_P(ExpNeg, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {0.f, -0.f, 1e-30f, -88.f, -88.8f, -89.f, -200.f, 87.f, 103.f, 104.f,
                          200.f, inf, -inf, std::nanf("")};
  std::vector<float> e(x.size(), -1.f);
  if (!exp_neg_on(GetParam(), x.data(), e.data(), static_cast<int64_t>(x.size()))) {
    GTEST_SKIP() << "no AVX2 on this CPU";
  }
  expect_close(x, e);
  EXPECT_EQ(e[0], 1.f);
  EXPECT_EQ(e[11], 0.f);    // exp(-inf)
  EXPECT_EQ(e[12], inf);    // exp(inf)
}

INSTANTIATE_TEST_SUITE_P(Paths, ExpNeg, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "vector" : "scalar"; });

}  // namespace
