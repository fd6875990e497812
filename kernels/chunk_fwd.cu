// chunk_fwd.cu - the raw chunkwise retention forward: the fused layer's forward (msr_fwd.cu)
// with batch rows as sequences and neither prologue nor epilogue, which runs the kernel of
// chunk_fwd.cuh without fusion.
#include "msr_common.cuh"

namespace retention::kernels {
namespace {
MsrForwardParams layer(const ChunkForwardParams& p) {
  MsrForwardParams m;
  static_cast<ChunkForwardParams&>(m) = p;
  m.seq.num_sequences = p.shape.B;  // no cu_seqlens, no offsets
  m.opt.rotary = RotaryMode::kNone;
  m.opt.norm = false;
  return m;
}
}  // namespace

// The states of segments 1 .. count - 1 of a split (fp32 [count - 1, B, H, dk, dv]).
std::size_t chunk_forward_workspace_bytes(const ChunkForwardParams& p) { return msr_forward_workspace_bytes(layer(p)); }

gpu::error_t launch_chunk_forward(const ChunkForwardParams& p) {
  return p.log_decay == nullptr ? gpu::kErrorInvalidValue : launch_msr_forward(layer(p));
}

}  // namespace retention::kernels
