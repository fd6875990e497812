// One row times a weight matrix on the CPU, the projections of a decode step at batch 1: the op
// retention::matvec (Python's retention.nn.Linear) and the C++ models' detail::linear. Why not
// the BLAS: docs/cpu-performance.md, "Decode at batch 1".
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

namespace retention {
namespace detail {

// y[n] = sum_k w[n * K + k] x[k] for n in [0, N): w row-major, fp32 or bf16; x, y fp32 (no
// aliasing); products and sums in fp32. Each y[n] is summed in one fixed order whatever the
// thread count (rows are split over at::parallel_for).
void gemv(const float* w, const float* x, float* y, int64_t N, int64_t K);
void gemv(const c10::BFloat16* w, const float* x, float* y, int64_t N, int64_t K);

// The same on one instruction-set variant (gemv picks the widest the CPU has), so that tests reach
// every variant the machine runs; returns false, doing nothing, where the CPU lacks it.
enum class GemvIsa { kBaseline, kAvx2, kAvx512 };
bool gemv_on(GemvIsa isa, const float* w, const float* x, float* y, int64_t N, int64_t K);
bool gemv_on(GemvIsa isa, const c10::BFloat16* w, const float* x, float* y, int64_t N, int64_t K);

// The dtypes matvec_cpu takes, for weight and for x.
inline bool matvec_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

// retention::matvec's CPU kernel: weight [N, K] (fp32 or bf16, contiguous) times x [K] (fp32 or
// bf16) -> [N] in x's dtype, through gemv. No autograd: callers take it only without gradients.
at::Tensor matvec_cpu(const at::Tensor& weight, const at::Tensor& x);

}  // namespace detail
}  // namespace retention
