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
#include "msr_args.h"

namespace retention {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_decay_has_no_grad(const char* op, const at::Tensor& log_decay) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && log_decay.requires_grad()), op,
              ": log_decay must not require grad (the decay is fixed; no gradient is computed "
              "for it)");
}

// The options of a call in the autograd context (saved_data holds IValues).
void save_options(AutogradContext* ctx, const MsrOptions& o) {
  ctx->saved_data["scale"] = *o.scale;
  ctx->saved_data["form"] = static_cast<int64_t>(o.form);
  ctx->saved_data["chunk_size"] = o.chunk_size;
  ctx->saved_data["rotary"] = static_cast<int64_t>(o.rotary);
  ctx->saved_data["norm"] = o.norm;
  ctx->saved_data["eps"] = o.eps;
  ctx->saved_data["decay_norm"] = o.decay_norm;
}

MsrOptions saved_options(AutogradContext* ctx) {
  MsrOptions o;
  o.scale = ctx->saved_data["scale"].toDouble();
  o.form = static_cast<Form>(ctx->saved_data["form"].toInt());
  o.chunk_size = ctx->saved_data["chunk_size"].toInt();
  o.rotary = static_cast<Rotary>(ctx->saved_data["rotary"].toInt());
  o.norm = ctx->saved_data["norm"].toBool();
  o.eps = ctx->saved_data["eps"].toDouble();
  o.decay_norm = ctx->saved_data["decay_norm"].toBool();
  return o;
}

// The fused layer core: gradients for q, k, v, g, initial_state and norm_weight, the inputs
// that autograd tracks (given explicitly; the rest of the call comes in `a`).
class MsrFunction : public torch::autograd::Function<MsrFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const OptTensor& g,
                               const OptTensor& initial_state, const OptTensor& norm_weight,
                               const MsrArgs& a) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = dispatch_msr_forward(a);
    auto opt = [](const OptTensor& t) { return has(t) ? *t : at::Tensor(); };
    ctx->save_for_backward({q, k, v, opt(g), a.log_decay, opt(initial_state), opt(a.offsets),
                            opt(a.cu_seqlens), opt(norm_weight)});
    save_options(ctx, a.opt);
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "retention: double backward (create_graph=True) is not supported");
    const auto saved = ctx->get_saved_variables();
    auto opt = [&](size_t i) { return saved[i].defined() ? OptTensor(saved[i]) : OptTensor(); };
    MsrArgs a = make_msr_args(saved[0], saved[1], saved[2], opt(3), saved[4], saved_options(ctx),
                              opt(5), opt(6), opt(7), opt(8));
    a.opt.chunk_size = msr_backward_chunk_size(a.opt);
    // zeros_like(v): [B, T, H, dv] without reading sizes as integers (symbolic under torch.compile).
    a.grad_y = grads[0].defined() ? grads[0] : at::zeros_like(a.v, at::MemoryFormat::Contiguous);
    a.grad_final_state = grads[1].defined() ? OptTensor(grads[1]) : OptTensor();
    auto r = dispatch_msr_backward(a);
    at::Tensor d_init;
    if (has(a.initial_state)) d_init = std::get<4>(r).to(a.initial_state->scalar_type());
    // One gradient per forward input: q, k, v, g, initial_state, norm_weight, a.
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), d_init, std::get<5>(r),
            at::Tensor()};
  }
};

MsrForwardResult msr_forward_autograd(const MsrArgs& a) {
  check_decay_has_no_grad(op_name("retention::msr_forward"), a.log_decay);
  auto out = MsrFunction::apply(a.q, a.k, a.v, a.g, a.initial_state, a.norm_weight, a);
  return {out[0], out[1]};
}

at::Tensor msr_step_autograd(const MsrArgs& a) {
  // Under no_grad a Parameter may still have requires_grad set; nothing is recorded then.
  const bool raw = CalledAs::raw_op() != nullptr;
  for (const OptTensor& t : {OptTensor(a.q), OptTensor(a.k), OptTensor(a.v), a.g,
                             OptTensor(a.log_decay), OptTensor(a.state), a.norm_weight}) {
    TORCH_CHECK(!(at::GradMode::is_enabled() && has(t) && t->requires_grad()),
                op_name("retention::msr_step"),
                ": decoding is inference-only and no input may require grad; use ",
                raw ? "recurrent_forward (or chunk_forward)" : "msr_forward",
                " for a differentiable pass");
  }
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    y = dispatch_msr_step(a);
  }
  torch::autograd::impl::bump_version(a.state);
  return y;
}

MsrBackwardResult msr_backward_autograd(const MsrArgs& a) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return dispatch_msr_backward(a);
}

at::Tensor matvec_autograd(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && (weight.requires_grad() || x.requires_grad())),
              "retention::matvec: an inference kernel with no backward; call it under no_grad, or "
              "use linear for a differentiable product");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("retention::matvec", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(weight, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, Autograd, m) {
  m.impl("msr_forward", msr_forward_kernel<&msr_forward_autograd>);
  m.impl("msr_backward", msr_backward_kernel<&msr_backward_autograd>);
  m.impl("msr_step", msr_step_kernel<&msr_step_autograd>);
  m.impl("matvec", &matvec_autograd);
}

}  // namespace retention
