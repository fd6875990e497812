// The arguments of one msr_* op call as one struct, MsrArgs: what the backend kernels (CPU, CUDA,
// Meta) and autograd take.  The schemas (ops.cpp) fix the order of the arguments; it is written
// once more here, in the two adapters of each op between the dispatcher's argument list and
// MsrArgs (msr_*_args packs it, with_msr_*_args unpacks it), so an option is added in the
// schema, here and in the kernels that use it.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>

#include "retention/retention.h"

namespace retention {

struct MsrArgs {  // (an aggregate: make_msr_args fills the first ten members in this order)
  at::Tensor q, k, v;  // [B, T, H, dk] / [B, T, H, dv]; msr_step: [B, H, d] or [B, 1, H, d]
  OptTensor g;         // gate, the shape of v
  at::Tensor log_decay;
  MsrOptions opt;  // opt.scale is always set
  OptTensor initial_state, offsets, cu_seqlens, norm_weight;
  at::Tensor grad_y;           // msr_backward: the output's gradient
  OptTensor grad_final_state;  // msr_backward
  at::Tensor state;            // msr_step: the state it updates in place
};

using MsrForwardResult = std::tuple<at::Tensor, at::Tensor>;
using MsrBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ---- the schemas' argument lists -------------------------------------------------------------

inline MsrArgs make_msr_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const OptTensor& g, const at::Tensor& log_decay, const MsrOptions& o,
                             const OptTensor& initial_state, const OptTensor& offsets,
                             const OptTensor& cu_seqlens, const OptTensor& norm_weight) {
  return MsrArgs{q, k, v, g, log_decay, o, initial_state, offsets, cu_seqlens, norm_weight};
}

inline MsrArgs msr_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const OptTensor& g, const at::Tensor& log_decay, double scale,
                                int64_t form, int64_t chunk_size, const OptTensor& initial_state,
                                const OptTensor& offsets, const OptTensor& cu_seqlens,
                                int64_t rotary, bool norm, const OptTensor& norm_weight,
                                double eps, bool decay_norm) {
  MsrOptions o;
  o.scale = scale;
  o.form = static_cast<Form>(form);
  o.chunk_size = chunk_size;
  o.rotary = static_cast<Rotary>(rotary);
  o.norm = norm;
  o.eps = eps;
  o.decay_norm = decay_norm;
  return make_msr_args(q, k, v, g, log_decay, o, initial_state, offsets, cu_seqlens, norm_weight);
}

template <class F>
decltype(auto) with_msr_forward_args(const MsrArgs& a, F&& f) {
  return f(a.q, a.k, a.v, a.g, a.log_decay, *a.opt.scale, static_cast<int64_t>(a.opt.form),
           a.opt.chunk_size, a.initial_state, a.offsets, a.cu_seqlens,
           static_cast<int64_t>(a.opt.rotary), a.opt.norm, a.norm_weight, a.opt.eps,
           a.opt.decay_norm);
}

// msr_backward has no form: every form has the same gradient, and the chunked backward computes
// it in O(T) time and memory, where one chunk spanning the sequence (the parallel form's T x T
// scores) would be O(T^2).  So a forward of another form is differentiated with this chunk size.
inline int64_t msr_backward_chunk_size(const MsrOptions& forward) {
  return forward.form == Form::Chunk ? forward.chunk_size : kDefaultChunkSize;
}

inline MsrArgs msr_backward_args(const at::Tensor& grad_y, const OptTensor& grad_final_state,
                                 const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const OptTensor& g, const at::Tensor& log_decay, double scale,
                                 int64_t chunk_size, const OptTensor& initial_state,
                                 const OptTensor& offsets, const OptTensor& cu_seqlens,
                                 int64_t rotary, bool norm, const OptTensor& norm_weight,
                                 double eps, bool decay_norm) {
  MsrArgs a = msr_forward_args(q, k, v, g, log_decay, scale, static_cast<int64_t>(Form::Chunk),
                               chunk_size, initial_state, offsets, cu_seqlens, rotary, norm,
                               norm_weight, eps, decay_norm);
  a.grad_y = grad_y;
  a.grad_final_state = grad_final_state;
  return a;
}

template <class F>
decltype(auto) with_msr_backward_args(const MsrArgs& a, F&& f) {
  return f(a.grad_y, a.grad_final_state, a.q, a.k, a.v, a.g, a.log_decay, *a.opt.scale,
           a.opt.chunk_size, a.initial_state, a.offsets, a.cu_seqlens,
           static_cast<int64_t>(a.opt.rotary), a.opt.norm, a.norm_weight, a.opt.eps,
           a.opt.decay_norm);
}

inline MsrArgs msr_step_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const OptTensor& g, const at::Tensor& log_decay, double scale,
                             const at::Tensor& state, const OptTensor& offsets, int64_t rotary,
                             bool norm, const OptTensor& norm_weight, double eps,
                             bool decay_norm) {
  MsrArgs a = msr_forward_args(q, k, v, g, log_decay, scale,
                               static_cast<int64_t>(Form::Recurrent), 1, {}, offsets, {}, rotary,
                               norm, norm_weight, eps, decay_norm);
  a.state = state;
  return a;
}

template <class F>
decltype(auto) with_msr_step_args(const MsrArgs& a, F&& f) {
  return f(a.q, a.k, a.v, a.g, a.log_decay, *a.opt.scale, a.state, a.offsets,
           static_cast<int64_t>(a.opt.rotary), a.opt.norm, a.norm_weight, a.opt.eps,
           a.opt.decay_norm);
}

// ---- kernels on MsrArgs, as the dispatcher calls them ----------------------------------------
//
// m.impl("msr_forward", msr_forward_kernel<&msr_forward_cpu>) registers
// MsrForwardResult msr_forward_cpu(const MsrArgs&): the dispatcher calls a function with the
// schema's argument list (that of the pack function), which packs them and calls Fn.

template <class Result, auto Pack, class PackType = decltype(Pack)>
struct MsrOp;

template <class Result, auto Pack, class... Args>
struct MsrOp<Result, Pack, MsrArgs (*)(Args...)> {
  using Schema = Result(Args...);  // the op's unboxed signature
  template <Result (*Fn)(const MsrArgs&)>
  static Result kernel(Args... args) {
    return Fn(Pack(args...));
  }
};

using MsrForwardOp = MsrOp<MsrForwardResult, &msr_forward_args>;
using MsrBackwardOp = MsrOp<MsrBackwardResult, &msr_backward_args>;
using MsrStepOp = MsrOp<at::Tensor, &msr_step_args>;

template <MsrForwardResult (*Fn)(const MsrArgs&)>
constexpr auto msr_forward_kernel = &MsrForwardOp::kernel<Fn>;
template <MsrBackwardResult (*Fn)(const MsrArgs&)>
constexpr auto msr_backward_kernel = &MsrBackwardOp::kernel<Fn>;
template <at::Tensor (*Fn)(const MsrArgs&)>
constexpr auto msr_step_kernel = &MsrStepOp::kernel<Fn>;

// ---- calling the ops with MsrArgs (ops.cpp) --------------------------------------------------
//
// Through the dispatcher, or with `keys` a redispatch to those keys (e.g. the CPU kernel).

MsrForwardResult dispatch_msr_forward(const MsrArgs& a,
                                      std::optional<c10::DispatchKeySet> keys = std::nullopt);
MsrBackwardResult dispatch_msr_backward(const MsrArgs& a,
                                        std::optional<c10::DispatchKeySet> keys = std::nullopt);
at::Tensor dispatch_msr_step(const MsrArgs& a,
                             std::optional<c10::DispatchKeySet> keys = std::nullopt);

}  // namespace retention
