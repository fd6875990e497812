// Autograd kernels of the msr_* ops (dispatch key Autograd; the raw ops run as these, ops.cpp):
// a C++ autograd Function, so Python and C++ callers both get gradients for q, k, v, g,
// initial_state and norm_weight. The backward op itself is not differentiable (no double
// backward).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "checks.h"

namespace retention {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_decay_has_no_grad(const char* op, const at::Tensor& log_decay) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && log_decay.requires_grad()), op,
              ": log_decay must not require grad (the decay is fixed; no gradient is computed "
              "for it)");
}

// The fused layer core: gradients for q, k, v, g, initial_state and norm_weight.
class MsrFunction : public torch::autograd::Function<MsrFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const OptTensor& g,
                               const at::Tensor& log_decay, double scale, int64_t form,
                               int64_t chunk_size, const OptTensor& initial_state,
                               const OptTensor& offsets, const OptTensor& cu_seqlens,
                               int64_t rotary, bool norm, const OptTensor& norm_weight,
                               double eps, bool decay_norm) {
    at::AutoDispatchBelowADInplaceOrView guard;
    MsrOptions o;
    o.form = static_cast<Form>(form);
    o.chunk_size = chunk_size;
    o.scale = scale;
    o.rotary = static_cast<Rotary>(rotary);
    o.norm = norm;
    o.eps = eps;
    o.decay_norm = decay_norm;
    auto out = msr_forward(q, k, v, g, log_decay, o, initial_state, offsets, cu_seqlens,
                           norm_weight);
    auto opt = [](const OptTensor& t) { return has(t) ? *t : at::Tensor(); };
    ctx->save_for_backward({q, k, v, opt(g), log_decay, opt(initial_state), opt(offsets),
                            opt(cu_seqlens), opt(norm_weight)});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["form"] = form;
    ctx->saved_data["chunk_size"] = chunk_size;
    ctx->saved_data["rotary"] = rotary;
    ctx->saved_data["norm"] = norm;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["decay_norm"] = decay_norm;
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "retention: double backward (create_graph=True) is not supported");
    const auto saved = ctx->get_saved_variables();
    auto opt = [&](size_t i) { return saved[i].defined() ? OptTensor(saved[i]) : OptTensor(); };
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &log_decay = saved[4];
    const OptTensor g = opt(3), initial_state = opt(5), norm_weight = opt(8);
    MsrOptions o;
    o.form = static_cast<Form>(ctx->saved_data["form"].toInt());
    o.chunk_size = ctx->saved_data["chunk_size"].toInt();
    o.scale = ctx->saved_data["scale"].toDouble();
    o.rotary = static_cast<Rotary>(ctx->saved_data["rotary"].toInt());
    o.norm = ctx->saved_data["norm"].toBool();
    o.eps = ctx->saved_data["eps"].toDouble();
    o.decay_norm = ctx->saved_data["decay_norm"].toBool();
    // zeros_like(v): [B, T, H, dv] without reading sizes as integers (symbolic under torch.compile).
    auto grad_y = grads[0].defined() ? grads[0] : at::zeros_like(v, at::MemoryFormat::Contiguous);
    const OptTensor grad_final = grads[1].defined() ? OptTensor(grads[1]) : OptTensor();
    auto r = msr_backward(grad_y, grad_final, q, k, v, g, log_decay, o, initial_state, opt(6),
                          opt(7), norm_weight);
    at::Tensor d_init;
    if (initial_state.has_value()) d_init = std::get<4>(r).to(initial_state->scalar_type());
    // One gradient per forward input (16).
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), at::Tensor(),
            at::Tensor(),   at::Tensor(),   at::Tensor(),   d_init,         at::Tensor(),
            at::Tensor(),   at::Tensor(),   at::Tensor(),   std::get<5>(r), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> msr_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
    const at::Tensor& log_decay, double scale, int64_t form, int64_t chunk_size,
    const OptTensor& initial_state, const OptTensor& offsets, const OptTensor& cu_seqlens,
    int64_t rotary, bool norm, const OptTensor& norm_weight, double eps, bool decay_norm) {
  check_decay_has_no_grad(op_name("retention::msr_forward"), log_decay);
  auto out = MsrFunction::apply(q, k, v, g, log_decay, scale, form, chunk_size, initial_state,
                                offsets, cu_seqlens, rotary, norm, norm_weight, eps, decay_norm);
  return {out[0], out[1]};
}

at::Tensor msr_step_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const OptTensor& g, const at::Tensor& log_decay, double scale,
                             const at::Tensor& state, const OptTensor& offsets, int64_t rotary,
                             bool norm, const OptTensor& norm_weight, double eps,
                             bool decay_norm) {
  // Under no_grad a Parameter may still have requires_grad set; nothing is recorded then.
  const bool raw = CalledAs::raw_op() != nullptr;
  for (const OptTensor& t : {OptTensor(q), OptTensor(k), OptTensor(v), g, OptTensor(log_decay),
                             OptTensor(state), norm_weight}) {
    TORCH_CHECK(!(at::GradMode::is_enabled() && has(t) && t->requires_grad()),
                op_name("retention::msr_step"),
                ": decoding is inference-only and no input may require grad; use ",
                raw ? "recurrent_forward (or chunk_forward)" : "msr_forward",
                " for a differentiable pass");
  }
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor s = state;
    MsrOptions o;
    o.scale = scale;
    o.rotary = static_cast<Rotary>(rotary);
    o.norm = norm;
    o.eps = eps;
    o.decay_norm = decay_norm;
    y = msr_step(q, k, v, g, log_decay, s, o, offsets, norm_weight);
  }
  torch::autograd::impl::bump_version(state);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
msr_backward_autograd(const at::Tensor& grad_y, const OptTensor& grad_final_state,
                      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const OptTensor& g, const at::Tensor& log_decay, double scale,
                      int64_t chunk_size, const OptTensor& initial_state,
                      const OptTensor& offsets, const OptTensor& cu_seqlens, int64_t rotary,
                      bool norm, const OptTensor& norm_weight, double eps, bool decay_norm) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("retention::msr_backward", "")
                           .typed<decltype(msr_backward_autograd)>();
  return handle.call(grad_y, grad_final_state, q, k, v, g, log_decay, scale, chunk_size,
                     initial_state, offsets, cu_seqlens, rotary, norm, norm_weight, eps,
                     decay_norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, Autograd, m) {
  m.impl("msr_forward", &msr_forward_autograd);
  m.impl("msr_backward", &msr_backward_autograd);
  m.impl("msr_step", &msr_step_autograd);
}

}  // namespace retention
