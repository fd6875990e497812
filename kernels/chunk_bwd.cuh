// chunk_bwd.cuh - the two backward sweeps of chunkwise retention.  One instantiation
// (MsrFusion<true>: packed sequences; q / k arrive rotated) serves the fused MSR layer core and
// the raw op (msr_bwd.cuh).
//
//
// With M_ij = g^(i-j)[i >= j] inside a chunk of L tokens, S the state entering the chunk and
// dH the gradient w.r.t. the state leaving it (dH = grad_final_state after the last chunk):
//
//   dQ  = scale * ( (dO V^T .* M) K  +  diag(g^(i+1)) dO S^T )                 forward sweep
//   dK  = scale * (dO V^T .* M)^T Q  +  diag(g^(L-1-j)) V dH^T                reverse sweep
//   dV  = scale * (Q K^T .* M)^T dO  +  diag(g^(L-1-j)) K dH                  reverse sweep
//   dH <- g^L dH + Q^T diag(scale g^(i+1)) dO          (after the chunk; dH at t = 0 is dS0)
//
// Both sweeps reuse the forward's decomposition: a CTA sweeps one dv tile at a time and carries
// its [dk x BV] slice of S (or dH) in registers.  dV only contracts over dk, so each sweep
// produces finished dV rows.  dQ and dK contract over dv, so the sweeps of different dv tiles
// produce partial sums.  Nothing per chunk is stored: states are recomputed.
//
// Deterministic reduction over dv tiles (no atomics).  The nvt dv tiles are split into P
// contiguous groups (dv_tiles_per_cta); CTA (row, g) of pass j sweeps tile j of group g and
// accumulates its dq / dk partial sums in fp32 slice g of a [P, B*H, T, dk] workspace (pass 0
// stores, the next passes add; passes are launches in stream order and every element has one
// writer per pass, so there is no race).  The final cast sums the P slices in the order g = 0..P-1.
// The result is bit-identical from run to run and independent of CTA scheduling; it depends
// only on the shapes (P is a function of dv, dk, the dtype and the number of (sequence, head)
// rows), not on the device.
// Cost: P_dq + P_dkv slices of B*H*T*dk fp32 instead of the 2 an atomic accumulation needs,
// i.e. (P_dq + P_dkv - 2) * B*H*T*dk * 4 extra workspace bytes, with P <= kMaxDvPartials = 8
// (at most 16 slices, 14 extra).  P only grows while the grid has fewer than
// kBackwardTargetCtas CTAs, so large batches get P = 1 (no extra bytes: each CTA sweeps all dv
// tiles).  The workspace needs no zero-fill (the atomic scheme memset it).  Work is unchanged:
// every dv tile is swept once either way.
#pragma once

#include "chunk_common.cuh"

namespace retention::kernels {

// Enough CTAs for one full wave at 2 CTAs per SM on a ~130-SM GPU; beyond that, more dv
// partials only cost memory.
inline constexpr int kBackwardTargetCtas = 256;
inline constexpr int kMaxDvPartials = 8;

// dv tiles swept by one CTA when `rows` = (sequences x heads) CTA rows share nvt tiles; the
// launch grid has ceil(nvt / that) CTAs per row, which is also the number of partial slices.
RT_HOST_DEVICE inline int dv_tiles_per_cta(int nvt, std::int64_t rows) {
  const std::int64_t want = rows > 0 ? (kBackwardTargetCtas + rows - 1) / rows : 1;
  int parts = want < nvt ? static_cast<int>(want) : nvt;
  parts = parts < kMaxDvPartials ? parts : kMaxDvPartials;
  parts = parts < 1 ? 1 : parts;
  return nvt > 0 ? (nvt + parts - 1) / parts : 1;
}
RT_HOST_DEVICE inline int dv_partials(int nvt, std::int64_t rows) {
  const int per_cta = dv_tiles_per_cta(nvt, rows);
  return (nvt + per_cta - 1) / per_cta;
}

// Number of dq and dk partial slices of a backward over `rows` (sequence, head) CTA rows (the
// sweeps' state budgets are 64 and 32 registers: chunk_backward_dq_kernel / _dkv_kernel).
inline void sweep_partials(DType dtype, const Shape& n, std::int64_t rows, int& dq_parts, int& dk_parts) {
  const int bv_dq = tile_width<64>(dtype, n.dk), bv_dkv = tile_width<32>(dtype, n.dk);
  dq_parts = dv_partials(static_cast<int>((n.dv + bv_dq - 1) / bv_dq), rows);
  dk_parts = dv_partials(static_cast<int>((n.dv + bv_dkv - 1) / bv_dkv), rows);
}

// Sum of the `parts` slices (slice stride `slice`) at index i, in slice order.
RT_DEVICE float sum_partials(const float* base, std::int64_t slice, int parts, std::int64_t i) {
  float s = base[i];
  for (int g = 1; g < parts; ++g) s += base[g * slice + i];
  return s;
}

// Store (first dv tile of the CTA) or add the warp's 16 x (16N) accumulator rows to the CTA's
// own fp32 row-major partial-sum slice.
template <class Mma, int N>
RT_DEVICE void store_or_add_rows(float* g, std::int64_t ld, int r0, int rows_valid, int cols_valid, bool add,
                                 typename Mma::FragC (&acc)[N]) {
  for_each<Mma, N>(acc, [&](int r, int c, float& x) {
    if (r0 + r < rows_valid && c < cols_valid) {
      float* const dst = g + (r0 + r) * ld + c;
      *dst = add ? *dst + x : x;
    }
  });
}

// The dv tile of a sweep CTA: dv_tiles_per_cta(...) == `passes` launches of the sweep run one
// after the other on the stream; the grid is (group g fastest, row): chunk_cta (groups of a row
// adjacent); in pass j, CTA (row, g) sweeps tile g * passes + j of its
// group g and stores (j == 0) or adds (j > 0) its partial sums in slice g.  Stream order
// makes the read-modify-write safe; separate launches instead of a loop inside the kernel keep
// the register allocation of a single sweep (a loop around it made ptxas spill).
// Returns -1 when group g has fewer tiles than `passes` (the last group may be short).
template <int BV>
RT_DEVICE int sweep_tile(int group, int dv, int pass, int passes) {
  const int tile = group * passes + pass;
  return tile * BV < dv ? tile : -1;
}

// D = scale * (dO V^T .* M) on the warp's rows, rounded into the shared tile d (both sweeps).
template <class Tr, class T>
RT_DEVICE void store_grad_scores(SmemTile<T> d, SmemTile<T> dO, SmemTile<T> v, int r0, float scale, float log2g) {
  typename Tr::FragC D[Tr::BT / 16];
  fill<typename Tr::Mma>(D, 0.f);
  warp_mma<typename Tr::Mma, Tr::BT / 16, Tr::BV / 16>(D, dO.block(r0, 0), v.t());
  decay_mask<typename Tr::Mma, Tr::BT / 16>(D, r0, scale, log2g);
  store<typename Tr::Mma, Tr::BT / 16>(d.block(r0, 0), D);
}

// dq partials: `partials` is the [groups, B*H, T, dk] fp32 slice array of the dq sweep.
// kSplit: pass (c) of the sequence split (chunk_common.cuh), from the forward's segment states.
// One resident CTA per SM is enough here (minimum 1): without saying so ptxas capped the fp32
// dk = 128 sweep at 168 registers and spilled once the split added its segment handling.
template <class Tr, bool kSplit = false>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    chunk_backward_dq_kernel(const MsrChunkBackward p, float* partials, int pass, int passes,
                             const SegmentSplit split) {
  using Fusion = typename Tr::Fusion;
  using T = typename Tr::T;
  using Mma = typename Tr::Mma;
  using FragC = typename Tr::FragC;
  constexpr int BT = Tr::BT, BK = Tr::BK, BV = Tr::BV, KT = Tr::KT, kThreads = Tr::kThreads;
  constexpr int NT = BT / 16, NK = BK / 16, NV = BV / 16;
  constexpr int LDK = Tr::LDK, LDV = Tr::LDV;

  Fusion::check_values(p, chunk_cta(kSplit ? split.count : 1).row);

  RETENTION_SMEM(smem_raw, Tr::kSmemDq);
  T* const sK = reinterpret_cast<T*>(smem_raw);  // [BT x BK]  k, current dk tile
  T* const sD = sK + Tr::kTileK;                 // [BT x BT]  scale * (dO V^T .* M)
  T* const sV = sD + Tr::kTileK;                 // [BT x BV]  v
  T* const sVd = sV + Tr::kTileV;                // [BT x BV]  g^(L-1-j) v_j
  T* const sDO = sVd + Tr::kTileV;               // [BT x BV]  dO
  T* const sS = sDO + Tr::kTileV;                // [BK x BV]  2^-e (state tile entering the chunk), as T
  float* const sScratch = reinterpret_cast<float*>(smem_raw + Tr::kSmemDq - Tr::kScratch);

  const Shape& n = p.shape;
  const int H = static_cast<int>(n.H), dk = static_cast<int>(n.dk), dv = static_cast<int>(n.dv);
  const ChunkCta cta = chunk_cta(kSplit ? split.count : 1);
  if (cta.row >= Fusion::num_sequences(p) * H) return;  // grid padding (chunk_grid)
  SeqSpan seq = Fusion::sequence(p, cta.row / H);
  if constexpr (kSplit) seq = segment_of(seq, split.length, cta.segment);
  const int b = seq.b, h = cta.row % H;
  const int r0 = 16 * gpu::warp_id();
  const float log2g = p.log_decay[h] * kLog2e;
  const std::int64_t bh = static_cast<std::int64_t>(b) * H + h;  // batch row: workspace rows
  float* const dq_acc = partials + (cta.tile * n.B * n.H + bh) * n.T * dk;

  const SmemTile<T> k = row_major(sK, LDK), d = row_major(sD, LDK);
  const SmemTile<T> v = row_major(sV, LDV), vd = row_major(sVd, LDV), dO = row_major(sDO, LDV),
                    s = row_major(sS, LDV);

  const int tile = sweep_tile<BV>(cta.tile, dv, pass, passes);
  if (tile < 0) return;  // uniform over the CTA, before any barrier
  const int v0 = tile * BV, nv = min(BV, dv - v0);
  const bool add = pass > 0;

  const float* entering = p.initial_state;  // state block cta.row (SeqSpan)
  if constexpr (kSplit)
    if (cta.segment > 0) entering = split.states + (cta.segment - 1) * split.state_stride;
  FragC S[KT][NV];
  load_state<Tr>(S, entering ? entering + static_cast<std::int64_t>(cta.row) * dk * dv : nullptr, dk, dv, v0);

  for (std::int64_t t0 = 0; t0 < seq.length; t0 += BT) {
    const int L = seq.length - t0 < BT ? static_cast<int>(seq.length - t0) : BT;
    const std::int64_t t = seq.t_begin + t0;  // row of the chunk's first token in batch row b
    const float gL = decay_pow(L, log2g);
    const float s_factor = state_operand_factor<Tr>(S, sScratch);

    __syncthreads();
    load_tile<BT, BV, kThreads>(sV, LDV, bthd_ptr<T>(p.v, b, t, h, v0), p.v.stride_t, L, nv);
    load_tile<BT, BV, kThreads>(sDO, LDV, bthd_ptr<T>(p.grad_o, b, t, h, v0), p.grad_o.stride_t, L, nv);
    __syncthreads();
    scale_rows<BT, BV, kThreads>(sVd, sV, LDV, [&](int j) { return j < L ? decay_pow(L - 1 - j, log2g) : 0.f; });

    store_grad_scores<Tr>(d, dO, v, r0, p.scale, log2g);

#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const int k0 = kt * BK;
      if (k0 >= dk) break;
      __syncthreads();
      Fusion::template load_qk<BT, BK, kThreads>(p, static_cast<T*>(nullptr), static_cast<const T*>(nullptr), 0,
                                                 sK, bthd_ptr<T>(p.k, b, t, h, 0), p.k.stride_t, LDK, L, k0,
                                                 dk, seq.pos0 + t0);
      store_state_operand<Tr>(s.block(r0, 0), S[kt], 1.f / s_factor);
      __syncthreads();

      FragC G[NK];
      fill<Mma>(G, 0.f);
      warp_mma<Mma, NK, NV>(G, dO.block(r0, 0), s.t());  // dO (2^-e S)^T
      for_each<Mma, NK>(G, [&](int r, int, float& x) { x *= p.scale * decay_pow(r0 + r + 1, log2g) * s_factor; });
      warp_mma<Mma, NK, NT>(G, d.block(r0, 0), k);  // + D K
      store_or_add_rows<Mma, NK>(dq_acc + t * dk + k0, dk, r0, L, dk - k0, add, G);

      scale_acc<Mma>(S[kt], gL);
      warp_mma<Mma, NV, NT>(S[kt], k.t().block(r0, 0), vd);
    }
  }
}

// dk partials: `partials` is the [groups, B*H, T, dk] fp32 slice array of this sweep.
// Sequence split (chunk_common.cuh), passes in reverse: kStateOnly is pass (a), the local dH of
// segments 1 .. G-1 into split.states (slice g - 1 for segment g: reads only q and dO);
// kSegments is pass (c), every segment from the scanned dH leaving it.
template <class Tr, SplitPass kPass = SplitPass::kNoSplit>
__global__ void __launch_bounds__(Tr::kThreads)
    chunk_backward_dkv_kernel(const MsrChunkBackward p, float* partials, int pass, int passes,
                              const SegmentSplit split) {
  using Fusion = typename Tr::Fusion;
  using T = typename Tr::T;
  using Mma = typename Tr::Mma;
  using FragC = typename Tr::FragC;
  constexpr int BT = Tr::BT, BK = Tr::BK, BV = Tr::BV, KT = Tr::KT, kThreads = Tr::kThreads;
  constexpr int NT = BT / 16, NK = BK / 16, NV = BV / 16;
  constexpr int LDK = Tr::LDK, LDV = Tr::LDV;
  static_assert(BT * LDV <= 2 * Tr::kTileK, "dV staging must fit in the q/k buffers");

  // No Fusion::check_values here: the dq sweep, which always runs first over the same CTA rows,
  // checks the values, and at dk = 256 this kernel has no registers to spare for the assert's call.
  RETENTION_SMEM(smem_raw, Tr::kSmemDkv);
  T* const sQ = reinterpret_cast<T*>(smem_raw);  // [BT x BK]  q, current dk tile
  T* const sK = sQ + Tr::kTileK;                 // [BT x BK]  k, current dk tile
  T* const sD = sK + Tr::kTileK;                 // [BT x BT]  scale * (dO V^T .* M)
  T* const sV = sD + Tr::kTileK;                 // [BT x BV]  v
  T* const sDO = sV + Tr::kTileV;                // [BT x BV]  dO
  T* const sDOd = sDO + Tr::kTileV;              // [BT x BV]  scale g^(i+1) dO_i
  T* const sH = sDOd + Tr::kTileV;               // [BK x BV]  2^-e (dH tile, state leaving the chunk), as T
  T* const sA = sQ;                              // [BT x BT]  scale * (K Q^T .* M^T), once q/k are dead
  T* const sO = sQ;                              // [BT x BV]  dV staging
  float* const sScratch = reinterpret_cast<float*>(smem_raw + Tr::kSmemDkv - Tr::kScratch);

  const Shape& n = p.shape;
  const int H = static_cast<int>(n.H), dk = static_cast<int>(n.dk), dv = static_cast<int>(n.dv);
  constexpr bool kStateOnly = kPass == SplitPass::kStateOnly, kSplit = kPass != SplitPass::kNoSplit;
  const int segments = kSplit ? (kStateOnly ? split.count - 1 : split.count) : 1;
  const ChunkCta cta = chunk_cta(segments);
  if (cta.row >= Fusion::num_sequences(p) * H) return;  // grid padding (chunk_grid)
  SeqSpan seq = Fusion::sequence(p, cta.row / H);
  if constexpr (kSplit) seq = segment_of(seq, split.length, kStateOnly ? cta.segment + 1 : cta.segment);
  const int b = seq.b, h = cta.row % H;
  const int r0 = 16 * gpu::warp_id();
  const float log2g = p.log_decay[h] * kLog2e;
  const std::int64_t bh = static_cast<std::int64_t>(b) * H + h;  // batch row: workspace rows
  float* const dk_acc = partials + (cta.tile * n.B * n.H + bh) * n.T * dk;

  const SmemTile<T> q = row_major(sQ, LDK), k = row_major(sK, LDK), d = row_major(sD, LDK),
                    a = row_major(sA, LDK);
  const SmemTile<T> v = row_major(sV, LDV), dO = row_major(sDO, LDV), dOd = row_major(sDOd, LDV),
                    hh = row_major(sH, LDV);

  const int tile = sweep_tile<BV>(cta.tile, dv, pass, passes);
  if (tile < 0) return;  // uniform over the CTA, before any barrier
  const int v0 = tile * BV, nv = min(BV, dv - v0);
  const bool add = pass > 0;

  // dH leaving the CTA's last token: grad_final_state for the sequence's last segment; in pass
  // (a) zero for the others, in pass (c) the scanned slice of the segment.
  const float* entering = p.grad_final_state;  // state block cta.row (SeqSpan)
  if constexpr (kStateOnly) {
    if (cta.segment + 2 != split.count) entering = nullptr;
  } else if constexpr (kSplit) {
    if (cta.segment + 1 != split.count) entering = split.states + cta.segment * split.state_stride;
  }
  FragC dH[KT][NV];
  load_state<Tr>(dH, entering ? entering + static_cast<std::int64_t>(cta.row) * dk * dv : nullptr, dk, dv, v0);

  const std::int64_t num_chunks = (seq.length + BT - 1) / BT;
  for (std::int64_t c = num_chunks - 1; c >= 0; --c) {
    const std::int64_t t0 = c * BT;
    const int L = seq.length - t0 < BT ? static_cast<int>(seq.length - t0) : BT;
    const std::int64_t t = seq.t_begin + t0;  // row of the chunk's first token in batch row b
    const float gL = decay_pow(L, log2g);
    const auto tail_decay = [&](int j) { return j < L ? decay_pow(L - 1 - j, log2g) : 0.f; };
    const float h_factor = kStateOnly ? 1.f : state_operand_factor<Tr>(dH, sScratch);

    __syncthreads();
    if constexpr (!kStateOnly) load_tile<BT, BV, kThreads>(sV, LDV, bthd_ptr<T>(p.v, b, t, h, v0), p.v.stride_t, L, nv);
    load_tile<BT, BV, kThreads>(sDO, LDV, bthd_ptr<T>(p.grad_o, b, t, h, v0), p.grad_o.stride_t, L, nv);
    __syncthreads();
    scale_rows<BT, BV, kThreads>(sDOd, sDO, LDV, [&](int i) { return p.scale * decay_pow(i + 1, log2g); });

    if constexpr (!kStateOnly) store_grad_scores<Tr>(d, dO, v, r0, p.scale, log2g);

    FragC At[NT], dV[NV];
    fill<Mma>(At, 0.f);
    fill<Mma>(dV, 0.f);
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const int k0 = kt * BK;
      if (k0 >= dk) break;
      __syncthreads();
      if constexpr (kStateOnly) {  // q only (the loader's optional operand is the first)
        Fusion::template load_qk<BT, BK, kThreads>(p, static_cast<T*>(nullptr), static_cast<const T*>(nullptr), 0, sQ,
                                                   bthd_ptr<T>(p.q, b, t, h, 0), p.q.stride_t, LDK, L, k0, dk,
                                                   seq.pos0 + t0);
      } else {
        Fusion::template load_qk<BT, BK, kThreads>(p, sQ, bthd_ptr<T>(p.q, b, t, h, 0), p.q.stride_t, sK,
                                                   bthd_ptr<T>(p.k, b, t, h, 0), p.k.stride_t, LDK, L, k0, dk,
                                                   seq.pos0 + t0);
        store_state_operand<Tr>(hh.block(r0, 0), dH[kt], 1.f / h_factor);
      }
      __syncthreads();

      if constexpr (!kStateOnly) {
        warp_mma<Mma, NT, NK>(At, k.block(r0, 0), q.t());  // At += K Q^T
        warp_mma<Mma, NV, NK>(dV, k.block(r0, 0), hh);     // dV += K (2^-e dH)

        FragC G[NK];
        fill<Mma>(G, 0.f);
        warp_mma<Mma, NK, NV>(G, v.block(r0, 0), hh.t());  // V (2^-e dH)^T
        for_each<Mma, NK>(G, [&](int r, int, float& x) { x *= tail_decay(r0 + r) * h_factor; });
        warp_mma<Mma, NK, NT>(G, d.t().block(r0, 0), q);  // + D^T Q
        store_or_add_rows<Mma, NK>(dk_acc + t * dk + k0, dk, r0, L, dk - k0, add, G);
      }

      scale_acc<Mma>(dH[kt], gL);  // dH = g^L dH + Q^T dOd
      warp_mma<Mma, NV, NT>(dH[kt], q.t().block(r0, 0), dOd);
    }
    if constexpr (kStateOnly) continue;
    __syncthreads();  // q/k buffers become the transposed score tile

    decay_mask<Mma, NT, true>(At, r0, p.scale, log2g);
    store<Mma, NT>(a.block(r0, 0), At);
    for_each<Mma, NV>(dV, [&](int r, int, float& x) { x *= tail_decay(r0 + r) * h_factor; });
    __syncthreads();

    warp_mma<Mma, NV, NT>(dV, a.block(r0, 0), dO);  // + (K Q^T .* M^T) dO
    __syncthreads();
    store<Mma, NV>(row_major(sO, LDV).block(r0, 0), dV);
    __syncthreads();
    store_tile<BT, BV, kThreads>(bthd_ptr<T>(p.grad_v, b, t, h, v0), p.grad_v.stride_t, sO, LDV, L, nv);
  }

  // Where the dH entering the CTA's first token goes, from the block index again (nothing about
  // it stays live across the chunk loop): grad_initial_state from segment 0, the slice of
  // segment g in pass (a).
  const ChunkCta done = chunk_cta(segments);
  float* leaving = p.grad_initial_state;
  if constexpr (kStateOnly) {
    leaving = split.states + done.segment * split.state_stride;
  } else if constexpr (kSplit) {
    if (done.segment != 0) leaving = nullptr;
  }
  if (leaving != nullptr) store_state<Tr>(leaving + static_cast<std::int64_t>(done.row) * dk * dv, dH, dk, dv, v0);
}

// What a backward launches: the dv partial slices of each sweep and each sweep's sequence
// split (count 1: none): fwd for the dq sweep (the forward's segment states), rev for the
// dk / dv sweep, each with its [count - 1, rows, dk, dv] fp32 states (set by the launcher).
struct BackwardPlan {
  int dq_parts = 0, dk_parts = 0;
  SegmentSplit fwd, rev;
};

// Bytes of the backward core's workspace (msr_bwd.cu: launch_backward_core), fp32:
// [dq partials | dk partials | forward segment states | reverse segment states].
inline std::size_t backward_core_bytes(const BackwardPlan& b, const Shape& n, std::int64_t rows) {
  return static_cast<std::size_t>((b.dq_parts + b.dk_parts) * n.B * n.H * n.T * n.dk) * sizeof(float) +
         segment_states_bytes(b.fwd, rows, n) + segment_states_bytes(b.rev, rows, n);
}

// Each sweep's split is planned on its own grid (rows x its dv groups): they differ in tile
// width, so one plan would leave one of them under- or over-split.
inline BackwardPlan plan_backward(DType dtype, const Shape& n, std::int64_t rows, int split, int num_sms) {
  BackwardPlan b;
  sweep_partials(dtype, n, rows, b.dq_parts, b.dk_parts);
  if (split != 0 && rows > 0 && n.dk > 0 && n.dv > 0 && n.T > 1) {
    b.fwd = plan_split(split, num_sms, rows * b.dq_parts, n.T, chunk_rows(dtype));
    b.rev = plan_split(split, num_sms, rows * b.dk_parts, n.T, chunk_rows(dtype));
  }
  return b;
}

// The two sweeps over `rows` (sequence, head) CTA rows, dv_tiles_per_cta launches each
// (sweep_tile); p.workspace holds the dq, then the dk partial slices.  With a split,
// plan.fwd.states must already hold the forward's scanned segment states (chunk_fwd.cuh), and
// plan.rev.states is filled here.
template <class TrDq, class TrDkv>
gpu::error_t launch_backward_sweeps(const MsrChunkBackward& p, std::int64_t rows,
                                    const BackwardPlan& plan) {
  const Shape& n = p.shape;
  const auto groups = [&](int bv) { return dv_partials(static_cast<int>((n.dv + bv - 1) / bv), rows); };
  if (groups(TrDq::BV) != plan.dq_parts || groups(TrDkv::BV) != plan.dk_parts) return gpu::kErrorInvalidValue;
  if ((plan.fwd.count > 1 && plan.fwd.states == nullptr) || (plan.rev.count > 1 && plan.rev.states == nullptr))
    return gpu::kErrorInvalidValue;
  gpu::error_t e = gpu::kSuccess;
  // dv_tiles_per_cta launches of one sweep kernel over `segments` segments.
  const auto sweep = [&](auto* kernel, int bv, int threads, int smem, float* partials, int parts, int segments,
                         const SegmentSplit& s) {
    dim3 grid;
    if (e == gpu::kSuccess) e = gpu::set_max_dynamic_smem(kernel, smem);
    if (e == gpu::kSuccess && !chunk_grid(rows, parts, grid, segments)) e = gpu::kErrorInvalidValue;
    const int passes = dv_tiles_per_cta(static_cast<int>((n.dv + bv - 1) / bv), rows);
    for (int pass = 0; pass < passes && e == gpu::kSuccess; ++pass)
      e = gpu::launch(kernel, grid, threads, smem, p.stream, p, partials, pass, passes, s);
  };
  float* const dq_partials = static_cast<float*>(p.workspace);
  float* const dk_partials = dq_partials + plan.dq_parts * (n.B * n.H * n.T * n.dk);
  constexpr int kSmemDq = gpu::dynamic_smem_bytes(TrDq::kSmemDq), kSmemDkv = gpu::dynamic_smem_bytes(TrDkv::kSmemDkv);
  if (plan.fwd.count > 1)
    sweep(&chunk_backward_dq_kernel<TrDq, true>, TrDq::BV, TrDq::kThreads, kSmemDq, dq_partials, plan.dq_parts,
          plan.fwd.count, plan.fwd);
  else
    sweep(&chunk_backward_dq_kernel<TrDq>, TrDq::BV, TrDq::kThreads, kSmemDq, dq_partials, plan.dq_parts, 1, plan.fwd);
  const int count = plan.rev.count;
  if (count <= 1) {
    sweep(&chunk_backward_dkv_kernel<TrDkv>, TrDkv::BV, TrDkv::kThreads, kSmemDkv, dk_partials, plan.dk_parts, 1,
          plan.rev);
    return e;
  }
  sweep(&chunk_backward_dkv_kernel<TrDkv, SplitPass::kStateOnly>, TrDkv::BV, TrDkv::kThreads, kSmemDkv, dk_partials,
        plan.dk_parts, count - 1, plan.rev);
  if (e == gpu::kSuccess) e = launch_segment_scan<true>(p, plan.rev);
  sweep(&chunk_backward_dkv_kernel<TrDkv, SplitPass::kSegments>, TrDkv::BV, TrDkv::kThreads, kSmemDkv, dk_partials,
        plan.dk_parts, count, plan.rev);
  return e;
}

}  // namespace retention::kernels
