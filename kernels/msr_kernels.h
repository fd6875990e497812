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

struct MsrForwardParams {
  DType dtype = DType::kF32;
  Shape shape;          // B, T, H, dk, dv of the inputs
  Bthd q, k, v;
  Bthd g;               // optional gate (g.ptr == nullptr: no gate)
  Bthd y;               // output, input dtype
  const float* log_decay = nullptr;
  float scale = 1.f;
  std::int64_t chunk_size = 64;  // informational, as for the raw chunk kernels
  MsrSequences seq;
  MsrOptions opt;
  const float* initial_state = nullptr;  // optional [N, H, dk, dv]
  float* final_state = nullptr;          // optional [N, H, dk, dv]
  // Sequence split, as ChunkForwardParams::split / num_sms (segments cut every ceil(T / n)
  // tokens of each sequence; packed sequences shorter than that have fewer).
  int split = -1;
  int num_sms = 0;
  void* workspace = nullptr;             // msr_forward_workspace_bytes() bytes (16-byte aligned)
  gpu::stream_t stream = nullptr;
};

struct MsrBackwardParams {
  DType dtype = DType::kF32;
  Shape shape;
  Bthd q, k, v, g;      // g optional as in the forward
  Bthd grad_y;
  const float* log_decay = nullptr;
  float scale = 1.f;
  std::int64_t chunk_size = 64;
  MsrSequences seq;
  MsrOptions opt;
  const float* initial_state = nullptr;     // optional [N, H, dk, dv]
  const float* grad_final_state = nullptr;  // optional [N, H, dk, dv] (zero when absent)
  // Outputs (fully written): dq, dk w.r.t. the un-rotated inputs; dg when g is given.
  Bthd grad_q, grad_k, grad_v, grad_g;
  float* grad_initial_state = nullptr;  // required, [N, H, dk, dv]
  float* grad_norm_weight = nullptr;    // fp32 [dv]; required when norm && norm_weight
  int split = -1;                       // sequence split, as in MsrForwardParams
  int num_sms = 0;
  void* workspace = nullptr;            // msr_backward_workspace_bytes() bytes (16-byte aligned)
  gpu::stream_t stream = nullptr;
};

// One decode token per batch row b at position offsets[b]: S <- gamma S + k~^T v in place,
// u = scale q~ S, then the epilogue.  One CTA keeps the whole dv row of u in shared memory for
// the RMSNorm, hence the dv limit.
inline constexpr int kMsrStepMaxDv = 4096;

struct MsrStepParams {
  DType dtype = DType::kF32;
  std::int64_t B = 0, H = 0, dk = 0, dv = 0;
  const void* q = nullptr;  // [B, H, dk] with these strides, unit stride along d
  std::int64_t q_stride_b = 0, q_stride_h = 0;
  const void* k = nullptr;
  std::int64_t k_stride_b = 0, k_stride_h = 0;
  const void* v = nullptr;  // [B, H, dv]
  std::int64_t v_stride_b = 0, v_stride_h = 0;
  const void* g = nullptr;  // optional [B, H, dv]
  std::int64_t g_stride_b = 0, g_stride_h = 0;
  void* y = nullptr;        // [B, H, dv]
  std::int64_t y_stride_b = 0, y_stride_h = 0;
  const float* log_decay = nullptr;
  float scale = 1.f;
  float* state = nullptr;                 // [B, H, dk, dv], updated in place
  const std::int64_t* offsets = nullptr;  // [B] positions; null: 0
  MsrOptions opt;
  gpu::stream_t stream = nullptr;
};

std::size_t msr_forward_workspace_bytes(const MsrForwardParams& p);
gpu::error_t launch_msr_forward(const MsrForwardParams& p);
std::size_t msr_backward_workspace_bytes(const MsrBackwardParams& p);
gpu::error_t launch_msr_backward(const MsrBackwardParams& p);
gpu::error_t launch_msr_step(const MsrStepParams& p);

}  // namespace retention::kernels
