// Meta kernels of the msr_* ops (the raw ops run as these, ops.cpp): shapes and dtypes only, so
// FakeTensor tracing and torch.compile see the ops without running them. Validation is shared
// with the real kernels.
//
// Output shapes are built from SymInts (sym_size): under torch.compile with dynamic shapes a
// size is a symbol, and reading it as an int64 (as the shared validation in checks.h does)
// makes the compiler specialise the graph to that value and recompile for every sequence
// length. So the validation runs here only when the shapes are concrete; with symbolic shapes
// the real kernel validates the concrete inputs when the compiled graph runs.
#include <initializer_list>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace retention {
namespace {

bool any_symbolic(std::initializer_list<OptTensor> tensors) {
  for (const auto& t : tensors) {
    if (has(t) && t->unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return true;
  }
  return false;
}

at::Tensor empty_sym(std::vector<c10::SymInt> shape, const at::TensorOptions& options) {
  return at::empty_symint(shape, options);
}

// [B, T, H, dv] output and [N, H, dk, dv] state (N = B, or the number of packed sequences).
at::Tensor output_like(const at::Tensor& q, const at::Tensor& v) {
  return empty_sym({q.sym_size(0), q.sym_size(1), q.sym_size(2), v.sym_size(-1)}, q.options());
}
at::Tensor state_for(const c10::SymInt& n, const at::Tensor& q, const at::Tensor& v) {
  return empty_sym({n, q.sym_size(2), q.sym_size(3), v.sym_size(-1)},
                   q.options().dtype(state_dtype(q.scalar_type())));
}
// msr_step output: the layout of q ([B, H, dv] or [B, 1, H, dv]).
at::Tensor step_output(const at::Tensor& q, const at::Tensor& v) {
  return q.dim() == 3 ? empty_sym({q.sym_size(0), q.sym_size(1), v.sym_size(-1)}, q.options())
                      : output_like(q, v);
}
c10::SymInt num_sequences(const at::Tensor& q, const OptTensor& cu_seqlens) {
  return has(cu_seqlens) ? cu_seqlens->sym_size(0) - 1 : q.sym_size(0);
}

// as_single_step for Meta kernels: the 4-D stand-in of a [B, H, d] input is a new meta tensor, not
// a view. Under torch 2.x FakeTensor runs these kernels on fake tensors, and a view op issued from
// inside the kernel re-enters Python dispatch (an internal assert in torch 2.11 when
// functionalization is active, i.e. when the in-place decode ops are compiled).
at::Tensor as_single_step_meta(const char* op, const char* name, const at::Tensor& x) {
  if (x.dim() == 3) return at::empty({x.size(0), 1, x.size(1), x.size(2)}, x.options());
  return as_single_step(op, name, x);  // 4-D: checked and returned as is; other ranks: error
}

MsrForwardResult msr_forward_meta(const MsrArgs& a) {
  if (!any_symbolic({a.q, a.k, a.v, a.g, a.initial_state, a.offsets, a.cu_seqlens})) {
    check_msr_inputs(op_name("retention::msr_forward"), a);
  }
  return {output_like(a.q, a.v), state_for(num_sequences(a.q, a.cu_seqlens), a.q, a.v)};
}

MsrBackwardResult msr_backward_meta(const MsrArgs& a) {
  const char* op = op_name("retention::msr_backward");
  if (!any_symbolic({a.grad_y, a.grad_final_state, a.q, a.k, a.v, a.g, a.initial_state, a.offsets,
                     a.cu_seqlens})) {
    check_msr_grads(op, check_msr_inputs(op, a), a);
  }
  return {at::empty_like(a.q, at::MemoryFormat::Contiguous),
          at::empty_like(a.k, at::MemoryFormat::Contiguous),
          at::empty_like(a.v, at::MemoryFormat::Contiguous),
          has(a.g) ? at::empty_like(*a.g, at::MemoryFormat::Contiguous) : at::Tensor(),
          state_for(num_sequences(a.q, a.cu_seqlens), a.q, a.v),
          has(a.norm_weight) && a.opt.norm ? at::empty_like(*a.norm_weight) : at::Tensor()};
}

at::Tensor msr_step_meta(const MsrArgs& a) {
  const char* op = op_name("retention::msr_step");
  if (!any_symbolic({a.q, a.k, a.v, a.g, a.state, a.offsets})) {
    check_msr_inputs(op, msr_step_form(op, a, as_single_step_meta), "state");
  }
  return step_output(a.q, a.v);
}

at::Tensor matvec_meta(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 1,
              "retention::matvec: weight must be [N, K] and x [K], got ", weight.sym_sizes(), " and ",
              x.sym_sizes());
  return empty_sym({weight.sym_size(0)}, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, Meta, m) {
  m.impl("msr_forward", msr_forward_kernel<&msr_forward_meta>);
  m.impl("msr_backward", msr_backward_kernel<&msr_backward_meta>);
  m.impl("msr_step", msr_step_kernel<&msr_step_meta>);
  m.impl("matvec", &matvec_meta);
}

}  // namespace retention
