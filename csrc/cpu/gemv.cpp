#include "cpu/gemv.h"

#include <algorithm>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace retention {
namespace detail {
namespace {

// GCC / Clang vector extensions: one source for every instruction set, and the lanes are
// independent partial sums, so no reassociation is needed to vectorise (plain loops over an
// array of partial sums ran at half the rate under -O3).
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
constexpr int kVec = 16;
constexpr int kAcc = 4;  // independent accumulators: enough FMAs in flight to hide their latency
constexpr int kStep = kVec * kAcc;
static_assert(kAcc == 4, "gemv_rows adds the four accumulators by name");

// By reference: a 64-byte vector passed by value would change the ABI between the variants.
inline void load(const float* p, f32x16& v) { std::memcpy(&v, p, sizeof v); }
inline void load(const c10::BFloat16* p, f32x16& v) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 u = __builtin_convertvector(h, u32x16) << 16;
  std::memcpy(&v, &u, sizeof v);
}

// One weight row at a time, one sequential stream (four interleaved rows ran at two thirds of
// the rate).
template <class W>
__attribute__((always_inline)) inline void gemv_rows(const W* w, const float* x, float* y, int64_t begin, int64_t end,
                                                     int64_t K) {
  for (int64_t n = begin; n < end; ++n) {
    const W* row = w + n * K;
    f32x16 acc[kAcc] = {};
    int64_t k = 0;
    for (; k + kStep <= K; k += kStep) {
      for (int a = 0; a < kAcc; ++a) {
        f32x16 wv, xv;
        load(row + k + a * kVec, wv);
        load(x + k + a * kVec, xv);
        acc[a] += wv * xv;
      }
    }
    // The accumulators meet as vectors, then the 16 lanes in four chains: a single chain of 64
    // dependent adds cost as much as streaming a 768-wide row.
    const f32x16 t = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    float s[4] = {};
    for (int j = 0; j < kVec; j += 4)
      for (int i = 0; i < 4; ++i) s[i] += t[j + i];
    float tail = 0.f;
    for (; k < K; ++k) tail += static_cast<float>(row[k]) * x[k];
    y[n] = ((s[0] + s[1]) + (s[2] + s[3])) + tail;
  }
}

// The loop above compiled for AVX-512, AVX2 + FMA and baseline x86-64, chosen once at run time.
// Not target_clones: its ifunc resolver runs while the loader relocates, before a sanitizer's
// runtime is up, and crashes the TSan build.
template <class W>
using RowsFn = void (*)(const W*, const float*, float*, int64_t, int64_t, int64_t);
template <class W>
__attribute__((target("avx512f"))) void gemv_rows_avx512(const W* w, const float* x, float* y, int64_t b, int64_t e,
                                                         int64_t K) {
  gemv_rows(w, x, y, b, e, K);
}
template <class W>
__attribute__((target("avx2,fma"))) void gemv_rows_avx2(const W* w, const float* x, float* y, int64_t b, int64_t e,
                                                        int64_t K) {
  gemv_rows(w, x, y, b, e, K);
}
template <class W>
void gemv_rows_baseline(const W* w, const float* x, float* y, int64_t b, int64_t e, int64_t K) {
  gemv_rows(w, x, y, b, e, K);
}
bool supported(GemvIsa isa) {
  switch (isa) {
    case GemvIsa::kAvx512: return __builtin_cpu_supports("avx512f");
    case GemvIsa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return true;
  }
}
template <class W>
RowsFn<W> rows_for(GemvIsa isa) {
  return isa == GemvIsa::kAvx512 ? gemv_rows_avx512<W> : isa == GemvIsa::kAvx2 ? gemv_rows_avx2<W> : gemv_rows_baseline<W>;
}
template <class W>
RowsFn<W> pick_rows() {
  for (GemvIsa isa : {GemvIsa::kAvx512, GemvIsa::kAvx2})
    if (supported(isa)) return rows_for<W>(isa);
  return gemv_rows_baseline<W>;
}

template <class W>
void gemv_parallel(RowsFn<W> rows, const W* w, const float* x, float* y, int64_t N, int64_t K) {
  // Rows of at least ~64 KiB of weights per task, so that thread start-up stays small.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K * int64_t{sizeof(W)}));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { rows(w, x, y, begin, end, K); });
}

template <class W>
void gemv_picked(const W* w, const float* x, float* y, int64_t N, int64_t K) {
  static const RowsFn<W> rows = pick_rows<W>();
  gemv_parallel(rows, w, x, y, N, K);
}

template <class W>
bool gemv_isa(GemvIsa isa, const W* w, const float* x, float* y, int64_t N, int64_t K) {
  if (!supported(isa)) return false;
  gemv_parallel(rows_for<W>(isa), w, x, y, N, K);
  return true;
}

}  // namespace

void gemv(const float* w, const float* x, float* y, int64_t N, int64_t K) { gemv_picked(w, x, y, N, K); }
void gemv(const c10::BFloat16* w, const float* x, float* y, int64_t N, int64_t K) { gemv_picked(w, x, y, N, K); }
bool gemv_on(GemvIsa isa, const float* w, const float* x, float* y, int64_t N, int64_t K) {
  return gemv_isa(isa, w, x, y, N, K);
}
bool gemv_on(GemvIsa isa, const c10::BFloat16* w, const float* x, float* y, int64_t N, int64_t K) {
  return gemv_isa(isa, w, x, y, N, K);
}

at::Tensor matvec_cpu(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && matvec_dtype(weight),
              "retention::matvec: weight must be a contiguous 2-D float32 or bfloat16 tensor [N, K], got ",
              weight.scalar_type(), " ", weight.sizes(), weight.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(x.dim() == 1 && x.size(0) == weight.size(1) && matvec_dtype(x),
              "retention::matvec: x must be a float32 or bfloat16 vector [K] = [", weight.size(1), "], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.is_cpu() && x.is_cpu(), "retention::matvec: weight and x must be CPU tensors");
  const auto xf = x.to(at::kFloat).contiguous();
  auto y = at::empty({weight.size(0)}, xf.options());
  if (weight.scalar_type() == at::kFloat) {
    gemv(weight.data_ptr<float>(), xf.data_ptr<float>(), y.data_ptr<float>(), weight.size(0), weight.size(1));
  } else {
    gemv(weight.data_ptr<c10::BFloat16>(), xf.data_ptr<float>(), y.data_ptr<float>(), weight.size(0),
         weight.size(1));
  }
  return y.to(x.scalar_type());
}

}  // namespace detail
}  // namespace retention
