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
#include "cpu/layer_fusion.h"

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
  double log_gamma;
  std::vector<double> pow;  // gamma^d
  at::Tensor q_decay;       // [C, 1]: gamma^(i+1), weight of the incoming state for row i

  ChunkDecay(double log_gamma_, int64_t chunk, at::ScalarType acc)
      : C(chunk), log_gamma(log_gamma_), pow(chunk + 1) {
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
  // 1 - gamma^L without cancellation: the scan uses S - (1 - gamma^L) S, because gamma^L rounded
  // to fp32 is off by up to 2^-25 near 1, a relative error of 2^-25 / (1 - gamma^L) in the decay
  // that the scan would compound over every chunk the state remembers.
  double one_minus_chunk_decay(int64_t L) const { return -std::expm1(double(L) * log_gamma); }

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
      const auto a = static_cast<scalar_t>(dec.one_minus_chunk_decay(seg.lengths[c]));
      for (int64_t e = 0; e < n; ++e) s[e] = s[e] - a * s[e] + x[e];
    }
  });
  return before;
}

// Worker threads do not inherit the caller's dispatch state; nothing below must record autograd.
#define RETENTION_WORKER_GUARD at::AutoDispatchBelowADInplaceOrView below_autograd_guard

// Everything around the retention of one call: sequences, rotation, epilogue, gate and weight.
struct Layer {
  std::vector<Sequence> seqs;
  RotaryTable rotary;
  Epilogue epilogue;
  at::Tensor g;       // [B, T, H, dv] or undefined
  at::Tensor weight;  // [dv] in the accumulation type, contiguous, or undefined

  // The raw ops: every batch row is a sequence at position 0, nothing around the retention.
  static Layer raw(const Dims& d) {
    return Layer{make_sequences(d.B, d.T, at::Tensor(), at::Tensor()),
                 RotaryTable(Rotary::None, d.dk, {}), Epilogue{}, at::Tensor(), at::Tensor()};
  }
};

// Rows of sequence `seq`, head h of a [B, T, H, d] tensor: a [len, d] view.
at::Tensor rows_of(const at::Tensor& x, const Sequence& seq, int64_t h) {
  return x.select(0, seq.b).narrow(0, seq.t0, seq.len).select(1, h);
}

// Loads the rows of a segment in the accumulation type, rotated (prologue of the fused layer).
at::Tensor load_rotated(const Layer& L, const Segment& seg, const at::Tensor& x, size_t s,
                        int64_t C, at::ScalarType acc) {
  auto buf = seg.load(x, C, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "load_rotated", [&] {
    L.rotary.apply(buf.data_ptr<scalar_t>(), buf.size(2), s, seg.t0, seg.rows, false);
  });
  return buf;
}

// Writes dX ([n, C, d] acc, gradient w.r.t. rotated rows) back through the rotation.
void store_unrotated(const Layer& L, const Segment& seg, at::Tensor dX, size_t s,
                     const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(dX.scalar_type(), "store_unrotated", [&] {
    L.rotary.apply(dX.data_ptr<scalar_t>(), dX.size(2), s, seg.t0, seg.rows, true);
  });
  seg.store(dX, out);
}

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

template <typename scalar_t>
constexpr at::ScalarType acc_scalar_type() {
  return c10::CppTypeToScalarType<acc_type<scalar_t>>::value;
}

// y rows of a segment from the raw retention rows O ([n, C, dv] acc, contiguous).
template <typename scalar_t>
void finish_segment(const Layer& L, const Segment& seg, const Sequence& seq, int64_t h,
                    double log_gamma, const at::Tensor& O, const at::Tensor& y_rows) {
  using acc_t = acc_type<scalar_t>;
  if (L.epilogue.identity()) return seg.store(O, y_rows);
  const int64_t dv = O.size(2);
  acc_t* u = O.data_ptr<acc_t>();
  const acc_t* w = L.weight.defined() ? L.weight.data_ptr<acc_t>() : nullptr;
  at::Tensor g_rows = L.g.defined() ? rows_of(L.g, seq, h) : at::Tensor();
  for (int64_t r = 0; r < seg.rows; ++r) {
    const int64_t t = seg.t0 + r;
    const double alpha = L.epilogue.decay_norm ? decay_normaliser(log_gamma, seq.pos0 + t) : 1.0;
    const scalar_t* g = g_rows.defined() ? g_rows.data_ptr<scalar_t>() + t * g_rows.stride(0)
                                         : nullptr;
    L.epilogue.forward(u + r * dv, dv, alpha, g, g_rows.defined() ? g_rows.stride(1) : 0, w,
                       y_rows.data_ptr<scalar_t>() + t * y_rows.stride(0), y_rows.stride(1));
  }
}

template <typename scalar_t>
void chunk_forward_impl(const Dims& d, const Layer& L, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const std::vector<double>& log_gamma, double scale,
                        int64_t chunk_size, const at::Tensor& y, const at::Tensor& state) {
  const auto acc = acc_scalar_type<scalar_t>();
  const int64_t N = static_cast<int64_t>(L.seqs.size());
  const SingleThreadedBlas blas_guard;
  at::parallel_for(0, N * d.H, 1, [&](int64_t begin, int64_t end) {
    RETENTION_WORKER_GUARD;
    for (int64_t sh = begin; sh < end; ++sh) {
      const int64_t s = sh / d.H, h = sh % d.H;
      const Sequence& seq = L.seqs[s];
      auto q_sh = rows_of(q, seq, h), k_sh = rows_of(k, seq, h), v_sh = rows_of(v, seq, h);
      auto y_sh = rows_of(y, seq, h);
      auto S = state.select(0, s).select(0, h);  // [dk, dv], contiguous, carried across chunks
      // A chunk longer than the sequence is the sequence: no C x C buffers for C >> T.
      const int64_t C = std::min(chunk_size, std::max<int64_t>(1, seq.len));
      const ChunkDecay dec(log_gamma[h], C, acc);
      for_each_segment(seq.len, C, /*reverse=*/false, [&](const Segment& seg) {
        auto Q = load_rotated(L, seg, q_sh, s, C, acc).mul_(scale);
        auto K = load_rotated(L, seg, k_sh, s, C, acc);
        auto V = seg.load(v_sh, C, acc);
        auto A = at::bmm(Q, K.transpose(1, 2));
        dec.apply_causal_decay(A);
        auto O = at::bmm(A, V);
        auto KV = at::bmm((K * seg.k_decay(dec, acc)).transpose(1, 2), V);  // [n, dk, dv]
        auto S_in = scan_chunks(S, KV, dec, seg, /*reverse=*/false);
        O.baddbmm_(Q * dec.q_decay, S_in);
        finish_segment<scalar_t>(L, seg, seq, h, log_gamma[h], O, y_sh);
      });
    }
  });
}

template <typename scalar_t>
void chunk_backward_impl(const Dims& d, const Layer& L, const at::Tensor& grad_y,
                         const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::vector<double>& log_gamma, double scale, int64_t chunk_size,
                         const at::Tensor& initial_state /* [N,H,dk,dv] acc */,
                         const OptTensor& grad_final_state, const at::Tensor& dq,
                         const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& dS0,
                         const at::Tensor& dg, const at::Tensor& dw_partial /* [N*H, dv] */) {
  using acc_t = acc_type<scalar_t>;
  const auto acc = acc_scalar_type<scalar_t>();
  const int64_t N = static_cast<int64_t>(L.seqs.size());
  const bool fused = !L.epilogue.identity();
  const SingleThreadedBlas blas_guard;
  at::parallel_for(0, N * d.H, 1, [&](int64_t begin, int64_t end) {
    RETENTION_WORKER_GUARD;
    std::vector<acc_t> nhat(d.dv);
    for (int64_t sh = begin; sh < end; ++sh) {
      const int64_t s = sh / d.H, h = sh % d.H;
      const Sequence& seq = L.seqs[s];
      auto q_sh = rows_of(q, seq, h), k_sh = rows_of(k, seq, h), v_sh = rows_of(v, seq, h);
      auto dy_sh = rows_of(grad_y, seq, h);
      const int64_t C = std::min(chunk_size, std::max<int64_t>(1, seq.len));
      const ChunkDecay dec(log_gamma[h], C, acc);
      // Cotangent of the raw retention rows: grad_y itself for the raw ops; for a fused layer it
      // comes out of the epilogue backward in the forward sweep and the reverse sweep reuses it.
      auto dU = fused ? at::empty({seq.len, d.dv}, dS0.options()) : dy_sh;

      // Forward sweep: dq needs the state entering each chunk (and the fused epilogue the raw
      // output, recomputed here rather than stored by the forward pass).
      auto S = initial_state.select(0, s).select(0, h).clone();
      for_each_segment(seq.len, C, /*reverse=*/false, [&](const Segment& seg) {
        auto K = load_rotated(L, seg, k_sh, s, C, acc), V = seg.load(v_sh, C, acc);
        auto KV = at::bmm((K * seg.k_decay(dec, acc)).transpose(1, 2), V);
        auto S_in = scan_chunks(S, KV, dec, seg, /*reverse=*/false);
        if (fused) {
          auto Q = load_rotated(L, seg, q_sh, s, C, acc).mul_(scale);
          auto A = at::bmm(Q, K.transpose(1, 2));
          dec.apply_causal_decay(A);
          auto O = at::bmm(A, V).baddbmm_(Q * dec.q_decay, S_in);
          const acc_t* u = O.template data_ptr<acc_t>();
          const acc_t* w = L.weight.defined() ? L.weight.data_ptr<acc_t>() : nullptr;
          auto g_sh = L.g.defined() ? rows_of(L.g, seq, h) : at::Tensor();
          auto dg_sh = L.g.defined() ? rows_of(dg, seq, h) : at::Tensor();
          acc_t* dw = dw_partial.defined() ? dw_partial[sh].data_ptr<acc_t>() : nullptr;
          for (int64_t r = 0; r < seg.rows; ++r) {
            const int64_t t = seg.t0 + r;
            const double alpha =
                L.epilogue.decay_norm ? decay_normaliser(log_gamma[h], seq.pos0 + t) : 1.0;
            L.epilogue.backward(
                u + r * d.dv, d.dv, alpha, dy_sh.data_ptr<scalar_t>() + t * dy_sh.stride(0),
                dy_sh.stride(1),
                g_sh.defined() ? g_sh.data_ptr<scalar_t>() + t * g_sh.stride(0) : nullptr,
                g_sh.defined() ? g_sh.stride(1) : 0, w, dU.data_ptr<acc_t>() + t * d.dv,
                dg_sh.defined() ? dg_sh.data_ptr<scalar_t>() + t * dg_sh.stride(0) : nullptr,
                dg_sh.defined() ? dg_sh.stride(1) : 0, dw, nhat.data());
          }
        }
        auto dO = seg.load(dU, C, acc);
        auto dA = at::bmm(dO, V.transpose(1, 2));
        dec.apply_causal_decay(dA);
        auto dQ = at::bmm(dA, K).baddbmm_(dO * dec.q_decay, S_in.transpose(1, 2)).mul_(scale);
        store_unrotated(L, seg, dQ, s, rows_of(dq, seq, h));
      });

      // Reverse sweep: dk, dv need the cotangent of the state leaving each chunk.
      auto dS = has(grad_final_state)
                    ? grad_final_state->select(0, s).select(0, h).to(acc).contiguous().clone()
                    : at::zeros({d.dk, d.dv}, dS0.options());
      for_each_segment(seq.len, C, /*reverse=*/true, [&](const Segment& seg) {
        auto Q = load_rotated(L, seg, q_sh, s, C, acc).mul_(scale);
        auto K = load_rotated(L, seg, k_sh, s, C, acc);
        auto V = seg.load(v_sh, C, acc), dO = seg.load(dU, C, acc);
        auto R = at::bmm((Q * dec.q_decay).transpose(1, 2), dO);  // [n, dk, dv]
        auto dS_out = scan_chunks(dS, R, dec, seg, /*reverse=*/true);
        auto kd = seg.k_decay(dec, acc);
        auto A = at::bmm(Q, K.transpose(1, 2)), dA = at::bmm(dO, V.transpose(1, 2));
        dec.apply_causal_decay(A);
        dec.apply_causal_decay(dA);
        auto dK = at::bmm(dA.transpose(1, 2), Q).baddbmm_(V * kd, dS_out.transpose(1, 2));
        auto dV = at::bmm(A.transpose(1, 2), dO).baddbmm_(K * kd, dS_out);
        store_unrotated(L, seg, dK, s, rows_of(dk, seq, h));
        seg.store(dV, rows_of(dv, seq, h));
      });
      dS0.select(0, s).select(0, h).copy_(dS);
    }
  });
}

// Token loop on raw pointers: S <- gamma S + k^T v, o = scale q S (S is [dk, dv] row-major),
// with the fused layer's rotation and epilogue applied per token.
template <typename scalar_t>
void recurrent_impl(const Dims& d, const Layer& L, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const std::vector<double>& log_gamma, double scale,
                    const at::Tensor& y, const at::Tensor& state) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = static_cast<int64_t>(L.seqs.size());
  const acc_t* w = L.weight.defined() ? L.weight.data_ptr<acc_t>() : nullptr;
  auto* sp = state.data_ptr<acc_t>();
  at::parallel_for(0, N * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(d.dk), kt(d.dk), vt(d.dv), ot(d.dv);
    for (int64_t sh = begin; sh < end; ++sh) {
      const int64_t s = sh / d.H, h = sh % d.H;
      const Sequence& seq = L.seqs[s];
      // S <- gamma S + k^T v is computed as S - (1 - gamma) S + k^T v with 1 - gamma rounded once
      // from double: gamma itself rounded to fp32 is off by up to 2^-25 near 1, a relative error
      // of 2^-25 / (1 - gamma) in the decay rate (1% at gamma = 1 - 3e-6), which the recurrence
      // compounds over the ~1/(1 - gamma) tokens the state remembers (bench/long_decode.py). The
      // chunk form takes its decay powers from double and never had this error.
      const acc_t one_minus_gamma = static_cast<acc_t>(-std::expm1(log_gamma[h]));
      acc_t* S = sp + sh * d.dk * d.dv;
      for (int64_t n = 0; n < seq.len; ++n) {
        const int64_t t = seq.t0 + n;
        auto row = [&](const at::Tensor& x) {
          return x.data_ptr<scalar_t>() + seq.b * x.stride(0) + t * x.stride(1) + h * x.stride(2);
        };
        const scalar_t *qr = row(q), *kr = row(k), *vr = row(v);
        for (int64_t i = 0; i < d.dk; ++i) qt[i] = static_cast<acc_t>(qr[i * q.stride(3)]);
        for (int64_t i = 0; i < d.dk; ++i) kt[i] = static_cast<acc_t>(kr[i * k.stride(3)]);
        for (int64_t j = 0; j < d.dv; ++j) vt[j] = static_cast<acc_t>(vr[j * v.stride(3)]);
        L.rotary.apply(qt.data(), d.dk, s, n, 1, false);
        L.rotary.apply(kt.data(), d.dk, s, n, 1, false);
        std::fill(ot.begin(), ot.end(), acc_t(0));
        for (int64_t i = 0; i < d.dk; ++i) {
          acc_t* srow = S + i * d.dv;
          for (int64_t j = 0; j < d.dv; ++j) {
            srow[j] = srow[j] - one_minus_gamma * srow[j] + kt[i] * vt[j];
            ot[j] += qt[i] * srow[j];
          }
        }
        for (int64_t j = 0; j < d.dv; ++j) ot[j] *= static_cast<acc_t>(scale);
        const double alpha = L.epilogue.decay_norm ? decay_normaliser(log_gamma[h], seq.pos0 + n) : 1.0;
        const scalar_t* g = L.g.defined() ? row(L.g) : nullptr;
        L.epilogue.forward(ot.data(), d.dv, alpha, g, L.g.defined() ? L.g.stride(3) : 0, w, row(y),
                           y.stride(3));
      }
    }
  });
}

at::Tensor new_state(int64_t N, const Dims& d, const at::Tensor& q,
                     const OptTensor& initial_state) {
  const auto acc = state_dtype(q.scalar_type());
  if (has(initial_state)) return initial_state->detach().to(acc).contiguous().clone();
  return at::zeros({N, d.H, d.dk, d.dv}, q.options().dtype(acc));
}

// ---- op kernels -------------------------------------------------------------------------------

#define RETENTION_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> chunked_forward(const char* op, const at::Tensor& q,
                                                   const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& log_decay, double scale,
                                                   int64_t chunk_size,
                                                   const OptTensor& initial_state) {
  const auto d = check_inputs(op, q, k, v, log_decay, initial_state);
  check_chunk_size(op, chunk_size);
  auto o = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  auto state = new_state(d.B, d, q, initial_state);
  const auto L = Layer::raw(d);
  RETENTION_DISPATCH_FLOATS(q.scalar_type(), "chunk_forward", [&] {
    chunk_forward_impl<scalar_t>(d, L, q.detach(), k.detach(), v.detach(),
                                 log_decay_values(log_decay), scale, chunk_size, o, state);
  });
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
  auto S0 = new_state(d.B, d, q, initial_state);
  auto dS0 = at::empty_like(S0);
  const auto L = Layer::raw(d);
  RETENTION_DISPATCH_FLOATS(q.scalar_type(), "chunk_backward", [&] {
    chunk_backward_impl<scalar_t>(d, L, grad_o.detach(), q.detach(), k.detach(), v.detach(),
                                  log_decay_values(log_decay), scale, chunk_size, S0,
                                  grad_final_state, dq, dk, dv, dS0, at::Tensor(), at::Tensor());
  });
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
  auto state = new_state(d.B, d, q, initial_state);
  const auto L = Layer::raw(d);
  RETENTION_DISPATCH_FLOATS(q.scalar_type(), "recurrent_forward", [&] {
    recurrent_impl<scalar_t>(d, L, q.detach(), k.detach(), v.detach(),
                             log_decay_values(log_decay), scale, o, state);
  });
  return {o, state};
}

at::Tensor recurrent_step_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& log_decay, double scale, const at::Tensor& state) {
  const char* op = "retention::recurrent_step";
  auto q4 = as_single_step(op, "q", q), k4 = as_single_step(op, "k", k);
  auto v4 = as_single_step(op, "v", v);
  const auto d = check_inputs(op, q4, k4, v4, log_decay, state, "state");
  check_step_state(op, state, q);
  check_state_not_aliased(op, state, {{"q", &q}, {"k", &k}, {"v", &v}, {"log_decay", &log_decay}});
  auto o = at::empty({d.B, 1, d.H, d.dv}, q.options());
  const auto L = Layer::raw(d);
  RETENTION_DISPATCH_FLOATS(q.scalar_type(), "recurrent_step", [&] {
    recurrent_impl<scalar_t>(d, L, q4.detach(), k4.detach(), v4.detach(),
                             log_decay_values(log_decay), scale, o, state);
  });
  return q.dim() == 3 ? o.squeeze(1) : o;
}

// ---- fused layer core (msr_*) ------------------------------------------------------------------

// Checks the values of cu_seqlens (the shared checks see its shape; offsets' values are checked
// there too).
void check_msr_values(const char* op, int64_t T, const OptTensor& cu_seqlens) {
  if (has(cu_seqlens)) {
    auto cu = cu_seqlens->to(at::kLong).contiguous();
    const int64_t* c = cu.data_ptr<int64_t>();
    const int64_t n = cu.numel();
    TORCH_CHECK(c[0] == 0, op, ": cu_seqlens[0] must be 0, got ", c[0]);
    for (int64_t i = 1; i < n; ++i) {
      TORCH_CHECK(c[i] >= c[i - 1], op, ": cu_seqlens must be non-decreasing, got cu_seqlens[",
                  i - 1, "] = ", c[i - 1], " > cu_seqlens[", i, "] = ", c[i]);
    }
    TORCH_CHECK(c[n - 1] == T, op, ": cu_seqlens[-1] must equal the packed length T = ", T,
                ", got ", c[n - 1]);
  }
}

Layer make_layer(const Dims& d, const at::Tensor& q, const OptTensor& g,
                 const OptTensor& cu_seqlens, const OptTensor& offsets, int64_t rotary, bool norm,
                 const OptTensor& norm_weight, double eps, bool decay_norm) {
  const auto acc = state_dtype(q.scalar_type());
  Layer L{make_sequences(d.B, d.T, has(cu_seqlens) ? *cu_seqlens : at::Tensor(),
                         has(offsets) ? *offsets : at::Tensor()),
          RotaryTable(Rotary::None, d.dk, {}),
          Epilogue{decay_norm, norm, eps, has(g)},
          has(g) ? g->detach() : at::Tensor(),
          has(norm_weight) && norm ? norm_weight->detach().to(acc).contiguous() : at::Tensor()};
  L.rotary = RotaryTable(static_cast<Rotary>(rotary), d.dk, L.seqs);
  return L;
}

std::tuple<at::Tensor, at::Tensor> msr_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
    const at::Tensor& log_decay, double scale, int64_t form, int64_t chunk_size,
    const OptTensor& initial_state, const OptTensor& offsets, const OptTensor& cu_seqlens,
    int64_t rotary, bool norm, const OptTensor& norm_weight, double eps, bool decay_norm) {
  const char* op = "retention::msr_forward";
  const auto m = check_msr_inputs(op, q, k, v, g, log_decay, form, chunk_size, initial_state,
                                  offsets, cu_seqlens, rotary, norm_weight, eps);
  check_msr_values(op, m.d.T, cu_seqlens);
  const auto& d = m.d;
  // Outputs first: a T beyond memory fails here with the allocator's clear message (bytes asked),
  // not inside the layer's per-row tables.
  auto y = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  auto state = new_state(m.N, d, q, initial_state);
  const auto L = make_layer(d, q, g, cu_seqlens, offsets, rotary, norm, norm_weight, eps,
                            decay_norm);
  const auto log_gamma = log_decay_values(log_decay);
  RETENTION_DISPATCH_FLOATS(q.scalar_type(), "msr_forward", [&] {
    if (static_cast<Form>(form) == Form::Recurrent) {
      recurrent_impl<scalar_t>(d, L, q.detach(), k.detach(), v.detach(), log_gamma, scale, y,
                               state);
    } else {
      const int64_t C = static_cast<Form>(form) == Form::Parallel ? std::max<int64_t>(1, d.T)
                                                                  : chunk_size;
      chunk_forward_impl<scalar_t>(d, L, q.detach(), k.detach(), v.detach(), log_gamma, scale,
                                   C, y, state);
    }
  });
  return {y, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
msr_backward_cpu(const at::Tensor& grad_y, const OptTensor& grad_final_state, const at::Tensor& q,
                 const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
                 const at::Tensor& log_decay, double scale, int64_t chunk_size,
                 const OptTensor& initial_state, const OptTensor& offsets,
                 const OptTensor& cu_seqlens, int64_t rotary, bool norm,
                 const OptTensor& norm_weight, double eps, bool decay_norm) {
  const char* op = "retention::msr_backward";
  const auto m = check_msr_inputs(op, q, k, v, g, log_decay, /*form=*/0, chunk_size,
                                  initial_state, offsets, cu_seqlens, rotary, norm_weight, eps);
  check_msr_grads(op, m, q, grad_y, grad_final_state);
  check_msr_values(op, m.d.T, cu_seqlens);
  const auto& d = m.d;
  auto dq = at::empty_like(q, at::MemoryFormat::Contiguous);  // (allocated first, as in forward)
  auto dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  auto dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  const auto L = make_layer(d, q, g, cu_seqlens, offsets, rotary, norm, norm_weight, eps,
                            decay_norm);
  // Rows outside every packed sequence (none when cu_seqlens covers T) get zero gradients.
  if (has(cu_seqlens)) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  auto dg = has(g) ? at::zeros_like(*g, at::MemoryFormat::Contiguous) : at::Tensor();
  auto S0 = new_state(m.N, d, q, initial_state);
  auto dS0 = at::empty_like(S0);
  auto dw_partial = L.weight.defined() ? at::zeros({m.N * d.H, d.dv}, S0.options()) : at::Tensor();
  RETENTION_DISPATCH_FLOATS(q.scalar_type(), "msr_backward", [&] {
    chunk_backward_impl<scalar_t>(d, L, grad_y.detach().to(q.scalar_type()), q.detach(),
                                  k.detach(), v.detach(), log_decay_values(log_decay), scale,
                                  chunk_size, S0, grad_final_state, dq, dk, dv, dS0, dg,
                                  dw_partial);
  });
  at::Tensor dw;
  if (dw_partial.defined()) dw = dw_partial.sum(0).to(norm_weight->scalar_type());
  return {dq, dk, dv, dg, dS0, dw};
}

at::Tensor msr_step_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const OptTensor& g, const at::Tensor& log_decay, double scale,
                        const at::Tensor& state, const OptTensor& offsets, int64_t rotary,
                        bool norm, const OptTensor& norm_weight, double eps, bool decay_norm) {
  const char* op = "retention::msr_step";
  auto q4 = as_single_step(op, "q", q), k4 = as_single_step(op, "k", k);
  auto v4 = as_single_step(op, "v", v);
  OptTensor g4 = has(g) ? OptTensor(as_single_step(op, "g", *g)) : OptTensor();
  const auto m = check_msr_inputs(op, q4, k4, v4, g4, log_decay, static_cast<int64_t>(Form::Recurrent),
                                  1, state, offsets, {}, rotary, norm_weight, eps, "state");
  check_step_state(op, state, q);
  check_state_not_aliased(op, state,
                          {{"q", &q}, {"k", &k}, {"v", &v}, {"g", has(g) ? &*g : nullptr},
                           {"log_decay", &log_decay}, {"offsets", has(offsets) ? &*offsets : nullptr},
                           {"norm_weight", has(norm_weight) ? &*norm_weight : nullptr}});
  const auto& d = m.d;
  const auto L = make_layer(d, q4, g4, {}, offsets, rotary, norm, norm_weight, eps, decay_norm);
  auto y = at::empty({d.B, 1, d.H, d.dv}, q.options());
  RETENTION_DISPATCH_FLOATS(q.scalar_type(), "msr_step", [&] {
    recurrent_impl<scalar_t>(d, L, q4.detach(), k4.detach(), v4.detach(),
                             log_decay_values(log_decay), scale, y, state);
  });
  return q.dim() == 3 ? y.squeeze(1) : y;
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, CPU, m) {
  m.impl("chunk_forward", &chunk_forward_cpu);
  m.impl("chunk_backward", &chunk_backward_cpu);
  m.impl("parallel_forward", &parallel_forward_cpu);
  m.impl("parallel_backward", &parallel_backward_cpu);
  m.impl("recurrent_forward", &recurrent_forward_cpu);
  m.impl("recurrent_step", &recurrent_step_cpu);
  m.impl("msr_forward", &msr_forward_cpu);
  m.impl("msr_backward", &msr_backward_cpu);
  m.impl("msr_step", &msr_step_cpu);
}

}  // namespace retention
