// msr_step.cu - the decode step, raw (recurrent_step) and fused (msr_step): one launch per step.
//   q~ = R(p) q, k~ = R(p) k at p = offsets[b];  S <- gamma S + k~^T v (in place);
//   u = scale q~ S;  y = epilogue(u)  (decay normaliser, RMSNorm over dv, swish gate).
// The raw step is this kernel with no prologue and no epilogue (as on the CPU).
//
// Purely bandwidth-bound on the fp32 state: 8 dk dv bytes of state traffic (read + write)
// against ~4 dk dv flops, so the goals are one launch for all (b, h), coalesced state access,
// enough bytes in flight and enough CTAs to reach every SM.  Consecutive lanes take consecutive
// state columns (one warp = one contiguous row segment); kStepGroups row groups split a CTA's
// rows and meet in shared memory for q S.
//
// Grid (b h, column tiles, row slices); plan_step chooses it from the shape:
//   * many heads (B H CTAs fill the SMs): no slices.  Without the RMSNorm each CTA finishes its
//     own kStepCols columns; with it, which needs all of u before any y can be written, one CTA
//     walks the whole dv row and keeps u in shared memory (fp32, up to kMsrStepMaxDv columns).
//   * few heads (batch-1 decode): a CTA per (head, column tile, slice of dk rows).  Each writes
//     its partial u (the sum over its rows) to a fixed workspace slot and takes a ticket from
//     the head's counter; the CTA that draws the last ticket sums the slots in slice order and
//     runs the epilogue for the whole row.  Which CTA that is depends on timing, but the order
//     of every sum does not, so the result is deterministic.  The last CTA also puts the counter
//     back to zero, so no call needs a memset.
// Traffic and predicted times: docs/gpu.md, "Decode step".
#include "chunk_common.cuh"
#include "msr_common.cuh"
#include "recurrence.cuh"
#include "value_checks.cuh"

namespace retention::kernels {
namespace {

constexpr int kStepCols = 64;
constexpr int kStepGroups = 4;
constexpr int kStepThreads = kStepCols * kStepGroups;
constexpr int kRowsInFlight = 8;                              // state loads in flight per thread
constexpr int kStepMinSliceRows = kStepGroups * kRowsInFlight;  // one batch of loads per thread
constexpr int kStepCtasPerSm = 4;  // resident per SM (the register budget of __launch_bounds__)
static_assert(kStepThreads >= kMaxHeadDimK, "one q / k element per thread");

// How one launch covers the heads (grid: heads x col_grid x slices).
struct StepPlan {
  int col_grid = 1;     // CTAs along dv; 1 with the norm and no split: one CTA walks the row
  int slices = 1;       // CTAs along dk, slice_rows rows each
  int slice_rows = 0;
  bool meet = false;    // the CTAs of a head meet in the workspace (last-ticket epilogue)
};

StepPlan plan_step(const Shape& n, bool norm, bool may_split) {
  StepPlan s;
  const std::int64_t heads = n.B * n.H, col_tiles = (n.dv + kStepCols - 1) / kStepCols;
  s.slice_rows = static_cast<int>(n.dk);
  int sms = 0;
  if (gpu::multiprocessor_count(&sms) != gpu::kSuccess || sms <= 0) sms = 132;
  if (!may_split || n.dk == 0 || heads > kMsrStepCounters || heads * (norm ? 1 : col_tiles) >= sms) {
    s.col_grid = norm ? 1 : static_cast<int>(col_tiles);
    return s;
  }
  // Few heads: every column tile its own CTA, and dk cut into slices until the grid holds
  // about kStepCtasPerSm CTAs per SM (fewer rows per CTA: fewer dependent batches of loads).
  s.col_grid = static_cast<int>(col_tiles);
  const std::int64_t want = kStepCtasPerSm * static_cast<std::int64_t>(sms) / (heads * col_tiles);
  const std::int64_t most = (n.dk + kStepMinSliceRows - 1) / kStepMinSliceRows;
  const std::int64_t slices = std::max<std::int64_t>(1, std::min(want, most));
  s.slice_rows = static_cast<int>((n.dk + slices - 1) / slices + kStepGroups - 1) / kStepGroups * kStepGroups;
  s.slices = static_cast<int>((n.dk + s.slice_rows - 1) / s.slice_rows);
  s.meet = s.slices > 1 || (norm && s.col_grid > 1);
  return s;
}

struct StepArgs {
  MsrStepParams p;
  int slice_rows;
  bool meet;
  float* partial;  // meet: [B H, slices, dv] partial u (sums over a slice's rows, unscaled)
};

template <class T>
__global__ void __launch_bounds__(kStepThreads, kStepCtasPerSm) msr_step_kernel(const StepArgs args) {
  RETENTION_SHARED(float, sq, [kMaxHeadDimK]);
  RETENTION_SHARED(float, sk, [kMaxHeadDimK]);
  RETENTION_SHARED(float, su, [kMsrStepMaxDv]);
  RETENTION_SHARED(float, partial, [kStepGroups][kStepCols]);
  RETENTION_SHARED(float, warp_sums, [kStepThreads / gpu::kWarpSize]);
  RETENTION_SHARED(double, theta, [kMaxHeadDimK / 2]);
  RETENTION_SHARED(int, last_ticket, [1]);

  const MsrStepParams& p = args.p;
  const int H = static_cast<int>(p.shape.H), dk = static_cast<int>(p.shape.dk), dv = static_cast<int>(p.shape.dv);
  const int head = blockIdx.x, b = head / H, h = head % H;
  const int tid = threadIdx.x, col = tid % kStepCols, group = tid / kStepCols;
  const bool rotary = p.opt.rotary != RotaryMode::kNone;

  const int row_begin = blockIdx.z * args.slice_rows, row_end = min(dk, row_begin + args.slice_rows);
  const std::int64_t pos = p.offsets != nullptr ? p.offsets[b] : 0;
  float* const S = p.state + static_cast<std::int64_t>(head) * dk * dv;
  // kRowsInFlight state loads before the first store: the compiler may not move a load above a
  // store that could alias it, so a row-by-row loop would have one load in flight.
  float s[kRowsInFlight];
  auto load_rows = [&](const float* Sc, int r0) {
#pragma unroll
    for (int i = 0; i < kRowsInFlight; ++i) {
      const int r = r0 + i * kStepGroups;
      s[i] = r < row_end ? Sc[static_cast<std::int64_t>(r) * dv] : 0.f;
    }
  };

  // Every load of the prologue goes out before the angles are computed, so one round trip
  // covers them and the float64 pow: the first batch of state rows with its v, the decay, and
  // this thread's q / k element with its rotation partner (one element per thread: dk <=
  // kStepThreads).
  const int first_col = blockIdx.y * kStepCols + col;
  const T* v = bthd_ptr<T>(p.v, b, 0, h, 0);
  float v_first = 0.f;
  if (first_col < dv) {
    load_rows(S + first_col, row_begin + group);
    v_first = Elem<T>::to_float(v[first_col]);
  }
  const float log_gamma = p.log_decay[h];
  // The values the glue passes unchecked (a host read would sync every step), checked before
  // this launch writes anything.
  if (tid == 0) {
    check_log_decay(log_gamma);
    check_position(pos);
  }
  const T* q = bthd_ptr<T>(p.q, b, 0, h, 0);
  const T* k = bthd_ptr<T>(p.k, b, 0, h, 0);
  const int d = row_begin + tid;
  int partner = d, pair = 0;
  float sign = 0.f;
  if (rotary) rotary_pair(p.opt.rotary, d < row_end ? d : 0, dk, partner, sign, pair);
  float qd = 0.f, kd = 0.f, qp = 0.f, kp = 0.f;
  if (d < row_end) {
    qd = Elem<T>::to_float(q[d]);
    kd = Elem<T>::to_float(k[d]);
    if (rotary) {
      qp = Elem<T>::to_float(q[partner]);
      kp = Elem<T>::to_float(k[partner]);
    }
  }

  if (rotary)
    for (int i = tid; i < dk / 2; i += kStepThreads) theta[i] = rotary_theta(p.opt.rotary, i, dk);
  __syncthreads();

  // Rotated q, k in fp32, for this CTA's rows (the rotation partner may lie outside them).
  if (d < row_end) {
    if (rotary) {
      float cs, sn;
      rotary_cos_sin(static_cast<double>(pos), theta[pair], cs, sn);
      qd = qd * cs + sign * qp * sn;
      kd = kd * cs + sign * kp * sn;
    }
    sq[d] = qd;
    sk[d] = kd;
  }
  const float omg = one_minus_gamma(log_gamma);
  const float a = p.opt.decay_norm ? decay_normaliser(pos + 1, log_gamma) : 1.f;
  const T* g = p.g.ptr != nullptr ? bthd_ptr<T>(p.g, b, 0, h, 0) : nullptr;
  T* y = bthd_ptr<T>(p.o, b, 0, h, 0);
  auto gate = [&](int c) {
    if (g == nullptr) return 1.f;
    const float gv = Elem<T>::to_float(g[c]);
    return gv * sigmoid(gv);
  };
  // With the norm, y[c] = a r u[c] f[c] (f: weight times swish gate) and r needs sum u^2: u f
  // goes to shared memory and u^2 into this thread's share of the sum, so f is loaded with u's
  // inputs (the epilogue after the row's reduction waits for no load) and one dv-sized array
  // suffices (shared memory limits the CTAs per CU on AMD's 64 KiB LDS).
  float ss_part = 0.f;
  auto keep_u = [&](int c, float u) {
    su[c] = u * (p.opt.norm_weight != nullptr ? p.opt.norm_weight[c] : 1.f) * gate(c);
    ss_part = fmaf(u, u, ss_part);
  };
  __syncthreads();

  // State update and u over this CTA's rows, kStepCols columns at a time.
  float* const slots = args.meet ? args.partial + (static_cast<std::int64_t>(head) * gridDim.z + blockIdx.z) * dv : nullptr;
  for (int c0 = blockIdx.y * kStepCols; c0 < dv; c0 += gridDim.y * kStepCols) {
    const int c = c0 + col;
    float acc = 0.f;
    if (c < dv) {
      const float vc = c == first_col ? v_first : Elem<T>::to_float(v[c]);
      float* const Sc = S + c;
      int r0 = row_begin + group;
      if (c != first_col) load_rows(Sc, r0);  // the first tile's first batch is in s[] already
      while (r0 < row_end) {
#pragma unroll
        for (int i = 0; i < kRowsInFlight; ++i) {
          const int r = r0 + i * kStepGroups;
          if (r < row_end) {
            s[i] = decay_update(s[i], omg, sk[r], vc);
            Sc[static_cast<std::int64_t>(r) * dv] = s[i];
            acc = fmaf(sq[r], s[i], acc);
          }
        }
        r0 += kStepGroups * kRowsInFlight;
        if (r0 < row_end) load_rows(Sc, r0);
      }
    }
    partial[group][col] = acc;
    __syncthreads();
    if (group == 0 && c < dv) {
#pragma unroll
      for (int i = 1; i < kStepGroups; ++i) acc += partial[i][col];
      if (args.meet)
        slots[c] = acc;
      else if (p.opt.norm)
        keep_u(c, p.scale * acc);
      else
        y[c] = Elem<T>::from_float(a * p.scale * acc * gate(c));
    }
    __syncthreads();
  }

  if (args.meet) {
    // Publish the slots (fence before the ticket), then the last of the head's CTAs takes over.
    gpu::fence_device();
    __syncthreads();
    const unsigned ctas_per_head = gridDim.y * gridDim.z;
    if (tid == 0) last_ticket[0] = gpu::atomic_add(&p.counters[head], 1u) == ctas_per_head - 1;
    __syncthreads();
    if (!last_ticket[0]) return;
    gpu::fence_device();  // acquire: the other CTAs' slots are visible from here on
    if (tid == 0) p.counters[head] = 0u;  // every CTA of this launch has drawn its ticket
    const float* const head_slots = args.partial + static_cast<std::int64_t>(head) * gridDim.z * dv;
    for (int c = tid; c < dv; c += kStepThreads) {
      float u = 0.f;
      for (int z = 0; z < static_cast<int>(gridDim.z); ++z) u += head_slots[static_cast<std::int64_t>(z) * dv + c];
      if (p.opt.norm)
        keep_u(c, p.scale * u);
      else
        y[c] = Elem<T>::from_float(a * p.scale * u * gate(c));
    }
  }
  if (!p.opt.norm) return;

  // RMSNorm epilogue over the whole row (su was written before a barrier or, after the meet, by
  // the thread that reads it).
  float ss = gpu::warp_reduce_sum(ss_part);
  if (gpu::lane_id() == 0) warp_sums[gpu::warp_id()] = ss;
  __syncthreads();
  ss = 0.f;
#pragma unroll
  for (int w = 0; w < kStepThreads / gpu::kWarpSize; ++w) ss += warp_sums[w];
  const float r = rsqrtf(a * a * ss / static_cast<float>(dv) + p.opt.eps);
  for (int c = tid; c < dv; c += kStepThreads) y[c] = Elem<T>::from_float(a * r * su[c]);
}

gpu::error_t launch_step(const MsrStepParams& p, bool may_split) {
  const Shape& n = p.shape;
  if (n.B < 0 || n.H < 0 || n.dk < 0 || n.dv < 0 || n.dk > kMaxHeadDimK || (p.opt.norm && n.dv > kMsrStepMaxDv) ||
      p.log_decay == nullptr)
    return gpu::kErrorInvalidValue;
  if (p.opt.rotary != RotaryMode::kNone && n.dk % 2 != 0) return gpu::kErrorInvalidValue;
  if (n.B * n.H == 0 || n.dv == 0) return gpu::kSuccess;
  if (p.state == nullptr || p.o.ptr == nullptr) return gpu::kErrorInvalidValue;
  const StepPlan s = plan_step(n, p.opt.norm, may_split);
  if (s.meet && (p.workspace == nullptr || p.counters == nullptr)) return gpu::kErrorInvalidValue;
  const StepArgs args{p, s.slice_rows, s.meet, static_cast<float*>(p.workspace)};
  const dim3 grid(static_cast<unsigned>(n.B * n.H), static_cast<unsigned>(s.col_grid), static_cast<unsigned>(s.slices));
  return dispatch_dtype(p.dtype, [&](auto t) {
    return gpu::launch(&msr_step_kernel<decltype(t)>, grid, kStepThreads, 0, p.stream, args);
  });
}

}  // namespace

std::size_t msr_step_workspace_bytes(const MsrStepParams& p) {
  const Shape& n = p.shape;
  if (n.B <= 0 || n.H <= 0 || n.dk <= 0 || n.dv <= 0) return 0;
  const StepPlan s = plan_step(n, p.opt.norm, true);
  return s.meet ? static_cast<std::size_t>(n.B * n.H) * s.slices * n.dv * sizeof(float) : 0;
}

gpu::error_t launch_msr_step(const MsrStepParams& p) { return launch_step(p, true); }

// The raw step: the fused step with no rotation, no normaliser, no norm and no gate, and no
// split (it has no workspace).
gpu::error_t launch_recurrent_step(const RecurrentStepParams& r) {
  MsrStepParams p;
  static_cast<RecurrentStepParams&>(p) = r;
  p.opt.rotary = RotaryMode::kNone;
  p.opt.norm = false;
  return launch_step(p, false);
}

}  // namespace retention::kernels
