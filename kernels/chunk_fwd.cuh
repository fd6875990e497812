// chunk_fwd.cuh - the chunkwise retention forward kernel, shared by the raw op (NoFusion) and
// the fused MSR layer core (msr_fwd.cuh, MsrFusion: rotary prologue, packed
// sequences, RMSNorm / gate epilogue).
//
// For one (b, h) and the dv tile [v0, v0 + BV), with S the fp32 state slice [dk x BV] entering
// chunk c of L <= BT tokens (rows i, j inside the chunk):
//
//   O   = scale * ( diag(g^(i+1)) Q S  +  (Q K^T  .*  M) V ),   M_ij = g^(i-j) [i >= j]
//   S  <- g^L S + K^T diag(g^(L-1-j)) V
//
// q, k and v are read once and o is written once; the per-chunk state never leaves the chip.
// The dk loop accumulates Q K^T and Q S over dk tiles while updating the matching state tile,
// so the whole of q/k never needs to be resident.  The rounded copy of S used as an MMA operand
// is the only precision compromise (FLA makes the same one with a bf16 h); S itself, the decay
// factors and all accumulators stay fp32.  For fp16 that copy is taken of 2^-e S, with the
// power of two chosen per chunk so that it cannot overflow (state_operand_factor), and the
// score tile is multiplied by `scale` before it is rounded: O = (scale g^(i+1) 2^e) Q (2^-e S)
// + (scale Q K^T .* M) V.  So an fp16 output is finite whenever its value fits in fp16.
#pragma once

#include "chunk_common.cuh"

namespace retention::kernels {

// What the forward kernel hands to a fused epilogue (Fusion::kEpilogue).  The shared-memory
// tiles are [BT x BV] with row stride Tr::LDV.
template <class T>
struct ForwardTile {
  SeqSpan seq;
  int seq_index;     // row / H (chunk_cta)
  int h;
  std::int64_t t0;   // chunk start, relative to the sequence
  int L;             // tokens in the chunk
  int v0, nv;        // dv tile [v0, v0 + nv): tile v0 / BV of ceil(dv / BV)
  int r0;            // first chunk row of this warp
  T* spare0;         // free after the dk loop (held the decayed v); epilogue operand tile
  T* spare1;         // free after the dk loop (held the state tile); epilogue operand tile
  T* stage0;         // output staging (aliases q / k; free once O is in registers)
  T* stage1;         // second output staging (aliases v; free once O is in registers)
  float* extra;      // Fusion::forward_extra_smem(kWarps, BV) bytes, kept across chunks
};


// The sequence split (chunk_common.cuh: SegmentSplit, SplitPass) runs this kernel as pass (a)
// (kStateOnly) and pass (c) (kSegments).
template <class Tr, SplitPass kPass = SplitPass::kNoSplit>
__global__ void __launch_bounds__(Tr::kThreads) chunk_forward_kernel(const MsrChunkForward p,
                                                                      const SegmentSplit split) {
  using Fusion = typename Tr::Fusion;
  using T = typename Tr::T;
  using Mma = typename Tr::Mma;
  using FragC = typename Tr::FragC;
  constexpr int BT = Tr::BT, BK = Tr::BK, BV = Tr::BV, KT = Tr::KT, kThreads = Tr::kThreads;
  constexpr int NT = BT / 16, NK = BK / 16, NV = BV / 16;
  constexpr int LDK = Tr::LDK, LDV = Tr::LDV;
  static_assert(BT * LDV <= 2 * Tr::kTileK, "output staging must fit in the q/k buffers");

  constexpr bool kStateOnly = kPass == SplitPass::kStateOnly, kSplit = kPass != SplitPass::kNoSplit;
  const int segments = kSplit ? (kStateOnly ? split.count - 1 : split.count) : 1;
  // Pass (c) of a split runs after pass (a) over the same CTA rows, which checked the values, and
  // at the raw state budget it has no registers to spare for the assert's call.
  if constexpr (kPass != SplitPass::kSegments) Fusion::check_values(p, chunk_cta(segments).row);

  RETENTION_SMEM(smem_raw, Tr::kSmemForward);
  T* const sQ = reinterpret_cast<T*>(smem_raw);  // [BT x BK]  q, current dk tile
  T* const sK = sQ + Tr::kTileK;                 // [BT x BK]  k, current dk tile
  T* const sV = sK + Tr::kTileK;                 // [BT x BV]  v
  T* const sVd = sV + Tr::kTileV;                // [BT x BV]  g^(L-1-j) v_j
  T* const sS = sVd + Tr::kTileV;                // [BK x BV]  state tile entering the chunk, as T
  T* const sA = sQ;                              // [BT x BT]  masked scores, once q/k are dead
  T* const sO = sQ;                              // [BT x BV]  output staging
  float* const sExtra = reinterpret_cast<float*>(sS + Tr::kTileV);  // Fusion::forward_extra_smem
  static_assert((2 * Tr::kTileK + 3 * Tr::kTileV) * sizeof(T) % sizeof(double) == 0,
                "the fusion's shared memory may hold float64 values");
  float* const sScratch = reinterpret_cast<float*>(smem_raw + Tr::kSmemForward - Tr::kScratch);

  const Shape& n = p.shape;
  const int H = static_cast<int>(n.H), dk = static_cast<int>(n.dk), dv = static_cast<int>(n.dv);
  const ChunkCta cta = chunk_cta(segments);
  if (cta.row >= Fusion::num_sequences(p) * H) return;  // grid padding (chunk_grid)
  const int seq_index = cta.row / H, h = cta.row % H;
  SeqSpan seq = Fusion::sequence(p, seq_index);
  if constexpr (kSplit) seq = segment_of(seq, split.length, cta.segment);
  const int b = seq.b;
  const int v0 = cta.tile * BV, nv = min(BV, dv - v0);
  const int r0 = 16 * gpu::warp_id();
  const float log2g = p.log_decay[h] * kLog2e;
  ForwardTile<T> tile{seq, seq_index, h, 0, 0, v0, nv, r0, sVd, sS, sO, sV, sExtra};
  Fusion::template begin<Tr>(p, sExtra);
  if constexpr (Fusion::kEpilogue && !kStateOnly) Fusion::template epilogue_begin<Tr>(p, tile);

  const SmemTile<T> q = row_major(sQ, LDK), k = row_major(sK, LDK), a = row_major(sA, LDK);
  const SmemTile<T> v = row_major(sV, LDV), vd = row_major(sVd, LDV), s = row_major(sS, LDV);

  // The state entering this CTA's tokens (split: segment 0 the initial state, the others start
  // from zero in pass (a) and from the scanned state in pass (c)).
  // The state block of (sequence, head) row r is block r of the [N, H, dk, dv] states.
  const float* entering = p.initial_state;
  if constexpr (kSplit)
    if (cta.segment > 0) entering = kStateOnly ? nullptr : split.states + (cta.segment - 1) * split.state_stride;
  FragC S[KT][NV];
  load_state<Tr>(S, entering ? entering + static_cast<std::int64_t>(cta.row) * dk * dv : nullptr, dk, dv, v0);

  for (std::int64_t t0 = 0; t0 < seq.length; t0 += BT) {
    const int L = seq.length - t0 < BT ? static_cast<int>(seq.length - t0) : BT;
    const std::int64_t t = seq.t_begin + t0;  // row of the chunk's first token in batch row b
    const float gL = decay_pow(L, log2g);
    const float s_factor = kStateOnly ? 1.f : state_operand_factor<Tr>(S, sScratch);

    __syncthreads();  // previous chunk is done with sV and sA/sO
    load_tile<BT, BV, kThreads>(sV, LDV, bthd_ptr<T>(p.v, b, t, h, v0), p.v.stride_t, L, nv);
    __syncthreads();
    scale_rows<BT, BV, kThreads>(sVd, sV, LDV, [&](int j) { return j < L ? decay_pow(L - 1 - j, log2g) : 0.f; });

    FragC A[NT], O[NV];
    fill<Mma>(A, 0.f);
    fill<Mma>(O, 0.f);
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const int k0 = kt * BK;
      if (k0 >= dk) break;  // uniform: dk is below this bucket's maximum
      __syncthreads();
      Fusion::template load_qk<BT, BK, kThreads>(p, kStateOnly ? nullptr : sQ, bthd_ptr<T>(p.q, b, t, h, 0),
                                                 p.q.stride_t, sK, bthd_ptr<T>(p.k, b, t, h, 0), p.k.stride_t, LDK,
                                                 L, k0, dk, seq.pos0 + t0, sExtra);
      if constexpr (!kStateOnly) store_state_operand<Tr>(s.block(r0, 0), S[kt], 1.f / s_factor);
      __syncthreads();

      if constexpr (!kStateOnly) {
        warp_mma<Mma, NT, NK>(A, q.block(r0, 0), k.t());  // A += Q K^T
        warp_mma<Mma, NV, NK>(O, q.block(r0, 0), s);      // O += Q 2^-e S
      }
      scale_acc<Mma>(S[kt], gL);                          // S  = g^L S + K^T Vd
      warp_mma<Mma, NV, NT>(S[kt], k.t().block(r0, 0), vd);
    }
    __syncthreads();  // q/k buffers become the score tile; sVd and sS are free
    if constexpr (kStateOnly) continue;
    if constexpr (Fusion::kEpilogue) {
      tile.t0 = t0;
      tile.L = L;
      Fusion::template epilogue_load<Tr>(p, tile);  // visible after the barrier below
    }

    decay_mask<Mma, NT>(A, r0, p.scale, log2g);
    store<Mma, NT>(a.block(r0, 0), A);
    for_each<Mma, NV>(O, [&](int r, int, float& x) { x *= p.scale * decay_pow(r0 + r + 1, log2g) * s_factor; });
    __syncthreads();

    warp_mma<Mma, NV, NT>(O, a.block(r0, 0), v);  // O += (scale Q K^T .* M) V
    __syncthreads();  // all warps are done reading the score tile (and sV)
    if constexpr (Fusion::kEpilogue) {
      Fusion::template epilogue<Tr>(p, tile, O);
    } else {
      store<Mma, NV>(row_major(sO, LDV).block(r0, 0), O);
      __syncthreads();
      store_tile<BT, BV, kThreads>(bthd_ptr<T>(p.o, b, t, h, v0), p.o.stride_t, sO, LDV, L, nv);
    }
  }
  if constexpr (Fusion::kEpilogue && !kStateOnly) Fusion::template epilogue_end<Tr>(p, tile);
  // Where the state leaving this CTA's tokens goes, from the block index again: nothing about
  // it stays live across the chunk loop (the kernels sit at 230-255 registers).
  const ChunkCta done = chunk_cta(segments);
  float* leaving = p.final_state;
  if constexpr (kSplit) {
    if (kStateOnly) leaving = split.states + done.segment * split.state_stride;
    else if (done.segment != split.count - 1) leaving = nullptr;
  }
  if (leaving != nullptr) store_state<Tr>(leaving + static_cast<std::int64_t>(done.row) * dk * dv, S, dk, dv, v0);
}

// Launchers of the forward passes (msr_fwd.cuh), for `rows`
// (sequence, head) CTA rows.  launch_segment_states runs passes (a) and (b) of a split
// (split.count > 1, split.states set); launch_forward_outputs runs the unsplit kernel or
// pass (c).
template <class Tr, SplitPass kPass>
gpu::error_t launch_forward_kernel(const MsrChunkForward& p, std::int64_t rows,
                                   const SegmentSplit& split, int segments) {
  constexpr int kSmem = gpu::dynamic_smem_bytes(Tr::kSmemForward);
  auto* kernel = &chunk_forward_kernel<Tr, kPass>;
  if (gpu::error_t e = gpu::set_max_dynamic_smem(kernel, kSmem); e != gpu::kSuccess) return e;
  dim3 grid;
  if (!chunk_grid(rows, (p.shape.dv + Tr::BV - 1) / Tr::BV, grid, segments)) return gpu::kErrorInvalidValue;
  return gpu::launch(kernel, grid, Tr::kThreads, kSmem, p.stream, p, split);
}

template <class Tr>
gpu::error_t launch_segment_states(const MsrChunkForward& p, std::int64_t rows,
                                   const SegmentSplit& split) {
  if (split.states == nullptr) return gpu::kErrorInvalidValue;
  gpu::error_t e = launch_forward_kernel<Tr, SplitPass::kStateOnly>(p, rows, split, split.count - 1);
  return e != gpu::kSuccess ? e : launch_segment_scan(p, split);
}

template <class Tr>
gpu::error_t launch_forward_outputs(const MsrChunkForward& p, std::int64_t rows,
                                    const SegmentSplit& split) {
  return split.count > 1 ? launch_forward_kernel<Tr, SplitPass::kSegments>(p, rows, split, split.count)
                         : launch_forward_kernel<Tr, SplitPass::kNoSplit>(p, rows, split, 1);
}

}  // namespace retention::kernels
