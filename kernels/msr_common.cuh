// msr_common.cuh - the fusion policy of the MSR layer core for the chunk kernels, and the
// per-element math (rotary angles, decay normaliser, gate) shared by the MSR kernels.
//
// How the layer core maps onto the chunk kernels (chunk_fwd.cuh, chunk_bwd.cuh):
//
//  * Prologue (rotary).  q and k tiles are rotated while they are copied to shared memory.
//    Each thread of the copy keeps one tile column (kThreads is a multiple of the tile width),
//    so it looks theta of that column up once per tile and every row only needs its angle.
//    Rotation partners are read from global memory by absolute column, so neox pairs
//    (i, i + dk/2), which straddle dk tiles, need no special case.
//
//  * Angles.  p * theta_i loses about |p theta| * 2^-24 radians in fp32 (0.06 rad at p = 1e6),
//    so theta_i (10000^(-x)) and the product p * theta_i are evaluated in float64, reduced to
//    [-pi/4, pi/4] in float64 (rint + two-term pi/2), and only that reduced angle is rounded
//    to fp32 for a short polynomial: the angle error stays below ~1e-7 rad at any position,
//    and the only float64 work per element is a multiply, a rint and two fmas (theta_i comes
//    from a [dk/2] float64 table in shared memory that each CTA fills before its first chunk).
//
//  * Packed sequences.  A CTA's sequence is a batch row or [cu[s], cu[s+1]) of batch row 0;
//    empty sequences run no chunk and pass the state (or its gradient) through.
//
//  * Epilogue (RMSNorm + gate).  The norm needs the whole dv row of u, but a CTA owns one dv
//    tile (the state slice [dk x BV] is what fits in registers; dv = 432 would need 7 of them).
//    Keeping a whole row on chip would mean a CTA per (sequence, head) holding the full
//    [dk x dv] state, i.e. global-memory states or spills.  So the row statistics are
//    *recomputed* instead: when dv needs more than one tile, a statistics pass runs the same
//    kernel and writes, per dv tile and row, the partial sum of u^2 (and, backward, of
//    dz w u) to a small fp32 buffer [tiles, B*T*H, 2]; the output pass recomputes u and reads
//    those partials (deterministic: no atomics).  With a single dv tile (dv <= BV) the row
//    totals are reduced in registers (a butterfly over the lanes sharing a row) and one pass
//    suffices.  The cost of the second pass is one more retention evaluation; u itself never
//    reaches global memory.
//
//  * Backward rotation.  The backward reads q and k in four kernels (two epilogue passes, two
//    sweeps), each once per dv tile, so it rotates them once into a workspace copy (input
//    dtype, like the tiles the forward's prologue produces) and runs every backward kernel
//    without a prologue; those instantiations then carry no rotation code, which is what
//    keeps the dk = 256 sweeps free of spills.  Only the forward keeps q~ / k~ off memory.
//
//  * Backward epilogue.  Per row: dz = dy silu(g); dg = dy z silu'(g); dw += dz n^; dn = dz w;
//    do = r (dn - n^ mean(dn n^)); du = a do (no norm: du = a dz).  mean(dn n^) =
//    a r / dv * sum_j dz_j w_j u_j, so one statistics pass gives both row sums.  A gradient
//    pass (the forward kernel again, recomputing u) writes du (input dtype, workspace), dg and
//    per-CTA column sums of dz n^ (d_norm_weight, reduced later without atomics).  The chunk
//    backward sweeps then run with du as grad_o on the rotated q / k, and the final cast of
//    the fp32 dq~ / dk~ accumulators applies R(p)^T.
#pragma once

#include <cmath>
#include <cstdint>

#include "chunk_bwd.cuh"
#include "chunk_common.cuh"
#include "chunk_fwd.cuh"
#include "msr_kernels.h"

namespace retention::kernels {

// The forward pass launcher (msr_fwd.cu), also used by the backward (msr_bwd.cu); and the dv
// tile width it uses (forward or backward epilogue passes), which sizes the statistics buffer.
gpu::error_t launch_msr_chunk_pass(const MsrChunkForward& p);
// The chunk kernels of one dtype: the forward passes (msr_fwd.cuh) and the backward sweeps
// (msr_bwd.cuh), each instantiated in its own translation unit (instances/) so that the builds
// of the three dtypes run in parallel.
template <class T>
gpu::error_t launch_msr_chunk_pass_as(const MsrChunkForward& p);
template <class T>
gpu::error_t launch_msr_backward_sweeps_as(const MsrChunkBackward& p, const BackwardPlan& plan);
int msr_forward_tile_width(DType dtype, std::int64_t dk, bool backward_passes);
// Argument validation shared by the MSR launchers (msr_fwd.cu).
bool msr_shape_ok(const Shape& n, const MsrSequences& seq, const MsrOptions& opt, const float* log_decay);

RT_HOST_DEVICE inline std::int64_t msr_stats_rows(const Shape& n) { return n.B * n.T * n.H; }
// Neither prologue nor epilogue: the raw ops (chunk_fwd.cu, chunk_bwd.cu), or a layer with every
// option off.  The backward then skips its epilogue passes; the forward runs NoFusion when the
// sequences are also batch rows (forward_without_fusion).
template <class P>
bool without_fusion(const P& p) {
  return p.opt.rotary == RotaryMode::kNone && !p.opt.norm && !p.opt.decay_norm && p.g.ptr == nullptr;
}

// The output pass runs without fusion (NoFusion: batch rows, no prologue, no epilogue).  Given
// offsets keep MsrFusion, whose value checks (value_checks.cuh) see them: with every option off
// they change nothing, but a negative one is still an error, as on the CPU.
inline bool forward_without_fusion(const MsrForwardParams& p) {
  return without_fusion(p) && p.seq.cu_seqlens == nullptr && p.seq.offsets == nullptr;
}

// MsrFusion's state budget, half the raw one (BV = 64 / 32 / 16 for dk <= 64 / 128 / 256; a
// quarter, BV = 64 / 16 / 16, for the backward's epilogue passes): the rotary prologue and the
// epilogue need registers next to the state, and with the raw budget ptxas spills (the raw
// kernels already sit at 230-255 registers).
constexpr int kMsrForwardStateRegs = 32;

// The layer-core parameters (Msr*Params) of a raw op's (Chunk*Params): batch rows as
// sequences, every option off.
template <class Msr, class Raw>
Msr raw_layer(const Raw& p) {
  Msr m;
  static_cast<Raw&>(m) = p;
  m.seq.num_sequences = p.shape.B;  // no cu_seqlens, no offsets
  m.opt.rotary = RotaryMode::kNone;
  m.opt.norm = false;
  return m;
}

// ------------------------------------------------------------------------------------------
// Per-element math
// ------------------------------------------------------------------------------------------

// Rotation partner of column d, the sign of the partner's term (x'_d = x_d cos + sign x_p sin)
// and the pair index i (the angle is p theta_i).
RT_HOST_DEVICE inline void rotary_pair(RotaryMode mode, int d, int dk, int& partner, float& sign, int& pair) {
  const int half = dk / 2;
  if (mode == RotaryMode::kTorchscale) {
    partner = d ^ 1;
    sign = (d & 1) ? 1.f : -1.f;
    pair = d >> 1;
  } else {
    const bool lower = d < half;
    pair = lower ? d : d - half;
    partner = lower ? d + half : d - half;
    sign = lower ? -1.f : 1.f;
  }
}

// theta_i in float64.  The forward kernel evaluates it once per CTA into a [dk/2] shared-memory
// table (MsrFusion::begin), so its inner loops never run a float64 pow.
RT_HOST_DEVICE inline double rotary_theta(RotaryMode mode, int pair, int dk) {
  const int half = dk / 2;
  if (mode == RotaryMode::kTorchscale)
    return half == 1 ? 1.0 : pow(10000.0, -static_cast<double>(pair) / static_cast<double>(half - 1));
  return pow(10000.0, -2.0 * static_cast<double>(pair) / static_cast<double>(dk));
}

inline constexpr std::size_t kThetaTableBytes = kMaxHeadDimK / 2 * sizeof(double);

// cos and sin of pos * theta.  The product and the reduction by multiples of pi/2 are done in
// float64 (two-term pi/2, so the reduced angle is exact to ~1e-16 for any int64 position
// that matters); the reduced angle x in [-pi/4, pi/4] is rounded to fp32 and evaluated with
// Taylor polynomials (truncation < 2e-9 on that interval, below fp32 rounding).  Unlike
// sincosf this has no large-argument slow path, so it needs no local memory.
RT_DEVICE void rotary_cos_sin(double pos, double theta, float& c, float& s) {
  constexpr double kTwoOverPi = 0.63661977236758138;
  constexpr double kHalfPiHi = 1.5707963267948966;      // pi/2 rounded to float64
  constexpr double kHalfPiLo = 6.123233995736766e-17;   // pi/2 - kHalfPiHi
  const double a = pos * theta;  // pos: an integer, exact in float64 below 2^53
  const double quarter_turns = rint(a * kTwoOverPi);
  const float x = static_cast<float>(fma(-quarter_turns, kHalfPiLo, fma(-quarter_turns, kHalfPiHi, a)));
  const float x2 = x * x;
  const float sin_x = x * (1.f + x2 * (-1.f / 6 + x2 * (1.f / 120 + x2 * (-1.f / 5040 + x2 * (1.f / 362880)))));
  const float cos_x =
      1.f + x2 * (-0.5f + x2 * (1.f / 24 + x2 * (-1.f / 720 + x2 * (1.f / 40320 + x2 * (-1.f / 3628800)))));
  // angle = x + q pi/2: rotate (cos x, sin x) by q quarter turns.
  const int q = static_cast<int>(static_cast<std::int64_t>(quarter_turns) & 3);
  c = q == 0 ? cos_x : q == 1 ? -sin_x : q == 2 ? -cos_x : sin_x;
  s = q == 0 ? sin_x : q == 1 ? cos_x : q == 2 ? -sin_x : -cos_x;
}

// a = 1/sqrt(S_j), S_j = (1 - gamma^j)/(1 - gamma) = expm1(j lg)/expm1(lg) (j when lg == 0).
// j lg is formed in float64 (j can be large), the rest in fp32 (relative error ~1e-7).
RT_DEVICE float decay_normaliser(std::int64_t j, float log_gamma) {
  if (log_gamma == 0.f) return rsqrtf(static_cast<float>(j));
  const float x = static_cast<float>(static_cast<double>(j) * static_cast<double>(log_gamma));
  return rsqrtf(expm1f(x) / expm1f(log_gamma));
}

RT_DEVICE float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Global -> shared copy of the rotated q and k tiles (dk tile [k0, k0 + C)).  q_row / k_row
// point at column 0 of the first row; rows >= rows_valid and columns >= dk are zero-filled.
template <int R, int C, int kThreads, class T>
RT_DEVICE void load_rotated_qk(RotaryMode mode, const double* theta_table, T* dst_q, const T* q_row, std::int64_t q_stride, T* dst_k,
                               const T* k_row, std::int64_t k_stride, int ld, int rows_valid, int k0, int dk,
                               std::int64_t pos0) {
  static_assert(kThreads % C == 0, "each thread keeps one column of the tile");
  const int c = static_cast<int>(threadIdx.x) % C, d = k0 + c;
  const bool column_valid = d < dk;
  int partner = d, pair = 0;
  float sign = 0.f;
  if (column_valid) rotary_pair(mode, d, dk, partner, sign, pair);
  const double theta = column_valid ? theta_table[pair] : 0.0;
  // Not unrolled, with running pointers and a running float64 position: this runs inside the
  // dk loop while the state and score accumulators are live, and every register it holds is
  // one the accumulators cannot have (the fp32 dk = 256 bucket is at the limit).
  constexpr int kRowStep = kThreads / C;
  // q and k one after the other (the angle is recomputed): halves the values in flight.
  for (int operand = dst_q != nullptr ? 0 : 1; operand < 2; ++operand) {
    T* const dst = operand == 0 ? dst_q : dst_k;
    int r = static_cast<int>(threadIdx.x) / C;
    const std::int64_t stride = operand == 0 ? q_stride : k_stride;
    const T* x = (operand == 0 ? q_row : k_row) + r * stride;
    double pos = static_cast<double>(pos0 + r);
#pragma unroll 1
    for (; r < R; r += kRowStep) {
      T out = Elem<T>::zero();
      if (column_valid && r < rows_valid) {
        float cs, sn;
        rotary_cos_sin(pos, theta, cs, sn);
        out = Elem<T>::from_float(Elem<T>::to_float(x[d]) * cs + sign * Elem<T>::to_float(x[partner]) * sn);
      }
      dst[r * ld + c] = out;
      x += kRowStep * stride;
      pos += kRowStep;
    }
  }
}

// ------------------------------------------------------------------------------------------
// The fusion policy
// ------------------------------------------------------------------------------------------
// kBackwardPasses selects the epilogue family at compile time (forward: statistics / output;
// backward: statistics with dy / gradients), so each instantiation only carries the registers
// of its own passes.
template <bool kBackwardPasses>
struct MsrFusion : NoFusion {
  static constexpr bool kEpilogue = true;
  // Backward passes: per-warp column sums of dz n^ for d_norm_weight (kBackwardGrad), kept across
  // chunks.  Forward passes: the [dk/2] rotary theta table.
  static constexpr int forward_extra_smem(int warps, int bv) {
    return kBackwardPasses ? warps * bv * static_cast<int>(sizeof(float)) : static_cast<int>(kThetaTableBytes);
  }

  // Fills the theta table for load_qk; visible after the chunk loop's first barrier.
  template <class Tr>
  RT_DEVICE static void begin(const MsrChunkForward& p, float* extra) {
    if constexpr (!kBackwardPasses) {
      if (p.opt.rotary == RotaryMode::kNone) return;
      double* const theta = reinterpret_cast<double*>(extra);
      const int dk = static_cast<int>(p.shape.dk);
      for (int i = threadIdx.x; i < dk / 2; i += Tr::kThreads) theta[i] = rotary_theta(p.opt.rotary, i, dk);
    }
  }

  template <class P>
  RT_DEVICE static SeqSpan sequence(const P& p, int n) {
    return msr_sequence(p, n);
  }
  template <class P>
  RT_DEVICE static void check_values(const P& p, int row) {
    const int H = static_cast<int>(p.shape.H);
    if (row < p.seq.num_sequences * H) check_msr_values(p, row / H, row % H);
  }

  template <int R, int C, int kThreads, class T, class P>
  RT_DEVICE static void load_qk(const P& p, T* dst_q, const T* q_row, std::int64_t q_stride, T* dst_k,
                                const T* k_row, std::int64_t k_stride, int ld, int rows_valid, int k0, int dk,
                                std::int64_t pos0, const float* extra = nullptr) {
    // The backward passes get pre-rotated q / k (msr_bwd.cu), so their instantiations carry
    // no rotation code at all.
    const RotaryMode mode = kBackwardPasses ? RotaryMode::kNone : p.opt.rotary;
    if (kBackwardPasses || mode == RotaryMode::kNone) {
      NoFusion::load_qk<R, C, kThreads>(p, dst_q, q_row, q_stride, dst_k, k_row, k_stride, ld, rows_valid, k0, dk,
                                        pos0);
    } else if constexpr (!kBackwardPasses) {
      load_rotated_qk<R, C, kThreads>(mode, reinterpret_cast<const double*>(extra), dst_q, q_row, q_stride, dst_k,
                                      k_row, k_stride, ld, rows_valid, k0, dk, pos0);
    }
  }

  // ---- epilogue hooks of chunk_forward_kernel -------------------------------------------

  template <class Tr, class T>
  RT_DEVICE static void epilogue_begin(const MsrChunkForward& p, const ForwardTile<T>& tile) {
    if constexpr (kBackwardPasses) {
      if (p.pass != MsrPass::kBackwardGrad) return;
      for (int i = threadIdx.x; i < Tr::kWarps * Tr::BV; i += Tr::kThreads) tile.extra[i] = 0.f;
    }
    // Visible after the first barrier of the chunk loop (or the one in epilogue_end).
  }

  // Operand tiles of the chunk: g -> spare0, dy -> spare1 (both [BT x BV], zero-filled).
  template <class Tr, class T>
  RT_DEVICE static void epilogue_load(const MsrChunkForward& p, const ForwardTile<T>& tile) {
    const std::int64_t t = tile.seq.t_begin + tile.t0;
    if (p.pass != MsrPass::kForwardStats && p.g.ptr != nullptr)
      load_tile<Tr::BT, Tr::BV, Tr::kThreads>(tile.spare0, Tr::LDV, bthd_ptr<T>(p.g, tile.seq.b, t, tile.h, tile.v0),
                                              p.g.stride_t, tile.L, tile.nv);
    if (kBackwardPasses)
      load_tile<Tr::BT, Tr::BV, Tr::kThreads>(tile.spare1, Tr::LDV,
                                              bthd_ptr<T>(p.grad_y, tile.seq.b, t, tile.h, tile.v0),
                                              p.grad_y.stride_t, tile.L, tile.nv);
  }

  // O holds u for the warp's 16 rows of the chunk and the CTA's dv tile.
  template <class Tr, class T>
  RT_DEVICE static void epilogue(const MsrChunkForward& p, const ForwardTile<T>& tile,
                                 typename Tr::FragC (&O)[Tr::BV / 16]) {
    using Mma = typename Tr::Mma;
    using L = typename Mma::Layout;
    constexpr int E = L::kCElems, NV = Tr::BV / 16, LDV = Tr::LDV;
    const int lane = gpu::lane_id();
    const int H = static_cast<int>(p.shape.H), dv = static_cast<int>(p.shape.dv);
    const float inv_dv = 1.f / static_cast<float>(dv);
    const bool gated = p.g.ptr != nullptr;
    constexpr bool backward = kBackwardPasses;
    const SmemTile<T> gate_tile = row_major(tile.spare0, LDV), dy_tile = row_major(tile.spare1, LDV);
    const std::int64_t t = tile.seq.t_begin + tile.t0;
    // Row of the statistics buffer: the token's (b, t, h).
    const auto stats_row = [&](int row) {
      return (static_cast<std::int64_t>(tile.seq.b) * p.shape.T + t + row) * H + tile.h;
    };
    const auto weight = [&](int col) {
      return p.opt.norm_weight != nullptr && tile.v0 + col < dv ? p.opt.norm_weight[tile.v0 + col] : 1.f;
    };
    const auto gate = [&](int row, int col) { return gated ? Elem<T>::to_float(gate_tile(row, col)) : 0.f; };

    // dz = dy silu(g) (backward passes), recomputed from the shared tiles where needed so that
    // only O stays live across the epilogue.
    const auto grad_z = [&](int row, int col) {
      const float dy = Elem<T>::to_float(dy_tile(row, col));
      const float gv = gate(row, col);
      return gated ? dy * gv * sigmoid(gv) : dy;
    };

    // Row statistics: sum u^2 and sum dz w u over the dv tile (stats passes) or the whole row.
    float sum_u2[E], sum_dzwu[E];
#pragma unroll
    for (int i = 0; i < E; ++i) sum_u2[i] = sum_dzwu[i] = 0.f;
    const bool stats_pass = p.pass == MsrPass::kForwardStats || p.pass == MsrPass::kBackwardStats;
    const bool single_tile = gridDim.x == 1;  // blockIdx.x is the dv tile, split or not (chunk_grid)
    if (stats_pass || (p.opt.norm && single_tile)) {
      float part_u2[E], part_dzwu[E];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        part_u2[i] = part_dzwu[i] = 0.f;
        const int row = tile.r0 + L::c(lane, i).row;
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int col = 16 * j + L::c(lane, i).col;
          const float u = O[j].x[i];
          part_u2[i] += u * u;
          if constexpr (backward) part_dzwu[i] += grad_z(row, col) * weight(col) * u;
        }
      }
      row_reduce<Mma>(part_u2, sum_u2);
      if constexpr (backward) row_reduce<Mma>(part_dzwu, sum_dzwu);
    }
    if (stats_pass) {
      const std::int64_t rows = msr_stats_rows(p.shape);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const int row = tile.r0 + L::c(lane, i).row;
        if (row < tile.L && first_in<Mma, true>(lane, i)) {
          float* out = p.stats + (blockIdx.x * rows + stats_row(row)) * 2;
          out[0] = sum_u2[i];
          out[1] = sum_dzwu[i];
        }
      }
      return;
    }
    if (p.opt.norm && !single_tile) {
      const std::int64_t rows = msr_stats_rows(p.shape);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const int row = tile.r0 + L::c(lane, i).row;
        if (row < tile.L) {
          const float* in = p.stats + stats_row(row) * 2;
          for (unsigned y = 0; y < gridDim.x; ++y) {
            sum_u2[i] += in[y * rows * 2];
            sum_dzwu[i] += in[y * rows * 2 + 1];
          }
        }
      }
    }

    // Per-row factors: a (decay normaliser), r = rsqrt(mean o^2 + eps), m = mean(dn n^).
    const float log_gamma = p.log_decay[tile.h];
    float a[E], r[E], m[E];
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int row = tile.r0 + L::c(lane, i).row;
      a[i] = p.opt.decay_norm ? decay_normaliser(tile.seq.pos0 + tile.t0 + row + 1, log_gamma) : 1.f;
      r[i] = 1.f;
      m[i] = 0.f;
      if (p.opt.norm) {
        r[i] = rsqrtf(a[i] * a[i] * sum_u2[i] * inv_dv + p.opt.eps);
        m[i] = a[i] * r[i] * sum_dzwu[i] * inv_dv;
      }
    }

    const SmemTile<T> out0 = row_major(tile.stage0, LDV);  // y or du
    if constexpr (!backward) {
#pragma unroll
      for (int j = 0; j < NV; ++j)
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const frag::Coord rc = L::c(lane, i);
          const int row = tile.r0 + rc.row, col = 16 * j + rc.col;
          const float o = a[i] * O[j].x[i];
          const float z = p.opt.norm ? o * r[i] * weight(col) : o;
          const float gv = gate(row, col);
          out0(row, col) = Elem<T>::from_float(gated ? gv * sigmoid(gv) * z : z);
        }
    } else {
      const SmemTile<T> out1 = row_major(tile.stage1, LDV);
      // kBackwardGrad: du -> stage0, dg -> stage1, column sums of dz n^ -> this warp's row of
      // extra (one writer per column, so plain += across chunks).
      float* const dw = tile.extra + gpu::warp_id() * Tr::BV;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        float dz_nhat[E];
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const frag::Coord rc = L::c(lane, i);
          const int row = tile.r0 + rc.row, col = 16 * j + rc.col;
          const float o = a[i] * O[j].x[i], n_hat = o * r[i], w = weight(col), dz = grad_z(row, col);
          float du = a[i] * dz;
          dz_nhat[i] = 0.f;
          if (p.opt.norm) {
            dz_nhat[i] = dz * n_hat;
            du = a[i] * r[i] * (dz * w - n_hat * m[i]);
          }
          out0(row, col) = Elem<T>::from_float(du);
          if (gated) {
            const float gv = gate(row, col), sg = sigmoid(gv);
            const float dy = Elem<T>::to_float(dy_tile(row, col));
            const float z = p.opt.norm ? n_hat * w : o;
            out1(row, col) = Elem<T>::from_float(dy * z * sg * (1.f + gv * (1.f - sg)));
          }
        }
        if (p.dw_partial != nullptr) {
          col_reduce<Mma>(dz_nhat);
#pragma unroll
          for (int i = 0; i < E; ++i)
            if (first_in<Mma, false>(lane, i)) dw[16 * j + L::c(lane, i).col] += dz_nhat[i];
        }
      }
    }
    __syncthreads();
    store_tile<Tr::BT, Tr::BV, Tr::kThreads>(bthd_ptr<T>(p.o, tile.seq.b, t, tile.h, tile.v0), p.o.stride_t,
                                             tile.stage0, LDV, tile.L, tile.nv);
    if (backward && gated)
      store_tile<Tr::BT, Tr::BV, Tr::kThreads>(bthd_ptr<T>(p.grad_g, tile.seq.b, t, tile.h, tile.v0),
                                               p.grad_g.stride_t, tile.stage1, LDV, tile.L, tile.nv);
  }

  // After the last chunk: the CTA's column sums of dz n^ (summed over its warps in a fixed
  // order) -> dw_partial[seq * H + h][v0 + c].
  template <class Tr, class T>
  RT_DEVICE static void epilogue_end(const MsrChunkForward& p, const ForwardTile<T>& tile) {
    if (!kBackwardPasses || p.pass != MsrPass::kBackwardGrad || p.dw_partial == nullptr) return;
    __syncthreads();
    const std::int64_t row = static_cast<std::int64_t>(tile.seq_index) * p.shape.H + tile.h;
    for (int c = threadIdx.x; c < tile.nv; c += Tr::kThreads) {
      float s = 0.f;
      for (int w = 0; w < Tr::kWarps; ++w) s += tile.extra[w * Tr::BV + c];
      p.dw_partial[row * p.shape.dv + tile.v0 + c] = s;
    }
  }
};

}  // namespace retention::kernels
