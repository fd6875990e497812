// chunk_bwd.cu - the raw chunkwise retention backward: the fused layer's backward core
// (msr_bwd.cu: the two sweeps of chunk_bwd.cuh, which recompute the states, then the
// fixed-order dq / dk reduction and cast) with batch rows as sequences and no rotation.
#include "chunk_bwd.cuh"
#include "msr_common.cuh"

namespace retention::kernels {

// The dq and dk partial-sum slices over dv tiles (chunk_bwd.cuh: the cost of determinism).
std::size_t chunk_backward_workspace_bytes(const ChunkBackwardParams& p) {
  const Shape& n = p.shape;
  if (n.B <= 0 || n.T <= 0 || n.H <= 0 || n.dk <= 0 || n.dv <= 0 || n.dk > kMaxHeadDimK) return 0;
  int dq_parts = 0, dk_parts = 0;
  sweep_partials(p.dtype, n, n.B * n.H, dq_parts, dk_parts);
  return static_cast<std::size_t>(dq_parts + dk_parts) * static_cast<std::size_t>(n.B * n.H * n.T * n.dk) *
         sizeof(float);
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
  if (n.T * n.dk > 0 && p.workspace == nullptr) return gpu::kErrorInvalidValue;
  MsrChunkBackward b;
  static_cast<ChunkBackwardParams&>(b) = p;
  b.seq.num_sequences = n.B;  // no cu_seqlens, no offsets
  int dq_parts = 0, dk_parts = 0;
  sweep_partials(p.dtype, n, n.B * n.H, dq_parts, dk_parts);
  return launch_backward_core(b, RotaryMode::kNone, dq_parts, dk_parts);
}

}  // namespace retention::kernels
