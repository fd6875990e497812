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
    static gpu::error_t run(const ChunkForwardParams& p) {
      using Tr = ChunkTraits<T, kMaxDk>;
      constexpr int kSmem = gpu::dynamic_smem_bytes(Tr::kSmemForward);
      auto* kernel = &chunk_forward_kernel<Tr>;
      gpu::error_t e = gpu::set_max_dynamic_smem(kernel, kSmem);
      if (e != gpu::kSuccess) return e;
      dim3 grid;
      if (!chunk_grid(p.shape.B * p.shape.H, (p.shape.dv + Tr::BV - 1) / Tr::BV, grid)) return gpu::kErrorInvalidValue;
      return gpu::launch(kernel, grid, Tr::kThreads, kSmem, p.stream, p);
    }
  };
};

}  // namespace

gpu::error_t launch_chunk_forward(const ChunkForwardParams& p) {
  const Shape& n = p.shape;
  if (n.B < 0 || n.T < 0 || n.H < 0 || n.dk < 0 || n.dv < 0 || n.dk > kMaxHeadDimK || p.log_decay == nullptr)
    return gpu::kErrorInvalidValue;
  if (n.B * n.H == 0 || n.dv == 0) return gpu::kSuccess;
  if (gpu::error_t e = gpu::check_warp_size(); e != gpu::kSuccess) return e;
  switch (p.dtype) {
    case DType::kF16:
      return dispatch_dk<ChunkForward<f16_t>::template Bucket>(n.dk, p);
    case DType::kBF16:
      return dispatch_dk<ChunkForward<bf16_t>::template Bucket>(n.dk, p);
    case DType::kF32:
      return dispatch_dk<ChunkForward<float>::template Bucket>(n.dk, p);
  }
  return gpu::kErrorInvalidValue;
}

}  // namespace retention::kernels
