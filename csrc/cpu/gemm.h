// Row-major GEMM on raw pointers through the BLAS that torch itself calls.
//
// The chunk kernels run about ten small GEMMs per chunk (64 rows x dk x dv), so a tensor and a
// dispatcher round trip per call would cost a tenth of the FLOPs at dk = dv = 128. Both torch
// builds we support export the Fortran interface: Debian's libtorch links OpenBLAS's, PyPI's
// carries MKL's. The references are weak so that a torch without them fails with a clear error
// instead of refusing to load.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <c10/util/Exception.h>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace retention {

inline int blas_int(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(),
              "retention (CPU): a matrix dimension of ", v, " exceeds the BLAS interface's int");
  return static_cast<int>(v);
}

// C[m, n] = alpha * op(A) op(B) + beta * C, all row-major with leading dimensions lda, ldb, ldc;
// op(X) = X^T when the flag is set (A is then stored [k, m], B [n, k]). beta = 0 ignores C's
// contents (NaN included).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int M = blas_int(n), N = blas_int(m), K = blas_int(k);
  const int LA = blas_int(std::max<int64_t>(1, ldb)), LB = blas_int(std::max<int64_t>(1, lda));
  const int LC = blas_int(std::max<int64_t>(1, ldc));
  if constexpr (std::is_same_v<T, float>) {
    TORCH_CHECK(sgemm_ != nullptr, "retention (CPU): this torch build exports no BLAS sgemm_");
    sgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
  } else {
    static_assert(std::is_same_v<T, double>, "gemm: float or double");
    TORCH_CHECK(dgemm_ != nullptr, "retention (CPU): this torch build exports no BLAS dgemm_");
    dgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
  }
}

}  // namespace retention
