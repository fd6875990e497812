// Public C++ API of the retention library.
//
// Raw multi-scale retention (FLA semantics), per batch b, head h and 0-based position n:
//   o_n = scale * sum_{m<=n} gamma_h^(n-m) (q_n . k_m) v_m + scale * gamma_h^(n+1) q_n S_0
//   S_T = gamma_h^T S_0 + sum_m gamma_h^(T-1-m) k_m^T v_m
// with gamma_h = exp(log_decay[h]).
//
// Layout is time-first: q, k [B, T, H, dk], v [B, T, H, dv] (any strides), fp16/bf16/fp32/fp64.
// States are [B, H, dk, dv] in fp32 (fp64 for fp64 inputs). Every function calls through the
// dispatcher, so CPU/CUDA tensors, meta tensors and autograd all work.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

#include "retention/compat.h"

#if defined(_WIN32)
#define RETENTION_API __declspec(dllexport)
#else
#define RETENTION_API __attribute__((visibility("default")))
#endif

namespace retention {

constexpr int64_t kDefaultChunkSize = 64;
constexpr int64_t kMaxHeadDimK = 256;

// Chunkwise-recurrent form: O(T) time and memory. Returns (o, final_state).
// `scale` defaults to dk^-1/2.
RETENTION_API std::tuple<at::Tensor, at::Tensor> chunk_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    OptDouble scale = {}, int64_t chunk_size = kDefaultChunkSize,
    const OptTensor& initial_state = {});

// Parallel (quadratic) form: same contract as chunk_forward.
RETENTION_API std::tuple<at::Tensor, at::Tensor> parallel_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    OptDouble scale = {}, const OptTensor& initial_state = {});

// Token-by-token recurrent scan: same contract as chunk_forward.
RETENTION_API std::tuple<at::Tensor, at::Tensor> recurrent_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    OptDouble scale = {}, const OptTensor& initial_state = {});

// One decode step. q, k: [B, H, dk] or [B, 1, H, dk]; v likewise with dv. `state` ([B, H, dk, dv],
// fp32, contiguous) is updated in place: S <- gamma S + k^T v. Returns o = scale q S in the layout
// of q. Inference only.
RETENTION_API at::Tensor recurrent_step(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    at::Tensor& state, OptDouble scale = {});

// Backward passes (what autograd calls). Return (grad_q, grad_k, grad_v, grad_initial_state).
RETENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_backward(
    const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
    int64_t chunk_size, const OptTensor& initial_state);

RETENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> parallel_backward(
    const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
    const OptTensor& initial_state);

// ---- Fused multi-scale retention layer core (MSR) -------------------------------------------
//
// One pass per layer: rotate -> retain -> (decay normaliser) -> per-head RMSNorm -> swish gate.
// Neither the rotated q/k nor the un-normalised retention output is written to memory.
// For sequence s (a batch row, or a packed sequence of cu_seqlens), head h, local index n and
// absolute position p = offsets[s] + n:
//   q~_n = R(p) q_n, k~_n = R(p) k_n                   (rotary; R = identity for kNone)
//   u_n  = raw retention of (q~, k~, v) as above, continuing from initial_state[s]
//   o_n  = a_n u_n,  a_n = 1/sqrt(S_{p+1}), S_j = (1-gamma^j)/(1-gamma)   (decay_norm; else 1)
//   z_n  = norm ? o_n / sqrt(mean_j o_n[j]^2 + eps) * w : o_n        (fp32 statistics, w opt.)
//   y_n  = g defined ? silu(g_n) * z_n : z_n
// Rotations (angles computed in float64):
//   kTorchscale: pairs (x_2i, x_2i+1) rotated by p*theta_i, theta_i = 10000^(-i/(dk/2-1))
//   kNeox:       pairs (x_i, x_i+dk/2) rotated by p*theta_i, theta_i = 10000^(-2i/dk)
// Layouts: q, k [B, T, H, dk]; v, g, y [B, T, H, dv]; norm_weight [dv]; offsets int64 [N]
// (default 0); cu_seqlens int32/int64 [N+1] (FlashAttention convention: B == 1, cu[0] = 0,
// non-decreasing, cu[N] = T); states [N, H, dk, dv] with N = B without cu_seqlens.
enum class Form : int64_t { Chunk = 0, Parallel = 1, Recurrent = 2 };
enum class Rotary : int64_t { None = 0, Torchscale = 1, Neox = 2 };

struct MsrOptions {
  Form form = Form::Chunk;
  int64_t chunk_size = kDefaultChunkSize;
  OptDouble scale = {};  // default dk^-1/2
  Rotary rotary = Rotary::Torchscale;
  bool norm = true;
  double eps = 1e-6;
  bool decay_norm = false;  // torchscale's 1/sqrt(S_{p+1}) (only changes the effective eps)
};

// Returns (y [B, T, H, dv] in the dtype of q, final_state [N, H, dk, dv]).
RETENTION_API std::tuple<at::Tensor, at::Tensor> msr_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
    const at::Tensor& log_decay, const MsrOptions& options = {},
    const OptTensor& initial_state = {}, const OptTensor& offsets = {},
    const OptTensor& cu_seqlens = {}, const OptTensor& norm_weight = {});

// One fused decode step for B sequences at positions offsets[b] (default 0): q, k [B, H, dk] or
// [B, 1, H, dk]; v, g likewise with dv. Updates `state` [B, H, dk, dv] in place; returns y.
// The caller advances its offsets. Inference only.
RETENTION_API at::Tensor msr_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const OptTensor& g, const at::Tensor& log_decay,
                                  at::Tensor& state, const MsrOptions& options = {},
                                  const OptTensor& offsets = {},
                                  const OptTensor& norm_weight = {});

// Backward of msr_forward (what autograd calls): (dq, dk, dv, dg, d_initial_state,
// d_norm_weight); dg / d_norm_weight are undefined when g / norm_weight are.
RETENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
msr_backward(const at::Tensor& grad_y, const OptTensor& grad_final_state, const at::Tensor& q,
             const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
             const at::Tensor& log_decay, const MsrOptions& options,
             const OptTensor& initial_state = {}, const OptTensor& offsets = {},
             const OptTensor& cu_seqlens = {}, const OptTensor& norm_weight = {});

// Per-head log-decay of RetNet: log(1 - 2^(-5-h)), fp32 [num_heads].
RETENTION_API at::Tensor retnet_log_decay(int64_t num_heads);

// The paper's experimental variant: log(1 - exp(linspace(log 1/32, log 1/512, H))), fp32.
RETENTION_API at::Tensor linspace_log_decay(int64_t num_heads);

}  // namespace retention
