// msr_step.cu - the decode step, raw (recurrent_step) and fused (msr_step): one launch per step.
//   q~ = R(p) q, k~ = R(p) k at p = offsets[b];  S <- gamma S + k~^T v (in place);
//   u = scale q~ S;  y = epilogue(u)  (decay normaliser, RMSNorm over dv, swish gate).
// The raw step is this kernel with no prologue and no epilogue (as on the CPU).
//
// Purely bandwidth-bound on the fp32 state: 8 dk dv bytes of state traffic (read + write)
// against ~4 dk dv flops, so the goals are one launch for all (b, h), coalesced state access and
// enough bytes in flight.  Consecutive lanes take consecutive state columns (one warp = one
// contiguous row segment); kStepGroups row groups split dk and meet in shared memory for q S.
// Grid: (b, h) x column tiles of kStepCols.  The RMSNorm needs all of u before any y can be
// written, and u may not go to global memory, so with the norm one CTA walks the whole dv row
// and keeps u in shared memory (fp32, up to kMsrStepMaxDv columns); without it each CTA finishes
// its own tile.  Traffic at B H >= 256 and dk = dv = 128 (the model in docs/gpu.md, "Decode
// step"): the state is 8 dk dv = 128 KiB per (b, h) against 4 (dk + 2 dv) bytes of q/k/v/y, so
// the step should run at the state-streaming rate, >= 90 % of HBM bandwidth (unmeasured).
#include "chunk_common.cuh"
#include "msr_common.cuh"
#include "recurrence.cuh"

namespace retention::kernels {
namespace {

constexpr int kStepCols = 64;
constexpr int kStepGroups = 4;
constexpr int kStepThreads = kStepCols * kStepGroups;
constexpr int kRowsInFlight = 8;  // state loads in flight per thread

template <class T>
__global__ void __launch_bounds__(kStepThreads) msr_step_kernel(const MsrStepParams p) {
  RETENTION_SHARED(float, sq, [kMaxHeadDimK]);
  RETENTION_SHARED(float, sk, [kMaxHeadDimK]);
  RETENTION_SHARED(float, su, [kMsrStepMaxDv]);
  RETENTION_SHARED(float, partial, [kStepGroups][kStepCols]);
  RETENTION_SHARED(float, warp_sums, [kStepThreads / gpu::kWarpSize]);
  RETENTION_SHARED(double, theta, [kMaxHeadDimK / 2]);

  const int H = static_cast<int>(p.shape.H), dk = static_cast<int>(p.shape.dk), dv = static_cast<int>(p.shape.dv);
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const int tid = threadIdx.x, col = tid % kStepCols, group = tid / kStepCols;
  const std::int64_t pos = p.offsets != nullptr ? p.offsets[b] : 0;
  const bool rotary = p.opt.rotary != RotaryMode::kNone;

  // theta_i first, while almost nothing is live: the float64 pow is a function call whose
  // register saves would otherwise spill.
  if (rotary)
    for (int i = tid; i < dk / 2; i += kStepThreads) theta[i] = rotary_theta(p.opt.rotary, i, dk);
  __syncthreads();

  // Rotated q, k in fp32.
  const T* q = bthd_ptr<T>(p.q, b, 0, h, 0);
  const T* k = bthd_ptr<T>(p.k, b, 0, h, 0);
  for (int d = tid; d < dk; d += kStepThreads) {
    float qd = Elem<T>::to_float(q[d]), kd = Elem<T>::to_float(k[d]);
    if (rotary) {
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
  const float omg = one_minus_gamma(log_gamma);
  const float a = p.opt.decay_norm ? decay_normaliser(pos + 1, log_gamma) : 1.f;
  const T* g = p.g.ptr != nullptr ? bthd_ptr<T>(p.g, b, 0, h, 0) : nullptr;
  T* y = bthd_ptr<T>(p.o, b, 0, h, 0);
  // y[c] from o = a u[c] and the normalisation factor r (1 without the norm).
  auto write_y = [&](int c, float o, float r) {
    float z = o;
    if (p.opt.norm) z = o * r * (p.opt.norm_weight != nullptr ? p.opt.norm_weight[c] : 1.f);
    if (g != nullptr) {
      const float gv = Elem<T>::to_float(g[c]);
      z *= gv * sigmoid(gv);
    }
    y[c] = Elem<T>::from_float(z);
  };
  __syncthreads();

  // State update and u, kStepCols columns at a time.
  const T* v = bthd_ptr<T>(p.v, b, 0, h, 0);
  float* const S = p.state + (static_cast<std::int64_t>(b) * H + h) * dk * dv;
  for (int c0 = blockIdx.y * kStepCols; c0 < dv; c0 += gridDim.y * kStepCols) {
    const int c = c0 + col;
    float acc = 0.f;
    if (c < dv) {
      const float vc = Elem<T>::to_float(v[c]);
      float* const Sc = S + c;
      // kRowsInFlight loads before the first store: the compiler may not move a load above a
      // store that could alias it, so a row-by-row loop would have one load in flight.
      for (int r0 = group; r0 < dk; r0 += kStepGroups * kRowsInFlight) {
        float s[kRowsInFlight];
#pragma unroll
        for (int i = 0; i < kRowsInFlight; ++i) {
          const int r = r0 + i * kStepGroups;
          s[i] = r < dk ? Sc[static_cast<std::int64_t>(r) * dv] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < kRowsInFlight; ++i) {
          const int r = r0 + i * kStepGroups;
          if (r < dk) {
            s[i] = decay_update(s[i], omg, sk[r], vc);
            Sc[static_cast<std::int64_t>(r) * dv] = s[i];
            acc = fmaf(sq[r], s[i], acc);
          }
        }
      }
    }
    partial[group][col] = acc;
    __syncthreads();
    if (group == 0 && c < dv) {
#pragma unroll
      for (int i = 1; i < kStepGroups; ++i) acc += partial[i][col];
      if (p.opt.norm)
        su[c] = p.scale * acc;
      else
        write_y(c, a * p.scale * acc, 1.f);
    }
    __syncthreads();
  }
  if (!p.opt.norm) return;

  // RMSNorm epilogue over the whole row.
  float ss = 0.f;
  for (int c = tid; c < dv; c += kStepThreads) ss += su[c] * su[c];
  ss = gpu::warp_reduce_sum(ss);
  if (gpu::lane_id() == 0) warp_sums[gpu::warp_id()] = ss;
  __syncthreads();
  ss = 0.f;
#pragma unroll
  for (int w = 0; w < kStepThreads / gpu::kWarpSize; ++w) ss += warp_sums[w];
  const float r = rsqrtf(a * a * ss / static_cast<float>(dv) + p.opt.eps);
  for (int c = tid; c < dv; c += kStepThreads) write_y(c, a * su[c], r);
}

}  // namespace

gpu::error_t launch_msr_step(const MsrStepParams& p) {
  const Shape& n = p.shape;
  if (n.B < 0 || n.H < 0 || n.dk < 0 || n.dv < 0 || n.dk > kMaxHeadDimK || (p.opt.norm && n.dv > kMsrStepMaxDv) ||
      p.log_decay == nullptr)
    return gpu::kErrorInvalidValue;
  if (p.opt.rotary != RotaryMode::kNone && n.dk % 2 != 0) return gpu::kErrorInvalidValue;
  if (n.B * n.H == 0 || n.dv == 0) return gpu::kSuccess;
  if (p.state == nullptr || p.o.ptr == nullptr) return gpu::kErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(n.B * n.H), p.opt.norm ? 1u : static_cast<unsigned>((n.dv + kStepCols - 1) / kStepCols));
  return dispatch_dtype(p.dtype, [&](auto t) {
    return gpu::launch(&msr_step_kernel<decltype(t)>, grid, kStepThreads, 0, p.stream, p);
  });
}

// The raw step: the fused step with no rotation, no normaliser, no norm and no gate.
gpu::error_t launch_recurrent_step(const RecurrentStepParams& r) {
  MsrStepParams p;
  static_cast<RecurrentStepParams&>(p) = r;
  p.opt.rotary = RotaryMode::kNone;
  p.opt.norm = false;
  return launch_msr_step(p);
}

}  // namespace retention::kernels
