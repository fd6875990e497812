// chunk_common.cuh - tiling traits and the small tile vocabulary shared by the chunk kernels.
//
// Work decomposition (forward and both backward sweeps):
//   one CTA = one (batch, head, dv tile of BV columns); it walks the chunks of BT tokens in
//   order and keeps its [dk x BV] slice of the fp32 state in registers, as accumulator
//   fragments.  Inside a chunk every product has 64 (or 32) rows, and warp w owns rows
//   [16w, 16w + 16) of all of them, so no cross-warp reduction is ever needed.
//   dk is covered by KT tiles of BK columns; dv by `tiles` tiles of BV columns.
//
// Launch order (q / k reuse): the dv tile is the fastest grid index, blockIdx.x, and the
// (sequence, head) row is blockIdx.y (+ gridDim.y * blockIdx.z past 65535 rows).  GPUs hand
// out CTAs in increasing linear index (in practice; no API guarantees it), so the dv-tile CTAs
// of one head start together, walk the same chunks at the same pace and read the same q / k
// chunk within a short window: the first read comes from HBM, the other tiles - 1 from L2
// (docs/gpu.md: the order before it).  Designed HBM traffic per token and head (bench/gpu_model.py):
// forward (q + k) dk + 2 dv elements instead of up to tiles (q + k) dk + 2 dv.  Every CTA
// coordinate is read from the block index registers: the kernels sit at 230-255 registers, and
// a one-dimensional grid decoded by division made ptxas spill.
//
// Decay: gamma^n is always evaluated as exp2(n * log2(gamma)) with n >= 0, so it can only
// underflow (to 0, harmless), never overflow; log2(gamma) stays fp32.
#pragma once

#include <cstdint>
#include <type_traits>

#include "gpu_compat.h"
#include "numeric.h"
#include "msr_kernels.h"
#include "retention_kernels.h"
#include "tile_mma.h"
#include "value_checks.cuh"

namespace retention::kernels {

inline constexpr float kLog2e = 1.4426950408889634f;

// gamma^n for integer n >= 0.  n == 0 is special-cased so that gamma == 0 (log2 = -inf) gives
// the correct 1 instead of exp2(0 * -inf) = NaN.
RT_DEVICE float decay_pow(int n, float log2_gamma) {
  return n == 0 ? 1.f : exp2f(static_cast<float>(n) * log2_gamma);
}

// Row pointer of a [B, T, H, d] operand at (b, t, h, d0).
template <class T>
RT_DEVICE T* bthd_ptr(const Bthd& x, std::int64_t b, std::int64_t t, std::int64_t h, std::int64_t d0) {
  return static_cast<T*>(x.ptr) + b * x.stride_b + t * x.stride_t + h * x.stride_h + d0;
}

// Cooperative global -> shared copy of an [R x C] tile; rows >= rows_valid and columns >=
// cols_valid are zero-filled (that is how partial chunks and ragged dk/dv are masked).  When
// the whole tile width is valid and every row start is 16-byte aligned, rows move as 16-byte
// vectors; otherwise element by element.  Both branches are uniform across the CTA.
template <int R, int C, int kThreads, class T>
RT_DEVICE void load_tile(T* dst, int ld, const T* src, std::int64_t row_stride, int rows_valid,
                         int cols_valid) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = cols_valid >= C && (reinterpret_cast<std::uintptr_t>(src) % 16 == 0) &&
                   ((row_stride * static_cast<std::int64_t>(sizeof(T))) % 16 == 0);
  if (vec) {
    constexpr int kPerRow = C / kVec;
    for (int idx = threadIdx.x; idx < R * kPerRow; idx += kThreads) {
      const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
      uint4 x = make_uint4(0, 0, 0, 0);
      if (r < rows_valid) x = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = x;
    }
  } else {
    for (int idx = threadIdx.x; idx < R * C; idx += kThreads) {
      const int r = idx / C, c = idx % C;
      dst[r * ld + c] = (r < rows_valid && c < cols_valid) ? src[r * row_stride + c] : Elem<T>::zero();
    }
  }
}

// Cooperative shared -> global copy of the valid part of an [R x C] tile.
template <int R, int C, int kThreads, class T>
RT_DEVICE void store_tile(T* dst, std::int64_t row_stride, const T* src, int ld, int rows_valid,
                          int cols_valid) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = cols_valid >= C && (reinterpret_cast<std::uintptr_t>(dst) % 16 == 0) &&
                   ((row_stride * static_cast<std::int64_t>(sizeof(T))) % 16 == 0);
  if (vec) {
    constexpr int kPerRow = C / kVec;
    for (int idx = threadIdx.x; idx < R * kPerRow; idx += kThreads) {
      const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
      if (r < rows_valid)
        *reinterpret_cast<uint4*>(dst + r * row_stride + c) = *reinterpret_cast<const uint4*>(src + r * ld + c);
    }
  } else {
    for (int idx = threadIdx.x; idx < R * C; idx += kThreads) {
      const int r = idx / C, c = idx % C;
      if (r < rows_valid && c < cols_valid) dst[r * row_stride + c] = src[r * ld + c];
    }
  }
}

// dst[r][c] = src[r][c] * row_factor(r), rounded to T; used for the decayed copies of v / dO.
template <int R, int C, int kThreads, class T, class F>
RT_DEVICE void scale_rows(T* dst, const T* src, int ld, F&& row_factor) {
  for (int idx = threadIdx.x; idx < R * C; idx += kThreads) {
    const int r = idx / C, c = idx % C;
    dst[r * ld + c] = Elem<T>::from_float(Elem<T>::to_float(src[r * ld + c]) * row_factor(r));
  }
}

// The tile is always blockIdx.x and the tile count gridDim.x (an epilogue may read them); the
// row is blockIdx.y + gridDim.y * (row block), and with the sequence split (chunk_fwd.cuh)
// blockIdx.z = row block + row blocks * segment, so a segment's CTAs keep the launch order of
// the unsplit grid.
struct ChunkCta {
  int row;      // (sequence, head): sequence = row / H, head = row % H
  int tile;     // dv tile (or, in the backward sweeps, dv tile group)
  int segment;  // segment of the sequence (0 without a split)
};
// CTAs past the last row (grid padding) must return at once.
RT_DEVICE ChunkCta chunk_cta(int segments = 1) {
  const int tile = static_cast<int>(blockIdx.x), y = static_cast<int>(blockIdx.y);
  if (segments == 1) return ChunkCta{y + static_cast<int>(blockIdx.z * gridDim.y), tile, 0};
  const int row_blocks = static_cast<int>(gridDim.z) / segments, z = static_cast<int>(blockIdx.z);
  return ChunkCta{y + (z % row_blocks) * static_cast<int>(gridDim.y), tile, z / row_blocks};
}
inline constexpr std::int64_t kMaxGridY = 65535;
// The grid of `tiles` x `rows` x `segments` CTAs in that order; false when it exceeds the grid
// limits.
inline bool chunk_grid(std::int64_t rows, std::int64_t tiles, dim3& grid, std::int64_t segments = 1) {
  const std::int64_t y = rows < kMaxGridY ? rows : kMaxGridY, z = y > 0 ? (rows + y - 1) / y * segments : 0;
  grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(y), static_cast<unsigned>(z));
  return tiles > 0 && tiles <= 0x7fffffff && y > 0 && z <= kMaxGridY;
}

// Where the tokens of one CTA's sequence live.  (Its state is block `row` = sequence * H + head
// of the [N, H, dk, dv] initial / final states.)  Without fusion a sequence is a batch row; the
// fused MSR kernels (msr_common.cuh) also map packed sequences (cu_seqlens) of batch row 0.
struct SeqSpan {
  int b;                 // batch row of q / k / v / o
  std::int64_t t_begin;  // first token of the sequence in that row
  std::int64_t length;   // number of tokens (0 allowed: the state passes through)
  std::int64_t pos0;     // absolute position of its first token (rotary angle, decay normaliser)
};

// Sequence split of the forward (chunk_fwd.cuh): segment g of a sequence is its tokens
// [g length, (g + 1) length), clamped to the sequence (empty past its end).
struct SegmentSplit {
  std::int64_t length = 0;  // tokens per segment; 0: no split
  int count = 1;            // segments per sequence
  // [count - 1, sequences * H, dk, dv] fp32: the local states of segments 0 .. count - 2, then
  // (after the scan) the states entering segments 1 .. count - 1.
  float* states = nullptr;
  std::int64_t state_stride = 0;  // sequences * H * dk * dv
};
RT_HOST_DEVICE inline SeqSpan segment_of(SeqSpan s, std::int64_t length, int g) {
  const std::int64_t begin = g * length < s.length ? g * length : s.length;
  const std::int64_t rest = s.length - begin;
  s.t_begin += begin;
  s.pos0 += begin;
  s.length = rest < length ? rest : length;
  return s;
}

// Sequence split (the launchers decide: plan_split): with split.count = G > 1 segments per
// sequence the forward (chunk_fwd.cuh) runs as
//   (a) kStateOnly: segments 0 .. G-2 each compute their local final state (segment 0 from the
//       initial state, the others from zero) into split.states; no output, q is not read;
//   (b) segment_scan_kernel: S_in(g + 1) = gamma^len(g) S_in(g) + local(g), in place;
//   (c) this kernel: every segment g from its incoming state (g = 0: the initial state),
//       writing its outputs; the last segment writes the final state.
// All other CTAs of (c) see the same per-chunk math as without the split; only the state
// entering a segment is summed in another order (fp32, deterministic).
// The backward (chunk_bwd.cuh) mirrors this in reverse for the dk / dv sweep: (a) segments
// 1 .. G-1 compute their local dH (the last from grad_final_state, the others from zero),
// (b) a reverse scan gives the dH leaving every segment, (c) each segment sweeps from it and
// segment 0 writes grad_initial_state; the dq sweep runs (c) on the forward's segment states.
// The pass is a template argument, kNoSplit being exactly the unsplit kernel: the kernels sit
// at 230-255 registers, and even one more value live across the chunk loop makes ptxas spill
// (measured: a runtime segment index did, for the dk = 256 buckets).
enum class SplitPass : int { kNoSplit = 0, kStateOnly = 1, kSegments = 2 };

// Bytes of the states a split keeps between its passes: (count - 1) x rows x dk x dv fp32.
inline std::size_t segment_states_bytes(const SegmentSplit& s, std::int64_t rows, const Shape& n) {
  return s.count > 1 ? static_cast<std::size_t>((s.count - 1) * rows * n.dk * n.dv) * sizeof(float) : 0;
}

// Which job the forward chunk kernel does for the MSR ops (a runtime value: one instantiation
// per dtype and dk bucket serves all four).
enum class MsrPass : int {
  kForwardStats = 0,   // partial sum_j u_j^2 per (dv tile, row)
  kForwardOutput = 1,  // y and the final state
  kBackwardStats = 2,  // partial sum_j u_j^2 and sum_j dz_j w_j u_j per (dv tile, row)
  kBackwardGrad = 3,   // du (into the workspace), dg, per-CTA column sums of dz n^
  kSegmentStates = 4,  // sequence split, forward: the states entering the segments (chunk_fwd.cuh)
};

// Parameters of the MSR instantiations of the chunk kernels: the op's parameters plus what the
// passes add.  For the forward kernel `o` is the output of the pass: y (kForwardOutput) or du
// (kBackwardGrad).
struct MsrChunkForward : MsrForwardParams {
  MsrPass pass = MsrPass::kForwardOutput;
  Bthd grad_y;                    // backward passes
  Bthd grad_g;                    // kBackwardGrad, when g is given
  float* stats = nullptr;         // [tiles, B*T*H, 2]; written by the stats passes, read when tiles > 1
  float* dw_partial = nullptr;    // kBackwardGrad with norm_weight: [N*H, dv]
  SegmentSplit segments;          // forward passes; the backward passes are never split
};

// The sweeps read grad_o (du) and q / k as given.
struct MsrChunkBackward : MsrBackwardParams {};

// Where the tokens of sequence n live: batch row n, or tokens [cu[n], cu[n + 1]) of batch row
// 0 for packed sequences (cu_seqlens); its first position is offsets[n] (0 without offsets).
template <class P>
RT_DEVICE SeqSpan msr_sequence(const P& p, int n) {
  const MsrSequences& s = p.seq;
  SeqSpan span{n, 0, p.shape.T, 0};
  if (s.cu_seqlens != nullptr) {
    // The kernels check cu_seqlens themselves (value_checks.cuh), so a CTA may run on a bad
    // tensor before another CTA's check stops the launch.  Clamping every sequence into [0, T]
    // keeps all accesses in bounds whatever the values are; a bad tensor then gives wrong rows
    // (or rows no sequence writes), never an out-of-bounds access.
    const std::int64_t T = p.shape.T;
    std::int64_t begin = cu_seqlens_at(s, n), end = cu_seqlens_at(s, n + 1);
    begin = begin < 0 ? 0 : begin > T ? T : begin;
    end = end < begin ? begin : end > T ? T : end;
    span.b = 0;
    span.t_begin = begin;
    span.length = end - begin;
  }
  span.pos0 = s.offsets != nullptr ? s.offsets[n] : 0;
  return span;
}

// Compile-time fusion policy of the chunk kernels.  The kernels call it at these points:
//   sequence(p, n)   which tokens / state sequence n (chunk_cta row / H) covers
//   check_values(p, row)  the device-side checks of the values CTA row (sequence row / H, head
//                    row % H) reads (value_checks.cuh); the kernels call it first, so that no
//                    value is live across the assert's call (which would spill registers)
//   begin(p, extra)  forward only: per-CTA setup of its shared memory (the rotary theta table)
//   load_qk(...)     the prologue: global -> shared copy of the q / k tiles of one dk tile (the
//                    place for a rotary embedding; it gets the row base and the dk offset, so
//                    it can read rotation partners outside the tile)
//   epilogue hooks   forward only, when kEpilogue (see chunk_fwd.cuh)
// NoFusion is the forward without prologue or epilogue over batch rows (the raw op; its
// sequence bounds are kernel parameters, not values held in registers across the chunk loop,
// which the kernels at 230-255 registers cannot spare).  MsrFusion (msr_common.cuh) adds the
// packed-sequence map, the rotary prologue and the norm / gate epilogue.
struct NoFusion {
  static constexpr bool kEpilogue = false;
  static constexpr int forward_extra_smem(int /*warps*/, int /*bv*/) { return 0; }

  template <class P>
  RT_HOST_DEVICE static std::int64_t num_sequences(const P& p) {
    return p.seq.num_sequences;
  }
  template <class P>
  RT_DEVICE static SeqSpan sequence(const P& p, int n) {
    return {n, 0, p.shape.T, 0};
  }
  // log_decay is every kernel's input; the sequence tensors are MsrFusion's.
  template <class P>
  RT_DEVICE static void check_values(const P& p, int row) {
    const int H = static_cast<int>(p.shape.H);
    if (threadIdx.x == 0 && row < num_sequences(p) * H) check_log_decay(p.log_decay[row % H]);
  }
  // Forward kernel: per-CTA setup of the forward_extra_smem bytes at `extra`, before the chunk loop.
  template <class Tr, class P>
  RT_DEVICE static void begin(const P&, float* /*extra*/) {}
  // Rows [0, rows_valid) of the dk tile [k0, k0 + C) of q and k; q_row / k_row point at
  // column 0 of the first row.  dst_q may be null (the dq sweep only needs k).
  template <int R, int C, int kThreads, class T, class P>
  RT_DEVICE static void load_qk(const P&, T* dst_q, const T* q_row, std::int64_t q_stride, T* dst_k,
                                const T* k_row, std::int64_t k_stride, int ld, int rows_valid, int k0,
                                int dk, std::int64_t /*pos0*/, const float* /*extra*/ = nullptr) {
    if (dst_q != nullptr) load_tile<R, C, kThreads>(dst_q, ld, q_row + k0, q_stride, rows_valid, dk - k0);
    load_tile<R, C, kThreads>(dst_k, ld, k_row + k0, k_stride, rows_valid, dk - k0);
  }
};

template <class T_, int kMaxDk_, int kStateRegs_ = 64, class Fusion_ = NoFusion>
struct ChunkTraits {
  using T = T_;
  using Fusion = Fusion_;
  using Mma = typename MmaFor<T>::type;
  using FragC = typename Mma::FragC;

  static constexpr bool kHalfWidth = sizeof(T) == 2;
  static constexpr int kMaxDk = kMaxDk_;
  // Chunk length == dk tile: every product in a chunk step is BT x (multiple of 16), and the
  // state update K^T V has BK rows, so one warp-per-16-rows split serves all of them.
  static constexpr int BT = kHalfWidth ? 64 : 32;
  static constexpr int BK = BT;
  static constexpr int kWarps = BT / 16;
  static constexpr int kThreads = kWarps * gpu::kWarpSize;
  static constexpr int KT = (kMaxDk + BK - 1) / BK;
  // The state slice per warp is KT x (16 x BV), i.e. KT * BV / 2 fp32 registers per lane of a
  // 32-wide warp.  kStateRegs caps that so the other accumulators fit without spilling (the
  // reverse backward sweep holds three more tile rows than the forward and gets a smaller cap).
  static constexpr int kStateRegs = kStateRegs_;
  static constexpr int BV_ = 2 * kStateRegs / KT < 64 ? 2 * kStateRegs / KT : 64;
  static constexpr int BV = BV_ < 16 ? 16 : BV_;
  static_assert(BV >= 16 && BV % 16 == 0, "BV must be a multiple of the atom");

  // Shared-memory row padding: 16 bytes keeps vector stores aligned and shifts consecutive
  // rows across banks for the column-wise fragment reads.
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int LDK = BK + kPad;  // [BT x BK] tiles (q, k) and [BT x BT] tiles (scores)
  static constexpr int LDV = BV + kPad;  // [BT x BV] and [BK x BV] tiles
  static_assert(BT == BK, "score tiles reuse the q/k row stride");

  static constexpr int kTileK = BT * LDK;  // elements of one q/k/score tile
  static constexpr int kTileV = BT * LDV;  // elements of one v-like tile

  // Shared memory of each kernel, in bytes (see the buffer lists in the kernels).
  // Each ends with kWarps floats of scratch for the state rescale (state_operand_factor).
  static constexpr int kScratch = kWarps * static_cast<int>(sizeof(float));
  static constexpr int kSmemForward = (2 * kTileK + 3 * kTileV) * static_cast<int>(sizeof(T)) +
                                      Fusion::forward_extra_smem(kWarps, BV) + kScratch;
  static constexpr int kSmemDq = (2 * kTileK + 4 * kTileV) * static_cast<int>(sizeof(T)) + kScratch;
  static constexpr int kSmemDkv = (3 * kTileK + 4 * kTileV) * static_cast<int>(sizeof(T)) + kScratch;
  static_assert(kSmemDkv <= 64 * 1024, "must fit the 64 KiB LDS of CDNA");
};

// Host side of the tiling: the chunk length (BT) and the dv tile width (BV) of
// ChunkTraits<T, bucket, kStateRegs> for a runtime dtype and dk (bucket: the smallest of
// 64 / 128 / 256 that holds dk), to size grids and workspaces.
inline int chunk_rows(DType dtype) { return dtype == DType::kF32 ? ChunkTraits<float, 64>::BT : ChunkTraits<f16_t, 64>::BT; }
template <int kStateRegs>
int tile_width(DType dtype, std::int64_t dk) {
  const auto of = [dk](auto t) {
    using T = decltype(t);
    return dk <= 64 ? ChunkTraits<T, 64, kStateRegs>::BV
                    : dk <= 128 ? ChunkTraits<T, 128, kStateRegs>::BV : ChunkTraits<T, 256, kStateRegs>::BV;
  };
  return dtype == DType::kF32 ? of(float{}) : of(f16_t{});  // bf16 tiles as f16
}

// State slice <-> fp32 [dk, dv] matrix in global memory (initial / final states).  The warp's
// accumulators cover rows kt*BK + 16w + [0, 16) and columns v0 + [0, BV).
template <class Tr>
RT_DEVICE void load_state(typename Tr::FragC (&S)[Tr::KT][Tr::BV / 16], const float* g, int dk,
                          int dv, int v0) {
  using Mma = typename Tr::Mma;
  const int w = gpu::warp_id();
#pragma unroll
  for (int kt = 0; kt < Tr::KT; ++kt)
    for_each<Mma, Tr::BV / 16>(S[kt], [&](int r, int c, float& x) {
      const int row = kt * Tr::BK + 16 * w + r, col = v0 + c;
      x = (g != nullptr && row < dk && col < dv) ? g[static_cast<std::int64_t>(row) * dv + col] : 0.f;
    });
}

template <class Tr>
RT_DEVICE void store_state(float* g, typename Tr::FragC (&S)[Tr::KT][Tr::BV / 16], int dk, int dv, int v0) {
  using Mma = typename Tr::Mma;
  const int w = gpu::warp_id();
#pragma unroll
  for (int kt = 0; kt < Tr::KT; ++kt)
    for_each<Mma, Tr::BV / 16>(S[kt], [&](int r, int c, float& x) {
      const int row = kt * Tr::BK + 16 * w + r, col = v0 + c;
      if (row < dk && col < dv) g[static_cast<std::int64_t>(row) * dv + col] = x;
    });
}

// acc = scale * (acc .* M) on the warp's rows r0 + [0, 16) of a [BT x BT] score tile, M_ij =
// gamma^(i-j) [i >= j] (kTransposed: the tile is transposed, M^T); scaled before it is rounded.
template <class Mma, int N, bool kTransposed = false>
RT_DEVICE void decay_mask(typename Mma::FragC (&acc)[N], int r0, float scale, float log2g) {
  for_each<Mma, N>(acc, [&](int r, int c, float& x) {
    const int i = kTransposed ? c : r0 + r, j = kTransposed ? r0 + r : c;
    x = i >= j ? x * (scale * decay_pow(i - j, log2g)) : 0.f;
  });
}

template <class Mma, int N>
RT_DEVICE void scale_acc(typename Mma::FragC (&acc)[N], float s) {
  for_each<Mma, N>(acc, [&](int, int, float& x) { x *= s; });
}

// fp16 range of the state operand.  The fp32 state slice (S forward, dH backward) is rounded to
// the input type to be an MMA operand.  For fp16 that overflows to inf at 65504, and a slow-decay
// head accumulates ~1/(1 - gamma) tokens of k^T v (4096 at gamma = 1 - 2^-12) long before the
// outputs get anywhere near that (q.S / sqrt(dk) with a small q, or dH V^T with a small v).
// So before the rounding the CTA's whole slice is multiplied by 2^-e, with e chosen so that its
// largest |element| lands in [2^14, 2^15), and every product with it is multiplied by 2^e
// afterwards in fp32.  Powers of two are exact, so fp16 keeps its full 11-bit relative
// precision at every magnitude (a small state also moves out of the subnormals); the rescale is
// one max-reduction per chunk.  bf16 and fp32 have fp32's range: factor 1, nothing is done.
// Alternatives: a bf16 copy of S would need bf16 q / k (3 bits lost on every input); an fp32
// S product would give up the tensor cores for half of the chunk's FLOPs.
// `scratch` is one shared float per warp (ChunkTraits::kScratch) for the warps' maxima.

template <class Tr>
RT_DEVICE float state_operand_factor(typename Tr::FragC (&S)[Tr::KT][Tr::BV / 16], float* scratch) {
  using Mma = typename Tr::Mma;
  if constexpr (!std::is_same<typename Tr::T, f16_t>::value) {
    return 1.f;
  } else {
    float m = 0.f;
    // All KT tiles (those past dk hold zeros): a data-dependent exit would stop the unrolling
    // and put S in scratch memory on gfx90a.
#pragma unroll
    for (int kt = 0; kt < Tr::KT; ++kt)
      for_each<Mma, Tr::BV / 16>(S[kt], [&](int, int, float& x) { m = fmaxf(m, fabsf(x)); });
    m = gpu::warp_reduce_max(m);
    if (gpu::lane_id() == 0) scratch[gpu::warp_id()] = m;
    __syncthreads();
    m = 0.f;
#pragma unroll
    for (int w = 0; w < Tr::kWarps; ++w) m = fmaxf(m, scratch[w]);
    __syncthreads();  // scratch is rewritten by the next chunk
    // Non-finite or zero: factor 1 (inf / NaN propagate as they would without the rescale).
    if (!(m > 0.f) || !(m <= 3.0e38f)) return 1.f;
    const int e = ilogbf(m) - 14;
    return ldexpf(1.f, e < -110 ? -110 : e);  // 2^e and 2^-e both normal fp32
  }
}

// Round the warp's rows of one state tile to T for the MMA, times inv_factor (1 / the factor
// above; exactly 1 for bf16 / fp32, where the multiply is compiled out).
template <class Tr, int N>
RT_DEVICE void store_state_operand(SmemTile<typename Tr::T> dst, typename Tr::FragC (&acc)[N], float inv_factor) {
  using T = typename Tr::T;
  if constexpr (std::is_same<T, f16_t>::value) {
    for_each<typename Tr::Mma, N>(acc, [&](int r, int c, float& x) { dst(r, c) = Elem<T>::from_float(x * inv_factor); });
  } else {
    store<typename Tr::Mma, N>(dst, acc);
  }
}

// Pass (b) of the split: in place over split.states, for every (sequence, head) and state
// element, S_in(g + 1) = gamma^len(g) S_in(g) + local(g) for g = 1 .. count - 2 (slice 0 already
// holds S_in(1): segment 0 started from the initial state).  kReverse, the backward's:
// dH_out(g) = gamma^len(g + 1) dH_out(g + 1) + local(g + 1) for g = count - 3 .. 0 (slice
// count - 2 already holds dH_out(count - 2)).  fp32, one fixed order.
template <class Params, bool kReverse = false>
__global__ void __launch_bounds__(256) segment_scan_kernel(const Params p, const SegmentSplit split) {
  const Shape& n = p.shape;
  const std::int64_t per_row = n.dk * n.dv;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < split.state_stride;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t row = i / per_row;
    const float log2g = p.log_decay[row % n.H] * kLog2e;
    const SeqSpan seq = msr_sequence(p, static_cast<int>(row / n.H));
    float x = split.states[(kReverse ? split.count - 2 : 0) * split.state_stride + i];
    for (int step = 1; step + 1 < split.count; ++step) {
      const int g = kReverse ? split.count - 2 - step : step;  // slice updated
      const int len = static_cast<int>(segment_of(seq, split.length, kReverse ? g + 1 : g).length);
      float* const y = split.states + g * split.state_stride + i;
      x = fmaf(decay_pow(len, log2g), x, *y);
      *y = x;
    }
  }
}

// Pass (b), when there is anything to scan (count > 2).
template <bool kReverse = false, class Params>
gpu::error_t launch_segment_scan(const Params& p, const SegmentSplit& split) {
  const std::int64_t blocks = (split.state_stride + 255) / 256;
  if (split.count <= 2) return gpu::kSuccess;
  return gpu::launch(&segment_scan_kernel<Params, kReverse>, static_cast<unsigned>(blocks < 1024 ? blocks : 1024), 256,
                     0, p.stream, p, split);
}

// Segment plan of the split from the CTAs of the unsplit grid: split < 0 (automatic) cuts T
// when there are fewer of those CTAs than SMs (some SMs would idle for the whole walk; between
// one and two waves the extra passes cost more than the shorter chain saves), into as many
// segments as fit in two waves (two CTAs per SM, rounded down: a partial third wave would cost
// a whole segment walk) but never shorter than kSplitMinChunks chunks of bt tokens (shorter
// segments would spend more on passes (a) and (b) than they save).  The performance model's
// numbers behind these rules: docs/gpu.md, "Sequence split".  split > 0 forces that many
// segments of ceil(T / split) tokens.  count <= 1 (length 0) means no split.  num_sms <= 0: the current device's SMs (132
// if the query fails).
inline constexpr int kSplitMinChunks = 4;
inline SegmentSplit plan_split(int split, int num_sms, std::int64_t ctas, std::int64_t T, int bt) {
  SegmentSplit s;
  if (split < 0 && num_sms <= 0 && (gpu::multiprocessor_count(&num_sms) != gpu::kSuccess || num_sms <= 0))
    num_sms = 132;
  std::int64_t count = split > 0 ? split : 1;
  if (split < 0 && ctas > 0 && ctas < static_cast<std::int64_t>(num_sms)) {
    const std::int64_t want = 2 * static_cast<std::int64_t>(num_sms) / ctas;  // no partial third wave
    const std::int64_t most = (T + bt - 1) / bt / kSplitMinChunks;
    count = want < most ? want : most;
  }
  if (count <= 1 || T <= 1) return s;
  std::int64_t length = (T + count - 1) / count;
  if (split < 0) length = (length + bt - 1) / bt * bt;  // whole chunks
  s.length = length;
  s.count = static_cast<int>((T + length - 1) / length);
  if (s.count <= 1) s = SegmentSplit{};
  return s;
}

// Dispatch a runtime dk to the register-tiling bucket (64 / 128 / 256):
// Launch<kMaxDk>::run(args...).
template <template <int> class Launch, class... Args>
gpu::error_t dispatch_dk(std::int64_t dk, Args&&... args) {
  if (dk <= 64) return Launch<64>::run(args...);
  if (dk <= 128) return Launch<128>::run(args...);
  if (dk <= kMaxHeadDimK) return Launch<256>::run(args...);
  return gpu::kErrorInvalidValue;
}

}  // namespace retention::kernels
