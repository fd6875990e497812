// CPU kernels. Work is split over (batch, head) with at::parallel_for; inside, the chunkwise form
// runs as batched BLAS matmuls over segments of chunks, so the state scan is the only sequential
// part and memory stays O(T) per head in flight. The parallel form is the chunk form with a single
// chunk spanning the whole sequence; the recurrent form is a plain token loop (a genuinely
// different algorithm, which is what makes it useful as a cross-check).
#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/blas_threads.h"

namespace retention {
namespace {

// Rows of a segment of chunks handled by one batch of matmuls: big enough that ATen call overhead
// vanishes against the FLOPs, small enough that the per-chunk states of a segment stay in cache.
constexpr int64_t kSegmentRows = 1024;

std::vector<double> log_decay_values(const at::Tensor& log_decay) {
  auto ld = log_decay.detach().to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(ld.data_ptr<double>(), ld.data_ptr<double>() + ld.numel());
}

// Decay powers of one head for chunks of C rows, from one table gamma^d, d = 0..C (exponents are
// never positive: no overflow, whatever T).
struct ChunkDecay {
  int64_t C;
  std::vector<double> pow;  // gamma^d
  at::Tensor q_decay;       // [C, 1]: gamma^(i+1), weight of the incoming state for row i

  ChunkDecay(double log_gamma, int64_t chunk, at::ScalarType acc) : C(chunk), pow(chunk + 1) {
    // gamma^0 = 1 also for gamma = 0 (log_gamma = -inf), where 0 * -inf would give NaN.
    pow[0] = 1.0;
    for (int64_t d = 1; d <= C; ++d) pow[d] = std::exp(d * log_gamma);
    q_decay = at::tensor(std::vector<double>(pow.begin() + 1, pow.end()), at::kDouble)
                  .unsqueeze(1)
                  .to(acc);
  }
  // [C, 1]: gamma^(L-1-j) for the L real rows of a chunk (weight of row j in the outgoing state).
  at::Tensor k_decay(int64_t L, at::ScalarType acc) const {
    std::vector<double> w(C, 0.0);
    for (int64_t j = 0; j < L; ++j) w[j] = pow[L - 1 - j];
    return at::tensor(w, at::kDouble).unsqueeze(1).to(acc);
  }
  double chunk_decay(int64_t L) const { return pow[L]; }

  // Scores [n, C, C] (contiguous) -> scores * gamma^(i-j) on and below the diagonal, 0 above.
  // Applied in place instead of multiplying by a C x C mask: no mask to build or keep per head.
  void apply_causal_decay(const at::Tensor& A) const {
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "apply_causal_decay", [&] {
      std::vector<scalar_t> p(pow.begin(), pow.end());
      scalar_t* a = A.data_ptr<scalar_t>();
      for (int64_t r = 0; r < A.size(0) * C; ++r) {
        scalar_t* row = a + r * C;
        const int64_t i = r % C;
        for (int64_t j = 0; j <= i; ++j) row[j] *= p[i - j];
        std::fill(row + i + 1, row + C, scalar_t(0));
      }
    });
  }
};

// A run of consecutive chunks [c0, c1) of one (b, h), padded with zero rows to full chunks.
struct Segment {
  int64_t t0, rows, n_chunks;
  std::vector<int64_t> lengths;  // real rows of each chunk

  Segment(int64_t c0, int64_t c1, int64_t C, int64_t T) : t0(c0 * C), n_chunks(c1 - c0) {
    rows = std::min(T, c1 * C) - t0;
    for (int64_t c = c0; c < c1; ++c) lengths.push_back(std::min(C, T - c * C));
  }
  // [n_chunks, C, d] copy of rows t0.. of x ([T, d], any strides and dtype) in the acc dtype.
  at::Tensor load(const at::Tensor& x, int64_t C, at::ScalarType acc) const {
    auto buf = at::zeros({n_chunks * C, x.size(1)}, x.options().dtype(acc));
    buf.narrow(0, 0, rows).copy_(x.narrow(0, t0, rows));
    return buf.view({n_chunks, C, x.size(1)});
  }
  void store(const at::Tensor& y, const at::Tensor& out) const {
    out.narrow(0, t0, rows).copy_(y.reshape({-1, y.size(2)}).narrow(0, 0, rows));
  }
  // [n_chunks, C, 1] weights gamma^(L_c-1-j).
  at::Tensor k_decay(const ChunkDecay& dec, at::ScalarType acc) const {
    std::vector<at::Tensor> w;
    for (auto L : lengths) w.push_back(dec.k_decay(L, acc));
    return at::stack(w);
  }
};

template <typename F>
void for_each_segment(int64_t T, int64_t C, bool reverse, F&& f) {
  const int64_t n_chunks = (T + C - 1) / C;
  const int64_t per_segment = std::max<int64_t>(1, kSegmentRows / C);
  const int64_t n_segments = (n_chunks + per_segment - 1) / per_segment;
  for (int64_t i = 0; i < n_segments; ++i) {
    const int64_t s = reverse ? n_segments - 1 - i : i;
    const int64_t c0 = s * per_segment;
    f(Segment(c0, std::min(n_chunks, c0 + per_segment), C, T));
  }
}

// S <- gamma^(L_c) S + X[c] over the chunks of a segment (last to first when `reverse`), in
// place on S ([dk, dv], contiguous); returns S as it was before each chunk's step, [n, dk, dv].
at::Tensor scan_chunks(const at::Tensor& S, const at::Tensor& X, const ChunkDecay& dec,
                       const Segment& seg, bool reverse) {
  auto before = at::empty_like(X);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "scan_chunks", [&] {
    scalar_t* s = S.data_ptr<scalar_t>();
    const int64_t n = S.numel();
    for (int64_t i = 0; i < seg.n_chunks; ++i) {
      const int64_t c = reverse ? seg.n_chunks - 1 - i : i;
      const scalar_t* x = X[c].data_ptr<scalar_t>();
      std::copy(s, s + n, before[c].data_ptr<scalar_t>());
      const auto a = static_cast<scalar_t>(dec.chunk_decay(seg.lengths[c]));
      for (int64_t e = 0; e < n; ++e) s[e] = a * s[e] + x[e];
    }
  });
  return before;
}

at::Tensor new_state(const Dims& d, const at::Tensor& q, const OptTensor& initial_state) {
  const auto acc = state_dtype(q.scalar_type());
  if (has(initial_state)) return initial_state->detach().to(acc).contiguous().clone();
  return at::zeros({d.B, d.H, d.dk, d.dv}, q.options().dtype(acc));
}

// Worker threads do not inherit the caller's dispatch state; nothing below must record autograd.
#define RETENTION_WORKER_GUARD at::AutoDispatchBelowADInplaceOrView below_autograd_guard

void chunk_forward_impl(const Dims& d, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const std::vector<double>& log_gamma, double scale,
                        int64_t C, const at::Tensor& o, const at::Tensor& state) {
  const auto acc = state.scalar_type();
  const SingleThreadedBlas blas_guard;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    RETENTION_WORKER_GUARD;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      auto q_bh = q.select(0, b).select(1, h), k_bh = k.select(0, b).select(1, h);
      auto v_bh = v.select(0, b).select(1, h), o_bh = o.select(0, b).select(1, h);
      auto S = state.select(0, b).select(0, h);  // [dk, dv], contiguous, carried across chunks
      const ChunkDecay dec(log_gamma[h], C, acc);
      for_each_segment(d.T, C, /*reverse=*/false, [&](const Segment& seg) {
        auto Q = seg.load(q_bh, C, acc).mul_(scale), K = seg.load(k_bh, C, acc);
        auto V = seg.load(v_bh, C, acc);
        auto A = at::bmm(Q, K.transpose(1, 2));
        dec.apply_causal_decay(A);
        auto O = at::bmm(A, V);
        auto KV = at::bmm((K * seg.k_decay(dec, acc)).transpose(1, 2), V);  // [n, dk, dv]
        auto S_in = scan_chunks(S, KV, dec, seg, /*reverse=*/false);
        O.baddbmm_(Q * dec.q_decay, S_in);
        seg.store(O, o_bh);
      });
    }
  });
}

void chunk_backward_impl(const Dims& d, const at::Tensor& grad_o, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v,
                         const std::vector<double>& log_gamma, double scale, int64_t C,
                         const at::Tensor& initial_state /* [B,H,dk,dv] acc */,
                         const OptTensor& grad_final_state, const at::Tensor& dq,
                         const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& dS0) {
  const auto acc = dS0.scalar_type();
  const SingleThreadedBlas blas_guard;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    RETENTION_WORKER_GUARD;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      auto q_bh = q.select(0, b).select(1, h), k_bh = k.select(0, b).select(1, h);
      auto v_bh = v.select(0, b).select(1, h), do_bh = grad_o.select(0, b).select(1, h);
      const ChunkDecay dec(log_gamma[h], C, acc);

      // Forward sweep: dq needs the state entering each chunk.
      auto S = initial_state.select(0, b).select(0, h).clone();
      for_each_segment(d.T, C, /*reverse=*/false, [&](const Segment& seg) {
        auto K = seg.load(k_bh, C, acc), V = seg.load(v_bh, C, acc);
        auto dO = seg.load(do_bh, C, acc);
        auto KV = at::bmm((K * seg.k_decay(dec, acc)).transpose(1, 2), V);
        auto S_in = scan_chunks(S, KV, dec, seg, /*reverse=*/false);
        auto dA = at::bmm(dO, V.transpose(1, 2));
        dec.apply_causal_decay(dA);
        auto dQ = at::bmm(dA, K).baddbmm_(dO * dec.q_decay, S_in.transpose(1, 2)).mul_(scale);
        seg.store(dQ, dq.select(0, b).select(1, h));
      });

      // Reverse sweep: dk, dv need the cotangent of the state leaving each chunk.
      auto dS = has(grad_final_state)
                    ? grad_final_state->select(0, b).select(0, h).to(acc).contiguous().clone()
                    : at::zeros({d.dk, d.dv}, dS0.options());
      for_each_segment(d.T, C, /*reverse=*/true, [&](const Segment& seg) {
        auto Q = seg.load(q_bh, C, acc).mul_(scale), K = seg.load(k_bh, C, acc);
        auto V = seg.load(v_bh, C, acc), dO = seg.load(do_bh, C, acc);
        auto R = at::bmm((Q * dec.q_decay).transpose(1, 2), dO);  // [n, dk, dv]
        auto dS_out = scan_chunks(dS, R, dec, seg, /*reverse=*/true);
        auto kd = seg.k_decay(dec, acc);
        auto A = at::bmm(Q, K.transpose(1, 2)), dA = at::bmm(dO, V.transpose(1, 2));
        dec.apply_causal_decay(A);
        dec.apply_causal_decay(dA);
        auto dK = at::bmm(dA.transpose(1, 2), Q).baddbmm_(V * kd, dS_out.transpose(1, 2));
        auto dV = at::bmm(A.transpose(1, 2), dO).baddbmm_(K * kd, dS_out);
        seg.store(dK, dk.select(0, b).select(1, h));
        seg.store(dV, dv.select(0, b).select(1, h));
      });
      dS0.select(0, b).select(0, h).copy_(dS);
    }
  });
}

// Token loop on raw pointers: S <- gamma S + k^T v, o = scale q S (S is [dk, dv] row-major).
template <typename scalar_t>
void recurrent_impl(const Dims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::vector<double>& log_gamma, double scale, const at::Tensor& o,
                    const at::Tensor& state) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* qp = q.data_ptr<scalar_t>();
  const auto* kp = k.data_ptr<scalar_t>();
  const auto* vp = v.data_ptr<scalar_t>();
  auto* op = o.data_ptr<scalar_t>();
  auto* sp = state.data_ptr<acc_t>();
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(d.dk), kt(d.dk), vt(d.dv), ot(d.dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      const acc_t gamma = static_cast<acc_t>(std::exp(log_gamma[h]));
      acc_t* S = sp + bh * d.dk * d.dv;
      for (int64_t t = 0; t < d.T; ++t) {
        const auto* qr = qp + b * q.stride(0) + t * q.stride(1) + h * q.stride(2);
        const auto* kr = kp + b * k.stride(0) + t * k.stride(1) + h * k.stride(2);
        const auto* vr = vp + b * v.stride(0) + t * v.stride(1) + h * v.stride(2);
        for (int64_t i = 0; i < d.dk; ++i) qt[i] = static_cast<acc_t>(qr[i * q.stride(3)]);
        for (int64_t i = 0; i < d.dk; ++i) kt[i] = static_cast<acc_t>(kr[i * k.stride(3)]);
        for (int64_t j = 0; j < d.dv; ++j) vt[j] = static_cast<acc_t>(vr[j * v.stride(3)]);
        std::fill(ot.begin(), ot.end(), acc_t(0));
        for (int64_t i = 0; i < d.dk; ++i) {
          acc_t* row = S + i * d.dv;
          for (int64_t j = 0; j < d.dv; ++j) {
            row[j] = gamma * row[j] + kt[i] * vt[j];
            ot[j] += qt[i] * row[j];
          }
        }
        auto* orow = op + b * o.stride(0) + t * o.stride(1) + h * o.stride(2);
        for (int64_t j = 0; j < d.dv; ++j)
          orow[j * o.stride(3)] = static_cast<scalar_t>(static_cast<acc_t>(scale) * ot[j]);
      }
    }
  });
}

// ---- op kernels -------------------------------------------------------------------------------

// A chunk longer than the sequence is the sequence: no C x C buffers for C >> T.
int64_t effective_chunk(int64_t chunk_size, const Dims& d) {
  return std::min(chunk_size, std::max<int64_t>(1, d.T));
}

std::tuple<at::Tensor, at::Tensor> chunked_forward(const char* op, const at::Tensor& q,
                                                   const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& log_decay, double scale,
                                                   int64_t chunk_size,
                                                   const OptTensor& initial_state) {
  const auto d = check_inputs(op, q, k, v, log_decay, initial_state);
  check_chunk_size(op, chunk_size);
  auto o = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  auto state = new_state(d, q, initial_state);
  chunk_forward_impl(d, q.detach(), k.detach(), v.detach(), log_decay_values(log_decay), scale,
                     effective_chunk(chunk_size, d), o, state);
  return {o, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunked_backward(
    const char* op, const at::Tensor& grad_o, const OptTensor& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    double scale, int64_t chunk_size, const OptTensor& initial_state) {
  const auto d = check_inputs(op, q, k, v, log_decay, initial_state);
  check_chunk_size(op, chunk_size);
  check_grad_o(op, grad_o, d, q, grad_final_state);
  auto dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  auto dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  auto dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  auto S0 = new_state(d, q, initial_state);
  auto dS0 = at::empty_like(S0);
  chunk_backward_impl(d, grad_o.detach(), q.detach(), k.detach(), v.detach(),
                      log_decay_values(log_decay), scale, effective_chunk(chunk_size, d), S0,
                      grad_final_state, dq,
                      dk, dv, dS0);
  return {dq, dk, dv, dS0};
}

std::tuple<at::Tensor, at::Tensor> chunk_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const at::Tensor& log_decay, double scale,
                                                     int64_t chunk_size,
                                                     const OptTensor& initial_state) {
  return chunked_forward("retention::chunk_forward", q, k, v, log_decay, scale, chunk_size,
                         initial_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_backward_cpu(
    const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
    int64_t chunk_size, const OptTensor& initial_state) {
  return chunked_backward("retention::chunk_backward", grad_o, grad_final_state, q, k, v,
                          log_decay, scale, chunk_size, initial_state);
}

// The parallel form is one chunk spanning the whole sequence: the O(T^2) score matrix per head.
int64_t whole_sequence(const at::Tensor& q) { return q.dim() >= 2 ? std::max<int64_t>(1, q.size(1)) : 1; }

std::tuple<at::Tensor, at::Tensor> parallel_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        const at::Tensor& log_decay, double scale,
                                                        const OptTensor& initial_state) {
  return chunked_forward("retention::parallel_forward", q, k, v, log_decay, scale,
                         whole_sequence(q), initial_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> parallel_backward_cpu(
    const at::Tensor& grad_o, const OptTensor& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, double scale,
    const OptTensor& initial_state) {
  return chunked_backward("retention::parallel_backward", grad_o, grad_final_state, q, k, v,
                          log_decay, scale, whole_sequence(q), initial_state);
}

std::tuple<at::Tensor, at::Tensor> recurrent_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const at::Tensor& log_decay,
                                                         double scale,
                                                         const OptTensor& initial_state) {
  const auto d = check_inputs("retention::recurrent_forward", q, k, v, log_decay, initial_state);
  auto o = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  auto state = new_state(d, q, initial_state);
  const auto log_gamma = log_decay_values(log_decay);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "recurrent_forward",
                                  [&] {
                                    recurrent_impl<scalar_t>(d, q.detach(), k.detach(),
                                                             v.detach(), log_gamma, scale, o,
                                                             state);
                                  });
  return {o, state};
}

at::Tensor recurrent_step_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& log_decay, double scale, const at::Tensor& state) {
  const char* op = "retention::recurrent_step";
  auto q4 = as_single_step(op, "q", q), k4 = as_single_step(op, "k", k);
  auto v4 = as_single_step(op, "v", v);
  const auto d = check_inputs(op, q4, k4, v4, log_decay, state, "state");
  TORCH_CHECK(state.scalar_type() == state_dtype(q.scalar_type()), op, ": state must be ",
              state_dtype(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ",
              state.scalar_type());
  TORCH_CHECK(state.is_contiguous(), op, ": state must be contiguous (it is updated in place)");
  auto o = at::empty({d.B, 1, d.H, d.dv}, q.options());
  const auto log_gamma = log_decay_values(log_decay);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "recurrent_step",
                                  [&] {
                                    recurrent_impl<scalar_t>(d, q4.detach(), k4.detach(),
                                                             v4.detach(), log_gamma, scale, o,
                                                             state);
                                  });
  return q.dim() == 3 ? o.squeeze(1) : o;
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, CPU, m) {
  m.impl("chunk_forward", &chunk_forward_cpu);
  m.impl("chunk_backward", &chunk_backward_cpu);
  m.impl("parallel_forward", &parallel_forward_cpu);
  m.impl("parallel_backward", &parallel_backward_cpu);
  m.impl("recurrent_forward", &recurrent_forward_cpu);
  m.impl("recurrent_step", &recurrent_step_cpu);
}

}  // namespace retention
