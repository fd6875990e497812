// chunk_bwd.cu - the raw chunkwise retention backward: the fused layer's backward core
// (msr_bwd.cu: the two sweeps of chunk_bwd.cuh, which recompute the states, then the
// fixed-order dq / dk reduction and cast) with batch rows as sequences and no rotation.
#include "chunk_bwd.cuh"
#include "msr_common.cuh"

namespace retention::kernels {

namespace {
// What the launch does (chunk_bwd.cuh: plan_backward) and where its workspace parts go:
// [dq partials | dk partials | forward segment states | reverse segment states], fp32.
BackwardPlan plan(const ChunkBackwardParams& p, std::size_t* bytes) {
  const Shape& n = p.shape;
  *bytes = 0;
  // T or dk 0: no partial rows (0 bytes), but the parts still size the sweeps' grids.
  if (n.B <= 0 || n.T < 0 || n.H <= 0 || n.dk < 0 || n.dv <= 0 || n.dk > kMaxHeadDimK) return BackwardPlan{};
  BackwardPlan b = plan_backward(p.dtype, n, n.B * n.H, p.split, p.num_sms);
  const std::size_t partials = static_cast<std::size_t>((b.dq_parts + b.dk_parts) * n.B * n.H * n.T * n.dk);
  const std::size_t fwd = segment_states_bytes(b.fwd, n.B * n.H, n) / sizeof(float);
  const std::size_t rev = segment_states_bytes(b.rev, n.B * n.H, n) / sizeof(float);
  if (p.workspace != nullptr) {
    b.fwd.states = p.workspace + partials;
    b.rev.states = b.fwd.states + fwd;
    b.fwd.state_stride = b.rev.state_stride = n.B * n.H * n.dk * n.dv;
  }
  *bytes = (partials + fwd + rev) * sizeof(float);
  return b;
}
}  // namespace

std::size_t chunk_backward_workspace_bytes(const ChunkBackwardParams& p) {
  std::size_t bytes = 0;
  plan(p, &bytes);
  return bytes;
}

gpu::error_t launch_chunk_backward(const ChunkBackwardParams& p) {
  const Shape& n = p.shape;
  if (n.B < 0 || n.T < 0 || n.H < 0 || n.dk < 0 || n.dv < 0 || n.dk > kMaxHeadDimK || p.log_decay == nullptr ||
      (n.B * n.H * n.dk * n.dv > 0 && p.grad_initial_state == nullptr))
    return gpu::kErrorInvalidValue;
  if (n.B * n.H == 0) return gpu::kSuccess;
  // dv == 0 makes every gradient zero; the kernels tile over dv, so the caller zero-fills.
  if (n.dv == 0) return n.T * n.dk == 0 ? gpu::kSuccess : gpu::kErrorInvalidValue;
  if (gpu::error_t e = gpu::check_warp_size(); e != gpu::kSuccess) return e;
  std::size_t bytes = 0;
  BackwardPlan b = plan(p, &bytes);
  if (bytes > 0 && p.workspace == nullptr) return gpu::kErrorInvalidValue;
  MsrChunkBackward c;
  static_cast<ChunkBackwardParams&>(c) = p;
  c.seq.num_sequences = n.B;  // no cu_seqlens, no offsets
  return launch_backward_core(c, RotaryMode::kNone, b);
}

}  // namespace retention::kernels
