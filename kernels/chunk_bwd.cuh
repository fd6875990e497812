// chunk_bwd.cuh - the two backward sweeps of chunkwise retention, shared by the raw op
// (chunk_bwd.cu, NoFusion) and the fused MSR layer core (msr_bwd.cu, MsrFusion: rotary
// prologue on q / k, packed sequences).
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
// Both sweeps reuse the forward's decomposition: a CTA owns one dv tile and carries its
// [dk x BV] slice of S (or dH) in registers.  dV only contracts over dk, so each CTA produces
// finished dV rows.  dQ and dK contract over dv, so CTAs of different dv tiles produce partial
// sums; they are accumulated with fp32 atomics into a [B, H, T, dk] workspace and cast to the
// input dtype at the end (the FlashAttention-2 dq_accum scheme; the summation order across dv
// tiles is not deterministic).  Nothing per chunk is stored: states are recomputed.
#pragma once

#include "chunk_common.cuh"

namespace retention::kernels {

// Atomically add the warp's 16 x (16N) accumulator rows to an fp32 row-major matrix.
template <class Mma, int N>
RT_DEVICE void atomic_add_rows(float* g, std::int64_t ld, int r0, int rows_valid, int cols_valid,
                               typename Mma::FragC (&acc)[N]) {
  for_each<Mma, N>(acc, [&](int r, int c, float& x) {
    if (r0 + r < rows_valid && c < cols_valid) atomicAdd(g + (r0 + r) * ld + c, x);
  });
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) chunk_backward_dq_kernel(const typename Tr::Fusion::BackwardParams p) {
  using Fusion = typename Tr::Fusion;
  using T = typename Tr::T;
  using Mma = typename Tr::Mma;
  using FragC = typename Tr::FragC;
  constexpr int BT = Tr::BT, BK = Tr::BK, BV = Tr::BV, KT = Tr::KT, kThreads = Tr::kThreads;
  constexpr int NT = BT / 16, NK = BK / 16, NV = BV / 16;
  constexpr int LDK = Tr::LDK, LDV = Tr::LDV;

  RETENTION_SMEM(smem_raw, Tr::kSmemDq);
  T* const sK = reinterpret_cast<T*>(smem_raw);  // [BT x BK]  k, current dk tile
  T* const sD = sK + Tr::kTileK;                 // [BT x BT]  scale * (dO V^T .* M)
  T* const sV = sD + Tr::kTileK;                 // [BT x BV]  v
  T* const sVd = sV + Tr::kTileV;                // [BT x BV]  g^(L-1-j) v_j
  T* const sDO = sVd + Tr::kTileV;               // [BT x BV]  dO
  T* const sS = sDO + Tr::kTileV;                // [BK x BV]  state tile entering the chunk, as T

  const Shape& n = p.shape;
  const int H = static_cast<int>(n.H), dk = static_cast<int>(n.dk), dv = static_cast<int>(n.dv);
  const SeqSpan seq = Fusion::sequence(p, blockIdx.x / H);
  const int b = seq.b, h = blockIdx.x % H;
  const int v0 = blockIdx.y * BV, nv = min(BV, dv - v0);
  const int r0 = 16 * gpu::warp_id();
  const float log2g = p.log_decay[h] * kLog2e;
  const std::int64_t bh = static_cast<std::int64_t>(b) * H + h;  // batch row: workspace rows
  const std::int64_t sh = seq.state * H + h;                      // state block
  float* const dq_acc = p.workspace + bh * n.T * dk;

  const SmemTile<T> k = row_major(sK, LDK), d = row_major(sD, LDK);
  const SmemTile<T> v = row_major(sV, LDV), vd = row_major(sVd, LDV), dO = row_major(sDO, LDV),
                    s = row_major(sS, LDV);

  FragC S[KT][NV];
  load_state<Tr>(S, p.initial_state ? p.initial_state + sh * dk * dv : nullptr, dk, dv, v0);

  for (std::int64_t t0 = 0; t0 < seq.length; t0 += BT) {
    const int L = seq.length - t0 < BT ? static_cast<int>(seq.length - t0) : BT;
    const std::int64_t t = seq.t_begin + t0;  // row of the chunk's first token in batch row b
    const float gL = decay_pow(L, log2g);

    __syncthreads();
    load_tile<BT, BV, kThreads>(sV, LDV, bthd_ptr<T>(p.v, b, t, h, v0), p.v.stride_t, L, nv);
    load_tile<BT, BV, kThreads>(sDO, LDV, bthd_ptr<T>(p.grad_o, b, t, h, v0), p.grad_o.stride_t, L, nv);
    __syncthreads();
    scale_rows<BT, BV, kThreads>(sVd, sV, LDV, [&](int j) { return j < L ? decay_pow(L - 1 - j, log2g) : 0.f; });

    FragC D[NT];
    fill<Mma>(D, 0.f);
    warp_mma<Mma, NT, NV>(D, dO.block(r0, 0), v.t());  // D = dO V^T
    for_each<Mma, NT>(D, [&](int r, int j, float& x) {
      const int i = r0 + r;
      x = i >= j ? x * p.scale * decay_pow(i - j, log2g) : 0.f;
    });
    store<Mma, NT>(d.block(r0, 0), D);

#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const int k0 = kt * BK;
      if (k0 >= dk) break;
      __syncthreads();
      Fusion::template load_qk<BT, BK, kThreads>(p, static_cast<T*>(nullptr), static_cast<const T*>(nullptr), 0,
                                                 sK, bthd_ptr<T>(p.k, b, t, h, 0), p.k.stride_t, LDK, L, k0,
                                                 dk, seq.pos0 + t0);
      store<Mma, NV>(s.block(r0, 0), S[kt]);
      __syncthreads();

      FragC G[NK];
      fill<Mma>(G, 0.f);
      warp_mma<Mma, NK, NV>(G, dO.block(r0, 0), s.t());  // dO S^T
      for_each<Mma, NK>(G, [&](int r, int, float& x) { x *= p.scale * decay_pow(r0 + r + 1, log2g); });
      warp_mma<Mma, NK, NT>(G, d.block(r0, 0), k);  // + D K
      atomic_add_rows<Mma, NK>(dq_acc + t * dk + k0, dk, r0, L, dk - k0, G);

      scale_acc<Mma>(S[kt], gL);
      warp_mma<Mma, NV, NT>(S[kt], k.t().block(r0, 0), vd);
    }
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) chunk_backward_dkv_kernel(const typename Tr::Fusion::BackwardParams p) {
  using Fusion = typename Tr::Fusion;
  using T = typename Tr::T;
  using Mma = typename Tr::Mma;
  using FragC = typename Tr::FragC;
  constexpr int BT = Tr::BT, BK = Tr::BK, BV = Tr::BV, KT = Tr::KT, kThreads = Tr::kThreads;
  constexpr int NT = BT / 16, NK = BK / 16, NV = BV / 16;
  constexpr int LDK = Tr::LDK, LDV = Tr::LDV;
  static_assert(BT * LDV <= 2 * Tr::kTileK, "dV staging must fit in the q/k buffers");

  RETENTION_SMEM(smem_raw, Tr::kSmemDkv);
  T* const sQ = reinterpret_cast<T*>(smem_raw);  // [BT x BK]  q, current dk tile
  T* const sK = sQ + Tr::kTileK;                 // [BT x BK]  k, current dk tile
  T* const sD = sK + Tr::kTileK;                 // [BT x BT]  scale * (dO V^T .* M)
  T* const sV = sD + Tr::kTileK;                 // [BT x BV]  v
  T* const sDO = sV + Tr::kTileV;                // [BT x BV]  dO
  T* const sDOd = sDO + Tr::kTileV;              // [BT x BV]  scale g^(i+1) dO_i
  T* const sH = sDOd + Tr::kTileV;               // [BK x BV]  dH tile (state leaving the chunk), as T
  T* const sA = sQ;                              // [BT x BT]  scale * (K Q^T .* M^T), once q/k are dead
  T* const sO = sQ;                              // [BT x BV]  dV staging

  const Shape& n = p.shape;
  const int H = static_cast<int>(n.H), dk = static_cast<int>(n.dk), dv = static_cast<int>(n.dv);
  const SeqSpan seq = Fusion::sequence(p, blockIdx.x / H);
  const int b = seq.b, h = blockIdx.x % H;
  const int v0 = blockIdx.y * BV, nv = min(BV, dv - v0);
  const int r0 = 16 * gpu::warp_id();
  const float log2g = p.log_decay[h] * kLog2e;
  const std::int64_t bh = static_cast<std::int64_t>(b) * H + h;  // batch row: workspace rows
  const std::int64_t sh = seq.state * H + h;                      // state block
  float* const dk_acc = p.workspace + (n.B * n.H + bh) * n.T * dk;

  const SmemTile<T> q = row_major(sQ, LDK), k = row_major(sK, LDK), d = row_major(sD, LDK),
                    a = row_major(sA, LDK);
  const SmemTile<T> v = row_major(sV, LDV), dO = row_major(sDO, LDV), dOd = row_major(sDOd, LDV),
                    hh = row_major(sH, LDV);

  FragC dH[KT][NV];
  load_state<Tr>(dH, p.grad_final_state ? p.grad_final_state + sh * dk * dv : nullptr, dk, dv, v0);

  const std::int64_t num_chunks = (seq.length + BT - 1) / BT;
  for (std::int64_t c = num_chunks - 1; c >= 0; --c) {
    const std::int64_t t0 = c * BT;
    const int L = seq.length - t0 < BT ? static_cast<int>(seq.length - t0) : BT;
    const std::int64_t t = seq.t_begin + t0;  // row of the chunk's first token in batch row b
    const float gL = decay_pow(L, log2g);
    const auto tail_decay = [&](int j) { return j < L ? decay_pow(L - 1 - j, log2g) : 0.f; };

    __syncthreads();
    load_tile<BT, BV, kThreads>(sV, LDV, bthd_ptr<T>(p.v, b, t, h, v0), p.v.stride_t, L, nv);
    load_tile<BT, BV, kThreads>(sDO, LDV, bthd_ptr<T>(p.grad_o, b, t, h, v0), p.grad_o.stride_t, L, nv);
    __syncthreads();
    scale_rows<BT, BV, kThreads>(sDOd, sDO, LDV, [&](int i) { return p.scale * decay_pow(i + 1, log2g); });

    FragC D[NT];
    fill<Mma>(D, 0.f);
    warp_mma<Mma, NT, NV>(D, dO.block(r0, 0), v.t());  // D = dO V^T
    for_each<Mma, NT>(D, [&](int r, int j, float& x) {
      const int i = r0 + r;
      x = i >= j ? x * p.scale * decay_pow(i - j, log2g) : 0.f;
    });
    store<Mma, NT>(d.block(r0, 0), D);

    FragC At[NT], dV[NV];
    fill<Mma>(At, 0.f);
    fill<Mma>(dV, 0.f);
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const int k0 = kt * BK;
      if (k0 >= dk) break;
      __syncthreads();
      Fusion::template load_qk<BT, BK, kThreads>(p, sQ, bthd_ptr<T>(p.q, b, t, h, 0), p.q.stride_t, sK,
                                                 bthd_ptr<T>(p.k, b, t, h, 0), p.k.stride_t, LDK, L, k0, dk,
                                                 seq.pos0 + t0);
      store<Mma, NV>(hh.block(r0, 0), dH[kt]);
      __syncthreads();

      warp_mma<Mma, NT, NK>(At, k.block(r0, 0), q.t());  // At += K Q^T
      warp_mma<Mma, NV, NK>(dV, k.block(r0, 0), hh);     // dV += K dH

      FragC G[NK];
      fill<Mma>(G, 0.f);
      warp_mma<Mma, NK, NV>(G, v.block(r0, 0), hh.t());  // V dH^T
      for_each<Mma, NK>(G, [&](int r, int, float& x) { x *= tail_decay(r0 + r); });
      warp_mma<Mma, NK, NT>(G, d.t().block(r0, 0), q);  // + D^T Q
      atomic_add_rows<Mma, NK>(dk_acc + t * dk + k0, dk, r0, L, dk - k0, G);

      scale_acc<Mma>(dH[kt], gL);  // dH = g^L dH + Q^T dOd
      warp_mma<Mma, NV, NT>(dH[kt], q.t().block(r0, 0), dOd);
    }
    __syncthreads();  // q/k buffers become the transposed score tile

    for_each<Mma, NT>(At, [&](int r, int i, float& x) {
      const int j = r0 + r;
      x = i >= j ? x * p.scale * decay_pow(i - j, log2g) : 0.f;
    });
    store<Mma, NT>(a.block(r0, 0), At);
    for_each<Mma, NV>(dV, [&](int r, int, float& x) { x *= tail_decay(r0 + r); });
    __syncthreads();

    warp_mma<Mma, NV, NT>(dV, a.block(r0, 0), dO);  // + (K Q^T .* M^T) dO
    __syncthreads();
    store<Mma, NV>(row_major(sO, LDV).block(r0, 0), dV);
    __syncthreads();
    store_tile<BT, BV, kThreads>(bthd_ptr<T>(p.grad_v, b, t, h, v0), p.grad_v.stride_t, sO, LDV, L, nv);
  }

  store_state<Tr>(p.grad_initial_state + sh * dk * dv, dH, dk, dv, v0);
}

}  // namespace retention::kernels
