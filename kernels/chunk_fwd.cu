// chunk_fwd.cu - fused chunkwise retention forward.
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
// factors and all accumulators stay fp32.
#include "chunk_common.cuh"

namespace retention::kernels {
namespace {

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) chunk_forward_kernel(const ChunkForwardParams p) {
  using T = typename Tr::T;
  using Mma = typename Tr::Mma;
  using FragC = typename Tr::FragC;
  constexpr int BT = Tr::BT, BK = Tr::BK, BV = Tr::BV, KT = Tr::KT, kThreads = Tr::kThreads;
  constexpr int NT = BT / 16, NK = BK / 16, NV = BV / 16;
  constexpr int LDK = Tr::LDK, LDV = Tr::LDV;
  static_assert(BT * LDV <= 2 * Tr::kTileK, "output staging must fit in the q/k buffers");

  RETENTION_SMEM(smem_raw, Tr::kSmemForward);
  T* const sQ = reinterpret_cast<T*>(smem_raw);  // [BT x BK]  q, current dk tile
  T* const sK = sQ + Tr::kTileK;                 // [BT x BK]  k, current dk tile
  T* const sV = sK + Tr::kTileK;                 // [BT x BV]  v
  T* const sVd = sV + Tr::kTileV;                // [BT x BV]  g^(L-1-j) v_j
  T* const sS = sVd + Tr::kTileV;                // [BK x BV]  state tile entering the chunk, as T
  T* const sA = sQ;                              // [BT x BT]  masked scores, once q/k are dead
  T* const sO = sQ;                              // [BT x BV]  output staging

  const Shape& n = p.shape;
  const int H = static_cast<int>(n.H), dk = static_cast<int>(n.dk), dv = static_cast<int>(n.dv);
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const int v0 = blockIdx.y * BV, nv = min(BV, dv - v0);
  const int r0 = 16 * gpu::warp_id();
  const float log2g = p.log_decay[h] * kLog2e;
  const std::int64_t state_off = (static_cast<std::int64_t>(b) * H + h) * dk * dv;

  const SmemTile<T> q = row_major(sQ, LDK), k = row_major(sK, LDK), a = row_major(sA, LDK);
  const SmemTile<T> v = row_major(sV, LDV), vd = row_major(sVd, LDV), s = row_major(sS, LDV);

  FragC S[KT][NV];
  load_state<Tr>(S, p.initial_state ? p.initial_state + state_off : nullptr, dk, dv, v0);

  for (std::int64_t t0 = 0; t0 < n.T; t0 += BT) {
    const int L = n.T - t0 < BT ? static_cast<int>(n.T - t0) : BT;
    const float gL = decay_pow(L, log2g);

    __syncthreads();  // previous chunk is done with sV and sA/sO
    load_tile<BT, BV, kThreads>(sV, LDV, bthd_ptr<T>(p.v, b, t0, h, v0), p.v.stride_t, L, nv);
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
      load_tile<BT, BK, kThreads>(sQ, LDK, bthd_ptr<T>(p.q, b, t0, h, k0), p.q.stride_t, L, dk - k0);
      load_tile<BT, BK, kThreads>(sK, LDK, bthd_ptr<T>(p.k, b, t0, h, k0), p.k.stride_t, L, dk - k0);
      store<Mma, NV>(s.block(r0, 0), S[kt]);
      __syncthreads();

      warp_mma<Mma, NT, NK>(A, q.block(r0, 0), k.t());  // A += Q K^T
      warp_mma<Mma, NV, NK>(O, q.block(r0, 0), s);      // O += Q S
      scale_acc<Mma>(S[kt], gL);                          // S  = g^L S + K^T Vd
      warp_mma<Mma, NV, NT>(S[kt], k.t().block(r0, 0), vd);
    }
    __syncthreads();  // q/k buffers become the score tile

    for_each<Mma, NT>(A, [&](int r, int j, float& x) {
      const int i = r0 + r;
      x = i >= j ? x * decay_pow(i - j, log2g) : 0.f;
    });
    store<Mma, NT>(a.block(r0, 0), A);
    for_each<Mma, NV>(O, [&](int r, int, float& x) { x *= decay_pow(r0 + r + 1, log2g); });
    __syncthreads();

    warp_mma<Mma, NV, NT>(O, a.block(r0, 0), v);  // O += (Q K^T .* M) V
    scale_acc<Mma>(O, p.scale);
    __syncthreads();  // all warps are done reading the score tile
    store<Mma, NV>(row_major(sO, LDV).block(r0, 0), O);
    __syncthreads();
    store_tile<BT, BV, kThreads>(bthd_ptr<T>(p.o, b, t0, h, v0), p.o.stride_t, sO, LDV, L, nv);
  }

  if (p.final_state != nullptr) store_state<Tr>(p.final_state + state_off, S, dk, dv, v0);
}

template <class T>
struct ChunkForward {
  template <int kMaxDk>
  struct Bucket {
    static gpu::error_t run(const ChunkForwardParams& p) {
      using Tr = ChunkTraits<T, kMaxDk>;
      constexpr int kSmem = gpu::dynamic_smem_bytes(Tr::kSmemForward);
      auto* kernel = &chunk_forward_kernel<Tr>;
      gpu::error_t e = gpu::set_max_dynamic_smem(kernel, kSmem);
      if (e != gpu::kSuccess) return e;
      const dim3 grid(static_cast<unsigned>(p.shape.B * p.shape.H),
                      static_cast<unsigned>((p.shape.dv + Tr::BV - 1) / Tr::BV));
      kernel<<<grid, Tr::kThreads, kSmem, p.stream>>>(p);
      return gpu::last_error();
    }
  };
};

}  // namespace

gpu::error_t launch_chunk_forward(const ChunkForwardParams& p) {
  const Shape& n = p.shape;
  if (n.B < 0 || n.T < 0 || n.H < 0 || n.dk < 0 || n.dv < 0 || n.dk > kMaxHeadDimK || p.log_decay == nullptr)
    return gpu::kErrorInvalidValue;
  if (n.B * n.H == 0 || n.dv == 0) return gpu::kSuccess;
  if (gpu::error_t e = gpu::check_warp_size(); e != gpu::kSuccess) return e;
  switch (p.dtype) {
    case DType::kF16:
      return dispatch_dk<ChunkForward<f16_t>::template Bucket>(n.dk, p);
    case DType::kBF16:
      return dispatch_dk<ChunkForward<bf16_t>::template Bucket>(n.dk, p);
    case DType::kF32:
      return dispatch_dk<ChunkForward<float>::template Bucket>(n.dk, p);
  }
  return gpu::kErrorInvalidValue;
}

}  // namespace retention::kernels
