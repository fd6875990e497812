// Meta kernels: shapes and dtypes only, so FakeTensor tracing and torch.compile see the ops
// without running them. Validation is shared with the real kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace retention {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_meta(const char* op, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& log_decay,
                                                const OptTensor& initial_state) {
  const auto d = check_inputs(op, q, k, v, log_decay, initial_state);
  return {at::empty({d.B, d.T, d.H, d.dv}, q.options()),
          at::empty({d.B, d.H, d.dk, d.dv}, q.options().dtype(state_dtype(q.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const char* op, const at::Tensor& grad_o, const OptTensor& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    const OptTensor& initial_state) {
  const auto d = check_inputs(op, q, k, v, log_decay, initial_state);
  check_grad_o(op, grad_o, d, q, grad_final_state);
  return {at::empty_like(q, at::MemoryFormat::Contiguous),
          at::empty_like(k, at::MemoryFormat::Contiguous),
          at::empty_like(v, at::MemoryFormat::Contiguous),
          at::empty({d.B, d.H, d.dk, d.dv}, q.options().dtype(state_dtype(q.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor> chunk_forward_meta(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const at::Tensor& log_decay, double,
                                                      int64_t chunk_size,
                                                      const OptTensor& initial_state) {
  check_chunk_size("retention::chunk_forward", chunk_size);
  return forward_meta("retention::chunk_forward", q, k, v, log_decay, initial_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_backward_meta(
    const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double,
    int64_t chunk_size, const OptTensor& initial_state) {
  check_chunk_size("retention::chunk_backward", chunk_size);
  return backward_meta("retention::chunk_backward", grad_o, grad_final_state, q, k, v, log_decay,
                       initial_state);
}

std::tuple<at::Tensor, at::Tensor> parallel_forward_meta(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const at::Tensor& log_decay, double,
                                                         const OptTensor& initial_state) {
  return forward_meta("retention::parallel_forward", q, k, v, log_decay, initial_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> parallel_backward_meta(
    const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double,
    const OptTensor& initial_state) {
  return backward_meta("retention::parallel_backward", grad_o, grad_final_state, q, k, v,
                       log_decay, initial_state);
}

std::tuple<at::Tensor, at::Tensor> recurrent_forward_meta(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const at::Tensor& log_decay, double,
                                                          const OptTensor& initial_state) {
  return forward_meta("retention::recurrent_forward", q, k, v, log_decay, initial_state);
}

at::Tensor recurrent_step_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& log_decay, double, const at::Tensor& state) {
  const char* op = "retention::recurrent_step";
  const auto d = check_inputs(op, as_single_step(op, "q", q), as_single_step(op, "k", k),
                              as_single_step(op, "v", v), log_decay, state, "state");
  return q.dim() == 3 ? at::empty({d.B, d.H, d.dv}, q.options())
                      : at::empty({d.B, 1, d.H, d.dv}, q.options());
}

std::tuple<at::Tensor, at::Tensor> msr_forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
    const at::Tensor& log_decay, double, int64_t form, int64_t chunk_size,
    const OptTensor& initial_state, const OptTensor& offsets, const OptTensor& cu_seqlens,
    int64_t rotary, bool, const OptTensor& norm_weight, double eps, bool) {
  const auto m = check_msr_inputs("retention::msr_forward", q, k, v, g, log_decay, form,
                                  chunk_size, initial_state, offsets, cu_seqlens, rotary,
                                  norm_weight, eps);
  const auto& d = m.d;
  return {at::empty({d.B, d.T, d.H, d.dv}, q.options()),
          at::empty({m.N, d.H, d.dk, d.dv}, q.options().dtype(state_dtype(q.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
msr_backward_meta(const at::Tensor& grad_y, const OptTensor& grad_final_state, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
                  const at::Tensor& log_decay, double, int64_t chunk_size,
                  const OptTensor& initial_state, const OptTensor& offsets,
                  const OptTensor& cu_seqlens, int64_t rotary, bool norm,
                  const OptTensor& norm_weight, double eps, bool) {
  const char* op = "retention::msr_backward";
  const auto m = check_msr_inputs(op, q, k, v, g, log_decay, 0, chunk_size, initial_state,
                                  offsets, cu_seqlens, rotary, norm_weight, eps);
  check_msr_grads(op, m, q, grad_y, grad_final_state);
  const auto& d = m.d;
  return {at::empty_like(q, at::MemoryFormat::Contiguous),
          at::empty_like(k, at::MemoryFormat::Contiguous),
          at::empty_like(v, at::MemoryFormat::Contiguous),
          has(g) ? at::empty_like(*g, at::MemoryFormat::Contiguous) : at::Tensor(),
          at::empty({m.N, d.H, d.dk, d.dv}, q.options().dtype(state_dtype(q.scalar_type()))),
          has(norm_weight) && norm ? at::empty_like(*norm_weight) : at::Tensor()};
}

at::Tensor msr_step_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const OptTensor& g, const at::Tensor& log_decay, double,
                         const at::Tensor& state, const OptTensor& offsets, int64_t rotary, bool,
                         const OptTensor& norm_weight, double eps, bool) {
  const char* op = "retention::msr_step";
  const OptTensor g4 = has(g) ? OptTensor(as_single_step(op, "g", *g)) : OptTensor();
  const auto m = check_msr_inputs(op, as_single_step(op, "q", q), as_single_step(op, "k", k),
                                  as_single_step(op, "v", v), g4, log_decay, 2, 1, state,
                                  offsets, {}, rotary, norm_weight, eps, "state");
  const auto& d = m.d;
  return q.dim() == 3 ? at::empty({d.B, d.H, d.dv}, q.options())
                      : at::empty({d.B, 1, d.H, d.dv}, q.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, Meta, m) {
  m.impl("chunk_forward", &chunk_forward_meta);
  m.impl("chunk_backward", &chunk_backward_meta);
  m.impl("parallel_forward", &parallel_forward_meta);
  m.impl("parallel_backward", &parallel_backward_meta);
  m.impl("recurrent_forward", &recurrent_forward_meta);
  m.impl("recurrent_step", &recurrent_step_meta);
  m.impl("msr_forward", &msr_forward_meta);
  m.impl("msr_backward", &msr_backward_meta);
  m.impl("msr_step", &msr_step_meta);
}

}  // namespace retention
