// msr_bwd.cu - the fused MSR backward (design in msr_common.cuh):
//
//   1. statistics pass (norm with more than one dv tile): partial sum u^2, sum dz w u per row
//   2. gradient pass: du (workspace, input dtype), dg, per-CTA column sums of dz n^
//      (1 and 2 are the forward chunk kernel again, recomputing u; msr_fwd.cu)
//   0. q~, k~ rotated once into the workspace (input dtype); every kernel below reads those
//   3. the dq sweep and the dk/dv/dS0 sweep of chunk_bwd.cuh with du as grad_o, on q~ / k~ and
//      packed sequences
//   4. sum of the fp32 dq~ / dk~ partials over dv tiles (fixed order, chunk_bwd.cuh), cast to
//      the input dtype, applying R(p)^T
//   5. d_norm_weight = sum of the per-CTA column sums (fixed order, no atomics)
#include "chunk_bwd.cuh"
#include "msr_common.cuh"

namespace retention::kernels {
namespace {

using MsrSweepFusion = MsrFusion<true>;

template <class T>
struct MsrSweeps {
  template <int kMaxDk>
  struct Bucket {
    // The raw sweeps' state budgets: without a prologue (q~ / k~ come pre-rotated) the sweeps
    // differ from the raw ones only by the sequence map.
    static gpu::error_t run(const MsrChunkBackward& p, const BackwardPlan& plan) {
      return launch_backward_sweeps<ChunkTraits<T, kMaxDk, 64, MsrSweepFusion>, ChunkTraits<T, kMaxDk, 32, MsrSweepFusion>>(
          p, p.seq.num_sequences * p.shape.H, plan);
    }
  };
};

// grad[b, t, h, d] = (R(p)^T acc[b, h, t, :])[d] rounded to T, for dq and dk, acc being the sum
// of the dv-tile partial slices in slice order.  One CTA per (sequence, head) slice of rows;
// each thread keeps one column d (its theta and partner) and walks rows.
constexpr int kCastColumns = 64;
constexpr int kCastRows = 4;

template <class T>
__global__ void __launch_bounds__(kCastColumns* kCastRows) msr_cast_grads_kernel(const MsrChunkBackward p, int dq_parts, int dk_parts) {
  const Shape& n = p.shape;
  const int H = static_cast<int>(n.H), dk = static_cast<int>(n.dk);
  const int h = blockIdx.x % H;
  const SeqSpan seq = msr_sequence(p, blockIdx.x / H);
  const std::int64_t bh = static_cast<std::int64_t>(seq.b) * H + h, slice = n.B * n.H * n.T * n.dk;
  const float* const dq_acc = p.workspace + bh * n.T * dk;
  const float* const dk_acc = p.workspace + dq_parts * slice + bh * n.T * dk;
  const auto dq_at = [&](std::int64_t i) { return sum_partials(dq_acc, slice, dq_parts, i); };
  const auto dk_at = [&](std::int64_t i) { return sum_partials(dk_acc, slice, dk_parts, i); };
  const int row_lane = threadIdx.x / kCastColumns;
  for (int d = threadIdx.x % kCastColumns; d < dk; d += kCastColumns) {
    int partner = d, pair = 0;
    float sign = 0.f;
    double theta = 0.0;
    if (p.rotary != RotaryMode::kNone) {
      rotary_pair(p.rotary, d, dk, partner, sign, pair);
      theta = p.theta[pair];
    }
    for (std::int64_t r = blockIdx.y * kCastRows + row_lane; r < seq.length; r += gridDim.y * kCastRows) {
      const std::int64_t t = seq.t_begin + r;
      float gq = dq_at(t * dk + d), gk = dk_at(t * dk + d);
      if (p.rotary != RotaryMode::kNone) {
        // R^T: the partner term changes sign.
        float cs, sn;
        rotary_cos_sin(static_cast<double>(seq.pos0 + r), theta, cs, sn);
        gq = gq * cs - sign * dq_at(t * dk + partner) * sn;
        gk = gk * cs - sign * dk_at(t * dk + partner) * sn;
      }
      bthd_ptr<T>(p.grad_q, seq.b, t, h, d)[0] = Elem<T>::from_float(gq);
      bthd_ptr<T>(p.grad_k, seq.b, t, h, d)[0] = Elem<T>::from_float(gk);
    }
  }
}

// q~ = R(p) q, k~ = R(p) k into contiguous [B, T, H, dk] copies (same thread mapping as the
// cast below).  Rows outside every sequence do not exist (cu covers [0, T)).
template <class T>
__global__ void __launch_bounds__(kCastColumns* kCastRows) msr_rotate_qk_kernel(const MsrChunkBackward p, Bthd q_out,
                                                                              Bthd k_out) {
  const Shape& n = p.shape;
  const int H = static_cast<int>(n.H), dk = static_cast<int>(n.dk);
  const int h = blockIdx.x % H;
  const SeqSpan seq = msr_sequence(p, blockIdx.x / H);
  const int row_lane = threadIdx.x / kCastColumns;
  for (int d = threadIdx.x % kCastColumns; d < dk; d += kCastColumns) {
    int partner = d, pair = 0;
    float sign = 0.f;
    rotary_pair(p.rotary, d, dk, partner, sign, pair);
    const double theta = p.theta[pair];
    for (std::int64_t r = blockIdx.y * kCastRows + row_lane; r < seq.length; r += gridDim.y * kCastRows) {
      const std::int64_t t = seq.t_begin + r;
      float cs, sn;
      rotary_cos_sin(static_cast<double>(seq.pos0 + r), theta, cs, sn);
      const T* q = bthd_ptr<T>(p.q, seq.b, t, h, 0);
      const T* k = bthd_ptr<T>(p.k, seq.b, t, h, 0);
      bthd_ptr<T>(q_out, seq.b, t, h, d)[0] =
          Elem<T>::from_float(Elem<T>::to_float(q[d]) * cs + sign * Elem<T>::to_float(q[partner]) * sn);
      bthd_ptr<T>(k_out, seq.b, t, h, d)[0] =
          Elem<T>::from_float(Elem<T>::to_float(k[d]) * cs + sign * Elem<T>::to_float(k[partner]) * sn);
    }
  }
}

// grad_norm_weight[c] = sum over the N*H rows of dw_partial[:, c].
__global__ void __launch_bounds__(256) msr_reduce_dw_kernel(const float* dw_partial, std::int64_t rows, std::int64_t dv,
                                                             float* grad_norm_weight) {
  const std::int64_t c = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (c >= dv) return;
  float s = 0.f;
  for (std::int64_t r = 0; r < rows; ++r) s += dw_partial[r * dv + c];
  grad_norm_weight[c] = s;
}

// Grid of the row-walking kernels: (sequence, head) x enough row slices for ~16 rows each.
dim3 row_grid(const MsrChunkBackward& p) {
  const std::int64_t y = (p.shape.T + kCastRows * 16 - 1) / (kCastRows * 16);
  return dim3(static_cast<unsigned>(p.seq.num_sequences * p.shape.H),
              static_cast<unsigned>(y < 1 ? 1 : y > 1024 ? 1024 : y));
}

// Steps 3 and 4 for one dtype (launch_backward_core).
template <class T>
gpu::error_t sweeps_and_cast(MsrChunkBackward b, RotaryMode rotary, const BackwardPlan& plan) {
  b.rotary = RotaryMode::kNone;  // the sweeps read q / k as given
  gpu::error_t e = dispatch_dk<MsrSweeps<T>::template Bucket>(b.shape.dk, b, plan);
  if (e != gpu::kSuccess || b.shape.T == 0 || b.shape.dk == 0) return e;
  b.rotary = rotary;
  return gpu::launch(&msr_cast_grads_kernel<T>, row_grid(b), kCastColumns * kCastRows, 0, b.stream, b, plan.dq_parts,
                     plan.dk_parts);
}

template <class T>
gpu::error_t launch_rotate(const MsrChunkBackward& p, const Bthd& q_out, const Bthd& k_out) {
  return gpu::launch(&msr_rotate_qk_kernel<T>, row_grid(p), kCastColumns * kCastRows, 0, p.stream, p, q_out, k_out);
}

struct Layout {
  std::size_t theta = 0, acc = 0, split = 0, stats = 0, dw = 0, du = 0, qk = 0, total = 0;
  BackwardPlan plan;  // dv-tile partial slices of dq~ / dk~ and the split (chunk_bwd.cuh)
};

std::size_t align16(std::size_t x) { return (x + 15) / 16 * 16; }

Layout workspace_layout(const MsrBackwardParams& p) {
  const Shape& n = p.shape;
  Layout l;
  std::size_t off = kThetaTableBytes;
  const bool any = n.B > 0 && n.T > 0 && n.H > 0 && n.dv > 0;
  l.acc = off;
  if (n.dv > 0 && n.dk <= kMaxHeadDimK) {  // zero bytes when T or dk is 0, but the sweeps still run
    l.plan = plan_backward(p.dtype, n, p.seq.num_sequences * n.H, p.split, p.num_sms);
    off += align16(static_cast<std::size_t>(l.plan.dq_parts + l.plan.dk_parts) *
                   static_cast<std::size_t>(n.B * n.H * n.T * n.dk) * sizeof(float));
  }
  l.split = off;
  off += align16(segment_states_bytes(l.plan.fwd, p.seq.num_sequences * n.H, n)) +
         align16(segment_states_bytes(l.plan.rev, p.seq.num_sequences * n.H, n));
  const int bv = msr_forward_tile_width(p.dtype, n.dk, true);
  const std::int64_t tiles = bv > 0 ? (n.dv + bv - 1) / bv : 0;
  l.stats = off;
  if (any && p.opt.norm && tiles > 1) off += align16(static_cast<std::size_t>(tiles * msr_stats_rows(n) * 2) * sizeof(float));
  l.dw = off;
  if (p.opt.norm && p.opt.norm_weight != nullptr)
    off += align16(static_cast<std::size_t>(p.seq.num_sequences * n.H * n.dv) * sizeof(float));
  const std::size_t elem = p.dtype == DType::kF32 ? 4 : 2;
  l.du = off;
  if (any) off += align16(static_cast<std::size_t>(n.B * n.T * n.H * n.dv) * elem);
  l.qk = off;
  if (any && p.opt.rotary != RotaryMode::kNone) off += 2 * align16(static_cast<std::size_t>(n.B * n.T * n.H * n.dk) * elem);
  l.total = off;
  return l;
}

}  // namespace

gpu::error_t launch_backward_core(const MsrChunkBackward& b, RotaryMode rotary, const BackwardPlan& plan) {
  if (plan.fwd.count > 1) {  // the states entering the segments, for the dq sweep (msr_fwd.cu)
    MsrChunkForward f;
    f.dtype = b.dtype;
    f.shape = b.shape;
    f.q = b.q;
    f.k = b.k;
    f.v = b.v;
    f.log_decay = b.log_decay;
    f.scale = b.scale;
    f.initial_state = b.initial_state;
    f.stream = b.stream;
    f.seq = b.seq;
    f.opt.rotary = RotaryMode::kNone;  // q / k as given
    f.pass = MsrPass::kSegmentStates;
    f.segments = plan.fwd;
    if (gpu::error_t e = launch_msr_chunk_pass(f); e != gpu::kSuccess) return e;
  }
  switch (b.dtype) {
    case DType::kF16:
      return sweeps_and_cast<f16_t>(b, rotary, plan);
    case DType::kBF16:
      return sweeps_and_cast<bf16_t>(b, rotary, plan);
    case DType::kF32:
      return sweeps_and_cast<float>(b, rotary, plan);
  }
  return gpu::kErrorInvalidValue;
}

std::size_t msr_backward_workspace_bytes(const MsrBackwardParams& p) { return workspace_layout(p).total; }

gpu::error_t launch_msr_backward(const MsrBackwardParams& p) {
  const Shape& n = p.shape;
  if (!msr_shape_ok(n, p.seq, p.opt, p.log_decay)) return gpu::kErrorInvalidValue;
  const std::int64_t N = p.seq.num_sequences;
  const bool want_dw = p.opt.norm && p.opt.norm_weight != nullptr;
  if (want_dw && p.grad_norm_weight == nullptr) return gpu::kErrorInvalidValue;
  // Every output is written, also when there is nothing to retain: d_norm_weight is a sum over
  // no rows then, i.e. zero (the other outputs are empty).
  const auto zero_dw = [&] {
    return gpu::memset_async(p.grad_norm_weight, 0, static_cast<std::size_t>(n.dv) * sizeof(float), p.stream);
  };
  if (N * n.H == 0) return want_dw && n.dv > 0 ? zero_dw() : gpu::kSuccess;
  if (n.dv == 0 || p.grad_initial_state == nullptr || p.workspace == nullptr) return gpu::kErrorInvalidValue;
  if (p.g.ptr != nullptr && p.grad_g.ptr == nullptr) return gpu::kErrorInvalidValue;
  if (gpu::error_t e = gpu::check_warp_size(); e != gpu::kSuccess) return e;

  const Layout l = workspace_layout(p);
  unsigned char* const ws = static_cast<unsigned char*>(p.workspace);
  double* const theta = reinterpret_cast<double*>(ws + l.theta);
  gpu::error_t e = launch_rotary_theta(p.opt.rotary, n.dk, theta, p.stream);
  if (e != gpu::kSuccess) return e;

  // du: a contiguous [B, T, H, dv] tensor of the input dtype.
  Bthd du;
  du.ptr = ws + l.du;
  du.stride_h = n.dv;
  du.stride_t = n.H * n.dv;
  du.stride_b = n.T * n.H * n.dv;

  // 0. q~, k~ (the backward kernels run without a rotary prologue).
  Bthd q_used = p.q, k_used = p.k;
  MsrChunkBackward rot;
  rot.dtype = p.dtype;
  rot.shape = n;
  rot.q = p.q;
  rot.k = p.k;
  rot.seq = p.seq;
  rot.rotary = p.opt.rotary;
  rot.theta = theta;
  rot.stream = p.stream;
  if (p.opt.rotary != RotaryMode::kNone && n.T > 0 && n.dk > 0) {
    const std::size_t elem = p.dtype == DType::kF32 ? 4 : 2;
    const std::size_t bytes = align16(static_cast<std::size_t>(n.B * n.T * n.H * n.dk) * elem);
    for (Bthd* x : {&q_used, &k_used}) {
      x->ptr = ws + l.qk + (x == &k_used ? bytes : 0);
      x->stride_h = n.dk;
      x->stride_t = n.H * n.dk;
      x->stride_b = n.T * n.H * n.dk;
    }
    switch (p.dtype) {
      case DType::kF16:
        e = launch_rotate<f16_t>(rot, q_used, k_used);
        break;
      case DType::kBF16:
        e = launch_rotate<bf16_t>(rot, q_used, k_used);
        break;
      case DType::kF32:
        e = launch_rotate<float>(rot, q_used, k_used);
        break;
    }
    if (e != gpu::kSuccess) return e;
  }

  // 1-2. Epilogue backward (recomputes u).
  MsrChunkForward f;
  f.dtype = p.dtype;
  f.shape = n;
  f.q = q_used;
  f.k = k_used;
  f.v = p.v;
  f.o = du;
  f.log_decay = p.log_decay;
  f.scale = p.scale;
  f.chunk_size = p.chunk_size;
  f.initial_state = p.initial_state;
  f.final_state = nullptr;
  f.stream = p.stream;
  f.seq = p.seq;
  f.opt = p.opt;
  f.opt.rotary = RotaryMode::kNone;  // q~ / k~ already rotated
  f.theta = theta;
  f.g = p.g;
  f.grad_y = p.grad_y;
  f.grad_g = p.grad_g;
  f.stats = reinterpret_cast<float*>(ws + l.stats);
  f.dw_partial = want_dw ? reinterpret_cast<float*>(ws + l.dw) : nullptr;
  if (n.T > 0) {
    if (l.dw > l.stats) {  // a statistics buffer exists: more than one dv tile
      f.pass = MsrPass::kBackwardStats;
      if ((e = launch_msr_chunk_pass(f)) != gpu::kSuccess) return e;
    }
    f.pass = MsrPass::kBackwardGrad;
    if ((e = launch_msr_chunk_pass(f)) != gpu::kSuccess) return e;
  } else if (want_dw) {
    if ((e = zero_dw()) != gpu::kSuccess) return e;
  }

  // 3-4. The retention sweeps with du as grad_o; dq, dk un-rotated.
  MsrChunkBackward b;
  b.dtype = p.dtype;
  b.shape = n;
  b.q = q_used;
  b.k = k_used;
  b.v = p.v;
  b.grad_o = du;
  b.grad_q = p.grad_q;
  b.grad_k = p.grad_k;
  b.grad_v = p.grad_v;
  b.log_decay = p.log_decay;
  b.scale = p.scale;
  b.chunk_size = p.chunk_size;
  b.initial_state = p.initial_state;
  b.grad_final_state = p.grad_final_state;
  b.grad_initial_state = p.grad_initial_state;
  b.workspace = reinterpret_cast<float*>(ws + l.acc);
  b.stream = p.stream;
  b.seq = p.seq;
  b.theta = theta;  // q~ / k~ already rotated; the cast applies R^T
  BackwardPlan plan = l.plan;
  plan.fwd.states = reinterpret_cast<float*>(ws + l.split);
  plan.rev.states = reinterpret_cast<float*>(ws + l.split + align16(segment_states_bytes(plan.fwd, N * n.H, n)));
  plan.fwd.state_stride = plan.rev.state_stride = N * n.H * n.dk * n.dv;
  if ((e = launch_backward_core(b, p.opt.rotary, plan)) != gpu::kSuccess) return e;

  // 5. d_norm_weight.
  if (want_dw && n.T > 0) {
    e = gpu::launch(&msr_reduce_dw_kernel, static_cast<unsigned>((n.dv + 255) / 256), 256, 0, p.stream,
                    reinterpret_cast<const float*>(ws + l.dw), N * n.H, n.dv, p.grad_norm_weight);
  }
  return e;
}

}  // namespace retention::kernels
