// chunk_fwd.cu - fused chunkwise retention forward.
//
// The kernel itself (and the math) is in chunk_fwd.cuh; this file instantiates it without
// fusion for the raw op and holds its launcher.
#include "chunk_fwd.cuh"

namespace retention::kernels {
namespace {

template <class T>
struct ChunkForward {
  template <int kMaxDk>
  struct Bucket {
    using Tr = ChunkTraits<T, kMaxDk>;
    static gpu::error_t run(const ChunkForwardParams& p, SegmentSplit split) {
      const std::int64_t rows = p.shape.B * p.shape.H;
      if (split.count > 1) {
        split.states = p.workspace;
        split.state_stride = rows * p.shape.dk * p.shape.dv;
        if (gpu::error_t e = launch_segment_states<Tr>(p, rows, split); e != gpu::kSuccess) return e;
      }
      return launch_forward_outputs<Tr>(p, rows, split);
    }
  };
};

// The segment plan of a forward (chunk_common.cuh: plan_split) over its B*H*ceil(dv / BV) CTAs.
SegmentSplit forward_split(const ChunkForwardParams& p) {
  const Shape& n = p.shape;
  if (n.B * n.H <= 0 || n.dv <= 0 || n.dk <= 0 || n.T <= 1 || n.dk > kMaxHeadDimK || p.split == 0) return SegmentSplit{};
  const int bv = tile_width<ChunkTraits<float, 64>::kStateRegs>(p.dtype, n.dk);
  return plan_split(p.split, p.num_sms, n.B * n.H * ((n.dv + bv - 1) / bv), n.T, chunk_rows(p.dtype));
}

}  // namespace

// The states of segments 1 .. count - 1 (fp32 [count - 1, B, H, dk, dv]).
std::size_t chunk_forward_workspace_bytes(const ChunkForwardParams& p) {
  return segment_states_bytes(forward_split(p), p.shape.B * p.shape.H, p.shape);
}

gpu::error_t launch_chunk_forward(const ChunkForwardParams& p) {
  const Shape& n = p.shape;
  if (n.B < 0 || n.T < 0 || n.H < 0 || n.dk < 0 || n.dv < 0 || n.dk > kMaxHeadDimK || p.log_decay == nullptr)
    return gpu::kErrorInvalidValue;
  if (n.B * n.H == 0 || n.dv == 0) return gpu::kSuccess;
  if (gpu::error_t e = gpu::check_warp_size(); e != gpu::kSuccess) return e;
  const SegmentSplit split = forward_split(p);
  switch (p.dtype) {
    case DType::kF16:
      return dispatch_dk<ChunkForward<f16_t>::template Bucket>(n.dk, p, split);
    case DType::kBF16:
      return dispatch_dk<ChunkForward<bf16_t>::template Bucket>(n.dk, p, split);
    case DType::kF32:
      return dispatch_dk<ChunkForward<float>::template Bucket>(n.dk, p, split);
  }
  return gpu::kErrorInvalidValue;
}

}  // namespace retention::kernels
