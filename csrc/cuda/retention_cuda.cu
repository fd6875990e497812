// CUDA kernels of the retention ops: the shared argument checks, output allocation, and one
// call into the torch-free launchers of kernels/ on the current stream.  All device code lives
// in kernels/; this file only translates tensors into parameter structs.
//
// float64 inputs have no GPU kernel (tensor cores and the fp32 state are the point of the GPU
// path); they are evaluated by the CPU kernel on host copies, which keeps gradcheck on CUDA
// tensors working, slowly.
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "kernel_params.h"
#include "retention_kernels.h"

namespace retention {
namespace {

namespace rk = retention::kernels;

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using glue::bthd;
using glue::kernel_dtype;
using glue::shape_of;
using glue::unit_inner_stride;

// fp32 [B, H, dk, dv] contiguous copy of an optional state, or an undefined tensor.
at::Tensor fp32_state(const OptTensor& s) {
  return has(s) ? s->to(at::kFloat).contiguous() : at::Tensor();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(e));
}

// ---- float64: the CPU kernel on host copies ---------------------------------------------------

template <class Signature>
c10::TypedOperatorHandle<Signature> schema(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor cpu(const at::Tensor& t) { return t.to(at::kCPU); }
OptTensor cpu(const OptTensor& t) { return has(t) ? OptTensor(t->to(at::kCPU)) : OptTensor(); }
const c10::DispatchKeySet kCpuKeys{c10::DispatchKey::CPU};

template <class... T>
std::tuple<T...> to_device(std::tuple<T...> r, const at::Device& device) {
  return std::apply([&](auto&... t) { return std::make_tuple(t.to(device)...); }, r);
}

// ---- forward ----------------------------------------------------------------------------------

Pair chunked_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& log_decay, double scale, int64_t chunk_size,
                     const OptTensor& initial_state) {
  const Dims d = check_inputs(op, q, k, v, log_decay, initial_state);
  check_chunk_size(op, chunk_size);
  if (q.scalar_type() == at::kDouble) {
    static auto cpu_op = schema<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     double, int64_t, const OptTensor&)>("retention::chunk_forward");
    return to_device(cpu_op.redispatch(kCpuKeys, cpu(q), cpu(k), cpu(v), cpu(log_decay), scale, chunk_size,
                                       cpu(initial_state)),
                     q.device());
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q_ = unit_inner_stride(q), k_ = unit_inner_stride(k), v_ = unit_inner_stride(v);
  const at::Tensor decay = log_decay.to(at::kFloat).contiguous(), h0 = fp32_state(initial_state);
  at::Tensor o = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  at::Tensor state = at::empty({d.B, d.H, d.dk, d.dv}, q.options().dtype(at::kFloat));

  rk::ChunkForwardParams p;
  p.dtype = kernel_dtype(q.scalar_type());
  p.shape = shape_of(d);
  p.q = bthd(q_);
  p.k = bthd(k_);
  p.v = bthd(v_);
  p.o = bthd(o);
  p.log_decay = decay.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.chunk_size = chunk_size;
  p.initial_state = ptr_or_null(h0);
  p.final_state = state.data_ptr<float>();
  // Segment states of the sequence split (kernels/chunk_fwd.cuh), when the launcher splits.
  const auto ws_bytes = static_cast<int64_t>(rk::chunk_forward_workspace_bytes(p));
  const at::Tensor workspace = at::empty({ws_bytes / 4}, q.options().dtype(at::kFloat));
  p.workspace = ws_bytes > 0 ? workspace.data_ptr<float>() : nullptr;
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(rk::launch_chunk_forward(p), op);
  return {o, state};
}

Pair chunk_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& log_decay, double scale, int64_t chunk_size,
                        const OptTensor& initial_state) {
  return chunked_forward("retention::chunk_forward", q, k, v, log_decay, scale, chunk_size, initial_state);
}

// The parallel form computes the same function; on the GPU the chunk kernel is the faster way
// to evaluate it at every length (its intra-chunk part *is* the parallel form).
Pair parallel_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& log_decay, double scale, const OptTensor& initial_state) {
  if (q.scalar_type() == at::kDouble) {
    check_inputs("retention::parallel_forward", q, k, v, log_decay, initial_state);
    static auto cpu_op = schema<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     double, const OptTensor&)>("retention::parallel_forward");
    return to_device(
        cpu_op.redispatch(kCpuKeys, cpu(q), cpu(k), cpu(v), cpu(log_decay), scale, cpu(initial_state)),
        q.device());
  }
  return chunked_forward("retention::parallel_forward", q, k, v, log_decay, scale, 64, initial_state);
}

Pair recurrent_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& log_decay, double scale, const OptTensor& initial_state) {
  const char* op = "retention::recurrent_forward";
  const Dims d = check_inputs(op, q, k, v, log_decay, initial_state);
  if (q.scalar_type() == at::kDouble) {
    static auto cpu_op = schema<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     double, const OptTensor&)>("retention::recurrent_forward");
    return to_device(
        cpu_op.redispatch(kCpuKeys, cpu(q), cpu(k), cpu(v), cpu(log_decay), scale, cpu(initial_state)),
        q.device());
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q_ = unit_inner_stride(q), k_ = unit_inner_stride(k), v_ = unit_inner_stride(v);
  const at::Tensor decay = log_decay.to(at::kFloat).contiguous(), h0 = fp32_state(initial_state);
  at::Tensor o = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  at::Tensor state = at::empty({d.B, d.H, d.dk, d.dv}, q.options().dtype(at::kFloat));

  rk::RecurrentForwardParams p;
  p.dtype = kernel_dtype(q.scalar_type());
  p.shape = shape_of(d);
  p.q = bthd(q_);
  p.k = bthd(k_);
  p.v = bthd(v_);
  p.o = bthd(o);
  p.log_decay = decay.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.initial_state = ptr_or_null(h0);
  p.final_state = state.data_ptr<float>();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(rk::launch_recurrent_forward(p), op);
  return {o, state};
}

// ---- backward ---------------------------------------------------------------------------------

Quad chunked_backward(const char* op, const at::Tensor& grad_o, const OptTensor& grad_final_state,
                      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
                      double scale, int64_t chunk_size, const OptTensor& initial_state) {
  const Dims d = check_inputs(op, q, k, v, log_decay, initial_state);
  check_chunk_size(op, chunk_size);
  check_grad_o(op, grad_o, d, q, grad_final_state);
  if (q.scalar_type() == at::kDouble) {
    static auto cpu_op =
        schema<Quad(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, double, int64_t, const OptTensor&)>("retention::chunk_backward");
    return to_device(cpu_op.redispatch(kCpuKeys, cpu(grad_o), cpu(grad_final_state), cpu(q), cpu(k), cpu(v),
                                       cpu(log_decay), scale, chunk_size, cpu(initial_state)),
                     q.device());
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q_ = unit_inner_stride(q), k_ = unit_inner_stride(k), v_ = unit_inner_stride(v);
  const at::Tensor do_ = unit_inner_stride(grad_o.to(q.scalar_type()));
  const at::Tensor decay = log_decay.to(at::kFloat).contiguous();
  const at::Tensor h0 = fp32_state(initial_state), dhT = fp32_state(grad_final_state);
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor dh0 = at::empty({d.B, d.H, d.dk, d.dv}, q.options().dtype(at::kFloat));

  rk::ChunkBackwardParams p;
  p.dtype = kernel_dtype(q.scalar_type());
  p.shape = shape_of(d);
  p.q = bthd(q_);
  p.k = bthd(k_);
  p.v = bthd(v_);
  p.grad_o = bthd(do_);
  p.grad_q = bthd(dq);
  p.grad_k = bthd(dk);
  p.grad_v = bthd(dv);
  p.log_decay = decay.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.chunk_size = chunk_size;
  p.initial_state = ptr_or_null(h0);
  p.grad_final_state = ptr_or_null(dhT);
  p.grad_initial_state = dh0.data_ptr<float>();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  // fp32 partial sums of dq and dk over dv tiles, reduced in a fixed order by the kernels
  // (kernels/chunk_bwd.cuh): the backward is deterministic, so it needs no
  // alertNotDeterministic under torch.use_deterministic_algorithms.  The caching allocator
  // makes the workspace cheap; it needs no zero-fill.
  const auto ws_bytes = static_cast<int64_t>(rk::chunk_backward_workspace_bytes(p));
  const at::Tensor workspace = at::empty({ws_bytes / 4}, q.options().dtype(at::kFloat));
  p.workspace = ws_bytes > 0 ? workspace.data_ptr<float>() : nullptr;
  check_launch(rk::launch_chunk_backward(p), op);
  return {dq, dk, dv, dh0};
}

Quad chunk_backward_cuda(const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
                         int64_t chunk_size, const OptTensor& initial_state) {
  return chunked_backward("retention::chunk_backward", grad_o, grad_final_state, q, k, v, log_decay, scale,
                          chunk_size, initial_state);
}

Quad parallel_backward_cuda(const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
                            const OptTensor& initial_state) {
  if (q.scalar_type() == at::kDouble) {
    const char* op = "retention::parallel_backward";
    const Dims d = check_inputs(op, q, k, v, log_decay, initial_state);
    check_grad_o(op, grad_o, d, q, grad_final_state);
    static auto cpu_op =
        schema<Quad(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, double, const OptTensor&)>("retention::parallel_backward");
    return to_device(cpu_op.redispatch(kCpuKeys, cpu(grad_o), cpu(grad_final_state), cpu(q), cpu(k), cpu(v),
                                       cpu(log_decay), scale, cpu(initial_state)),
                     q.device());
  }
  return chunked_backward("retention::parallel_backward", grad_o, grad_final_state, q, k, v, log_decay, scale, 64,
                          initial_state);
}

// ---- decode step ------------------------------------------------------------------------------

at::Tensor recurrent_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& log_decay, double scale, const at::Tensor& state) {
  const char* op = "retention::recurrent_step";
  const at::Tensor q4 = as_single_step(op, "q", q), k4 = as_single_step(op, "k", k), v4 = as_single_step(op, "v", v);
  const Dims d = check_inputs(op, q4, k4, v4, log_decay, state, "state");
  TORCH_CHECK(state.scalar_type() == state_dtype(q.scalar_type()), op, ": state must be ",
              state_dtype(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ", state.scalar_type());
  TORCH_CHECK(state.is_contiguous(), op, ": state must be contiguous (it is updated in place)");
  check_state_not_aliased(op, state, {{"q", &q}, {"k", &k}, {"v", &v}, {"log_decay", &log_decay}});
  if (q.scalar_type() == at::kDouble) {
    static auto cpu_op = schema<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, double, const at::Tensor&)>("retention::recurrent_step");
    at::Tensor host_state = cpu(state);
    at::Tensor o = cpu_op.redispatch(kCpuKeys, cpu(q), cpu(k), cpu(v), cpu(log_decay), scale, host_state);
    state.copy_(host_state);
    return o.to(q.device());
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q_ = unit_inner_stride(q4), k_ = unit_inner_stride(k4), v_ = unit_inner_stride(v4);
  const at::Tensor decay = log_decay.to(at::kFloat).contiguous();
  at::Tensor o = at::empty({d.B, 1, d.H, d.dv}, q.options());

  rk::RecurrentStepParams p;
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
  p.o = o.data_ptr();
  p.o_stride_b = o.stride(0);
  p.o_stride_h = o.stride(2);
  p.log_decay = decay.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.state = state.data_ptr<float>();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(rk::launch_recurrent_step(p), op);
  return q.dim() == 3 ? o.squeeze(1) : o;
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, CUDA, m) {
  m.impl("chunk_forward", &chunk_forward_cuda);
  m.impl("chunk_backward", &chunk_backward_cuda);
  m.impl("parallel_forward", &parallel_forward_cuda);
  m.impl("parallel_backward", &parallel_backward_cuda);
  m.impl("recurrent_forward", &recurrent_forward_cuda);
  m.impl("recurrent_step", &recurrent_step_cuda);
}

}  // namespace retention
