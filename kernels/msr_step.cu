// msr_step.cu - one fused MSR decode step per batch row (design notes in msr_kernels.h):
//   q~ = R(p) q, k~ = R(p) k at p = offsets[b];  S <- gamma S + k~^T v (in place);
//   u = scale q~ S;  y = epilogue(u)  (decay normaliser, RMSNorm over dv, swish gate).
//
// One CTA per (b, h) owns the whole dv row: the RMSNorm needs all of u before any y can be
// written, and u may not go to global memory, so u is kept in shared memory (fp32, up to
// kMsrStepMaxDv columns).  The state update keeps the raw decode step's access pattern:
// consecutive lanes take consecutive state columns (coalesced), kStepGroups row groups split
// dk and meet in shared memory for q S.  The step is bandwidth-bound on the state, so one CTA
// per head with a column loop costs nothing beyond the memory traffic.
#include "chunk_common.cuh"
#include "msr_common.cuh"

namespace retention::kernels {
namespace {

constexpr int kStepCols = 64;
constexpr int kStepGroups = 4;
constexpr int kStepThreads = kStepCols * kStepGroups;

template <class T>
__global__ void __launch_bounds__(kStepThreads) msr_step_kernel(const MsrStepParams p) {
  RETENTION_SHARED(float, sq, [kMaxHeadDimK]);
  RETENTION_SHARED(float, sk, [kMaxHeadDimK]);
  RETENTION_SHARED(float, su, [kMsrStepMaxDv]);
  RETENTION_SHARED(float, partial, [kStepGroups][kStepCols]);
  RETENTION_SHARED(float, warp_sums, [kStepThreads / gpu::kWarpSize]);
  RETENTION_SHARED(double, theta, [kMaxHeadDimK / 2]);

  const int H = static_cast<int>(p.H), dk = static_cast<int>(p.dk), dv = static_cast<int>(p.dv);
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const int tid = threadIdx.x, col = tid % kStepCols, group = tid / kStepCols;
  const std::int64_t pos = p.offsets != nullptr ? p.offsets[b] : 0;

  // theta_i first, while almost nothing is live: the float64 pow is a function call whose
  // register saves would otherwise spill.
  if (p.opt.rotary != RotaryMode::kNone)
    for (int i = tid; i < dk / 2; i += kStepThreads) theta[i] = rotary_theta(p.opt.rotary, i, dk);
  __syncthreads();

  // Rotated q, k in fp32.
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  for (int d = tid; d < dk; d += kStepThreads) {
    float qd = Elem<T>::to_float(q[d]), kd = Elem<T>::to_float(k[d]);
    if (p.opt.rotary != RotaryMode::kNone) {
      int partner, pair;
      float sign, cs, sn;
      rotary_pair(p.opt.rotary, d, dk, partner, sign, pair);
      rotary_cos_sin(static_cast<double>(pos), theta[pair], cs, sn);
      qd = qd * cs + sign * Elem<T>::to_float(q[partner]) * sn;
      kd = kd * cs + sign * Elem<T>::to_float(k[partner]) * sn;
    }
    sq[d] = qd;
    sk[d] = kd;
  }
  const float log_gamma = p.log_decay[h];
  const float gamma = expf(log_gamma);
  __syncthreads();

  // State update and u, kStepCols columns at a time.
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  float* const S = p.state + (static_cast<std::int64_t>(b) * H + h) * dk * dv;
  for (int c0 = 0; c0 < dv; c0 += kStepCols) {
    const int c = c0 + col;
    float acc = 0.f;
    if (c < dv) {
      const float vc = Elem<T>::to_float(v[c]);
#pragma unroll 4
      for (int r = group; r < dk; r += kStepGroups) {
        const float s = fmaf(gamma, S[static_cast<std::int64_t>(r) * dv + c], sk[r] * vc);
        S[static_cast<std::int64_t>(r) * dv + c] = s;
        acc = fmaf(sq[r], s, acc);
      }
    }
    partial[group][col] = acc;
    __syncthreads();
    if (group == 0 && c < dv) {
#pragma unroll
      for (int g = 1; g < kStepGroups; ++g) acc += partial[g][col];
      su[c] = p.scale * acc;
    }
    __syncthreads();
  }

  // Epilogue over the whole row.
  const float a = p.opt.decay_norm ? decay_normaliser(pos + 1, log_gamma) : 1.f;
  float r = 1.f;
  if (p.opt.norm) {
    float ss = 0.f;
    for (int c = tid; c < dv; c += kStepThreads) ss += su[c] * su[c];
    ss = gpu::warp_reduce_sum(ss);
    if (gpu::lane_id() == 0) warp_sums[gpu::warp_id()] = ss;
    __syncthreads();
    ss = 0.f;
#pragma unroll
    for (int w = 0; w < kStepThreads / gpu::kWarpSize; ++w) ss += warp_sums[w];
    r = rsqrtf(a * a * ss / static_cast<float>(dv) + p.opt.eps);
  }
  const T* g = p.g != nullptr ? static_cast<const T*>(p.g) + b * p.g_stride_b + h * p.g_stride_h : nullptr;
  T* y = static_cast<T*>(p.y) + b * p.y_stride_b + h * p.y_stride_h;
  for (int c = tid; c < dv; c += kStepThreads) {
    const float o = a * su[c];
    float z = o;
    if (p.opt.norm) z = o * r * (p.opt.norm_weight != nullptr ? p.opt.norm_weight[c] : 1.f);
    if (g != nullptr) {
      const float gv = Elem<T>::to_float(g[c]);
      z *= gv * sigmoid(gv);
    }
    y[c] = Elem<T>::from_float(z);
  }
}

template <class T>
gpu::error_t launch_step(const MsrStepParams& p) {
  return gpu::launch(&msr_step_kernel<T>, static_cast<unsigned>(p.B * p.H), kStepThreads, 0, p.stream, p);
}

}  // namespace

gpu::error_t launch_msr_step(const MsrStepParams& p) {
  if (p.B < 0 || p.H < 0 || p.dk < 0 || p.dv < 0 || p.dk > kMaxHeadDimK || p.dv > kMsrStepMaxDv ||
      p.log_decay == nullptr)
    return gpu::kErrorInvalidValue;
  if (p.opt.rotary != RotaryMode::kNone && p.dk % 2 != 0) return gpu::kErrorInvalidValue;
  if (p.B * p.H == 0 || p.dv == 0) return gpu::kSuccess;
  if (p.state == nullptr || p.y == nullptr) return gpu::kErrorInvalidValue;
  switch (p.dtype) {
    case DType::kF16:
      return launch_step<f16_t>(p);
    case DType::kBF16:
      return launch_step<bf16_t>(p);
    case DType::kF32:
      return launch_step<float>(p);
  }
  return gpu::kErrorInvalidValue;
}

}  // namespace retention::kernels
