// CUDA kernels of the fused layer-core ops (msr_*; the raw ops run as these with every option
// off, ops.cpp): the shared argument checks (checks.h), output and workspace allocation, and one
// call into the torch-free launchers of kernels/ on the current stream; all device code lives in
// kernels/.
//
// All three forms (chunk / parallel / recurrent) of the layer core run the fused chunk kernels
// on the GPU, and chunk_size does not change the kernels' tiling: the result is the same
// function of the inputs up to rounding.  The recurrent form of plain retention (the raw
// recurrent_forward) alone runs the token-by-token scan: a different algorithm, which keeps it
// an independent check of the chunk kernels.  float64 inputs run the op's CPU kernel on host
// copies (cpu_fallback.h).  The values of log_decay, offsets and cu_seqlens are checked by the
// kernels themselves (kernels/value_checks.cuh): checking adds no launch and no host sync.
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_fallback.h"
#include "kernel_params.h"
#include "msr_kernels.h"

namespace retention {
namespace {

using namespace glue;


// The layer's sequences and prologue / epilogue options as the launchers take them, with the
// device tensors they point into kept alive for the launch.
struct Layer {
  at::Tensor cu_seqlens, offsets, norm_weight;
  rk::MsrSequences seq;
  rk::MsrOptions opt;
};

Layer layer(int64_t N, const MsrArgs& a) {
  const MsrOptions& o = a.opt;
  Layer L;
  if (has(a.cu_seqlens)) {
    L.cu_seqlens = a.cu_seqlens->contiguous();
    L.seq.cu_seqlens = L.cu_seqlens.data_ptr();
    L.seq.cu_seqlens_int64 = L.cu_seqlens.scalar_type() == at::kLong;
  }
  L.seq.num_sequences = N;
  if (has(a.offsets)) L.offsets = a.offsets->contiguous();
  L.seq.offsets = L.offsets.defined() ? L.offsets.data_ptr<int64_t>() : nullptr;
  L.norm_weight = fp32_contiguous(a.norm_weight);
  L.opt.rotary = static_cast<rk::RotaryMode>(o.rotary);
  L.opt.norm = o.norm;
  L.opt.norm_weight = o.norm ? ptr_or_null(L.norm_weight) : nullptr;
  L.opt.eps = static_cast<float>(o.eps);
  L.opt.decay_norm = o.decay_norm;
  return L;
}

// ---- forward ----------------------------------------------------------------------------------

MsrForwardResult msr_forward_cuda(const MsrArgs& a) {
  const char* op = op_name("retention::msr_forward");
  const MsrDims m = check_msr_inputs(op, a);
  if (a.q.scalar_type() == at::kDouble) return to_device(dispatch_msr_forward(to_host(a), kCpu), a.q.device());
  const Dims& d = m.d;
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  const MsrOptions& o = a.opt;
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor h0 = fp32_contiguous(a.initial_state);
  at::Tensor y = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  at::Tensor state = empty_state(q, m.N, d);
  const bool plain = !has(a.g) && o.rotary == Rotary::None && !o.norm && !o.decay_norm && !has(a.offsets) &&
                     !has(a.cu_seqlens);
  if (o.form == Form::Recurrent && plain) {
    rk::RecurrentForwardParams p;
    const Inputs in = fill_inputs(p, d, q, k, v, a.log_decay, *o.scale);
    p.o = bthd(y);
    p.initial_state = ptr_or_null(h0);
    p.final_state = state.data_ptr<float>();
    check_launch(rk::launch_recurrent_forward(p), op);
    return {y, state};
  }
  const Layer L = layer(m.N, a);
  const at::Tensor g_ = unit_inner_stride(a.g);

  rk::MsrForwardParams p;
  const Inputs in = fill_inputs(p, d, q, k, v, a.log_decay, *o.scale);
  if (g_.defined()) p.g = bthd(g_);
  p.o = bthd(y);
  p.seq = L.seq;
  p.opt = L.opt;
  p.initial_state = ptr_or_null(h0);
  p.final_state = state.data_ptr<float>();
  p.num_sms = num_sms();
  const at::Tensor ws = workspace(rk::msr_forward_workspace_bytes(p), q);
  p.workspace = ws.data_ptr();
  check_launch(rk::launch_msr_forward(p), op);
  return {y, state};
}

// ---- backward ---------------------------------------------------------------------------------

MsrBackwardResult msr_backward_cuda(const MsrArgs& a) {
  const char* op = op_name("retention::msr_backward");
  const MsrDims m = check_msr_inputs(op, a);
  check_msr_grads(op, m, a);
  if (a.q.scalar_type() == at::kDouble) return to_device(dispatch_msr_backward(to_host(a), kCpu), a.q.device());
  const Dims& d = m.d;
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  const c10::cuda::CUDAGuard guard(q.device());
  const Layer L = layer(m.N, a);
  const at::Tensor g_ = unit_inner_stride(a.g), dy = unit_inner_stride(a.grad_y.to(q.scalar_type()));
  const at::Tensor h0 = fp32_contiguous(a.initial_state), dhT = fp32_contiguous(a.grad_final_state);
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor dg = g_.defined() ? at::empty_like(g_, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor dh0 = empty_state(q, m.N, d);
  const bool want_dw = L.opt.norm_weight != nullptr;
  at::Tensor dw32 = want_dw ? at::empty({d.dv}, q.options().dtype(at::kFloat)) : at::Tensor();

  rk::MsrBackwardParams p;
  const Inputs in = fill_inputs(p, d, q, k, v, a.log_decay, *a.opt.scale);
  if (g_.defined()) {
    p.g = bthd(g_);
    p.grad_g = bthd(dg);
  }
  p.grad_o = bthd(dy);
  p.seq = L.seq;
  p.opt = L.opt;
  p.initial_state = ptr_or_null(h0);
  p.grad_final_state = ptr_or_null(dhT);
  p.grad_q = bthd(dq);
  p.grad_k = bthd(dk);
  p.grad_v = bthd(dv);
  p.grad_initial_state = dh0.data_ptr<float>();
  p.grad_norm_weight = want_dw ? dw32.data_ptr<float>() : nullptr;
  // fp32 partial sums of dq and dk over dv tiles, reduced in a fixed order by the kernels
  // (kernels/chunk_bwd.cuh): the backward is deterministic, so it needs no
  // alertNotDeterministic under torch.use_deterministic_algorithms.
  p.num_sms = num_sms();
  const at::Tensor ws = workspace(rk::msr_backward_workspace_bytes(p), q);
  p.workspace = ws.data_ptr();
  check_launch(rk::launch_msr_backward(p), op);

  // d_norm_weight: undefined without norm_weight; zero when the norm is off (w is unused).
  at::Tensor dw;
  if (has(a.norm_weight)) dw = want_dw ? dw32.to(a.norm_weight->scalar_type()) : at::zeros_like(*a.norm_weight);
  return {dq, dk, dv, dg, dh0, dw};
}

// ---- decode step ------------------------------------------------------------------------------

// The per-head counters of the split decode step (MsrStepParams::counters): zero when created,
// and every launch leaves them zero, so they are made once per (device, stream) and reused with
// no memset; steps on different streams may overlap, so streams do not share them.  Created
// during a CUDA graph capture, their zero-fill is captured too (it runs at every replay, before
// the step); such counters are zeroed once more before their first use outside a capture.
unsigned* step_counters(const at::Tensor& like) {
  struct Entry {
    at::Tensor counters;
    bool zero_outside_capture;
  };
  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<int, cudaStream_t>, Entry>();  // kept until exit
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(like.device().index()), stream);
  auto it = cache->find(key);
  if (it == cache->end()) {
    it = cache->emplace(key, Entry{at::zeros({rk::kMsrStepCounters}, like.options().dtype(at::kInt)), !capturing})
             .first;
  } else if (!capturing && !it->second.zero_outside_capture) {
    it->second.counters.zero_();
    it->second.zero_outside_capture = true;
  }
  return reinterpret_cast<unsigned*>(it->second.counters.data_ptr<int>());
}

at::Tensor msr_step_cuda(const MsrArgs& a) {
  const char* op = op_name("retention::msr_step");
  const MsrArgs s = msr_step_form(op, a, as_single_step);
  const MsrDims m = check_msr_inputs(op, s, "state");
  check_msr_step_state(op, a);
  const at::Tensor& state = a.state;
  if (a.q.scalar_type() == at::kDouble) {  // the state is updated on a host copy, then copied back
    const MsrArgs host = to_host(a);
    at::Tensor y = to_device(dispatch_msr_step(host, kCpu), a.q.device());
    state.copy_(host.state);
    return y;
  }
  const Dims& d = m.d;
  const bool norm = a.opt.norm;
  TORCH_CHECK(!norm || d.dv <= rk::kMsrStepMaxDv, op, ": dv (last dim of v) must be at most ", rk::kMsrStepMaxDv,
              " on the GPU with norm (the decode step keeps a whole row in shared memory), got ", d.dv);
  const c10::cuda::CUDAGuard guard(a.q.device());
  const Layer L = layer(d.B, s);
  const at::Tensor g_ = unit_inner_stride(s.g);
  at::Tensor y = at::empty({d.B, 1, d.H, d.dv}, a.q.options());

  rk::MsrStepParams p;
  const Inputs in = fill_inputs(p, d, s.q, s.k, s.v, a.log_decay, *a.opt.scale);
  if (g_.defined()) p.g = bthd(g_);
  p.o = bthd(y);
  p.state = state.data_ptr<float>();
  p.offsets = L.seq.offsets;
  p.opt = L.opt;
  // With few heads the step spreads each over several CTAs (msr_step.cu), which meet in a
  // workspace from the caching allocator (no launch) and the stream's counters.
  const std::size_t ws_bytes = rk::msr_step_workspace_bytes(p);
  const at::Tensor ws = ws_bytes > 0 ? workspace(ws_bytes, a.q) : at::Tensor();
  if (ws_bytes > 0) {
    p.workspace = ws.data_ptr();
    p.counters = step_counters(a.q);
  }
  check_launch(rk::launch_msr_step(p), op);
  return a.q.dim() == 3 ? y.squeeze(1) : y;
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, CUDA, m) {
  m.impl("msr_forward", msr_forward_kernel<&msr_forward_cuda>);
  m.impl("msr_backward", msr_backward_kernel<&msr_backward_cuda>);
  m.impl("msr_step", msr_step_kernel<&msr_step_cuda>);
}

}  // namespace retention
