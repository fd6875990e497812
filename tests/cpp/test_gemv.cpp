// detail::gemv (csrc/cpu/gemv.cpp), the one-row projection of the C++ models' decode step,
// against a float64 reference of the same (widened) weights.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/gemv.h"

namespace {

using retention::detail::gemv;

// Any summation order of K fp32 products is within K u sum |w x| of the exact sum (u = 2^-24,
// plus the product's own rounding), so that is the bound, whatever the lanes and tails do.
template <class W, class Gemv>
void check(int64_t N, int64_t K, unsigned seed, Gemv&& run) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  std::vector<W> w(N * K);
  std::vector<float> x(K);
  for (auto& v : w) v = W(nd(g));
  for (auto& v : x) v = nd(g);
  std::vector<float> y(N, std::nanf(""));  // poisoned
  run(w.data(), x.data(), y.data(), N, K);
  for (int64_t n = 0; n < N; ++n) {
    double ref = 0, mag = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double p = static_cast<double>(static_cast<float>(w[n * K + k])) * x[k];
      ref += p;
      mag += std::abs(p);
    }
    const double bound = (K + 1) * std::ldexp(1.0, -24) * mag + 1e-30;
    ASSERT_LE(std::abs(y[n] - ref), bound) << "N " << N << " K " << K << " row " << n;
  }
}

// K around the 64 lanes (tails of 0, 1 and 63), a RetNet width, a single element; N = 1 and odd.
template <class Gemv>
void check_shapes(Gemv&& run) {
  for (int64_t K : {1, 5, 63, 64, 65, 127, 129, 1000, 1536}) {
    for (int64_t N : {1, 7, 130}) {
      check<float>(N, K, static_cast<unsigned>(N * 7919 + K), run);
      check<c10::BFloat16>(N, K, static_cast<unsigned>(N * 104729 + K), run);
    }
  }
}

TEST(Gemv, MatchesFloat64Reference) {
  check_shapes([](const auto* w, const float* x, float* y, int64_t N, int64_t K) { gemv(w, x, y, N, K); });
}

// Each instruction-set variant this CPU runs (the widest is what gemv picks; the others run on
// other machines).
TEST(Gemv, EveryVariantMatchesFloat64Reference) {
  using retention::detail::GemvIsa;
  int ran = 0;
  for (GemvIsa isa : {GemvIsa::kBaseline, GemvIsa::kAvx2, GemvIsa::kAvx512}) {
    float probe_w = 1.f, probe_x = 1.f, probe_y = 0.f;
    if (!retention::detail::gemv_on(isa, &probe_w, &probe_x, &probe_y, 1, 1)) continue;
    ++ran;
    check_shapes([isa](const auto* w, const float* x, float* y, int64_t N, int64_t K) {
      ASSERT_TRUE(retention::detail::gemv_on(isa, w, x, y, N, K));
    });
  }
  EXPECT_GE(ran, 1);  // the baseline runs everywhere
}

TEST(Gemv, EmptyShapes) {
  std::vector<float> w(3), x(3), y(3, 7.f);
  gemv(w.data(), x.data(), y.data(), 0, 3);  // no rows: nothing written
  EXPECT_EQ(y[0], 7.f);
  gemv(w.data(), x.data(), y.data(), 3, 0);  // no columns: zeros
  for (float v : y) EXPECT_EQ(v, 0.f);
}

// Rows are split over threads, never a row's sum: the result is bit-identical at any thread count.
TEST(Gemv, SameBitsAtAnyThreadCount) {
  const int64_t N = 1031, K = 777;
  std::mt19937 g(5);
  std::normal_distribution<float> nd;
  std::vector<float> w(N * K), x(K), y1(N), y2(N);
  for (auto& v : w) v = nd(g);
  for (auto& v : x) v = nd(g);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  gemv(w.data(), x.data(), y1.data(), N, K);
  at::set_num_threads(std::max(2, threads));
  gemv(w.data(), x.data(), y2.data(), N, K);
  at::set_num_threads(threads);
  EXPECT_EQ(std::memcmp(y1.data(), y2.data(), N * sizeof(float)), 0);
}

}  // namespace
