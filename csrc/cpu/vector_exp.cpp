#include "cpu/vector_exp.h"

#include <algorithm>

#include <immintrin.h>

// glibc's libmvec, x86-64 vector ABI "d" (AVX2: 8 floats in a ymm register); an IFUNC that
// resolves to the best 8-lane expf for the CPU.
extern "C" __m256 _ZGVdN8v_expf(__m256);

namespace retention {
namespace detail {
namespace {

__attribute__((target("avx2,fma"))) void exp_neg_avx2(const float* x, float* e, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(e + j, _ZGVdN8v_expf(_mm256_xor_ps(_mm256_loadu_ps(x + j), sign)));
  }
  if (j < n) {
    float in[8] = {}, out[8];
    std::copy(x + j, x + n, in);
    _mm256_storeu_ps(out, _ZGVdN8v_expf(_mm256_xor_ps(_mm256_loadu_ps(in), sign)));
    std::copy(out, out + (n - j), e + j);
  }
}

void exp_neg_scalar(const float* x, float* e, int64_t n) {
  for (int64_t j = 0; j < n; ++j) e[j] = std::exp(-x[j]);
}

bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

}  // namespace

void exp_neg(const float* x, float* e, int64_t n) {
  static const bool vector = has_avx2();
  vector ? exp_neg_avx2(x, e, n) : exp_neg_scalar(x, e, n);
}

bool exp_neg_on(bool vector, const float* x, float* e, int64_t n) {
  if (!vector) {
    exp_neg_scalar(x, e, n);
    return true;
  }
  if (!has_avx2()) return false;
  exp_neg_avx2(x, e, n);
  return true;
}

}  // namespace detail
}  // namespace retention
