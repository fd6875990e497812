// CUDA kernels of the retention ops: the shared argument checks, output allocation, and one
// call into the torch-free launchers of kernels/ on the current stream.  All device code lives
// in kernels/; this file only translates tensors into parameter structs.  float64 inputs run
// the CPU kernel on host copies (cpu_fallback.h).
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_fallback.h"
#include "kernel_params.h"
#include "retention_kernels.h"

namespace retention {
namespace {

using namespace glue;

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ---- forward ----------------------------------------------------------------------------------

Pair chunked_forward(const char* op, const Dims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& log_decay, double scale, const OptTensor& initial_state) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor h0 = fp32_contiguous(initial_state);
  at::Tensor o = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  at::Tensor state = empty_state(q, d.B, d);

  rk::ChunkForwardParams p;
  const Inputs in = fill_inputs(p, d, q, k, v, log_decay, scale);
  p.o = bthd(o);
  p.initial_state = ptr_or_null(h0);
  p.final_state = state.data_ptr<float>();
  p.num_sms = num_sms();
  // Segment states of the sequence split (kernels/chunk_fwd.cuh), when the launcher splits.
  const at::Tensor ws = workspace(rk::chunk_forward_workspace_bytes(p), q);
  p.workspace = ws.data_ptr();
  check_launch(rk::launch_chunk_forward(p), op);
  return {o, state};
}

Pair chunk_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& log_decay, double scale, int64_t chunk_size,
                        const OptTensor& initial_state) {
  const char* op = "retention::chunk_forward";
  const Dims d = check_inputs(op, q, k, v, log_decay, initial_state);
  check_chunk_size(op, chunk_size);
  if (q.scalar_type() == at::kDouble)
    return CpuKernel<&chunk_forward_cuda>::run(op, q.device(), q, k, v, log_decay, scale, chunk_size, initial_state);
  return chunked_forward(op, d, q, k, v, log_decay, scale, initial_state);
}

// The parallel form computes the same function; on the GPU the chunk kernel is the faster way
// to evaluate it at every length (its intra-chunk part *is* the parallel form).
Pair parallel_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& log_decay, double scale, const OptTensor& initial_state) {
  const char* op = "retention::parallel_forward";
  const Dims d = check_inputs(op, q, k, v, log_decay, initial_state);
  if (q.scalar_type() == at::kDouble)
    return CpuKernel<&parallel_forward_cuda>::run(op, q.device(), q, k, v, log_decay, scale, initial_state);
  return chunked_forward(op, d, q, k, v, log_decay, scale, initial_state);
}

Pair recurrent_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& log_decay, double scale, const OptTensor& initial_state) {
  const char* op = "retention::recurrent_forward";
  const Dims d = check_inputs(op, q, k, v, log_decay, initial_state);
  if (q.scalar_type() == at::kDouble)
    return CpuKernel<&recurrent_forward_cuda>::run(op, q.device(), q, k, v, log_decay, scale, initial_state);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor h0 = fp32_contiguous(initial_state);
  at::Tensor o = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  at::Tensor state = empty_state(q, d.B, d);

  rk::RecurrentForwardParams p;
  const Inputs in = fill_inputs(p, d, q, k, v, log_decay, scale);
  p.o = bthd(o);
  p.initial_state = ptr_or_null(h0);
  p.final_state = state.data_ptr<float>();
  check_launch(rk::launch_recurrent_forward(p), op);
  return {o, state};
}

// ---- backward ---------------------------------------------------------------------------------

Quad chunked_backward(const char* op, const Dims& d, const at::Tensor& grad_o, const OptTensor& grad_final_state,
                      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
                      double scale, const OptTensor& initial_state) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor do_ = unit_inner_stride(grad_o.to(q.scalar_type()));
  const at::Tensor h0 = fp32_contiguous(initial_state), dhT = fp32_contiguous(grad_final_state);
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor dh0 = empty_state(q, d.B, d);

  rk::ChunkBackwardParams p;
  const Inputs in = fill_inputs(p, d, q, k, v, log_decay, scale);
  p.grad_o = bthd(do_);
  p.grad_q = bthd(dq);
  p.grad_k = bthd(dk);
  p.grad_v = bthd(dv);
  p.initial_state = ptr_or_null(h0);
  p.grad_final_state = ptr_or_null(dhT);
  p.grad_initial_state = dh0.data_ptr<float>();
  // fp32 partial sums of dq and dk over dv tiles, reduced in a fixed order by the kernels
  // (kernels/chunk_bwd.cuh): the backward is deterministic, so it needs no
  // alertNotDeterministic under torch.use_deterministic_algorithms.
  p.num_sms = num_sms();
  const at::Tensor ws = workspace(rk::chunk_backward_workspace_bytes(p), q);
  p.workspace = ws.data_ptr();
  check_launch(rk::launch_chunk_backward(p), op);
  return {dq, dk, dv, dh0};
}

Quad chunk_backward_cuda(const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
                         int64_t chunk_size, const OptTensor& initial_state) {
  const char* op = "retention::chunk_backward";
  const Dims d = check_inputs(op, q, k, v, log_decay, initial_state);
  check_chunk_size(op, chunk_size);
  check_grad_o(op, grad_o, d, q, grad_final_state);
  if (q.scalar_type() == at::kDouble)
    return CpuKernel<&chunk_backward_cuda>::run(op, q.device(), grad_o, grad_final_state, q, k, v, log_decay, scale,
                                                chunk_size, initial_state);
  return chunked_backward(op, d, grad_o, grad_final_state, q, k, v, log_decay, scale, initial_state);
}

Quad parallel_backward_cuda(const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
                            const OptTensor& initial_state) {
  const char* op = "retention::parallel_backward";
  const Dims d = check_inputs(op, q, k, v, log_decay, initial_state);
  check_grad_o(op, grad_o, d, q, grad_final_state);
  if (q.scalar_type() == at::kDouble)
    return CpuKernel<&parallel_backward_cuda>::run(op, q.device(), grad_o, grad_final_state, q, k, v, log_decay,
                                                   scale, initial_state);
  return chunked_backward(op, d, grad_o, grad_final_state, q, k, v, log_decay, scale, initial_state);
}

// ---- decode step ------------------------------------------------------------------------------

at::Tensor recurrent_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& log_decay, double scale, const at::Tensor& state) {
  const char* op = "retention::recurrent_step";
  const at::Tensor q4 = as_single_step(op, "q", q), k4 = as_single_step(op, "k", k), v4 = as_single_step(op, "v", v);
  const Dims d = check_inputs(op, q4, k4, v4, log_decay, state, "state");
  check_step_state(op, state, q);
  check_state_not_aliased(op, state, {{"q", &q}, {"k", &k}, {"v", &v}, {"log_decay", &log_decay}});
  if (q.scalar_type() == at::kDouble) {
    const at::Tensor host_state = to_host(state);
    at::Tensor o = CpuKernel<&recurrent_step_cuda>::run(op, q.device(), q, k, v, log_decay, scale, host_state);
    state.copy_(host_state);
    return o;
  }
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor o = at::empty({d.B, 1, d.H, d.dv}, q.options());

  rk::RecurrentStepParams p;
  const Inputs in = fill_inputs(p, d, q4, k4, v4, log_decay, scale);
  p.o = bthd(o);
  p.state = state.data_ptr<float>();
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
