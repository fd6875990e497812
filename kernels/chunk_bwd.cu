// chunk_bwd.cu - the raw chunkwise retention backward: the fused layer's backward (msr_bwd.cu)
// with batch rows as sequences and neither prologue nor epilogue, i.e. its core alone: the two
// sweeps of chunk_bwd.cuh, which recompute the states, then the fixed-order dq / dk reduction.
#include "msr_common.cuh"

namespace retention::kernels {

// [dq partials | dk partials | segment states of a split] (msr_bwd.cu: backward_core_bytes).
std::size_t chunk_backward_workspace_bytes(const ChunkBackwardParams& p) {
  return msr_backward_workspace_bytes(raw_layer<MsrBackwardParams>(p));
}

gpu::error_t launch_chunk_backward(const ChunkBackwardParams& p) {
  const Shape& n = p.shape;
  if (n.B < 0 || n.T < 0 || n.H < 0 || n.dk < 0 || n.dv < 0 || n.dk > kMaxHeadDimK || p.log_decay == nullptr ||
      (n.B * n.H * n.dk * n.dv > 0 && p.grad_initial_state == nullptr))
    return gpu::kErrorInvalidValue;
  if (n.B * n.H == 0) return gpu::kSuccess;
  // dv == 0 makes every gradient zero; the kernels tile over dv, so the caller zero-fills.
  if (n.dv == 0) return n.T * n.dk == 0 ? gpu::kSuccess : gpu::kErrorInvalidValue;
  return launch_msr_backward(raw_layer<MsrBackwardParams>(p));
}

}  // namespace retention::kernels
