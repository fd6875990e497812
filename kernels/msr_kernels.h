// msr_kernels.h - the torch-free interface of the fused multi-scale retention (MSR) layer core.
//
// One pass per layer: rotate q / k -> retain -> decay normaliser -> per-head RMSNorm -> swish
// gate (the contract is the MSR section of retention.h).  For sequence s, head h, local index
// n and absolute position p = offsets[s] + n:
//   q~_n = R(p) q_n, k~_n = R(p) k_n
//   u_n  = scale sum_{m<=n} gamma^(n-m) (q~_n . k~_m) v_m + scale gamma^(n+1) q~_n S0[s]
//   o_n  = a_n u_n,   a_n = 1/sqrt(S_{p+1}), S_j = (1-gamma^j)/(1-gamma)   (decay_norm; else 1)
//   z_n  = norm ? o_n rsqrt(mean_j o_n[j]^2 + eps) * w : o_n
//   y_n  = gate ? silu(g_n) * z_n : z_n
// Neither q~ / k~ nor u is ever written to global memory.
//
// Layouts as in retention_kernels.h: q, k [B, T, H, dk]; v, g, y [B, T, H, dv] (any B/T/H
// strides, unit stride along d); states fp32 [N, H, dk, dv] contiguous, N = number of
// sequences; log_decay fp32 [H]; norm_weight fp32 [dv] contiguous.
#pragma once

#include <cstddef>
#include <cstdint>

#include "gpu_compat.h"
#include "numeric.h"
#include "retention_kernels.h"

namespace retention::kernels {

// Rotary embedding applied to q and k (the values of the op's `rotary` argument).
//   kTorchscale: pairs (x_2i, x_2i+1), theta_i = 10000^(-i/(dk/2-1)) (theta_0 = 1 when dk == 2)
//   kNeox:       pairs (x_i, x_i+dk/2), theta_i = 10000^(-2i/dk)
// Pair (a, b) at position p: x'_a = x_a cos - x_b sin, x'_b = x_b cos + x_a sin, angle p theta_i.
// Both need an even dk.
enum class RotaryMode : int { kNone = 0, kTorchscale = 1, kNeox = 2 };

// Which tokens form a sequence.
struct MsrSequences {
  // Packed sequences (FlashAttention convention): batch row 0 (B == 1) holds num_sequences
  // sequences, sequence s being tokens [cu_seqlens[s], cu_seqlens[s + 1]), with cu[0] = 0,
  // non-decreasing, cu[N] = T.  Null: sequence s is batch row s (num_sequences == B).
  const void* cu_seqlens = nullptr;  // on the device, int32 or int64
  bool cu_seqlens_int64 = true;
  std::int64_t num_sequences = 0;         // N
  const std::int64_t* offsets = nullptr;  // [N] position of each first token; null: all 0
};

// The epilogue and prologue options shared by the three ops.
struct MsrOptions {
  RotaryMode rotary = RotaryMode::kTorchscale;
  bool norm = true;
  const float* norm_weight = nullptr;  // optional fp32 [dv] (norm only)
  float eps = 1e-6f;
  bool decay_norm = false;
};

// The raw ops' parameters plus the sequences, the options and the gate; `o` is the output y,
// grad_o its cotangent.
struct MsrForwardParams : ChunkForwardParams {
  Bthd g;  // optional gate (g.ptr == nullptr: no gate)
  MsrSequences seq;
  MsrOptions opt;
  // States are [N, H, dk, dv]; the split cuts every ceil(T / n) tokens of each sequence
  // (packed sequences shorter than that have fewer segments).
};

struct MsrBackwardParams : ChunkBackwardParams {
  Bthd g;       // optional, as in the forward
  Bthd grad_g;  // output when g is given
  MsrSequences seq;
  MsrOptions opt;
  // grad_q, grad_k are w.r.t. the un-rotated inputs; states are [N, H, dk, dv].
  float* grad_norm_weight = nullptr;  // fp32 [dv]; required when norm && norm_weight
};

// One decode token per batch row b at position offsets[b]: S <- gamma S + k~^T v in place,
// u = scale q~ S, then the epilogue.  One CTA keeps the whole dv row of u in shared memory for
// the RMSNorm, hence the dv limit.
inline constexpr int kMsrStepMaxDv = 4096;
// With few heads (B H up to this many) the step spreads each head over several CTAs, which meet
// through a workspace and one counter per head (msr_step.cu).
inline constexpr int kMsrStepCounters = 1024;

struct MsrStepParams : RecurrentStepParams {
  Bthd g;                                 // optional [B, 1, H, dv]
  const std::int64_t* offsets = nullptr;  // [B] positions; null: 0
  MsrOptions opt;
  // Required when msr_step_workspace_bytes(*this) > 0.  workspace: that many bytes, any
  // contents, not shared with a launch that may run concurrently.  counters: kMsrStepCounters
  // uint32 that are zero before the first launch; every launch leaves them zero, so they are
  // set up once (per stream: launches that may overlap must not share them).
  void* workspace = nullptr;
  unsigned* counters = nullptr;
};

std::size_t msr_forward_workspace_bytes(const MsrForwardParams& p);
gpu::error_t launch_msr_forward(const MsrForwardParams& p);
std::size_t msr_backward_workspace_bytes(const MsrBackwardParams& p);
gpu::error_t launch_msr_backward(const MsrBackwardParams& p);
std::size_t msr_step_workspace_bytes(const MsrStepParams& p);
gpu::error_t launch_msr_step(const MsrStepParams& p);

}  // namespace retention::kernels
