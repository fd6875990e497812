// CPU kernels of the fused layer-core ops (msr_*; the raw ops run as these with every option
// off, ops.cpp). Work is split over (sequence, head) with at::parallel_for; inside, the chunkwise
// form walks the chunks of one head with a few BLAS GEMMs per chunk on per-thread buffers, so
// the [dk, dv] state and one chunk's rows stay in cache and memory stays O(T) per head in
// flight. The parallel form is the chunk form with a single chunk spanning the whole sequence;
// the recurrent form is a plain token loop (a genuinely different algorithm, which is what
// makes it useful as a cross-check).
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
#include "cpu/gemv.h"
#include "cpu/gemm.h"
#include "cpu/layer_fusion.h"

namespace retention {
namespace {

std::vector<double> log_decay_values(const at::Tensor& log_decay) {
  auto ld = log_decay.detach().to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(ld.data_ptr<double>(), ld.data_ptr<double>() + ld.numel());
}

// Decay powers of one head for chunks of up to C rows, from one table gamma^d, d = 0..C
// (exponents are never positive: no overflow, whatever T).
template <typename T>
struct ChunkDecay {
  int64_t C;
  double log_gamma;
  std::vector<double> pow;  // gamma^d
  std::vector<T> rev;       // rev[C - d] = gamma^d: row i of the causal mask is rev[C - i ..]

  ChunkDecay(double log_gamma_, int64_t chunk) : C(chunk), log_gamma(log_gamma_), pow(chunk + 1),
                                                 rev(chunk + 1) {
    // gamma^0 = 1 also for gamma = 0 (log_gamma = -inf), where 0 * -inf would give NaN.
    pow[0] = 1.0;
    for (int64_t d = 1; d <= C; ++d) pow[d] = std::exp(d * log_gamma);
    for (int64_t d = 0; d <= C; ++d) rev[C - d] = static_cast<T>(pow[d]);
  }
  // 1 - gamma^L without cancellation: the state update is S - (1 - gamma^L) S, because gamma^L
  // rounded to fp32 is off by up to 2^-25 near 1, a relative error of 2^-25 / (1 - gamma^L) in
  // the decay that the recurrence would compound over every chunk the state remembers.
  double one_minus_chunk_decay(int64_t L) const { return -std::expm1(double(L) * log_gamma); }

  // Scores [L, L] -> scores * gamma^(i-j) on and below the diagonal, 0 above. In place, with the
  // powers read forwards so the loop vectorises; no C x C mask (the parallel form has C = T).
  void causal(T* A, int64_t L) const {
    for (int64_t i = 0; i < L; ++i) {
      T* row = A + i * L;
      const T* m = rev.data() + (C - i);
      for (int64_t j = 0; j <= i; ++j) row[j] *= m[j];
      std::fill(row + i + 1, row + L, T(0));
    }
  }
  // dst[i, :] = src[i, :] * gamma^(i+1) (weight of the incoming state for row i), [L, n].
  void by_query_decay(const T* src, int64_t L, int64_t n, T* dst) const {
    for (int64_t i = 0; i < L; ++i) scale_row(src + i * n, n, pow[i + 1], dst + i * n);
  }
  // dst[j, :] = src[j, :] * gamma^(L-1-j) (weight of row j in the outgoing state), [L, n].
  void by_key_decay(const T* src, int64_t L, int64_t n, T* dst) const {
    for (int64_t j = 0; j < L; ++j) scale_row(src + j * n, n, pow[L - 1 - j], dst + j * n);
  }
  // S <- gamma^L S, as S - (1 - gamma^L) S.
  void decay_state(T* S, int64_t n, int64_t L) const {
    const T a = static_cast<T>(one_minus_chunk_decay(L));
    for (int64_t e = 0; e < n; ++e) S[e] = S[e] - a * S[e];
  }

 private:
  static void scale_row(const T* src, int64_t n, double w, T* dst) {
    const T f = static_cast<T>(w);
    for (int64_t e = 0; e < n; ++e) dst[e] = src[e] * f;
  }
};

// Worker threads do not inherit the caller's dispatch state; nothing below must record autograd.
#define RETENTION_WORKER_GUARD at::AutoDispatchBelowADInplaceOrView below_autograd_guard

// Everything around the retention of one call: sequences, rotation, epilogue, gate and weight.
struct Layer {
  std::vector<Sequence> seqs;
  RotaryTable rotary;
  Epilogue epilogue;
  at::Tensor g;       // [B, T, H, dv] or undefined
  at::Tensor weight;  // [dv] in the accumulation type, contiguous, or undefined
};

// Rows of sequence `seq`, head h of a [B, T, H, d] tensor: a [len, d] view.
at::Tensor rows_of(const at::Tensor& x, const Sequence& seq, int64_t h) {
  return x.select(0, seq.b).narrow(0, seq.t0, seq.len).select(1, h);
}

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Rows t0.. of a [len, d] view (any strides, input dtype) -> contiguous [rows, d] acc rows.
template <typename scalar_t, typename acc_t>
void load_rows(const at::Tensor& x, int64_t t0, int64_t rows, acc_t* out) {
  const int64_t d = x.size(1), rs = x.stride(0), cs = x.stride(1);
  const scalar_t* p = x.data_ptr<scalar_t>() + t0 * rs;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = p + r * rs;
    acc_t* dst = out + r * d;
    if (cs == 1) {  // the usual [B, T, H, d] layout: a vectorised copy per row
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<acc_t>(src[j]);
    } else {
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<acc_t>(src[j * cs]);
    }
  }
}

// Contiguous [rows, d] acc rows -> rows t0.. of a [len, d] view.
template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* in, int64_t t0, int64_t rows, const at::Tensor& x) {
  const int64_t d = x.size(1), rs = x.stride(0), cs = x.stride(1);
  scalar_t* p = x.data_ptr<scalar_t>() + t0 * rs;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* src = in + r * d;
    scalar_t* dst = p + r * rs;
    if (cs == 1) {
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<scalar_t>(src[j]);
    } else {
      for (int64_t j = 0; j < d; ++j) dst[j * cs] = static_cast<scalar_t>(src[j]);
    }
  }
}

// Per-thread buffers of the chunk kernels, reused by every (sequence, head) and chunk the thread
// handles: one chunk's rows and scores stay in cache, and nothing is allocated per chunk.
template <typename acc_t>
struct ChunkBuffers {
  std::vector<acc_t> Q, K, V, dO, A, dA, Tk, Tv, Rk, Rv;
  std::vector<acc_t> dU;  // fused backward: cotangent of the raw retention rows, [len, dv]
  // Backward: the masked scores (fused layer) and score gradients of every chunk of one
  // (sequence, head), kept from the forward sweep for the reverse one, [chunks, C, C].
  std::vector<acc_t> A_kept, dA_kept;
  RotaryTable::Angles<acc_t> angles;

  ChunkBuffers(int64_t C, int64_t dk, int64_t dv)
      : Q(C * dk), K(C * dk), V(C * dv), dO(C * dv), A(C * C), dA(C * C), Tk(C * dk),
        Tv(C * dv), Rk(C * dk), Rv(C * dv) {}

  // Rows t0.. of one (sequence, head), rotated: q (times scale) and k.
  template <typename scalar_t>
  void load_qk(const Layer& L, const at::Tensor& x, int64_t t0, int64_t rows, double scale,
               std::vector<acc_t>& out) {
    const int64_t dk = x.size(1);
    load_rows<scalar_t>(x, t0, rows, out.data());
    L.rotary.rotate(out.data(), dk, rows, angles, 0, false);
    if (scale != 1.0) {
      const auto f = static_cast<acc_t>(scale);
      for (int64_t e = 0; e < rows * dk; ++e) out[e] *= f;
    }
  }
};

// The largest chunk of a sequence: a chunk longer than the sequence is the sequence, so the
// parallel form (C = T) and short sequences get no C x C buffers beyond their length.
int64_t chunk_of(int64_t chunk_size, const std::vector<Sequence>& seqs) {
  int64_t longest = 1;
  for (const auto& s : seqs) longest = std::max(longest, s.len);
  return std::min(chunk_size, longest);
}

// y rows t0.. of one (sequence, head) from the raw retention rows O ([rows, dv] acc, contiguous;
// overwritten by the epilogue).
template <typename scalar_t, typename acc_t>
void finish_rows(const Layer& L, const Sequence& seq, int64_t h, double log_gamma, int64_t t0,
                 int64_t rows, acc_t* O, int64_t dv, const at::Tensor& y_rows) {
  if (L.epilogue.identity()) return store_rows<scalar_t>(O, t0, rows, y_rows);
  const acc_t* w = L.weight.defined() ? L.weight.data_ptr<acc_t>() : nullptr;
  at::Tensor g_rows = L.g.defined() ? rows_of(L.g, seq, h) : at::Tensor();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r;
    const double alpha = L.epilogue.decay_norm ? decay_normaliser(log_gamma, seq.pos0 + t) : 1.0;
    const scalar_t* g = g_rows.defined() ? g_rows.data_ptr<scalar_t>() + t * g_rows.stride(0)
                                         : nullptr;
    L.epilogue.forward(O + r * dv, dv, alpha, g, g_rows.defined() ? g_rows.stride(1) : 0, w,
                       y_rows.data_ptr<scalar_t>() + t * y_rows.stride(0), y_rows.stride(1));
  }
}

// Chunk c of rows [t0, t0 + n): with Q = rot(q) * scale, K = rot(k) and D the causal decay mask,
//   O   = (Q K^T ∘ D) V + diag(gamma^(i+1)) Q S        (S: the state entering the chunk)
//   S' = gamma^n S + (diag(gamma^(n-1-j)) K)^T V
// as six GEMMs on one chunk's rows, so the [dk, dv] state never leaves the cache.
template <typename scalar_t>
void chunk_forward_impl(const Dims& d, const Layer& L, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const std::vector<double>& log_gamma, double scale,
                        int64_t chunk_size, const at::Tensor& y, const at::Tensor& state) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = static_cast<int64_t>(L.seqs.size());
  const int64_t C = chunk_of(chunk_size, L.seqs);
  const SingleThreadedBlas blas_guard;
  at::parallel_for(0, N * d.H, 1, [&](int64_t begin, int64_t end) {
    RETENTION_WORKER_GUARD;
    ChunkBuffers<acc_t> b(C, d.dk, d.dv);
    for (int64_t sh = begin; sh < end; ++sh) {
      const int64_t s = sh / d.H, h = sh % d.H;
      const Sequence& seq = L.seqs[s];
      auto q_sh = rows_of(q, seq, h), k_sh = rows_of(k, seq, h), v_sh = rows_of(v, seq, h);
      auto y_sh = rows_of(y, seq, h);
      acc_t* S = state.select(0, s).select(0, h).data_ptr<acc_t>();  // [dk, dv], contiguous
      const ChunkDecay<acc_t> dec(log_gamma[h], C);
      for (int64_t t0 = 0; t0 < seq.len; t0 += C) {
        const int64_t n = std::min(C, seq.len - t0);
        L.rotary.angles(seq.pos0 + t0, n, b.angles);
        b.template load_qk<scalar_t>(L, q_sh, t0, n, scale, b.Q);
        b.template load_qk<scalar_t>(L, k_sh, t0, n, 1.0, b.K);
        load_rows<scalar_t>(v_sh, t0, n, b.V.data());
        gemm<acc_t>(false, true, n, n, d.dk, 1, b.Q.data(), d.dk, b.K.data(), d.dk, 0,
                    b.A.data(), n);
        dec.causal(b.A.data(), n);
        dec.by_query_decay(b.Q.data(), n, d.dk, b.Tk.data());
        gemm<acc_t>(false, false, n, d.dv, d.dk, 1, b.Tk.data(), d.dk, S, d.dv, 0, b.Rv.data(),
                    d.dv);
        gemm<acc_t>(false, false, n, d.dv, n, 1, b.A.data(), n, b.V.data(), d.dv, 1,
                    b.Rv.data(), d.dv);
        finish_rows<scalar_t>(L, seq, h, log_gamma[h], t0, n, b.Rv.data(), d.dv, y_sh);
        dec.decay_state(S, d.dk * d.dv, n);
        dec.by_key_decay(b.K.data(), n, d.dk, b.Tk.data());
        gemm<acc_t>(true, false, d.dk, d.dv, n, 1, b.Tk.data(), d.dk, b.V.data(), d.dv, 1, S,
                    d.dv);
      }
    }
  });
}

// Two sweeps per (sequence, head). Forward: the state entering each chunk gives dQ (and, for a
// fused layer, the raw rows that the epilogue backward turns into dU, kept for the second
// sweep). Reverse: the cotangent dS of the state leaving each chunk gives dK and dV:
//   dA = (dO V^T) ∘ D
//   dQ = scale * (dA K + diag(gamma^(i+1)) dO S^T)
//   dK = dA^T Q + diag(gamma^(n-1-j)) V dS^T,   dV = (Q K^T ∘ D)^T dO + diag(gamma^(n-1-j)) K dS
//   dS <- gamma^n dS + (diag(gamma^(i+1)) Q)^T dO
template <typename scalar_t>
void chunk_backward_impl(const Dims& d, const Layer& L, const at::Tensor& grad_y,
                         const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::vector<double>& log_gamma, double scale, int64_t chunk_size,
                         const at::Tensor& initial_state /* [N,H,dk,dv] acc */,
                         const OptTensor& grad_final_state, const at::Tensor& dq,
                         const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& dS0,
                         const at::Tensor& dg, const at::Tensor& dw_partial /* [N*H, dv] */) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = static_cast<int64_t>(L.seqs.size());
  const int64_t C = chunk_of(chunk_size, L.seqs);
  const bool fused = !L.epilogue.identity();
  const SingleThreadedBlas blas_guard;
  at::parallel_for(0, N * d.H, 1, [&](int64_t begin, int64_t end) {
    RETENTION_WORKER_GUARD;
    ChunkBuffers<acc_t> b(C, d.dk, d.dv);
    std::vector<acc_t> S(d.dk * d.dv), nhat(d.dv);
    for (int64_t sh = begin; sh < end; ++sh) {
      const int64_t s = sh / d.H, h = sh % d.H;
      const Sequence& seq = L.seqs[s];
      auto q_sh = rows_of(q, seq, h), k_sh = rows_of(k, seq, h), v_sh = rows_of(v, seq, h);
      auto dy_sh = rows_of(grad_y, seq, h);
      auto dq_sh = rows_of(dq, seq, h), dk_sh = rows_of(dk, seq, h), dv_sh = rows_of(dv, seq, h);
      const ChunkDecay<acc_t> dec(log_gamma[h], C);
      if (fused) b.dU.resize(seq.len * d.dv);
      // With one chunk (the parallel form, short sequences) the live buffers are the history.
      const int64_t n_chunks = (seq.len + C - 1) / C;
      const bool keep = n_chunks > 1;
      if (keep) {
        b.dA_kept.resize(n_chunks * C * C);
        if (fused) b.A_kept.resize(n_chunks * C * C);
      }
      auto A_of = [&](int64_t c) { return keep && fused ? b.A_kept.data() + c * C * C : b.A.data(); };
      auto dA_of = [&](int64_t c) { return keep ? b.dA_kept.data() + c * C * C : b.dA.data(); };
      // dO rows of a chunk: dU (fused, computed in the forward sweep) or grad_y itself.
      auto chunk_dO = [&](int64_t t0, int64_t n) -> const acc_t* {
        if (fused) return b.dU.data() + t0 * d.dv;
        load_rows<scalar_t>(dy_sh, t0, n, b.dO.data());
        return b.dO.data();
      };

      // Forward sweep.
      const acc_t* S0 = initial_state.select(0, s).select(0, h).data_ptr<acc_t>();
      std::copy(S0, S0 + d.dk * d.dv, S.begin());
      for (int64_t t0 = 0; t0 < seq.len; t0 += C) {
        const int64_t n = std::min(C, seq.len - t0);
        L.rotary.angles(seq.pos0 + t0, n, b.angles);
        b.template load_qk<scalar_t>(L, k_sh, t0, n, 1.0, b.K);
        load_rows<scalar_t>(v_sh, t0, n, b.V.data());
        if (fused) {
          // The raw rows again (cheaper than keeping them from the forward pass in memory), then
          // the epilogue backward row by row into dU.
          b.template load_qk<scalar_t>(L, q_sh, t0, n, scale, b.Q);
          acc_t* A = A_of(t0 / C);
          gemm<acc_t>(false, true, n, n, d.dk, 1, b.Q.data(), d.dk, b.K.data(), d.dk, 0, A, n);
          dec.causal(A, n);
          dec.by_query_decay(b.Q.data(), n, d.dk, b.Tk.data());
          gemm<acc_t>(false, false, n, d.dv, d.dk, 1, b.Tk.data(), d.dk, S.data(), d.dv, 0,
                      b.Rv.data(), d.dv);
          gemm<acc_t>(false, false, n, d.dv, n, 1, A, n, b.V.data(), d.dv, 1, b.Rv.data(),
                      d.dv);
          const acc_t* w = L.weight.defined() ? L.weight.data_ptr<acc_t>() : nullptr;
          auto g_sh = L.g.defined() ? rows_of(L.g, seq, h) : at::Tensor();
          auto dg_sh = L.g.defined() ? rows_of(dg, seq, h) : at::Tensor();
          acc_t* dw = dw_partial.defined() ? dw_partial[sh].data_ptr<acc_t>() : nullptr;
          for (int64_t r = 0; r < n; ++r) {
            const int64_t t = t0 + r;
            const double alpha =
                L.epilogue.decay_norm ? decay_normaliser(log_gamma[h], seq.pos0 + t) : 1.0;
            L.epilogue.backward(
                b.Rv.data() + r * d.dv, d.dv, alpha,
                dy_sh.data_ptr<scalar_t>() + t * dy_sh.stride(0), dy_sh.stride(1),
                g_sh.defined() ? g_sh.data_ptr<scalar_t>() + t * g_sh.stride(0) : nullptr,
                g_sh.defined() ? g_sh.stride(1) : 0, w, b.dU.data() + t * d.dv,
                dg_sh.defined() ? dg_sh.data_ptr<scalar_t>() + t * dg_sh.stride(0) : nullptr,
                dg_sh.defined() ? dg_sh.stride(1) : 0, dw, nhat.data());
          }
        }
        const acc_t* dO = chunk_dO(t0, n);
        acc_t* dA = dA_of(t0 / C);
        gemm<acc_t>(false, true, n, n, d.dv, 1, dO, d.dv, b.V.data(), d.dv, 0, dA, n);
        dec.causal(dA, n);
        gemm<acc_t>(false, false, n, d.dk, n, 1, dA, n, b.K.data(), d.dk, 0, b.Rk.data(), d.dk);
        dec.by_query_decay(dO, n, d.dv, b.Tv.data());
        gemm<acc_t>(false, true, n, d.dk, d.dv, 1, b.Tv.data(), d.dv, S.data(), d.dv, 1,
                    b.Rk.data(), d.dk);
        const auto f = static_cast<acc_t>(scale);
        for (int64_t e = 0; e < n * d.dk; ++e) b.Rk[e] *= f;
        L.rotary.rotate(b.Rk.data(), d.dk, n, b.angles, 0, true);
        store_rows<scalar_t>(b.Rk.data(), t0, n, dq_sh);
        dec.decay_state(S.data(), d.dk * d.dv, n);
        dec.by_key_decay(b.K.data(), n, d.dk, b.Tk.data());
        gemm<acc_t>(true, false, d.dk, d.dv, n, 1, b.Tk.data(), d.dk, b.V.data(), d.dv, 1,
                    S.data(), d.dv);
      }

      // Reverse sweep; S now holds dS, the cotangent of the state leaving the current chunk.
      if (has(grad_final_state)) {
        auto gS = grad_final_state->select(0, s).select(0, h).to(dS0.scalar_type()).contiguous();
        std::copy(gS.data_ptr<acc_t>(), gS.data_ptr<acc_t>() + d.dk * d.dv, S.begin());
      } else {
        std::fill(S.begin(), S.end(), acc_t(0));
      }
      for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * C, n = std::min(C, seq.len - t0);
        L.rotary.angles(seq.pos0 + t0, n, b.angles);
        b.template load_qk<scalar_t>(L, q_sh, t0, n, scale, b.Q);
        b.template load_qk<scalar_t>(L, k_sh, t0, n, 1.0, b.K);
        load_rows<scalar_t>(v_sh, t0, n, b.V.data());
        const acc_t* dO = chunk_dO(t0, n);
        const acc_t* A = A_of(c);
        const acc_t* dA = dA_of(c);
        if (!fused) {  // the raw backward's forward sweep had no use for the scores
          gemm<acc_t>(false, true, n, n, d.dk, 1, b.Q.data(), d.dk, b.K.data(), d.dk, 0,
                      b.A.data(), n);
          dec.causal(b.A.data(), n);
        }
        // dK
        gemm<acc_t>(true, false, n, d.dk, n, 1, dA, n, b.Q.data(), d.dk, 0, b.Rk.data(), d.dk);
        dec.by_key_decay(b.V.data(), n, d.dv, b.Tv.data());
        gemm<acc_t>(false, true, n, d.dk, d.dv, 1, b.Tv.data(), d.dv, S.data(), d.dv, 1,
                    b.Rk.data(), d.dk);
        L.rotary.rotate(b.Rk.data(), d.dk, n, b.angles, 0, true);
        store_rows<scalar_t>(b.Rk.data(), t0, n, dk_sh);
        // dV
        gemm<acc_t>(true, false, n, d.dv, n, 1, A, n, dO, d.dv, 0, b.Rv.data(), d.dv);
        dec.by_key_decay(b.K.data(), n, d.dk, b.Tk.data());
        gemm<acc_t>(false, false, n, d.dv, d.dk, 1, b.Tk.data(), d.dk, S.data(), d.dv, 1,
                    b.Rv.data(), d.dv);
        store_rows<scalar_t>(b.Rv.data(), t0, n, dv_sh);
        // dS for the previous chunk
        dec.decay_state(S.data(), d.dk * d.dv, n);
        dec.by_query_decay(b.Q.data(), n, d.dk, b.Tk.data());
        gemm<acc_t>(true, false, d.dk, d.dv, n, 1, b.Tk.data(), d.dk, dO, d.dv, 1, S.data(),
                    d.dv);
      }
      auto dS_out = dS0.select(0, s).select(0, h);
      std::copy(S.begin(), S.end(), dS_out.data_ptr<acc_t>());
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

// The layer of a call whose inputs are a.q, a.g (msr_step: their [B, 1, H, d] forms).
Layer make_layer(const Dims& d, const MsrArgs& a, bool token_loop) {
  const auto acc = state_dtype(a.q.scalar_type());
  const MsrOptions& o = a.opt;
  Layer L{make_sequences(d.B, d.T, has(a.cu_seqlens) ? *a.cu_seqlens : at::Tensor(),
                         has(a.offsets) ? *a.offsets : at::Tensor()),
          RotaryTable(o.rotary, d.dk),
          Epilogue{o.decay_norm, o.norm, o.eps, has(a.g)},
          has(a.g) ? a.g->detach() : at::Tensor(),
          has(a.norm_weight) && o.norm ? a.norm_weight->detach().to(acc).contiguous() : at::Tensor()};
  if (token_loop) L.rotary.tabulate(L.seqs);
  return L;
}

MsrForwardResult msr_forward_cpu(const MsrArgs& a) {
  const char* op = op_name("retention::msr_forward");
  const auto m = check_msr_inputs(op, a);
  check_msr_values(op, m.d.T, a.cu_seqlens);
  const auto& d = m.d;
  const at::Tensor& q = a.q;
  const Form form = a.opt.form;
  // Outputs first: a T beyond memory fails here with the allocator's clear message (bytes asked),
  // not inside the layer's per-row tables.
  auto y = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  auto state = new_state(m.N, d, q, a.initial_state);
  const auto L = make_layer(d, a, form == Form::Recurrent);
  const auto log_gamma = log_decay_values(a.log_decay);
  const double scale = *a.opt.scale;
  RETENTION_DISPATCH_FLOATS(q.scalar_type(), "msr_forward", [&] {
    if (form == Form::Recurrent) {
      recurrent_impl<scalar_t>(d, L, q.detach(), a.k.detach(), a.v.detach(), log_gamma, scale, y,
                               state);
    } else {
      const int64_t C = form == Form::Parallel ? std::max<int64_t>(1, d.T) : a.opt.chunk_size;
      chunk_forward_impl<scalar_t>(d, L, q.detach(), a.k.detach(), a.v.detach(), log_gamma, scale,
                                   C, y, state);
    }
  });
  return {y, state};
}

MsrBackwardResult msr_backward_cpu(const MsrArgs& a) {
  const char* op = op_name("retention::msr_backward");
  const auto m = check_msr_inputs(op, a);
  check_msr_grads(op, m, a);
  check_msr_values(op, m.d.T, a.cu_seqlens);
  const auto& d = m.d;
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  auto dq = at::empty_like(q, at::MemoryFormat::Contiguous);  // (allocated first, as in forward)
  auto dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  auto dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  const auto L = make_layer(d, a, /*token_loop=*/false);
  auto dg = has(a.g) ? at::empty_like(*a.g, at::MemoryFormat::Contiguous) : at::Tensor();
  // The kernel writes every row of every sequence; rows outside every packed sequence (none
  // when cu_seqlens covers T) get zero gradients.
  if (has(a.cu_seqlens)) {
    for (auto* t : {&dq, &dk, &dv, &dg}) {
      if (t->defined()) t->zero_();
    }
  }
  auto S0 = new_state(m.N, d, q, a.initial_state);
  auto dS0 = at::empty_like(S0);
  auto dw_partial = L.weight.defined() ? at::zeros({m.N * d.H, d.dv}, S0.options()) : at::Tensor();
  RETENTION_DISPATCH_FLOATS(q.scalar_type(), "msr_backward", [&] {
    chunk_backward_impl<scalar_t>(d, L, a.grad_y.detach().to(q.scalar_type()), q.detach(),
                                  k.detach(), v.detach(), log_decay_values(a.log_decay),
                                  *a.opt.scale, a.opt.chunk_size, S0, a.grad_final_state, dq, dk,
                                  dv, dS0, dg, dw_partial);
  });
  at::Tensor dw;
  if (dw_partial.defined()) dw = dw_partial.sum(0).to(a.norm_weight->scalar_type());
  return {dq, dk, dv, dg, dS0, dw};
}

at::Tensor msr_step_cpu(const MsrArgs& a) {
  const char* op = op_name("retention::msr_step");
  const MsrArgs s = msr_step_form(op, a, as_single_step);
  const auto m = check_msr_inputs(op, s, "state");
  check_msr_step_state(op, a);
  const auto& d = m.d;
  const auto L = make_layer(d, s, /*token_loop=*/true);
  auto y = at::empty({d.B, 1, d.H, d.dv}, a.q.options());
  RETENTION_DISPATCH_FLOATS(a.q.scalar_type(), "msr_step", [&] {
    recurrent_impl<scalar_t>(d, L, s.q.detach(), s.k.detach(), s.v.detach(),
                             log_decay_values(a.log_decay), *a.opt.scale, y, a.state);
  });
  return a.q.dim() == 3 ? y.squeeze(1) : y;
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, CPU, m) {
  m.impl("msr_forward", msr_forward_kernel<&msr_forward_cpu>);
  m.impl("msr_backward", msr_backward_kernel<&msr_backward_cpu>);
  m.impl("msr_step", msr_step_kernel<&msr_step_cpu>);
  m.impl("matvec", &detail::matvec_cpu);
}

}  // namespace retention
