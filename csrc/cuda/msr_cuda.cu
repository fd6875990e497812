// CUDA kernels of the fused multi-scale retention (MSR) layer-core ops: msr_forward,
// msr_backward, msr_step (contract: the MSR section of retention.h).  Argument checks, output
// and workspace allocation, and one call into the torch-free launchers of kernels/msr_kernels.h
// on the current stream; all device code lives in kernels/.
//
// All three forms (chunk / parallel / recurrent) run the fused chunk kernels on the GPU, and
// chunk_size does not change the kernels' tiling (as for the raw ops): the result is the same
// function of the inputs up to rounding.  float64 inputs are evaluated by the CPU kernel on
// host copies (as for the raw ops), which keeps gradcheck on CUDA tensors working.
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "kernel_params.h"
#include "msr_kernels.h"

namespace retention {
namespace {

namespace rk = retention::kernels;

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Six = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using glue::bthd;
using glue::kernel_dtype;
using glue::shape_of;
using glue::unit_inner_stride;

at::Tensor fp32_contiguous(const OptTensor& s) { return has(s) ? s->to(at::kFloat).contiguous() : at::Tensor(); }
const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(e));
}

// Byte workspace from the caching allocator (16-byte aligned, as the launchers require).
at::Tensor workspace(std::size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

template <class Signature>
c10::TypedOperatorHandle<Signature> schema(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
at::Tensor cpu(const at::Tensor& t) { return t.to(at::kCPU); }
OptTensor cpu(const OptTensor& t) { return has(t) ? OptTensor(t->to(at::kCPU)) : OptTensor(); }
const c10::DispatchKeySet kCpuKeys{c10::DispatchKey::CPU};

at::Tensor to_device(const at::Tensor& t, const at::Device& device) { return t.defined() ? t.to(device) : t; }

// ---- argument checks ------------------------------------------------------------------------

struct MsrArgs {
  Dims d;
  int64_t N;  // number of sequences
  rk::MsrSequences seq;
  at::Tensor cu_seqlens, offsets, norm_weight;  // device copies kept alive for the launch
};

rk::RotaryMode rotary_mode(const char* op, int64_t rotary, int64_t dk) {
  TORCH_CHECK(rotary >= 0 && rotary <= 2, op, ": rotary must be 0 (none), 1 (torchscale) or 2 (neox), got ",
              rotary);
  TORCH_CHECK(rotary == 0 || dk % 2 == 0, op, ": rotary embeddings need an even dk (last dim of q and k), got ",
              dk);
  return static_cast<rk::RotaryMode>(rotary);
}

void check_gate(const char* op, const char* name, const OptTensor& g, const at::Tensor& v) {
  if (!has(g)) return;
  TORCH_CHECK(g->sizes() == v.sizes(), op, ": ", name, " must have the shape of v ", v.sizes(), ", got ",
              g->sizes());
  TORCH_CHECK(g->scalar_type() == v.scalar_type(), op, ": ", name, " must have the dtype of v (", v.scalar_type(),
              "), got ", g->scalar_type());
  TORCH_CHECK(g->device() == v.device(), op, ": all tensors must be on the same device, but v is on ", v.device(),
              " and ", name, " is on ", g->device());
}

at::Tensor check_norm_weight(const char* op, const OptTensor& w, const at::Tensor& q, int64_t dv, double eps) {
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  if (!has(w)) return at::Tensor();
  TORCH_CHECK(w->dim() == 1 && w->size(0) == dv, op, ": norm_weight must have shape [dv] = [", dv, "], got ",
              w->sizes());
  TORCH_CHECK(is_float_type(w->scalar_type()), op, ": norm_weight must be a float tensor, got ", w->scalar_type());
  TORCH_CHECK(w->device() == q.device(), op, ": all tensors must be on the same device, but q is on ", q.device(),
              " and norm_weight is on ", w->device());
  return w->to(at::kFloat).contiguous();
}

// offsets: int64 [N] on the device of q.
at::Tensor check_offsets(const char* op, const OptTensor& offsets, int64_t N, const at::Tensor& q) {
  if (!has(offsets)) return at::Tensor();
  TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) == N, op, ": offsets must have shape [N] = [", N,
              "] (one position per sequence), got ", offsets->sizes());
  TORCH_CHECK(offsets->scalar_type() == at::kLong, op, ": offsets must be int64, got ", offsets->scalar_type());
  TORCH_CHECK(offsets->device() == q.device(), op, ": all tensors must be on the same device, but q is on ",
              q.device(), " and offsets is on ", offsets->device());
  check_offsets_values(op, *offsets);
  return offsets->contiguous();
}

// The values of cu_seqlens (cu[0] == 0, non-decreasing, cu[N] == T) are checked on the device:
// copying them to the host would synchronise every call and make the ops impossible to capture
// in a CUDA graph.  A violation raises a device-side assert (torch's _assert_async; its message
// is torch's generic one), reported by the next synchronising call.  The kernels clamp
// every sequence into [0, T] (msr_sequence), so they never access memory out of bounds before
// that, whatever the values.  (Builds whose device asserts are compiled out, such as ROCm's
// default, skip the check; the clamping still holds.)
void check_cu_seqlens_async(const at::Tensor& cu, int64_t T) {
  const at::Tensor c = cu.to(at::kLong);
  const at::Tensor ok = c.select(0, 0).eq(0).logical_and(c.select(0, -1).eq(T)).logical_and(at::diff(c).ge(0).all());
  at::_assert_async(ok);
}

MsrArgs check_msr(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
                  const at::Tensor& log_decay, const OptTensor& initial_state, const OptTensor& offsets,
                  const OptTensor& cu_seqlens, const OptTensor& norm_weight, double eps) {
  MsrArgs a;
  a.d = check_inputs(op, q, k, v, log_decay, OptTensor());
  check_gate(op, "g", g, v);
  a.N = a.d.B;
  if (has(cu_seqlens)) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, op, ": cu_seqlens must be 1-D [N + 1], got ", cu.sizes());
    TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op,
                ": cu_seqlens must be int32 or int64, got ", cu.scalar_type());
    TORCH_CHECK(cu.device() == q.device(), op, ": cu_seqlens must be on the device of q (", q.device(), "), got ",
                cu.device());
    TORCH_CHECK(a.d.B == 1, op, ": with cu_seqlens the sequences are packed in one batch row (B == 1), got B = ",
                a.d.B);
    a.N = cu.size(0) - 1;
    a.cu_seqlens = cu.contiguous();
    check_cu_seqlens_async(a.cu_seqlens, a.d.T);
    a.seq.cu_seqlens = a.cu_seqlens.data_ptr();
    a.seq.cu_seqlens_int64 = cu.scalar_type() == at::kLong;
  }
  a.seq.num_sequences = a.N;
  a.offsets = check_offsets(op, offsets, a.N, q);
  a.seq.offsets = a.offsets.defined() ? a.offsets.data_ptr<int64_t>() : nullptr;
  if (has(initial_state)) check_state(op, "initial_state", *initial_state, q, Dims{a.N, a.d.T, a.d.H, a.d.dk, a.d.dv});
  a.norm_weight = check_norm_weight(op, norm_weight, q, a.d.dv, eps);
  return a;
}

rk::MsrOptions options(rk::RotaryMode rotary, bool norm, const at::Tensor& w, double eps, bool decay_norm) {
  rk::MsrOptions o;
  o.rotary = rotary;
  o.norm = norm;
  o.norm_weight = norm && w.defined() ? w.data_ptr<float>() : nullptr;
  o.eps = static_cast<float>(eps);
  o.decay_norm = decay_norm;
  return o;
}

// ---- forward ----------------------------------------------------------------------------------

Pair msr_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
                      const at::Tensor& log_decay, double scale, int64_t form, int64_t chunk_size,
                      const OptTensor& initial_state, const OptTensor& offsets, const OptTensor& cu_seqlens,
                      int64_t rotary, bool norm, const OptTensor& norm_weight, double eps, bool decay_norm) {
  const char* op = "retention::msr_forward";
  TORCH_CHECK(form >= 0 && form <= 2, op, ": form must be 0 (chunk), 1 (parallel) or 2 (recurrent), got ", form);
  check_chunk_size(op, chunk_size);
  MsrArgs a = check_msr(op, q, k, v, g, log_decay, initial_state, offsets, cu_seqlens, norm_weight, eps);
  const rk::RotaryMode mode = rotary_mode(op, rotary, a.d.dk);
  if (q.scalar_type() == at::kDouble) {
    static auto cpu_op =
        schema<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                    double, int64_t, int64_t, const OptTensor&, const OptTensor&, const OptTensor&, int64_t, bool,
                    const OptTensor&, double, bool)>("retention::msr_forward");
    auto r = cpu_op.redispatch(kCpuKeys, cpu(q), cpu(k), cpu(v), cpu(g), cpu(log_decay), scale, form, chunk_size,
                               cpu(initial_state), cpu(offsets), cpu(cu_seqlens), rotary, norm, cpu(norm_weight), eps,
                               decay_norm);
    return {to_device(std::get<0>(r), q.device()), to_device(std::get<1>(r), q.device())};
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q_ = unit_inner_stride(q), k_ = unit_inner_stride(k), v_ = unit_inner_stride(v);
  const at::Tensor g_ = has(g) ? unit_inner_stride(*g) : at::Tensor();
  const at::Tensor decay = log_decay.to(at::kFloat).contiguous(), h0 = fp32_contiguous(initial_state);
  at::Tensor y = at::empty({a.d.B, a.d.T, a.d.H, a.d.dv}, q.options());
  at::Tensor state = at::empty({a.N, a.d.H, a.d.dk, a.d.dv}, q.options().dtype(at::kFloat));

  rk::MsrForwardParams p;
  p.dtype = kernel_dtype(q.scalar_type());
  p.shape = shape_of(a.d);
  p.q = bthd(q_);
  p.k = bthd(k_);
  p.v = bthd(v_);
  if (g_.defined()) p.g = bthd(g_);
  p.y = bthd(y);
  p.log_decay = decay.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.chunk_size = chunk_size;
  p.seq = a.seq;
  p.opt = options(mode, norm, a.norm_weight, eps, decay_norm);
  p.initial_state = ptr_or_null(h0);
  p.final_state = state.data_ptr<float>();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  const at::Tensor ws = workspace(rk::msr_forward_workspace_bytes(p), q);
  p.workspace = ws.data_ptr();
  check_launch(rk::launch_msr_forward(p), op);
  return {y, state};
}

// ---- backward ---------------------------------------------------------------------------------

Six msr_backward_cuda(const at::Tensor& grad_y, const OptTensor& grad_final_state, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& v, const OptTensor& g, const at::Tensor& log_decay,
                      double scale, int64_t chunk_size, const OptTensor& initial_state, const OptTensor& offsets,
                      const OptTensor& cu_seqlens, int64_t rotary, bool norm, const OptTensor& norm_weight,
                      double eps, bool decay_norm) {
  const char* op = "retention::msr_backward";
  check_chunk_size(op, chunk_size);
  MsrArgs a = check_msr(op, q, k, v, g, log_decay, initial_state, offsets, cu_seqlens, norm_weight, eps);
  const rk::RotaryMode mode = rotary_mode(op, rotary, a.d.dk);
  const Dims state_dims{a.N, a.d.T, a.d.H, a.d.dk, a.d.dv};
  // grad_y has the shape of y = [B, T, H, dv]; grad_final_state that of the states [N, H, dk, dv].
  check_grad_o(op, grad_y, a.d, q, OptTensor());
  if (has(grad_final_state)) check_state(op, "grad_final_state", *grad_final_state, q, state_dims);
  if (q.scalar_type() == at::kDouble) {
    static auto cpu_op =
        schema<Six(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const OptTensor&, const at::Tensor&, double, int64_t, const OptTensor&, const OptTensor&,
                   const OptTensor&, int64_t, bool, const OptTensor&, double, bool)>("retention::msr_backward");
    auto r = cpu_op.redispatch(kCpuKeys, cpu(grad_y), cpu(grad_final_state), cpu(q), cpu(k), cpu(v), cpu(g),
                               cpu(log_decay), scale, chunk_size, cpu(initial_state), cpu(offsets), cpu(cu_seqlens),
                               rotary, norm, cpu(norm_weight), eps, decay_norm);
    return {to_device(std::get<0>(r), q.device()), to_device(std::get<1>(r), q.device()),
            to_device(std::get<2>(r), q.device()), to_device(std::get<3>(r), q.device()),
            to_device(std::get<4>(r), q.device()), to_device(std::get<5>(r), q.device())};
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q_ = unit_inner_stride(q), k_ = unit_inner_stride(k), v_ = unit_inner_stride(v);
  const at::Tensor g_ = has(g) ? unit_inner_stride(*g) : at::Tensor();
  const at::Tensor dy = unit_inner_stride(grad_y.to(q.scalar_type()));
  const at::Tensor decay = log_decay.to(at::kFloat).contiguous();
  const at::Tensor h0 = fp32_contiguous(initial_state), dhT = fp32_contiguous(grad_final_state);
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor dg = g_.defined() ? at::empty_like(g_, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor dh0 = at::empty({a.N, a.d.H, a.d.dk, a.d.dv}, q.options().dtype(at::kFloat));
  const bool want_dw = norm && a.norm_weight.defined();
  at::Tensor dw32 = want_dw ? at::empty({a.d.dv}, q.options().dtype(at::kFloat)) : at::Tensor();

  rk::MsrBackwardParams p;
  p.dtype = kernel_dtype(q.scalar_type());
  p.shape = shape_of(a.d);
  p.q = bthd(q_);
  p.k = bthd(k_);
  p.v = bthd(v_);
  if (g_.defined()) {
    p.g = bthd(g_);
    p.grad_g = bthd(dg);
  }
  p.grad_y = bthd(dy);
  p.log_decay = decay.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.chunk_size = chunk_size;
  p.seq = a.seq;
  p.opt = options(mode, norm, a.norm_weight, eps, decay_norm);
  p.initial_state = ptr_or_null(h0);
  p.grad_final_state = ptr_or_null(dhT);
  p.grad_q = bthd(dq);
  p.grad_k = bthd(dk);
  p.grad_v = bthd(dv);
  p.grad_initial_state = dh0.data_ptr<float>();
  p.grad_norm_weight = want_dw ? dw32.data_ptr<float>() : nullptr;
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  const at::Tensor ws = workspace(rk::msr_backward_workspace_bytes(p), q);
  p.workspace = ws.data_ptr();
  check_launch(rk::launch_msr_backward(p), op);

  // d_norm_weight: undefined without norm_weight; zero when the norm is off (w is unused).
  at::Tensor dw;
  if (has(norm_weight)) dw = want_dw ? dw32.to(norm_weight->scalar_type()) : at::zeros_like(*norm_weight);
  return {dq, dk, dv, dg, dh0, dw};
}

// ---- decode step ------------------------------------------------------------------------------

at::Tensor msr_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
                         const at::Tensor& log_decay, double scale, const at::Tensor& state, const OptTensor& offsets,
                         int64_t rotary, bool norm, const OptTensor& norm_weight, double eps, bool decay_norm) {
  const char* op = "retention::msr_step";
  const at::Tensor q4 = as_single_step(op, "q", q), k4 = as_single_step(op, "k", k), v4 = as_single_step(op, "v", v);
  const Dims d = check_inputs(op, q4, k4, v4, log_decay, state, "state");
  OptTensor g4;
  if (has(g)) g4 = as_single_step(op, "g", *g);
  check_gate(op, "g", g4, v4);
  TORCH_CHECK(state.scalar_type() == state_dtype(q.scalar_type()), op, ": state must be ",
              state_dtype(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ", state.scalar_type());
  TORCH_CHECK(state.is_contiguous(), op, ": state must be contiguous (it is updated in place)");
  check_state_not_aliased(op, state,
                          {{"q", &q}, {"k", &k}, {"v", &v}, {"g", has(g) ? &*g : nullptr},
                           {"log_decay", &log_decay}, {"offsets", has(offsets) ? &*offsets : nullptr},
                           {"norm_weight", has(norm_weight) ? &*norm_weight : nullptr}});
  const rk::RotaryMode mode = rotary_mode(op, rotary, d.dk);
  const at::Tensor offsets_ = check_offsets(op, offsets, d.B, q);
  const at::Tensor w = check_norm_weight(op, norm_weight, q, d.dv, eps);
  if (q.scalar_type() == at::kDouble) {
    static auto cpu_op = schema<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                           const at::Tensor&, double, const at::Tensor&, const OptTensor&, int64_t,
                                           bool, const OptTensor&, double, bool)>("retention::msr_step");
    at::Tensor host_state = cpu(state);
    at::Tensor y = cpu_op.redispatch(kCpuKeys, cpu(q), cpu(k), cpu(v), cpu(g), cpu(log_decay), scale, host_state,
                                     cpu(offsets), rotary, norm, cpu(norm_weight), eps, decay_norm);
    state.copy_(host_state);
    return y.to(q.device());
  }
  TORCH_CHECK(d.dv <= rk::kMsrStepMaxDv, op, ": dv (last dim of v) must be at most ", rk::kMsrStepMaxDv,
              " on the GPU (the decode step keeps a whole row in shared memory), got ", d.dv);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q_ = unit_inner_stride(q4), k_ = unit_inner_stride(k4), v_ = unit_inner_stride(v4);
  const at::Tensor g_ = has(g4) ? unit_inner_stride(*g4) : at::Tensor();
  const at::Tensor decay = log_decay.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({d.B, 1, d.H, d.dv}, q.options());

  rk::MsrStepParams p;
  p.dtype = kernel_dtype(q.scalar_type());
  p.B = d.B;
  p.H = d.H;
  p.dk = d.dk;
  p.dv = d.dv;
  p.q = q_.data_ptr();
  p.q_stride_b = q_.stride(0);
  p.q_stride_h = q_.stride(2);
  p.k = k_.data_ptr();
  p.k_stride_b = k_.stride(0);
  p.k_stride_h = k_.stride(2);
  p.v = v_.data_ptr();
  p.v_stride_b = v_.stride(0);
  p.v_stride_h = v_.stride(2);
  if (g_.defined()) {
    p.g = g_.data_ptr();
    p.g_stride_b = g_.stride(0);
    p.g_stride_h = g_.stride(2);
  }
  p.y = y.data_ptr();
  p.y_stride_b = y.stride(0);
  p.y_stride_h = y.stride(2);
  p.log_decay = decay.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.state = state.data_ptr<float>();
  p.offsets = offsets_.defined() ? offsets_.data_ptr<int64_t>() : nullptr;
  p.opt = options(mode, norm, w, eps, decay_norm);
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(rk::launch_msr_step(p), op);
  return q.dim() == 3 ? y.squeeze(1) : y;
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, CUDA, m) {
  m.impl("msr_forward", &msr_forward_cuda);
  m.impl("msr_backward", &msr_backward_cuda);
  m.impl("msr_step", &msr_step_cuda);
}

}  // namespace retention
