// What a fused MSR layer adds around the retention on the CPU (contract: retention.h): the
// sequences of a (possibly packed) batch, the rotation applied to q/k rows as they are loaded,
// and the per-row epilogue (decay normaliser, RMSNorm, swish gate) with its backward.
// Everything works on one row at a time in the accumulation type, so the rotated q/k and the raw
// retention output only ever exist in the small per-segment buffers of the kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "cpu/vector_exp.h"
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

// Rotation of q/k rows by p * theta_i, cos/sin in float64 (a float32 product p*theta is off by
// ~p * 6e-8 rad: 5e-4 at p = 8192). The chunk kernels fill the angles of one chunk's positions
// (`angles`) and rotate its q, k rows and gradients with them; the token loops read a table of
// every row of the call (`tabulate`), since one token per call would otherwise pay the
// trigonometry once per head.
class RotaryTable {
 public:
  // cos/sin [rows, dk/2] of consecutive positions, computed in float64 and stored as T (the
  // rotation's arithmetic type: rounding them once here is what the rotation did at each use).
  template <typename T>
  struct Angles {
    std::vector<T> cos, sin;
  };

  RotaryTable(Rotary kind, int64_t dk) : kind_(kind), half_(dk / 2) {
    if (kind_ == Rotary::None) return;
    theta_.resize(half_);
    for (int64_t i = 0; i < half_; ++i) {
      theta_[i] = kind_ == Rotary::Torchscale
                      // torchscale: 1 / 10000^linspace(0, 1, dk/2)
                      ? (half_ == 1 ? 1.0 : std::pow(10000.0, -double(i) / double(half_ - 1)))
                      // GPT-NeoX / FLA: 10000^(-2i/dk)
                      : std::pow(10000.0, -2.0 * double(i) / double(2 * half_));
      step_cos_.push_back(std::cos(theta_[i]));
      step_sin_.push_back(std::sin(theta_[i]));
    }
  }

  bool active() const { return kind_ != Rotary::None; }

  // Angles of positions p0 .. p0 + rows - 1. With `exact`, std::cos/std::sin of every angle (the
  // token loops: a step at position p gives the same bits as the recurrent form over the
  // sequence). Otherwise (the chunk kernels) one std::cos/std::sin per frequency every 64 rows and
  // angle-addition steps in float64 in between: the steps add ~2^-53 relative error per row, far
  // below fp32 and the fp64 tests' tolerances, and the trigonometry becomes a small part of the
  // rotation.
  template <typename T>
  void angles(int64_t p0, int64_t rows, Angles<T>& a, bool exact = false) const {
    if (!active()) return;
    a.cos.resize(rows * half_);
    a.sin.resize(rows * half_);
    constexpr int64_t kExact = 64;
    std::vector<double> c(half_), s(half_);
    for (int64_t r = 0; r < rows; ++r) {
      if (exact || r % kExact == 0) {
        for (int64_t i = 0; i < half_; ++i) {
          c[i] = std::cos(double(p0 + r) * theta_[i]);
          s[i] = std::sin(double(p0 + r) * theta_[i]);
        }
      } else {
        for (int64_t i = 0; i < half_; ++i) {
          const double ci = c[i] * step_cos_[i] - s[i] * step_sin_[i];
          s[i] = s[i] * step_cos_[i] + c[i] * step_sin_[i];
          c[i] = ci;
        }
      }
      for (int64_t i = 0; i < half_; ++i) {
        a.cos[r * half_ + i] = static_cast<T>(c[i]);
        a.sin[r * half_ + i] = static_cast<T>(s[i]);
      }
    }
  }

  // The table of every row of `seqs` (for the token loops, apply()).
  void tabulate(const std::vector<Sequence>& seqs) {
    if (!active()) return;
    int64_t rows = 0;
    for (const auto& s : seqs) {
      base_.push_back(rows);
      rows += s.len;
    }
    table_.cos.resize(rows * half_);
    table_.sin.resize(rows * half_);
    Angles<double> a;
    for (size_t s = 0; s < seqs.size(); ++s) {
      angles(seqs[s].pos0, seqs[s].len, a, /*exact=*/true);
      std::copy(a.cos.begin(), a.cos.end(), table_.cos.begin() + base_[s] * half_);
      std::copy(a.sin.begin(), a.sin.end(), table_.sin.begin() + base_[s] * half_);
    }
  }

  // Rotates `rows` rows (row stride `ld`) with angles rows first.. of `a`; the transpose
  // (rotation by -angle) when `inverse`, which maps gradients back to the inputs.
  template <typename T, typename A>
  void rotate(T* x, int64_t ld, int64_t rows, const Angles<A>& a, int64_t first,
              bool inverse) const {
    if (kind_ == Rotary::None) return;
    const T sign = inverse ? T(-1) : T(1);
    for (int64_t r = 0; r < rows; ++r) {
      const A* c = &a.cos[(first + r) * half_];
      const A* s = &a.sin[(first + r) * half_];
      T* row = x + r * ld;
      // One loop per layout, so each vectorises: torchscale rotates interleaved pairs
      // (x_2i, x_2i+1), NeoX the halves (x_i, x_i+dk/2).
      if (kind_ == Rotary::Torchscale) {
        for (int64_t i = 0; i < half_; ++i) {
          const T ci = static_cast<T>(c[i]), si = sign * static_cast<T>(s[i]);
          const T u = row[2 * i], w = row[2 * i + 1];
          row[2 * i] = u * ci - w * si;
          row[2 * i + 1] = w * ci + u * si;
        }
      } else {
        T* lo = row;
        T* hi = row + half_;
        for (int64_t i = 0; i < half_; ++i) {
          const T ci = static_cast<T>(c[i]), si = sign * static_cast<T>(s[i]);
          const T u = lo[i], w = hi[i];
          lo[i] = u * ci - w * si;
          hi[i] = w * ci + u * si;
        }
      }
    }
  }

  // Rotates rows first_row.. of sequence `seq` of the tabulated call.
  template <typename T>
  void apply(T* x, int64_t ld, size_t seq, int64_t first_row, int64_t rows, bool inverse) const {
    if (kind_ == Rotary::None) return;
    rotate(x, ld, rows, table_, base_[seq] + first_row, inverse);
  }

 private:
  Rotary kind_;
  int64_t half_;
  std::vector<double> theta_, step_cos_, step_sin_;  // theta_i, cos/sin(theta_i)
  std::vector<int64_t> base_;
  Angles<double> table_;
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
  static constexpr int64_t kBlock = 64;  // values per pass of the gate's loops (stack buffers)

  bool decay_norm = false;
  bool norm = false;
  double eps = 0.0;
  bool gate = false;

  bool identity() const { return !decay_norm && !norm && !gate; }

  // sum_j x[j] y[j] in eight interleaved partial sums: one chain of n dependent adds (the order
  // strict IEEE code must keep) waits on the add latency at every value.
  template <typename acc_t>
  static acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
    constexpr int64_t kLanes = 8;
    acc_t part[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int64_t i = 0; i < kLanes; ++i) part[i] += x[j + i] * y[j + i];
    }
    for (int64_t i = 0; j < n; ++i, ++j) part[i] += x[j] * y[j];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }

  // n values at stride `stride` in the accumulation type.
  template <typename scalar_t, typename acc_t>
  static void load_block(const scalar_t* x, int64_t stride, int64_t n, acc_t* out) {
    if (stride == 1) {
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(x[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(x[j * stride]);
    }
  }

  // u: the raw retention row (overwritten); g, y: rows with element stride gs, ys; w: [dv] or null.
  template <typename scalar_t, typename acc_t>
  void forward(acc_t* u, int64_t dv, double alpha, const scalar_t* g, int64_t gs, const acc_t* w,
               scalar_t* y, int64_t ys) const {
    const acc_t a = static_cast<acc_t>(alpha);
    for (int64_t j = 0; j < dv; ++j) u[j] *= a;
    if (norm) {
      const acc_t ss = dot(u, u, dv);
      const acc_t r = acc_t(1) / std::sqrt(ss / acc_t(dv) + static_cast<acc_t>(eps));
      for (int64_t j = 0; j < dv; ++j) u[j] *= w ? r * w[j] : r;
    }
    if (gate) {
      acc_t gb[kBlock], eb[kBlock];
      for (int64_t j0 = 0; j0 < dv; j0 += kBlock) {
        const int64_t n = std::min(kBlock, dv - j0);
        load_block(g + j0 * gs, gs, n, gb);
        // exp() on its own, so the loop of divides below vectorises.
        detail::exp_neg(gb, eb, n);
        for (int64_t j = 0; j < n; ++j) u[j0 + j] *= gb[j] / (acc_t(1) + eb[j]);
      }
    }
    if (ys == 1) {
      for (int64_t j = 0; j < dv; ++j) y[j] = static_cast<scalar_t>(u[j]);
    } else {
      for (int64_t j = 0; j < dv; ++j) y[j * ys] = static_cast<scalar_t>(u[j]);
    }
  }

  // Gradient of forward() w.r.t. u (written to du), g (dg row) and w (accumulated into dw),
  // recomputing the forward values from the raw row u. tmp: dv scratch values.
  template <typename scalar_t, typename acc_t>
  void backward(const acc_t* u, int64_t dv, double alpha, const scalar_t* dy, int64_t dys,
                const scalar_t* g, int64_t gs, const acc_t* w, acc_t* du, scalar_t* dg,
                int64_t dgs, acc_t* dw, acc_t* nhat) const {
    const acc_t a = static_cast<acc_t>(alpha);
    for (int64_t j = 0; j < dv; ++j) nhat[j] = a * u[j];  // the forward's scaled row
    acc_t r = 1;
    if (norm) {
      const acc_t ss = dot(nhat, nhat, dv);  // the forward's sum, in its order
      r = acc_t(1) / std::sqrt(ss / acc_t(dv) + static_cast<acc_t>(eps));
    }
    for (int64_t j = 0; j < dv; ++j) nhat[j] *= r;  // normalised, before the weight
    for (int64_t j0 = 0; j0 < dv; j0 += kBlock) {
      const int64_t n = std::min(kBlock, dv - j0);
      acc_t dz[kBlock], gb[kBlock], sig[kBlock];
      load_block(dy + j0 * dys, dys, n, dz);
      if (gate) {
        load_block(g + j0 * gs, gs, n, gb);
        detail::exp_neg(gb, sig, n);  // the same values as forward()
        for (int64_t j = 0; j < n; ++j) sig[j] = acc_t(1) / (acc_t(1) + sig[j]);
        for (int64_t j = 0; j < n; ++j) {
          const acc_t z = (norm && w) ? nhat[j0 + j] * w[j0 + j] : nhat[j0 + j];
          dg[(j0 + j) * dgs] =
              static_cast<scalar_t>(dz[j] * z * sig[j] * (acc_t(1) + gb[j] * (acc_t(1) - sig[j])));
          dz[j] *= gb[j] * sig[j];
        }
      }
      if (norm && w) {
        for (int64_t j = 0; j < n; ++j) {
          dw[j0 + j] += dz[j] * nhat[j0 + j];
          dz[j] *= w[j0 + j];
        }
      }
      for (int64_t j = 0; j < n; ++j) du[j0 + j] = dz[j];  // gradient w.r.t. the normalised row
    }
    if (norm) {
      const acc_t m = dot(du, nhat, dv) / acc_t(dv);
      for (int64_t j = 0; j < dv; ++j) du[j] = r * (du[j] - nhat[j] * m);
    }
    for (int64_t j = 0; j < dv; ++j) du[j] *= a;
  }
};

}  // namespace retention
