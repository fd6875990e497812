// chunk_fwd.cu - the raw chunkwise retention forward: the fused layer's forward (msr_fwd.cu)
// with batch rows as sequences and neither prologue nor epilogue, which runs the kernel of
// chunk_fwd.cuh without fusion.
#include "msr_common.cuh"

namespace retention::kernels {

// The states of segments 1 .. count - 1 of a split (fp32 [count - 1, B, H, dk, dv]).
std::size_t chunk_forward_workspace_bytes(const ChunkForwardParams& p) {
  return msr_forward_workspace_bytes(raw_layer<MsrForwardParams>(p));
}

gpu::error_t launch_chunk_forward(const ChunkForwardParams& p) {
  return p.log_decay == nullptr ? gpu::kErrorInvalidValue : launch_msr_forward(raw_layer<MsrForwardParams>(p));
}

}  // namespace retention::kernels
