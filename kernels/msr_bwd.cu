// msr_bwd.cu - the fused MSR backward (design in msr_common.cuh):
//
//   1. statistics pass (norm with more than one dv tile): partial sum u^2, sum dz w u per row
//   2. gradient pass: du (workspace, input dtype), dg, per-CTA column sums of dz n^ (no
//      epilogue, as for the raw op: 1 and 2 are skipped and du = dy)
//      (1 and 2 are the forward chunk kernel again, recomputing u; msr_fwd.cu)
//   0. q~, k~ rotated once into the workspace (input dtype); every kernel below reads those
//   3. the dq sweep and the dk/dv/dS0 sweep of chunk_bwd.cuh with du as grad_o, on q~ / k~ and
//      packed sequences
//   4. sum of the fp32 dq~ / dk~ partials over dv tiles (fixed order, chunk_bwd.cuh), cast to
//      the input dtype, applying R(p)^T
//   5. d_norm_weight = sum of the per-CTA column sums (fixed order, no atomics)
// The sweeps' instantiations are in msr_bwd.cuh, one dtype per translation unit.
#include "msr_common.cuh"

namespace retention::kernels {
namespace {

// The row-walking kernel (one CTA per (sequence, head) slice of rows; each thread keeps one
// column d, its theta and partner, and walks rows), two jobs:
//   kGrads = false: q~ = R(p) q, k~ = R(p) k into the workspace copies q_out, k_out;
//   kGrads = true:  grad_q / grad_k = R(p)^T acc rounded to T, acc being the sum of the dv-tile
//                   partial slices in slice order (chunk_bwd.cuh); q_out, k_out are the grads.
constexpr int kRowColumns = 64;
constexpr int kRowLanes = 4;

template <class T, bool kGrads>
__global__ void __launch_bounds__(kRowColumns* kRowLanes)
    msr_rotate_rows_kernel(const MsrChunkBackward p, Bthd q_out, Bthd k_out, int dq_parts, int dk_parts) {
  const Shape& n = p.shape;
  const int H = static_cast<int>(n.H), dk = static_cast<int>(n.dk);
  const int h = blockIdx.x % H;
  const SeqSpan seq = msr_sequence(p, blockIdx.x / H);
  const std::int64_t slice = n.B * n.H * n.T * n.dk;
  const float* const acc =
      static_cast<const float*>(p.workspace) + (static_cast<std::int64_t>(seq.b) * H + h) * n.T * dk;
  // Element d of row t of operand 0 (q) or 1 (k).
  const auto x = [&](int operand, std::int64_t t, int d) {
    if constexpr (kGrads)
      return sum_partials(acc + operand * dq_parts * slice, slice, operand ? dk_parts : dq_parts, t * dk + d);
    else
      return Elem<T>::to_float(bthd_ptr<T>(operand ? p.k : p.q, seq.b, t, h, d)[0]);
  };
  const bool rotary = p.opt.rotary != RotaryMode::kNone;
  for (int d = threadIdx.x % kRowColumns; d < dk; d += kRowColumns) {
    int partner = d, pair = 0;
    float sign = 0.f;
    if (rotary) rotary_pair(p.opt.rotary, d, dk, partner, sign, pair);
    if (kGrads) sign = -sign;  // R^T: the partner term changes sign
    const double theta = rotary ? rotary_theta(p.opt.rotary, pair, dk) : 0.0;  // once per column
    for (std::int64_t r = blockIdx.y * kRowLanes + threadIdx.x / kRowColumns; r < seq.length;
         r += gridDim.y * kRowLanes) {
      const std::int64_t t = seq.t_begin + r;
      float cs, sn;
      if (rotary) rotary_cos_sin(static_cast<double>(seq.pos0 + r), theta, cs, sn);
      const auto rotated = [&](int operand) {
        const float y = x(operand, t, d);
        return Elem<T>::from_float(rotary ? y * cs + sign * x(operand, t, partner) * sn : y);
      };
      bthd_ptr<T>(q_out, seq.b, t, h, d)[0] = rotated(0);
      bthd_ptr<T>(k_out, seq.b, t, h, d)[0] = rotated(1);
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

// Grid of the row-walking kernel: (sequence, head) x enough row slices for ~16 rows each.
template <class T, bool kGrads>
gpu::error_t launch_rotate_rows(const MsrChunkBackward& p, const Bthd& q_out, const Bthd& k_out, int dq_parts = 0,
                                int dk_parts = 0) {
  const std::int64_t y = (p.shape.T + kRowLanes * 16 - 1) / (kRowLanes * 16);
  const dim3 grid(static_cast<unsigned>(p.seq.num_sequences * p.shape.H),
                  static_cast<unsigned>(y < 1 ? 1 : y > 1024 ? 1024 : y));
  return gpu::launch(&msr_rotate_rows_kernel<T, kGrads>, grid, kRowColumns * kRowLanes, 0, p.stream, p, q_out, k_out,
                     dq_parts, dk_parts);
}

// The forward chunk pass over the backward's inputs (q / k as given: already rotated).
MsrChunkForward forward_pass(const MsrBackwardParams& p, MsrPass pass) {
  MsrChunkForward f;
  static_cast<ChunkInputs&>(f) = p;
  f.g = p.g;
  f.seq = p.seq;
  f.opt = p.opt;
  f.opt.rotary = RotaryMode::kNone;
  f.pass = pass;
  return f;
}

struct Layout {
  std::size_t core = 0, stats = 0, dw = 0, du = 0, q = 0, k = 0, total = 0;
  BackwardPlan plan;  // the core's sweeps (chunk_bwd.cuh)
};

std::size_t align16(std::size_t x) { return (x + 15) / 16 * 16; }

// [backward core | statistics | dw partials | du | q~ | k~], each 16-byte aligned; q~ and k~
// with rotation only, du with an epilogue only.
Layout workspace_layout(const MsrBackwardParams& p) {
  const Shape& n = p.shape;
  const std::int64_t rows = p.seq.num_sequences * n.H;
  const bool any = n.B > 0 && n.T > 0 && n.H > 0 && n.dv > 0;
  const std::size_t tokens = static_cast<std::size_t>(n.B * n.T * n.H), elem = p.dtype == DType::kF32 ? 4 : 2;
  const int bv = msr_forward_tile_width(p.dtype, n.dk, true);
  const std::int64_t tiles = bv > 0 ? (n.dv + bv - 1) / bv : 0;
  Layout l;
  const bool rotated = any && p.opt.rotary != RotaryMode::kNone;
  std::size_t off = 0;
  const auto take = [&off](std::size_t bytes) {
    const std::size_t at = off;
    off += align16(bytes);
    return at;
  };
  if (n.dv > 0 && n.dk <= kMaxHeadDimK) l.plan = plan_backward(p.dtype, n, rows, p.split, p.num_sms);
  l.core = take(backward_core_bytes(l.plan, n, rows));
  const bool stats = any && p.opt.norm && tiles > 1;
  l.stats = take(stats ? static_cast<std::size_t>(tiles * msr_stats_rows(n) * 2) * sizeof(float) : 0);
  l.dw = take(p.opt.norm && p.opt.norm_weight != nullptr ? static_cast<std::size_t>(rows * n.dv) * sizeof(float) : 0);
  l.du = take(any && !without_fusion(p) ? tokens * n.dv * elem : 0);
  l.q = take(rotated ? tokens * n.dk * elem : 0);
  l.k = take(rotated ? tokens * n.dk * elem : 0);
  l.total = off;
  return l;
}

// A contiguous [B, T, H, d] copy at ws + offset.
Bthd contiguous(unsigned char* ws, std::size_t offset, const Shape& n, std::int64_t d) {
  Bthd x;
  x.ptr = ws + offset;
  x.stride_h = d;
  x.stride_t = n.H * d;
  x.stride_b = n.T * n.H * d;
  return x;
}

// Steps 3-4: both sweeps of chunk_bwd.cuh on q / k as given, with b.grad_o as the output
// cotangent and b.workspace as the core's fp32 scratch (backward_core_bytes), then the
// fixed-order sum of the dq / dk partials cast to the input dtype, applying R(p)^T when
// b.opt.rotary is set.  With a split (plan.fwd.count > 1) the forward's state pass runs first,
// for the dq sweep.
gpu::error_t launch_backward_core(MsrChunkBackward b, const BackwardPlan& core) {
  const Shape& n = b.shape;
  const std::int64_t rows = b.seq.num_sequences * n.H;
  BackwardPlan plan = core;
  float* const partials = static_cast<float*>(b.workspace);
  plan.fwd.states = partials + (plan.dq_parts + plan.dk_parts) * n.B * n.H * n.T * n.dk;
  plan.rev.states = plan.fwd.states + segment_states_bytes(plan.fwd, rows, n) / sizeof(float);
  plan.fwd.state_stride = plan.rev.state_stride = rows * n.dk * n.dv;
  if (plan.fwd.count > 1) {  // the states entering the segments, for the dq sweep (msr_fwd.cu)
    MsrChunkForward f = forward_pass(b, MsrPass::kSegmentStates);
    f.segments = plan.fwd;
    if (gpu::error_t e = launch_msr_chunk_pass(f); e != gpu::kSuccess) return e;
  }
  return dispatch_dtype(b.dtype, [&](auto t) {
    using T = decltype(t);
    const RotaryMode rotary = b.opt.rotary;
    b.opt.rotary = RotaryMode::kNone;  // the sweeps read q / k as given
    gpu::error_t e = launch_msr_backward_sweeps_as<T>(b, plan);
    if (e != gpu::kSuccess || n.T == 0 || n.dk == 0) return e;
    b.opt.rotary = rotary;
    return launch_rotate_rows<T, true>(b, b.grad_q, b.grad_k, plan.dq_parts, plan.dk_parts);
  });
}

}  // namespace

std::size_t msr_backward_workspace_bytes(const MsrBackwardParams& p) { return workspace_layout(p).total; }

gpu::error_t launch_msr_backward(const MsrBackwardParams& p) {
  const Shape& n = p.shape;
  if (!msr_shape_ok(n, p.seq, p.opt, p.log_decay)) return gpu::kErrorInvalidValue;
  const bool want_dw = p.opt.norm && p.opt.norm_weight != nullptr;
  if (want_dw && p.grad_norm_weight == nullptr) return gpu::kErrorInvalidValue;
  // Every output is written, also when there is nothing to retain: d_norm_weight is a sum over
  // no rows then, i.e. zero (the other outputs are empty).
  const auto zero_dw = [&] {
    return gpu::memset_async(p.grad_norm_weight, 0, static_cast<std::size_t>(n.dv) * sizeof(float), p.stream);
  };
  if (p.seq.num_sequences * n.H == 0) return want_dw && n.dv > 0 ? zero_dw() : gpu::kSuccess;
  if (n.dv == 0 || p.grad_initial_state == nullptr) return gpu::kErrorInvalidValue;
  if (p.g.ptr != nullptr && p.grad_g.ptr == nullptr) return gpu::kErrorInvalidValue;
  if (gpu::error_t e = gpu::check_warp_size(); e != gpu::kSuccess) return e;

  const Layout l = workspace_layout(p);
  if (p.workspace == nullptr && l.total > 0) return gpu::kErrorInvalidValue;
  unsigned char* const ws = static_cast<unsigned char*>(p.workspace);
  MsrChunkBackward b;
  static_cast<MsrBackwardParams&>(b) = p;
  if (!without_fusion(p)) b.grad_o = contiguous(ws, l.du, n, n.dv);  // du, input dtype (else dy)
  b.workspace = ws + l.core;
  gpu::error_t e = gpu::kSuccess;

  // 0. q~, k~ (the backward kernels run without a rotary prologue).
  if (p.opt.rotary != RotaryMode::kNone && n.T > 0 && n.dk > 0) {
    const Bthd q = contiguous(ws, l.q, n, n.dk), k = contiguous(ws, l.k, n, n.dk);
    e = dispatch_dtype(p.dtype, [&](auto t) { return launch_rotate_rows<decltype(t), false>(b, q, k); });
    if (e != gpu::kSuccess) return e;
    b.q = q;
    b.k = k;
  }

  // 1-2. Epilogue backward (recomputes u), when there is an epilogue.
  MsrChunkForward f = forward_pass(b, MsrPass::kBackwardGrad);
  f.o = b.grad_o;
  f.grad_y = p.grad_o;
  f.grad_g = p.grad_g;
  f.stats = reinterpret_cast<float*>(ws + l.stats);
  f.dw_partial = want_dw ? reinterpret_cast<float*>(ws + l.dw) : nullptr;
  if (n.T > 0 && !without_fusion(p)) {
    if (l.dw > l.stats) {  // a statistics buffer exists: more than one dv tile
      f.pass = MsrPass::kBackwardStats;
      if ((e = launch_msr_chunk_pass(f)) != gpu::kSuccess) return e;
      f.pass = MsrPass::kBackwardGrad;
    }
    if ((e = launch_msr_chunk_pass(f)) != gpu::kSuccess) return e;
  } else if (want_dw) {
    if ((e = zero_dw()) != gpu::kSuccess) return e;
  }

  // 3-4. The retention sweeps with du as grad_o; dq, dk un-rotated.
  if ((e = launch_backward_core(b, l.plan)) != gpu::kSuccess) return e;

  // 5. d_norm_weight.
  if (want_dw && n.T > 0) {
    e = gpu::launch(&msr_reduce_dw_kernel, static_cast<unsigned>((n.dv + 255) / 256), 256, 0, p.stream,
                    reinterpret_cast<const float*>(ws + l.dw), p.seq.num_sequences * n.H, n.dv, p.grad_norm_weight);
  }
  return e;
}

}  // namespace retention::kernels
