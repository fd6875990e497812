// tile_mma.h - one warp-level 16x16x16 matrix-multiply interface, three backends.
//
//   Mma::FragA / FragB / FragC     register fragments of one 16x16 tile (C is fp32)
//   Mma::load_a(FragA&, SmemTile)  fill a fragment from a 16x16 shared-memory window
//   Mma::load_b(FragB&, SmemTile)
//   Mma::mma(FragC&, FragA, FragB) C += A * B
//   Mma::Layout::c(lane, i)        which (row, col) of C is element i of this lane
//
// Backends (selected by MmaFor<T>):
//   NVIDIA, f16/bf16  -> mma.sync m16n8k16 (two per atom), fp32 accumulate   [sm_80+]
//   NVIDIA, fp32      -> SIMT FMAs in the sm80 accumulator layout (tensor cores would mean
//                        silent TF32; fp32 inputs are the reference-precision path)
//   AMD CDNA, f16     -> v_mfma_f32_16x16x16f16
//   AMD CDNA, bf16    -> v_mfma_f32_16x16x16bf16_1k
//   AMD CDNA, fp32    -> 4 x v_mfma_f32_16x16x4f32 (full fp32 on the matrix cores)
//
// Operands are always read from shared memory through SmemTile, a (pointer, row stride,
// column stride) view, so a transposed operand is just a view with swapped strides; the kernels
// never materialise transposes.  Which lane reads which element is defined once, in
// fragment_layout.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "fragment_layout.h"
#include "gpu_compat.h"
#include "numeric.h"

namespace retention::kernels {

// Strided 2-D view of shared memory: element (r, c) lives at p[r * rs + c * cs].
template <class T>
struct SmemTile {
  T* p;
  int rs;
  int cs;
  RT_DEVICE T& operator()(int r, int c) const { return p[r * rs + c * cs]; }
  RT_DEVICE SmemTile block(int r0, int c0) const { return {p + r0 * rs + c0 * cs, rs, cs}; }
  RT_DEVICE SmemTile t() const { return {p, cs, rs}; }
};

template <class T>
RT_DEVICE SmemTile<T> row_major(T* p, int ld) {
  return {p, ld, 1};
}

namespace mma {

#if RETENTION_CUDA

RT_DEVICE std::uint32_t pack2(std::uint16_t lo, std::uint16_t hi) {
  return std::uint32_t(lo) | (std::uint32_t(hi) << 16);
}

template <class T>
struct Sm80 {
  static_assert(sizeof(T) == 2, "mma.sync path is for 16-bit inputs");
  using Layout = frag::Sm80;
  struct FragA {
    std::uint32_t r[4];
  };
  struct FragB {
    std::uint32_t r[4];
  };
  struct FragC {
    float x[8];
  };

  // Two 16-bit elements per 32-bit register, lower index in the low half.
  template <bool kA>
  RT_DEVICE static void load(std::uint32_t (&r)[4], SmemTile<T> t) {
    const int lane = gpu::lane_id();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const frag::Coord lo = kA ? Layout::a(lane, 2 * i) : Layout::b(lane, 2 * i);
      const frag::Coord hi = kA ? Layout::a(lane, 2 * i + 1) : Layout::b(lane, 2 * i + 1);
      r[i] = pack2(t(lo.row, lo.col).bits, t(hi.row, hi.col).bits);
    }
  }
  RT_DEVICE static void load_a(FragA& f, SmemTile<T> a) { load<true>(f.r, a); }
  RT_DEVICE static void load_b(FragB& f, SmemTile<T> b) { load<false>(f.r, b); }
  RT_DEVICE static void mma(FragC& c, const FragA& a, const FragB& b);
};

#if defined(RETENTION_HOST_EMU)
// The emulated instruction: a warp collective over the lanes' registers (matrix_isa.h).
#define RETENTION_MMA_M16N8K16(TYPE, c0, c1, c2, c3, A, B0, B1) \
  ::retention::emu::mma_m16n8k16_##TYPE(c0, c1, c2, c3, A.r, B0, B1)
#else
#define RETENTION_MMA_M16N8K16(TYPE, c0, c1, c2, c3, A, B0, B1)                                   \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." #TYPE "." #TYPE ".f32 "                   \
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                          \
               : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)                                           \
               : "r"(A.r[0]), "r"(A.r[1]), "r"(A.r[2]), "r"(A.r[3]), "r"(B0), "r"(B1))
#endif

template <>
RT_DEVICE void Sm80<f16_t>::mma(FragC& c, const FragA& a, const FragB& b) {
  RETENTION_MMA_M16N8K16(f16, c.x[0], c.x[1], c.x[2], c.x[3], a, b.r[0], b.r[1]);
  RETENTION_MMA_M16N8K16(f16, c.x[4], c.x[5], c.x[6], c.x[7], a, b.r[2], b.r[3]);
}
template <>
RT_DEVICE void Sm80<bf16_t>::mma(FragC& c, const FragA& a, const FragB& b) {
  RETENTION_MMA_M16N8K16(bf16, c.x[0], c.x[1], c.x[2], c.x[3], a, b.r[0], b.r[1]);
  RETENTION_MMA_M16N8K16(bf16, c.x[4], c.x[5], c.x[6], c.x[7], a, b.r[2], b.r[3]);
}
#undef RETENTION_MMA_M16N8K16

// fp32 on NVIDIA: same accumulator layout as Sm80 (so all epilogue code is shared), but the
// "fragments" are just the shared-memory views and the product is done with FMAs.
struct SimtF32 {
  using Layout = frag::Sm80;
  struct FragA {
    SmemTile<float> t;
  };
  struct FragB {
    SmemTile<float> t;
  };
  struct FragC {
    float x[8];
  };
  RT_DEVICE static void load_a(FragA& f, SmemTile<float> a) { f.t = a; }
  RT_DEVICE static void load_b(FragB& f, SmemTile<float> b) { f.t = b; }
  // The sm80 accumulator pattern touches 2 rows x 4 columns per lane (rows g, g+8; columns
  // 2t, 2t+1, 2t+8, 2t+9): per k step, 6 shared loads feed 8 FMAs.  Element i sits in row slot
  // (i >> 1) & 1 and column slot (i & 1) + 2 (i >> 2), which is Layout::c spelled out.
  RT_DEVICE static void mma(FragC& c, const FragA& a, const FragB& b) {
    const int lane = gpu::lane_id();
    const int row[2] = {Layout::c(lane, 0).row, Layout::c(lane, 2).row};
    const int col[4] = {Layout::c(lane, 0).col, Layout::c(lane, 1).col, Layout::c(lane, 4).col,
                        Layout::c(lane, 5).col};
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
      const float a0 = a.t(row[0], k), a1 = a.t(row[1], k);
      float bk[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) bk[j] = b.t(k, col[j]);
#pragma unroll
      for (int i = 0; i < Layout::kCElems; ++i)
        c.x[i] = fmaf(((i >> 1) & 1) ? a1 : a0, bk[(i & 1) + 2 * (i >> 2)], c.x[i]);
    }
  }
};

#else  // RETENTION_HIP

#if defined(RETENTION_HOST_EMU)
// g++ has no ext_vector_type; its vector extension gives the same element access.  The
// emulated MFMA builtins take the operands as raw 16-bit items.
typedef _Float16 half4_t __attribute__((vector_size(8)));
typedef short bf16x4_t __attribute__((vector_size(8)));
typedef float float4_t __attribute__((vector_size(16)));

template <class V>
inline float4_t emu_mfma_16x16x16(void (*op)(float (&)[4], const std::uint16_t (&)[4], const std::uint16_t (&)[4]),
                                  V a, V b, float4_t c) {
  std::uint16_t ra[4], rb[4];
  float rc[4];
  std::memcpy(ra, &a, 8);
  std::memcpy(rb, &b, 8);
  std::memcpy(rc, &c, 16);
  op(rc, ra, rb);
  std::memcpy(&c, rc, 16);
  return c;
}
#define RT_MFMA_F32_16X16X16F16(a, b, c, cbsz, abid, blgp) emu_mfma_16x16x16(::retention::emu::mfma_16x16x16_f16, a, b, c)
#define RT_MFMA_F32_16X16X16BF16_1K(a, b, c, cbsz, abid, blgp) \
  emu_mfma_16x16x16(::retention::emu::mfma_16x16x16_bf16, a, b, c)
inline float4_t emu_mfma_16x16x4f32(float a, float b, float4_t c) {
  float rc[4];
  std::memcpy(rc, &c, 16);
  ::retention::emu::mfma_16x16x4_f32(rc, a, b);
  std::memcpy(&c, rc, 16);
  return c;
}
#define RT_MFMA_F32_16X16X4F32(a, b, c, cbsz, abid, blgp) emu_mfma_16x16x4f32(a, b, c)
#else
typedef _Float16 half4_t __attribute__((ext_vector_type(4)));
typedef short bf16x4_t __attribute__((ext_vector_type(4)));
typedef float float4_t __attribute__((ext_vector_type(4)));
#define RT_MFMA_F32_16X16X16F16 __builtin_amdgcn_mfma_f32_16x16x16f16
#define RT_MFMA_F32_16X16X16BF16_1K __builtin_amdgcn_mfma_f32_16x16x16bf16_1k
#define RT_MFMA_F32_16X16X4F32 __builtin_amdgcn_mfma_f32_16x16x4f32
#endif

// What differs between the three atoms: the operand vector type, the element as the builtin
// takes it, and the instruction (fp32: four k = 4 steps).
template <class T>
struct MfmaOperand;
template <>
struct MfmaOperand<f16_t> {
  using Layout = frag::Mfma16;
  using V = half4_t;
  RT_DEVICE static _Float16 item(f16_t x) { return __builtin_bit_cast(_Float16, x.bits); }
  RT_DEVICE static float4_t mma(V a, V b, float4_t c) { return RT_MFMA_F32_16X16X16F16(a, b, c, 0, 0, 0); }
};
template <>
struct MfmaOperand<bf16_t> {
  using Layout = frag::Mfma16;
  using V = bf16x4_t;
  RT_DEVICE static short item(bf16_t x) { return static_cast<short>(x.bits); }
  RT_DEVICE static float4_t mma(V a, V b, float4_t c) { return RT_MFMA_F32_16X16X16BF16_1K(a, b, c, 0, 0, 0); }
};
template <>
struct MfmaOperand<float> {
  using Layout = frag::Mfma16F32;
  using V = float[4];
  RT_DEVICE static float item(float x) { return x; }
  RT_DEVICE static float4_t mma(const V& a, const V& b, float4_t c) {
#pragma unroll
    for (int i = 0; i < 4; ++i) c = RT_MFMA_F32_16X16X4F32(a[i], b[i], c, 0, 0, 0);
    return c;
  }
};

template <class T>
struct Mfma {
  using Op = MfmaOperand<T>;
  using Layout = typename Op::Layout;
  struct FragA {
    typename Op::V v;
  };
  struct FragB {
    typename Op::V v;
  };
  struct FragC {
    float4_t x;
  };
  template <bool kA>
  RT_DEVICE static void load(typename Op::V& v, SmemTile<T> t) {
    const int lane = gpu::lane_id();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const frag::Coord rc = kA ? Layout::a(lane, i) : Layout::b(lane, i);
      v[i] = Op::item(t(rc.row, rc.col));
    }
  }
  RT_DEVICE static void load_a(FragA& f, SmemTile<T> a) { load<true>(f.v, a); }
  RT_DEVICE static void load_b(FragB& f, SmemTile<T> b) { load<false>(f.v, b); }
  RT_DEVICE static void mma(FragC& c, const FragA& a, const FragB& b) { c.x = Op::mma(a.v, b.v, c.x); }
};

#endif

}  // namespace mma

// The backend the kernels use for element type T on the current target.
#if RETENTION_CUDA
template <class T>
struct MmaFor {
  using type = mma::Sm80<T>;
};
template <>
struct MmaFor<float> {
  using type = mma::SimtF32;
};
#else
template <class T>
struct MmaFor {
  using type = mma::Mfma<T>;
};
#endif

// ------------------------------------------------------------------------------------------
// Warp-level tile algebra on top of the atom.
// ------------------------------------------------------------------------------------------
#if RETENTION_DEVICE_CODE

template <class Mma, int N>
RT_DEVICE void fill(typename Mma::FragC (&acc)[N], float value) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int i = 0; i < Mma::Layout::kCElems; ++i) acc[j].x[i] = value;
}

// acc[j] += A[16 x 16K] * B[16K x 16N] (block j of 16 columns): one warp, one 16-row block.
// A fragments are loaded once per k step and reused across the N column tiles.
template <class Mma, int N, int K, class T>
RT_DEVICE void warp_mma(typename Mma::FragC (&acc)[N], SmemTile<T> a, SmemTile<T> b) {
  // Not unrolled over k: a fully unrolled body lets the schedulers hoist every fragment load
  // of the step, which costs far more registers than it hides latency (it spilled on gfx90a).
#pragma unroll 1
  for (int kk = 0; kk < K; ++kk) {
    typename Mma::FragA fa;
    Mma::load_a(fa, a.block(0, 16 * kk));
#pragma unroll
    for (int j = 0; j < N; ++j) {
      typename Mma::FragB fb;
      Mma::load_b(fb, b.block(16 * kk, 16 * j));
      Mma::mma(acc[j], fa, fb);
    }
  }
}

// f(row, col, value&) for every accumulator element this lane owns; row/col are relative to
// the 16-row block, col spans the N tiles.
template <class Mma, int N, class F>
RT_DEVICE void for_each(typename Mma::FragC (&acc)[N], F&& f) {
  const int lane = gpu::lane_id();
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int i = 0; i < Mma::Layout::kCElems; ++i) {
      const frag::Coord rc = Mma::Layout::c(lane, i);
      float x = acc[j].x[i];  // by value: MFMA accumulators are vector types, not addressable
      f(rc.row, 16 * j + rc.col, x);
      acc[j].x[i] = x;
    }
}

// Row and column reductions of a warp's 16 x 16N accumulator block, for epilogues that need
// per-row statistics (RMSNorm) or per-column sums over rows (a weight gradient).  They rely on
// the row groups of fragment_layout.h: the lanes sharing a row are kCRowLanes consecutive
// lanes, so a row total is a butterfly over lane masks below kCRowLanes and a column total one
// over the masks from kCRowLanes up.  Element indices are compile-time after unrolling, so the
// "same row / same column" tests below fold to constants (the lane terms cancel).

// The values are per-element float arrays v[i] in the accumulator layout of one 16 x 16 tile
// (element i of this lane), typically computed from accumulators by the caller; a caller
// covering several tiles sums them per element first (row totals) or reduces tile by tile
// (column totals), which keeps only one tile's worth of values live.

// out[i] = sum over the row of element i (all lanes of its row group, all elements of this
// lane in that row); every lane of the row group gets it.
template <class Mma>
RT_DEVICE void row_reduce(const float (&v)[Mma::Layout::kCElems], float (&out)[Mma::Layout::kCElems]) {
  using L = typename Mma::Layout;
  constexpr int E = L::kCElems;
  const int lane = gpu::lane_id();
#pragma unroll
  for (int i = 0; i < E; ++i) {
    float t = 0.f;
#pragma unroll
    for (int i2 = 0; i2 < E; ++i2)
      if (L::c(lane, i2).row == L::c(lane, i).row) t += v[i2];
    out[i] = gpu::warp_reduce_sum<L::kCRowLanes>(t);
  }
}

// In place: v[i] becomes the sum over the 16 rows of the column of element i; every lane
// holding that column gets it.
template <class Mma>
RT_DEVICE void col_reduce(float (&v)[Mma::Layout::kCElems]) {
  using L = typename Mma::Layout;
  constexpr int E = L::kCElems;
  const int lane = gpu::lane_id();
  float part[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    float t = 0.f;
#pragma unroll
    for (int i2 = 0; i2 < E; ++i2)
      if (L::c(lane, i2).col == L::c(lane, i).col) t += v[i2];
    part[i] = t;
  }
#pragma unroll
  for (int i = 0; i < E; ++i) {
    float t = part[i];
#pragma unroll
    for (int m = L::kCRowLanes; m < gpu::kWarpSize; m <<= 1) t += gpu::shfl_xor(t, m);
    v[i] = t;
  }
}

// Whether element i is the first of this lane's elements in its row (kRow) or column: with the
// lane group, it picks exactly one writer per row (lanes lane % kCRowLanes == 0) or per column
// (lanes lane < kCRowLanes) after the reductions above.
template <class Mma, bool kRow>
RT_DEVICE bool first_in(int lane, int i) {
  using L = typename Mma::Layout;
  bool first = kRow ? lane % L::kCRowLanes == 0 : lane < L::kCRowLanes;
#pragma unroll
  for (int i2 = 0; i2 < L::kCElems; ++i2)
    if (i2 < i && (kRow ? L::c(lane, i2).row == L::c(lane, i).row : L::c(lane, i2).col == L::c(lane, i).col))
      first = false;
  return first;
}

// Round the accumulators to T and write them to a 16 x 16N shared-memory block.
template <class Mma, int N, class T>
RT_DEVICE void store(SmemTile<T> dst, typename Mma::FragC (&acc)[N]) {
  for_each<Mma, N>(acc, [&](int r, int c, float& x) { dst(r, c) = Elem<T>::from_float(x); });
}

#endif  // device

}  // namespace retention::kernels
