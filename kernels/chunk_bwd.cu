// chunk_bwd.cu - chunkwise retention backward: two sweeps that recompute the states.
//
// The sweeps (and the math) are in chunk_bwd.cuh; this file instantiates them without fusion
// for the raw op and holds the dq / dk reduce-and-cast kernel and the launcher.
#include "chunk_bwd.cuh"

namespace retention::kernels {
namespace {

// grad[b, t, h, :] = (sum over the partial slices g = 0, 1, ... of acc[g, b, h, t, :]) rounded
// to T, for dq and dk: the fixed-order end of the deterministic reduction (chunk_bwd.cuh).
template <class T>
__global__ void __launch_bounds__(256) cast_grads_kernel(const ChunkBackwardParams p, int dq_parts, int dk_parts) {
  const Shape& n = p.shape;
  const std::int64_t rows = n.B * n.T * n.H, count = rows * n.dk, slice = n.B * n.H * n.T * n.dk;
  const float* const dq_acc = p.workspace;
  const float* const dk_acc = p.workspace + dq_parts * slice;
  for (std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; idx < count;
       idx += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t d = idx % n.dk, row = idx / n.dk;
    const std::int64_t h = row % n.H, t = (row / n.H) % n.T, b = row / (n.H * n.T);
    const std::int64_t src = ((b * n.H + h) * n.T + t) * n.dk + d;
    bthd_ptr<T>(p.grad_q, b, t, h, d)[0] = Elem<T>::from_float(sum_partials(dq_acc, slice, dq_parts, src));
    bthd_ptr<T>(p.grad_k, b, t, h, d)[0] = Elem<T>::from_float(sum_partials(dk_acc, slice, dk_parts, src));
  }
}

template <class T>
struct ChunkBackward {
  template <int kMaxDk>
  struct Bucket {
    static gpu::error_t run(const ChunkBackwardParams& p) {
      using TrDq = ChunkTraits<T, kMaxDk>;
      using TrDkv = ChunkTraits<T, kMaxDk, 32>;
      const Shape& n = p.shape;
      const std::int64_t rows = n.B * n.H;
      const auto groups = [&](int bv) { return dv_partials(static_cast<int>((n.dv + bv - 1) / bv), rows); };
      int dq_parts = 0, dk_parts = 0;
      sweep_partials(p.dtype, n, rows, dq_parts, dk_parts);
      if (groups(TrDq::BV) != dq_parts || groups(TrDkv::BV) != dk_parts)
        return gpu::kErrorInvalidValue;  // the workspace was sized for other tile widths
      dim3 grid_dq, grid_dkv;
      if (!chunk_grid(rows, dq_parts, grid_dq) || !chunk_grid(rows, dk_parts, grid_dkv)) return gpu::kErrorInvalidValue;
      float* const dq_partials = p.workspace;
      float* const dk_partials = p.workspace + dq_parts * (n.B * n.H * n.T * n.dk);

      constexpr int kSmemDq = gpu::dynamic_smem_bytes(TrDq::kSmemDq);
      constexpr int kSmemDkv = gpu::dynamic_smem_bytes(TrDkv::kSmemDkv);
      auto* dq_kernel = &chunk_backward_dq_kernel<TrDq>;
      auto* dkv_kernel = &chunk_backward_dkv_kernel<TrDkv>;
      gpu::error_t e = gpu::set_max_dynamic_smem(dq_kernel, kSmemDq);
      if (e == gpu::kSuccess) e = gpu::set_max_dynamic_smem(dkv_kernel, kSmemDkv);
      if (e != gpu::kSuccess) return e;

      const std::size_t ws = chunk_backward_workspace_bytes(p);
      if (ws > 0) {
        if (p.workspace == nullptr) return gpu::kErrorInvalidValue;
        const int passes = dv_tiles_per_cta(static_cast<int>((n.dv + TrDq::BV - 1) / TrDq::BV), rows);
        for (int pass = 0; pass < passes; ++pass)
          if ((e = gpu::launch(dq_kernel, grid_dq, TrDq::kThreads, kSmemDq, p.stream, p, dq_partials, dq_parts, pass,
                               passes)) != gpu::kSuccess)
            return e;
      }
      const int passes = dv_tiles_per_cta(static_cast<int>((n.dv + TrDkv::BV - 1) / TrDkv::BV), rows);
      for (int pass = 0; pass < passes; ++pass)
        if ((e = gpu::launch(dkv_kernel, grid_dkv, TrDkv::kThreads, kSmemDkv, p.stream, p, dk_partials, dk_parts, pass,
                             passes)) != gpu::kSuccess)
          return e;
      if (ws > 0) {
        const std::int64_t count = n.B * n.T * n.H * n.dk;
        const unsigned blocks = static_cast<unsigned>(count / 256 + 1 < 4096 ? count / 256 + 1 : 4096);
        e = gpu::launch(&cast_grads_kernel<T>, blocks, 256, 0, p.stream, p, dq_parts, dk_parts);
      }
      return e;
    }
  };
};

}  // namespace

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
  switch (p.dtype) {
    case DType::kF16:
      return dispatch_dk<ChunkBackward<f16_t>::template Bucket>(n.dk, p);
    case DType::kBF16:
      return dispatch_dk<ChunkBackward<bf16_t>::template Bucket>(n.dk, p);
    case DType::kF32:
      return dispatch_dk<ChunkBackward<float>::template Bucket>(n.dk, p);
  }
  return gpu::kErrorInvalidValue;
}

}  // namespace retention::kernels
