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
  template <int kMaxDk>
  struct Planner {
    using Tr = ChunkTraits<T, kMaxDk>;
    static gpu::error_t run(const ChunkForwardParams& p, SegmentSplit& split) {
      split = plan_split(p.split, p.num_sms, p.shape.B * p.shape.H * ((p.shape.dv + Tr::BV - 1) / Tr::BV), p.shape.T,
                         Tr::BT);
      return gpu::kSuccess;
    }
  };
};

// The segment plan of a forward (chunk_common.cuh: plan_split).
SegmentSplit forward_split(const ChunkForwardParams& p) {
  SegmentSplit s;
  const Shape& n = p.shape;
  if (n.B * n.H <= 0 || n.dv <= 0 || n.dk <= 0 || n.T <= 1 || n.dk > kMaxHeadDimK || p.split == 0) return s;
  switch (p.dtype) {
    case DType::kF16:
      dispatch_dk<ChunkForward<f16_t>::template Planner>(n.dk, p, s);
      break;
    case DType::kBF16:
      dispatch_dk<ChunkForward<bf16_t>::template Planner>(n.dk, p, s);
      break;
    case DType::kF32:
      dispatch_dk<ChunkForward<float>::template Planner>(n.dk, p, s);
      break;
  }
  return s;
}

}  // namespace

// The states of segments 1 .. count - 1 (fp32 [count - 1, B, H, dk, dv]).
std::size_t chunk_forward_workspace_bytes(const ChunkForwardParams& p) {
  const SegmentSplit s = forward_split(p);
  const Shape& n = p.shape;
  return s.count > 1 ? static_cast<std::size_t>(s.count - 1) * static_cast<std::size_t>(n.B * n.H * n.dk * n.dv) * sizeof(float)
                     : 0;
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
