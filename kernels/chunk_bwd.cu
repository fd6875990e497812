// chunk_bwd.cu - the raw chunkwise retention backward: the fused layer's backward core
// (msr_bwd.cu: the two sweeps of chunk_bwd.cuh, which recompute the states, then the
// fixed-order dq / dk reduction and cast) with batch rows as sequences and no rotation.
#include "chunk_bwd.cuh"
#include "msr_common.cuh"

namespace retention::kernels {

namespace {
BackwardPlan plan(const ChunkBackwardParams& p) {
  const Shape& n = p.shape;
  // T or dk 0: no partial rows (0 bytes), but the parts still size the sweeps' grids.
  if (n.B <= 0 || n.T < 0 || n.H <= 0 || n.dk < 0 || n.dv <= 0 || n.dk > kMaxHeadDimK) return BackwardPlan{};
  return plan_backward(p.dtype, n, n.B * n.H, p.split, p.num_sms);
}
}  // namespace

std::size_t chunk_backward_workspace_bytes(const ChunkBackwardParams& p) {
  return backward_core_bytes(plan(p), p.shape, p.shape.B * p.shape.H);
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
  if (chunk_backward_workspace_bytes(p) > 0 && p.workspace == nullptr) return gpu::kErrorInvalidValue;
  MsrChunkBackward c;
  static_cast<ChunkBackwardParams&>(c) = p;
  c.seq.num_sequences = n.B;  // no cu_seqlens, no offsets
  c.opt.rotary = RotaryMode::kNone;
  return launch_backward_core(c, plan(p));
}

}  // namespace retention::kernels
