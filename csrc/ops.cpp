// Op schemas, the raw ops as forms of the fused ones, and the public C++ API. Every public
// function goes through the dispatcher, so the same call reaches the CPU, CUDA or Meta kernel
// and records autograd.
#include <algorithm>
#include <cmath>
#include <optional>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "msr_args.h"
#include "retention/retention.h"

TORCH_LIBRARY(retention, m) {
  m.def("chunk_forward(Tensor q, Tensor k, Tensor v, Tensor log_decay, float scale, int chunk_size, Tensor? initial_state) -> (Tensor, Tensor)");
  m.def("chunk_backward(Tensor grad_o, Tensor? grad_final_state, Tensor q, Tensor k, Tensor v, Tensor log_decay, float scale, int chunk_size, Tensor? initial_state) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("parallel_forward(Tensor q, Tensor k, Tensor v, Tensor log_decay, float scale, Tensor? initial_state) -> (Tensor, Tensor)");
  m.def("parallel_backward(Tensor grad_o, Tensor? grad_final_state, Tensor q, Tensor k, Tensor v, Tensor log_decay, float scale, Tensor? initial_state) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("recurrent_forward(Tensor q, Tensor k, Tensor v, Tensor log_decay, float scale, Tensor? initial_state) -> (Tensor, Tensor)");
  m.def("recurrent_step(Tensor q, Tensor k, Tensor v, Tensor log_decay, float scale, Tensor(a!) state) -> Tensor");
  // Fused layer core (retention.h): form 0 chunk / 1 parallel / 2 recurrent; rotary 0 none /
  // 1 torchscale / 2 neox.
  m.def("msr_forward(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor log_decay, float scale, int form, int chunk_size, Tensor? initial_state, Tensor? offsets, Tensor? cu_seqlens, int rotary, bool norm, Tensor? norm_weight, float eps, bool decay_norm) -> (Tensor, Tensor)");
  m.def("msr_backward(Tensor grad_y, Tensor? grad_final_state, Tensor q, Tensor k, Tensor v, Tensor? g, Tensor log_decay, float scale, int chunk_size, Tensor? initial_state, Tensor? offsets, Tensor? cu_seqlens, int rotary, bool norm, Tensor? norm_weight, float eps, bool decay_norm) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("msr_step(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor log_decay, float scale, Tensor(a!) state, Tensor? offsets, int rotary, bool norm, Tensor? norm_weight, float eps, bool decay_norm) -> Tensor");
  // One row through a projection (decode at batch 1, CPU; csrc/cpu/gemv.h): weight [N, K] fp32
  // or bf16, x [K] -> [N] in x's dtype, fp32 sums. No autograd.
  m.def("matvec(Tensor weight, Tensor x) -> Tensor");
}

namespace retention {

namespace {
thread_local const char* t_raw_op = nullptr;
}  // namespace

CalledAs::CalledAs(const char* raw_op) : outer_(t_raw_op) { t_raw_op = raw_op; }
CalledAs::~CalledAs() { t_raw_op = outer_; }
const char* CalledAs::raw_op() { return t_raw_op; }

namespace {

// ---- the raw ops: the fused ops with every option off -----------------------------------------
//
// One engine and one set of backend kernels (msr_*) serve both op families; the raw ops are
// CompositeImplicitAutograd, so autograd, Meta, autocast and torch.compile see the msr_* calls
// they make.

MsrOptions raw_options(Form form, double scale, int64_t chunk_size = kDefaultChunkSize) {
  MsrOptions o;
  o.form = form;
  o.chunk_size = chunk_size;
  o.scale = scale;
  o.rotary = Rotary::None;
  o.norm = false;
  return o;
}

std::tuple<at::Tensor, at::Tensor> raw_forward(const char* op, Form form, const at::Tensor& q,
                                               const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& log_decay, double scale,
                                               int64_t chunk_size,
                                               const OptTensor& initial_state) {
  const CalledAs called(op);
  return msr_forward(q, k, v, {}, log_decay, raw_options(form, scale, chunk_size), initial_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> raw_backward(
    const char* op, Form form, const at::Tensor& grad_o, const OptTensor& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    double scale, int64_t chunk_size, const OptTensor& initial_state) {
  const CalledAs called(op);
  auto r = msr_backward(grad_o, grad_final_state, q, k, v, {}, log_decay,
                        raw_options(form, scale, chunk_size), initial_state);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<4>(r)};
}

std::tuple<at::Tensor, at::Tensor> chunk_forward_raw(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const at::Tensor& log_decay, double scale,
                                                     int64_t chunk_size,
                                                     const OptTensor& initial_state) {
  return raw_forward("retention::chunk_forward", Form::Chunk, q, k, v, log_decay, scale,
                     chunk_size, initial_state);
}

std::tuple<at::Tensor, at::Tensor> parallel_forward_raw(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        const at::Tensor& log_decay, double scale,
                                                        const OptTensor& initial_state) {
  return raw_forward("retention::parallel_forward", Form::Parallel, q, k, v, log_decay, scale,
                     kDefaultChunkSize, initial_state);
}

std::tuple<at::Tensor, at::Tensor> recurrent_forward_raw(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const at::Tensor& log_decay,
                                                         double scale,
                                                         const OptTensor& initial_state) {
  return raw_forward("retention::recurrent_forward", Form::Recurrent, q, k, v, log_decay, scale,
                     kDefaultChunkSize, initial_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_backward_raw(
    const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
    int64_t chunk_size, const OptTensor& initial_state) {
  return raw_backward("retention::chunk_backward", Form::Chunk, grad_o, grad_final_state, q, k,
                      v, log_decay, scale, chunk_size, initial_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> parallel_backward_raw(
    const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
    const OptTensor& initial_state) {
  return raw_backward("retention::parallel_backward", Form::Parallel, grad_o, grad_final_state,
                      q, k, v, log_decay, scale, kDefaultChunkSize, initial_state);
}

at::Tensor recurrent_step_raw(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& log_decay, double scale, const at::Tensor& state) {
  const CalledAs called("retention::recurrent_step");
  at::Tensor s = state;
  return msr_step(q, k, v, {}, log_decay, s, raw_options(Form::Recurrent, scale));
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, CompositeImplicitAutograd, m) {
  m.impl("chunk_forward", &chunk_forward_raw);
  m.impl("chunk_backward", &chunk_backward_raw);
  m.impl("parallel_forward", &parallel_forward_raw);
  m.impl("parallel_backward", &parallel_backward_raw);
  m.impl("recurrent_forward", &recurrent_forward_raw);
  m.impl("recurrent_step", &recurrent_step_raw);
}

namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

double scale_or_default(const OptDouble& scale, const at::Tensor& q) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> chunk_forward(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& log_decay,
                                                 OptDouble scale, int64_t chunk_size,
                                                 const OptTensor& initial_state) {
  static auto handle = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, double, int64_t, const OptTensor&)>(
      "retention::chunk_forward");
  return handle.call(q, k, v, log_decay, scale_or_default(scale, q), chunk_size, initial_state);
}

std::tuple<at::Tensor, at::Tensor> parallel_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const at::Tensor& log_decay, OptDouble scale,
                                                    const OptTensor& initial_state) {
  static auto handle = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, double, const OptTensor&)>(
      "retention::parallel_forward");
  return handle.call(q, k, v, log_decay, scale_or_default(scale, q), initial_state);
}

std::tuple<at::Tensor, at::Tensor> recurrent_forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const at::Tensor& log_decay, OptDouble scale,
                                                     const OptTensor& initial_state) {
  static auto handle = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, double, const OptTensor&)>(
      "retention::recurrent_forward");
  return handle.call(q, k, v, log_decay, scale_or_default(scale, q), initial_state);
}

at::Tensor recurrent_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& log_decay, at::Tensor& state, OptDouble scale) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, double, const at::Tensor&)>(
      "retention::recurrent_step");
  return handle.call(q, k, v, log_decay, scale_or_default(scale, q), state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_backward(
    const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
    int64_t chunk_size, const OptTensor& initial_state) {
  static auto handle =
      op<Quad(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, double, int64_t, const OptTensor&)>(
          "retention::chunk_backward");
  return handle.call(grad_o, grad_final_state, q, k, v, log_decay, scale, chunk_size,
                     initial_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> parallel_backward(
    const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
    const OptTensor& initial_state) {
  static auto handle =
      op<Quad(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, double, const OptTensor&)>(
          "retention::parallel_backward");
  return handle.call(grad_o, grad_final_state, q, k, v, log_decay, scale, initial_state);
}

// ---- the fused ops: MsrArgs through the dispatcher (msr_args.h) --------------------------------

namespace {

// handle.call(args...), or with `keys` handle.redispatch(keys, args...).
template <class Handle, class... Args>
auto call_or_redispatch(const Handle& handle, const std::optional<c10::DispatchKeySet>& keys,
                        const Args&... args) {
  return keys ? handle.redispatch(*keys, args...) : handle.call(args...);
}

}  // namespace

MsrForwardResult dispatch_msr_forward(const MsrArgs& a, std::optional<c10::DispatchKeySet> keys) {
  static auto handle = op<MsrForwardOp::Schema>("retention::msr_forward");
  return with_msr_forward_args(a, [&](const auto&... x) { return call_or_redispatch(handle, keys, x...); });
}

MsrBackwardResult dispatch_msr_backward(const MsrArgs& a, std::optional<c10::DispatchKeySet> keys) {
  static auto handle = op<MsrBackwardOp::Schema>("retention::msr_backward");
  return with_msr_backward_args(a, [&](const auto&... x) { return call_or_redispatch(handle, keys, x...); });
}

at::Tensor dispatch_msr_step(const MsrArgs& a, std::optional<c10::DispatchKeySet> keys) {
  static auto handle = op<MsrStepOp::Schema>("retention::msr_step");
  return with_msr_step_args(a, [&](const auto&... x) { return call_or_redispatch(handle, keys, x...); });
}

namespace {

MsrArgs public_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
                    const at::Tensor& log_decay, const MsrOptions& o, const OptTensor& initial_state,
                    const OptTensor& offsets, const OptTensor& cu_seqlens, const OptTensor& norm_weight) {
  MsrOptions resolved = o;
  resolved.scale = scale_or_default(o.scale, q);
  return make_msr_args(q, k, v, g, log_decay, resolved, initial_state, offsets, cu_seqlens, norm_weight);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> msr_forward(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const OptTensor& g,
                                               const at::Tensor& log_decay,
                                               const MsrOptions& o,
                                               const OptTensor& initial_state,
                                               const OptTensor& offsets,
                                               const OptTensor& cu_seqlens,
                                               const OptTensor& norm_weight) {
  return dispatch_msr_forward(
      public_args(q, k, v, g, log_decay, o, initial_state, offsets, cu_seqlens, norm_weight));
}

at::Tensor msr_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const OptTensor& g, const at::Tensor& log_decay, at::Tensor& state,
                    const MsrOptions& o, const OptTensor& offsets, const OptTensor& norm_weight) {
  MsrArgs a = public_args(q, k, v, g, log_decay, o, {}, offsets, {}, norm_weight);
  a.state = state;
  return dispatch_msr_step(a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> msr_backward(
    const at::Tensor& grad_y, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const OptTensor& g, const at::Tensor& log_decay,
    const MsrOptions& o, const OptTensor& initial_state, const OptTensor& offsets,
    const OptTensor& cu_seqlens, const OptTensor& norm_weight) {
  MsrArgs a = public_args(q, k, v, g, log_decay, o, initial_state, offsets, cu_seqlens, norm_weight);
  a.opt.chunk_size = msr_backward_chunk_size(o);
  a.grad_y = grad_y;
  a.grad_final_state = grad_final_state;
  return dispatch_msr_backward(a);
}

at::Tensor retnet_log_decay(int64_t num_heads) {
  TORCH_CHECK(num_heads > 0, "retnet_log_decay: num_heads must be positive, got ", num_heads);
  // Built in float64 then rounded once: 1 - 2^-20 is not representable in fp32 before the log.
  auto h = at::arange(num_heads, at::kDouble);
  return at::log1p(-at::pow(2.0, -5.0 - h)).to(at::kFloat);
}

at::Tensor linspace_log_decay(int64_t num_heads) {
  TORCH_CHECK(num_heads > 0, "linspace_log_decay: num_heads must be positive, got ", num_heads);
  auto x = at::linspace(std::log(1.0 / 32), std::log(1.0 / 512), num_heads, at::kDouble);
  return at::log1p(-at::exp(x)).to(at::kFloat);
}

}  // namespace retention
