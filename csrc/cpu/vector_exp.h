// exp(-x) over a block of values, for the swish gate of the fused layer's epilogue: the scalar
// expf cost more than the rest of the epilogue (docs/cpu-performance.md, "The gate's exp").
#pragma once

#include <cmath>
#include <cstdint>

namespace retention {
namespace detail {

// e[j] = exp(-x[j]) for j in [0, n) (no aliasing). fp32 runs glibc's vector expf (libmvec, 8
// lanes, which picks its own implementation for the CPU) where the CPU has AVX2, every value
// through the same vector call, the tail too: a value does not depend on where it sits in the
// block, nor on the thread count. Within 1 ulp of exp (glibc's documented bound), so the bits
// may differ between CPUs, as the BLAS's do.
void exp_neg(const float* x, float* e, int64_t n);
inline void exp_neg(const double* x, double* e, int64_t n) {
  for (int64_t j = 0; j < n; ++j) e[j] = std::exp(-x[j]);
}

// The same on the vector path (false, doing nothing, where the CPU lacks AVX2) or on the scalar
// expf, so that tests reach both.
bool exp_neg_on(bool vector, const float* x, float* e, int64_t n);

}  // namespace detail
}  // namespace retention
