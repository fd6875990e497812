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

// Per-head log-decay of RetNet: log(1 - 2^(-5-h)), fp32 [num_heads].
RETENTION_API at::Tensor retnet_log_decay(int64_t num_heads);

// The paper's experimental variant: log(1 - exp(linspace(log 1/32, log 1/512, H))), fp32.
RETENTION_API at::Tensor linspace_log_decay(int64_t num_heads);

}  // namespace retention
