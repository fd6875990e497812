// recurrent.cu - the token-by-token scan (recurrent_forward; the decode step is msr_step.cu).
//
//   S <- g S + k^T v ;  o = scale * q S        (S: fp32 [dk x dv] per (b, h))
//
// The state stays in registers for the whole sequence, so nothing about it needs to be
// coalesced; instead the lanes of a warp split dk (rows) and the q S reduction is a butterfly
// across lanes.  Each warp owns kCols columns and is independent of the others: no barriers.
// This is the GPU reference for the chunk kernels, not a throughput path (one token at a time,
// latency-bound).
#include "gpu_compat.h"
#include "numeric.h"
#include "recurrence.cuh"
#include "retention_kernels.h"
#include "value_checks.cuh"

namespace retention::kernels {
namespace {

constexpr int kScanWarps = 4;
constexpr int kScanCols = 8;  // state columns per warp

template <class T, int kMaxDk>
__global__ void __launch_bounds__(kScanWarps* gpu::kWarpSize) recurrent_forward_kernel(const RecurrentForwardParams p) {
  constexpr int kRows = (kMaxDk + gpu::kWarpSize - 1) / gpu::kWarpSize;  // rows per lane
  const Shape& n = p.shape;
  const int H = static_cast<int>(n.H), dk = static_cast<int>(n.dk), dv = static_cast<int>(n.dv);
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const int lane = gpu::lane_id();
  if (threadIdx.x == 0) check_log_decay(p.log_decay[h]);  // the glue does not read it (value_checks.cuh)
  const int c0 = (blockIdx.y * kScanWarps + gpu::warp_id()) * kScanCols;
  if (c0 >= dv) return;  // whole warp; there are no block-level barriers below
  const float omg = one_minus_gamma(p.log_decay[h]);
  const std::int64_t state_off = (static_cast<std::int64_t>(b) * H + h) * dk * dv;

  // S[i][j] = state[lane + kWarpSize * i][c0 + j]
  float S[kRows][kScanCols];
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < kScanCols; ++j) {
      const int r = lane + gpu::kWarpSize * i, c = c0 + j;
      S[i][j] = (p.initial_state != nullptr && r < dk && c < dv)
                    ? p.initial_state[state_off + static_cast<std::int64_t>(r) * dv + c]
                    : 0.f;
    }

  const T* q = static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h;
  const T* k = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
  const T* v = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h + c0;
  T* o = static_cast<T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h + c0;

  for (std::int64_t t = 0; t < n.T; ++t) {
    float qr[kRows], kr[kRows], vc[kScanCols];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = lane + gpu::kWarpSize * i;
      qr[i] = r < dk ? Elem<T>::to_float(q[t * p.q.stride_t + r]) : 0.f;
      kr[i] = r < dk ? Elem<T>::to_float(k[t * p.k.stride_t + r]) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kScanCols; ++j) vc[j] = c0 + j < dv ? Elem<T>::to_float(v[t * p.v.stride_t + j]) : 0.f;

#pragma unroll
    for (int j = 0; j < kScanCols; ++j) {
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        S[i][j] = decay_update(S[i][j], omg, kr[i], vc[j]);
        acc = fmaf(qr[i], S[i][j], acc);
      }
      acc = gpu::warp_reduce_sum(acc);
      if (lane == j && c0 + j < dv) o[t * p.o.stride_t + j] = Elem<T>::from_float(p.scale * acc);
    }
  }

  if (p.final_state != nullptr) {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kScanCols; ++j) {
        const int r = lane + gpu::kWarpSize * i, c = c0 + j;
        if (r < dk && c < dv) p.final_state[state_off + static_cast<std::int64_t>(r) * dv + c] = S[i][j];
      }
  }
}

template <class T, int kMaxDk>
gpu::error_t launch_scan(const RecurrentForwardParams& p) {
  constexpr int kColsPerCta = kScanWarps * kScanCols;
  const dim3 grid(static_cast<unsigned>(p.shape.B * p.shape.H),
                  static_cast<unsigned>((p.shape.dv + kColsPerCta - 1) / kColsPerCta));
  return gpu::launch(&recurrent_forward_kernel<T, kMaxDk>, grid, kScanWarps * gpu::kWarpSize, 0, p.stream, p);
}

}  // namespace

gpu::error_t launch_recurrent_forward(const RecurrentForwardParams& p) {
  const Shape& n = p.shape;
  if (n.B < 0 || n.T < 0 || n.H < 0 || n.dk < 0 || n.dv < 0 || n.dk > kMaxHeadDimK || p.log_decay == nullptr)
    return gpu::kErrorInvalidValue;
  if (n.B * n.H == 0 || n.dv == 0) return gpu::kSuccess;
  if (gpu::error_t e = gpu::check_warp_size(); e != gpu::kSuccess) return e;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return p.shape.dk <= 64    ? launch_scan<T, 64>(p)
           : p.shape.dk <= 128 ? launch_scan<T, 128>(p)
                               : launch_scan<T, 256>(p);
  });
}

}  // namespace retention::kernels
