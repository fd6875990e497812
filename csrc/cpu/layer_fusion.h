// What a fused MSR layer adds around the retention on the CPU (contract: retention.h): the
// sequences of a (possibly packed) batch, the rotation applied to q/k rows as they are loaded,
// and the per-row epilogue (decay normaliser, RMSNorm, swish gate) with its backward.
// Everything works on one row at a time in the accumulation type, so the rotated q/k and the raw
// retention output only ever exist in the small per-segment buffers of the kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "retention/retention.h"

namespace retention {

// Rows [t0, t0 + len) of batch row b form one sequence whose first row sits at absolute
// position pos0. Its state is slot `index in the sequence list` of the [N, H, dk, dv] states.
struct Sequence {
  int64_t b, t0, len, pos0;
};

// Without cu_seqlens every batch row is a sequence; with it, batch row 0 holds N packed ones.
// Values were validated by the caller.
inline std::vector<Sequence> make_sequences(int64_t B, int64_t T, const at::Tensor& cu_seqlens,
                                            const at::Tensor& offsets) {
  std::vector<Sequence> seqs;
  auto pos0 = [&](int64_t s) { return offsets.defined() ? offsets[s].item<int64_t>() : 0; };
  if (!cu_seqlens.defined()) {
    for (int64_t b = 0; b < B; ++b) seqs.push_back({b, 0, T, pos0(b)});
  } else {
    auto cu = cu_seqlens.to(at::kLong).contiguous();
    const int64_t* c = cu.data_ptr<int64_t>();
    for (int64_t s = 0; s + 1 < cu.numel(); ++s) seqs.push_back({0, c[s], c[s + 1] - c[s], pos0(s)});
  }
  return seqs;
}

// cos/sin of p * theta_i for every row of every sequence, in float64 (a float32 product p*theta
// is off by ~p * 6e-8 rad: 5e-4 at p = 8192).
class RotaryTable {
 public:
  RotaryTable(Rotary kind, int64_t dk, const std::vector<Sequence>& seqs)
      : kind_(kind), half_(dk / 2) {
    if (kind_ == Rotary::None) return;
    std::vector<double> theta(half_);
    for (int64_t i = 0; i < half_; ++i) {
      theta[i] = kind_ == Rotary::Torchscale
                     // torchscale: 1 / 10000^linspace(0, 1, dk/2)
                     ? (half_ == 1 ? 1.0 : std::pow(10000.0, -double(i) / double(half_ - 1)))
                     // GPT-NeoX / FLA: 10000^(-2i/dk)
                     : std::pow(10000.0, -2.0 * double(i) / double(2 * half_));
    }
    int64_t rows = 0;
    for (const auto& s : seqs) {
      base_.push_back(rows);
      rows += s.len;
    }
    cos_.resize(rows * half_);
    sin_.resize(rows * half_);
    for (size_t s = 0; s < seqs.size(); ++s) {
      for (int64_t n = 0; n < seqs[s].len; ++n) {
        const double p = double(seqs[s].pos0 + n);
        double* c = &cos_[(base_[s] + n) * half_];
        double* sn = &sin_[(base_[s] + n) * half_];
        for (int64_t i = 0; i < half_; ++i) {
          c[i] = std::cos(p * theta[i]);
          sn[i] = std::sin(p * theta[i]);
        }
      }
    }
  }

  bool active() const { return kind_ != Rotary::None; }

  // Rotates `rows` rows (row stride `ld`) that are rows first_row.. of sequence `seq`; the
  // transpose (rotation by -angle) when `inverse`, which maps gradients back to the inputs.
  template <typename T>
  void apply(T* x, int64_t ld, size_t seq, int64_t first_row, int64_t rows, bool inverse) const {
    if (kind_ == Rotary::None) return;
    const T sign = inverse ? T(-1) : T(1);
    for (int64_t r = 0; r < rows; ++r) {
      const double* c = &cos_[(base_[seq] + first_row + r) * half_];
      const double* s = &sin_[(base_[seq] + first_row + r) * half_];
      T* row = x + r * ld;
      for (int64_t i = 0; i < half_; ++i) {
        // torchscale rotates interleaved pairs (x_2i, x_2i+1); NeoX the halves (x_i, x_i+dk/2).
        T& a = kind_ == Rotary::Torchscale ? row[2 * i] : row[i];
        T& b = kind_ == Rotary::Torchscale ? row[2 * i + 1] : row[i + half_];
        const T ci = static_cast<T>(c[i]), si = sign * static_cast<T>(s[i]);
        const T a0 = a, b0 = b;
        a = a0 * ci - b0 * si;
        b = b0 * ci + a0 * si;
      }
    }
  }

 private:
  Rotary kind_;
  int64_t half_;
  std::vector<int64_t> base_;
  std::vector<double> cos_, sin_;
};

// torchscale's decay normaliser 1/sqrt(S_{p+1}), S_j = (1 - gamma^j)/(1 - gamma), without
// cancellation for gamma -> 1 (expm1), S_j = j for gamma == 1 and 1 for gamma == 0.
inline double decay_normaliser(double log_gamma, int64_t p) {
  const double j = double(p + 1);
  const double s = log_gamma == 0.0 ? j : std::expm1(j * log_gamma) / std::expm1(log_gamma);
  return 1.0 / std::sqrt(s);
}

// Per-row epilogue y = silu(g) * RMSNorm(a * u) * w (each part optional), in the accumulation
// type acc_t; statistics over the dv values of one (token, head).
struct Epilogue {
  bool decay_norm = false;
  bool norm = false;
  double eps = 0.0;
  bool gate = false;

  bool identity() const { return !decay_norm && !norm && !gate; }

  // u: the raw retention row (overwritten); g, y: rows with element stride gs, ys; w: [dv] or null.
  template <typename scalar_t, typename acc_t>
  void forward(acc_t* u, int64_t dv, double alpha, const scalar_t* g, int64_t gs, const acc_t* w,
               scalar_t* y, int64_t ys) const {
    const acc_t a = static_cast<acc_t>(alpha);
    for (int64_t j = 0; j < dv; ++j) u[j] *= a;
    if (norm) {
      acc_t ss = 0;
      for (int64_t j = 0; j < dv; ++j) ss += u[j] * u[j];
      const acc_t r = acc_t(1) / std::sqrt(ss / acc_t(dv) + static_cast<acc_t>(eps));
      for (int64_t j = 0; j < dv; ++j) u[j] *= w ? r * w[j] : r;
    }
    if (gate) {
      for (int64_t j = 0; j < dv; ++j) {
        const acc_t gj = static_cast<acc_t>(g[j * gs]);
        u[j] *= gj / (acc_t(1) + std::exp(-gj));
      }
    }
    for (int64_t j = 0; j < dv; ++j) y[j * ys] = static_cast<scalar_t>(u[j]);
  }

  // Gradient of forward() w.r.t. u (written to du), g (dg row) and w (accumulated into dw),
  // recomputing the forward values from the raw row u. tmp: dv scratch values.
  template <typename scalar_t, typename acc_t>
  void backward(const acc_t* u, int64_t dv, double alpha, const scalar_t* dy, int64_t dys,
                const scalar_t* g, int64_t gs, const acc_t* w, acc_t* du, scalar_t* dg,
                int64_t dgs, acc_t* dw, acc_t* nhat) const {
    const acc_t a = static_cast<acc_t>(alpha);
    acc_t r = 1;
    if (norm) {
      acc_t ss = 0;
      for (int64_t j = 0; j < dv; ++j) ss += (a * u[j]) * (a * u[j]);
      r = acc_t(1) / std::sqrt(ss / acc_t(dv) + static_cast<acc_t>(eps));
    }
    for (int64_t j = 0; j < dv; ++j) nhat[j] = a * u[j] * r;  // normalised, before the weight
    for (int64_t j = 0; j < dv; ++j) {
      acc_t dz = static_cast<acc_t>(dy[j * dys]);
      if (gate) {
        const acc_t gj = static_cast<acc_t>(g[j * gs]);
        const acc_t sig = acc_t(1) / (acc_t(1) + std::exp(-gj));
        const acc_t z = (norm && w) ? nhat[j] * w[j] : nhat[j];
        dg[j * dgs] = static_cast<scalar_t>(dz * z * sig * (acc_t(1) + gj * (acc_t(1) - sig)));
        dz *= gj * sig;
      }
      if (norm && w) {
        dw[j] += dz * nhat[j];
        dz *= w[j];
      }
      du[j] = dz;  // gradient w.r.t. the normalised row
    }
    if (norm) {
      acc_t m = 0;
      for (int64_t j = 0; j < dv; ++j) m += du[j] * nhat[j];
      m /= acc_t(dv);
      for (int64_t j = 0; j < dv; ++j) du[j] = r * (du[j] - nhat[j] * m);
    }
    for (int64_t j = 0; j < dv; ++j) du[j] *= a;
  }
};

}  // namespace retention
