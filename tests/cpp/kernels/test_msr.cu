// GoogleTest tests of the fused MSR layer-core kernels (kernels/msr_*.cu), one source for nvcc
// and hipcc, linked into the same binary as test_kernels.cu.
//
// The reference is a plain float64 CPU evaluation written from the math of msr_kernels.h
// (rotation with float64 angles, token-by-token retention per sequence, decay normaliser,
// RMSNorm, swish gate; the backward as the epilogue backward followed by the reverse scan),
// computed from the *rounded* inputs.  The reference backward is itself checked against
// finite differences of the reference forward (host-only, always runs).  Outputs are poisoned
// with NaN before each launch; metric: relative RMS error plus finiteness.  GPU tests skip
// without a device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gpu_compat.h"
#include "kernel_test_util.h"
#include "msr_kernels.h"
#include "numeric.h"

namespace rk = retention::kernels;
namespace gpu = retention::gpu;

namespace {

using namespace kernel_test;

const char* dtype_name(rk::DType t) { return t == rk::DType::kF32 ? "f32" : t == rk::DType::kF16 ? "f16" : "bf16"; }
double tolerance(rk::DType t) { return t == rk::DType::kF32 ? 2e-4 : t == rk::DType::kF16 ? 1e-2 : 3e-2; }

std::vector<float> to_f32(const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); }

// ------------------------------------------------------------------------------------------
// Problem and float64 reference
// ------------------------------------------------------------------------------------------
struct Config {
  rk::DType dtype;
  int B, T, H, dk, dv;
  std::vector<std::int64_t> cu;  // empty: batch rows are the sequences
  int rotary;                    // 0 none, 1 torchscale, 2 neox
  bool norm, weight, gate, decay_norm, state;
  std::int64_t offset_base;      // offsets[s] = offset_base * (s + 1) (0: no offsets)
  bool cu_int32 = false;         // cu given to the kernels as int32 (FlashAttention's type), else int64
};

struct Msr {
  Config c;
  int N;
  double scale, eps = 1e-6;
  std::vector<double> q, k, v, g, w, log_decay, s0;
  std::vector<std::int64_t> offsets;

  std::size_t qi(int b, std::int64_t t, int h, int d) const { return ((std::size_t(b) * c.T + t) * c.H + h) * c.dk + d; }
  std::size_t vi(int b, std::int64_t t, int h, int d) const { return ((std::size_t(b) * c.T + t) * c.H + h) * c.dv + d; }
  std::size_t si(int s, int h) const { return (std::size_t(s) * c.H + h) * c.dk * c.dv; }
  // (batch row, first token, length) of sequence s.
  void span(int s, int& b, std::int64_t& t0, std::int64_t& len) const {
    if (c.cu.empty()) {
      b = s, t0 = 0, len = c.T;
    } else {
      b = 0, t0 = c.cu[s], len = c.cu[s + 1] - c.cu[s];
    }
  }
};

Msr make_msr(const Config& c, unsigned seed) {
  Msr m;
  m.c = c;
  m.N = c.cu.empty() ? c.B : static_cast<int>(c.cu.size()) - 1;
  m.scale = 1.0 / std::sqrt(double(c.dk));
  std::mt19937 gen(seed);
  std::normal_distribution<double> n01;
  auto fill = [&](std::vector<double>& x, std::size_t n, double s, double mean = 0) {
    x.resize(n);
    for (auto& e : x) e = mean + s * n01(gen);
  };
  fill(m.q, std::size_t(c.B) * c.T * c.H * c.dk, 1.0);
  fill(m.k, std::size_t(c.B) * c.T * c.H * c.dk, 1.0);
  fill(m.v, std::size_t(c.B) * c.T * c.H * c.dv, 1.0);
  fill(m.g, c.gate ? std::size_t(c.B) * c.T * c.H * c.dv : 0, 1.5);
  fill(m.w, c.weight ? c.dv : 0, 0.3, 1.0);
  fill(m.s0, c.state ? std::size_t(m.N) * c.H * c.dk * c.dv : 0, 0.5);
  for (int h = 0; h < c.H; ++h) m.log_decay.push_back(static_cast<float>(std::log1p(-std::ldexp(1.0, -5 - h))));
  if (c.offset_base != 0)
    for (int s = 0; s < m.N; ++s) m.offsets.push_back(c.offset_base * (s + 1));
  return m;
}

std::int64_t offset_of(const Msr& m, int s) { return m.offsets.empty() ? 0 : m.offsets[s]; }

// x' = R(p) x (inverse: R(p)^T x) for one head vector of length dk, float64 throughout.
void rotate(const Msr& m, std::int64_t pos, const double* x, double* out, bool inverse) {
  const int dk = m.c.dk, half = dk / 2;
  for (int d = 0; d < dk; ++d) out[d] = x[d];
  if (m.c.rotary == 0) return;
  for (int i = 0; i < half; ++i) {
    const int a = m.c.rotary == 1 ? 2 * i : i, b = m.c.rotary == 1 ? 2 * i + 1 : i + half;
    const double theta = m.c.rotary == 1 ? (half == 1 ? 1.0 : std::pow(10000.0, -double(i) / (half - 1)))
                                         : std::pow(10000.0, -2.0 * i / dk);
    const double cs = std::cos(pos * theta), sn = (inverse ? -1 : 1) * std::sin(pos * theta);
    out[a] = x[a] * cs - x[b] * sn;
    out[b] = x[b] * cs + x[a] * sn;
  }
}

struct Ref {
  std::vector<double> y, sT;                     // forward
  std::vector<double> dq, dk, dv, dg, ds0, dw;   // backward
};

// Forward (and, with dy, the backward) of the whole layer core in float64.
Ref reference(const Msr& m, const std::vector<double>* dy = nullptr, const std::vector<double>* dsT = nullptr) {
  const Config& c = m.c;
  const int dk = c.dk, dv = c.dv;
  Ref r;
  r.y.assign(m.v.size(), 0.0);
  r.sT.assign(std::size_t(m.N) * c.H * dk * dv, 0.0);
  if (dy) {
    r.dq.assign(m.q.size(), 0.0);
    r.dk.assign(m.k.size(), 0.0);
    r.dv.assign(m.v.size(), 0.0);
    r.dg.assign(m.g.size(), 0.0);
    r.ds0.assign(r.sT.size(), 0.0);
    r.dw.assign(c.weight ? dv : 0, 0.0);
  }
  for (int s = 0; s < m.N; ++s) {
    int b;
    std::int64_t t0, len;
    m.span(s, b, t0, len);
    for (int h = 0; h < c.H; ++h) {
      const double lg = m.log_decay[h], gamma = std::exp(lg);
      std::vector<double> qr(len * dk), kr(len * dk), du(len * dv, 0.0);
      for (std::int64_t n = 0; n < len; ++n) {
        rotate(m, offset_of(m, s) + n, &m.q[m.qi(b, t0 + n, h, 0)], &qr[n * dk], false);
        rotate(m, offset_of(m, s) + n, &m.k[m.qi(b, t0 + n, h, 0)], &kr[n * dk], false);
      }
      std::vector<double> S(dk * dv, 0.0), u(dv);
      if (c.state) std::copy(m.s0.begin() + m.si(s, h), m.s0.begin() + m.si(s, h) + dk * dv, S.begin());
      std::vector<std::vector<double>> states;  // S_n after token n (for dq)
      for (std::int64_t n = 0; n < len; ++n) {
        for (int i = 0; i < dk; ++i)
          for (int j = 0; j < dv; ++j) S[i * dv + j] = gamma * S[i * dv + j] + kr[n * dk + i] * m.v[m.vi(b, t0 + n, h, j)];
        if (dy) states.push_back(S);
        for (int j = 0; j < dv; ++j) {
          double acc = 0;
          for (int i = 0; i < dk; ++i) acc += qr[n * dk + i] * S[i * dv + j];
          u[j] = m.scale * acc;
        }
        // Epilogue.
        const std::int64_t jpos = offset_of(m, s) + n + 1;
        const double a = c.decay_norm ? 1.0 / std::sqrt(lg == 0 ? double(jpos) : std::expm1(jpos * lg) / std::expm1(lg)) : 1.0;
        double ms = 0;
        for (int j = 0; j < dv; ++j) ms += a * u[j] * a * u[j];
        const double rr = c.norm ? 1.0 / std::sqrt(ms / dv + m.eps) : 1.0;
        double mean_dn_nh = 0;
        std::vector<double> dz(dv);
        for (int j = 0; j < dv; ++j) {
          const double o = a * u[j], nh = o * rr, wj = c.weight ? m.w[j] : 1.0;
          const double z = c.norm ? nh * wj : o;
          const std::size_t yi = m.vi(b, t0 + n, h, j);
          const double gv = c.gate ? m.g[yi] : 0, sg = 1 / (1 + std::exp(-gv));
          r.y[yi] = c.gate ? gv * sg * z : z;
          if (dy) {
            const double d = (*dy)[yi];
            dz[j] = c.gate ? d * gv * sg : d;
            if (c.gate) r.dg[yi] = d * z * sg * (1 + gv * (1 - sg));
            if (c.norm && c.weight) r.dw[j] += dz[j] * nh;
            mean_dn_nh += dz[j] * wj * nh / dv;
          }
        }
        if (dy)
          for (int j = 0; j < dv; ++j) {
            const double o = a * u[j], nh = o * rr, wj = c.weight ? m.w[j] : 1.0;
            du[n * dv + j] = c.norm ? a * rr * (dz[j] * wj - nh * mean_dn_nh) : a * dz[j];
          }
      }
      std::copy(S.begin(), S.end(), r.sT.begin() + m.si(s, h));
      if (!dy) continue;
      // Retention backward with du: dq~_n = scale S_n du_n; reverse scan for dk~, dv, dS0.
      std::vector<double> U(dk * dv, 0.0), tmp(dk);
      if (dsT) std::copy(dsT->begin() + m.si(s, h), dsT->begin() + m.si(s, h) + dk * dv, U.begin());
      for (std::int64_t n = 0; n < len; ++n) {
        for (int i = 0; i < dk; ++i) {
          double acc = 0;
          for (int j = 0; j < dv; ++j) acc += states[n][i * dv + j] * du[n * dv + j];
          tmp[i] = m.scale * acc;
        }
        rotate(m, offset_of(m, s) + n, tmp.data(), &r.dq[m.qi(b, t0 + n, h, 0)], true);
      }
      for (std::int64_t n = len - 1; n >= 0; --n) {
        for (int i = 0; i < dk; ++i)
          for (int j = 0; j < dv; ++j) U[i * dv + j] += m.scale * qr[n * dk + i] * du[n * dv + j];
        for (int i = 0; i < dk; ++i) {
          double acc = 0;
          for (int j = 0; j < dv; ++j) acc += U[i * dv + j] * m.v[m.vi(b, t0 + n, h, j)];
          tmp[i] = acc;
        }
        rotate(m, offset_of(m, s) + n, tmp.data(), &r.dk[m.qi(b, t0 + n, h, 0)], true);
        for (int j = 0; j < dv; ++j) {
          double acc = 0;
          for (int i = 0; i < dk; ++i) acc += U[i * dv + j] * kr[n * dk + i];
          r.dv[m.vi(b, t0 + n, h, j)] = acc;
        }
        for (auto& x : U) x *= gamma;
      }
      std::copy(U.begin(), U.end(), r.ds0.begin() + m.si(s, h));
    }
  }
  return r;
}

// ------------------------------------------------------------------------------------------
// Host-only: the reference backward is the gradient of the reference forward.
// ------------------------------------------------------------------------------------------
TEST(MsrReference, BackwardMatchesFiniteDifferences) {
  for (int rotary : {1, 2}) {
    Config c{rk::DType::kF32, 1, 7, 2, 6, 5, {0, 3, 3, 7}, rotary, true, true, true, true, true, 1000};
    Msr m = make_msr(c, 3);
    std::mt19937 gen(5);
    std::normal_distribution<double> n01;
    std::vector<double> dy(m.v.size()), dsT(std::size_t(m.N) * c.H * c.dk * c.dv);
    for (auto& x : dy) x = n01(gen);
    for (auto& x : dsT) x = 0.3 * n01(gen);
    const Ref r = reference(m, &dy, &dsT);
    // loss = <dy, y> + <dsT, sT>
    auto loss = [&](const Msr& mm) {
      const Ref f = reference(mm);
      double l = 0;
      for (std::size_t i = 0; i < f.y.size(); ++i) l += dy[i] * f.y[i];
      for (std::size_t i = 0; i < f.sT.size(); ++i) l += dsT[i] * f.sT[i];
      return l;
    };
    auto check = [&](std::vector<double> Msr::*field, const std::vector<double>& grad, const char* what) {
      for (std::size_t i = 0; i < grad.size(); i += 3) {
        Msr p = m, n = m;
        const double e = 1e-6;
        (p.*field)[i] += e;
        (n.*field)[i] -= e;
        const double fd = (loss(p) - loss(n)) / (2 * e);
        ASSERT_NEAR(grad[i], fd, 1e-5 * (1 + std::fabs(fd))) << what << "[" << i << "] rotary " << rotary;
      }
    };
    check(&Msr::q, r.dq, "dq");
    check(&Msr::k, r.dk, "dk");
    check(&Msr::v, r.dv, "dv");
    check(&Msr::g, r.dg, "dg");
    check(&Msr::w, r.dw, "dw");
    check(&Msr::s0, r.ds0, "ds0");
  }
}

// Argument validation of the MSR launchers (host-only: nothing is launched).
TEST(MsrLaunchers, RejectBadArguments) {
  const float decay = -0.1f;
  int cu_dummy = 0;
  rk::MsrForwardParams f;
  f.shape = {2, 4, 1, 64, 8};
  f.log_decay = &decay;
  f.seq.num_sequences = 3;  // must equal B without cu_seqlens
  EXPECT_EQ(rk::launch_msr_forward(f), gpu::kErrorInvalidValue);
  f.seq.num_sequences = 2;
  f.seq.cu_seqlens = &cu_dummy;  // packed sequences need B == 1
  EXPECT_EQ(rk::launch_msr_forward(f), gpu::kErrorInvalidValue);
  f.seq.cu_seqlens = nullptr;
  f.shape.dk = 63;  // rotary needs an even dk
  EXPECT_EQ(rk::launch_msr_forward(f), gpu::kErrorInvalidValue);
  f.opt.rotary = static_cast<rk::RotaryMode>(5);
  f.shape.dk = 64;
  EXPECT_EQ(rk::launch_msr_forward(f), gpu::kErrorInvalidValue);
  f.opt.rotary = rk::RotaryMode::kTorchscale;
  f.shape.dk = 300;
  EXPECT_EQ(rk::launch_msr_forward(f), gpu::kErrorInvalidValue);
  f.shape.dk = 64;
  f.opt.norm = true;
  f.shape.dv = 432;  // the norm over several dv tiles: a statistics pass, which needs a workspace
  ASSERT_GT(rk::msr_forward_workspace_bytes(f), 0u);
  EXPECT_EQ(rk::launch_msr_forward(f), gpu::kErrorInvalidValue);  // no workspace
  f.shape.H = 0;
  EXPECT_EQ(rk::launch_msr_forward(f), gpu::kSuccess);

  rk::MsrBackwardParams b;
  b.shape = {1, 4, 1, 64, 8};
  b.log_decay = &decay;
  b.seq.num_sequences = 1;
  EXPECT_EQ(rk::launch_msr_backward(b), gpu::kErrorInvalidValue);  // no grad_initial_state / workspace
  b.seq.num_sequences = -1;
  EXPECT_EQ(rk::launch_msr_backward(b), gpu::kErrorInvalidValue);

  rk::MsrStepParams st;
  st.shape = {1, 1, 1, 64, rk::kMsrStepMaxDv + 1};
  st.log_decay = &decay;
  EXPECT_EQ(rk::launch_msr_step(st), gpu::kErrorInvalidValue);
  st.shape.dv = 8;
  st.shape.dk = 63;
  EXPECT_EQ(rk::launch_msr_step(st), gpu::kErrorInvalidValue);  // rotary with odd dk
  st.shape.dk = 64;
  EXPECT_EQ(rk::launch_msr_step(st), gpu::kErrorInvalidValue);  // no state / output
  float state = 0.f;
  unsigned char out[16];
  st.state = &state;
  st.o.ptr = out;
  ASSERT_GT(rk::msr_step_workspace_bytes(st), 0u);  // B H = 1 with the norm: a split head
  EXPECT_EQ(rk::launch_msr_step(st), gpu::kErrorInvalidValue);  // no workspace / counters
  st.shape.B = 0;
  EXPECT_EQ(rk::msr_step_workspace_bytes(st), 0u);
  EXPECT_EQ(rk::launch_msr_step(st), gpu::kSuccess);
}

// dk = 0: u = 0, so y = 0 (the norm of a zero row is zero), with no split to plan.
TEST(MsrLaunchers, StepWithEmptyKeyDimWritesZeros) {
  SKIP_WITHOUT_DEVICE();
  const float decay = -0.1f;
  const std::vector<float> v(8, 1.f);
  DeviceBuffer d_decay(sizeof decay), d_v(8 * sizeof(float)), y(8 * sizeof(float)), state(4);
  d_decay.upload(&decay);
  d_v.upload(v.data());
  y.poison();
  rk::MsrStepParams st;
  st.shape = {1, 1, 1, 0, 8};
  st.log_decay = d_decay.as<float>();
  st.state = state.as<float>();
  st.v.ptr = d_v.ptr;
  st.o.ptr = y.ptr;
  EXPECT_EQ(rk::msr_step_workspace_bytes(st), 0u);
  GPU_OK(rk::launch_msr_step(st));
  for (double x : decode(rk::DType::kF32, y.download())) EXPECT_EQ(x, 0.0);
}

// ------------------------------------------------------------------------------------------
// GPU tests
// ------------------------------------------------------------------------------------------
// Packed sequences for the int32 cu_seqlens cases: exactly 64 tokens, an empty sequence, a
// one-token one, one crossing chunk boundaries, and an empty last one; T = 131 is not a multiple
// of the chunk length.
const std::vector<std::int64_t> kCu131 = {0, 64, 64, 65, 131, 131};

std::vector<Config> configs() {
  using D = rk::DType;
  // Packed: an empty sequence, a one-token one, a boundary inside the first chunk (5), and
  // sequences crossing chunk boundaries.
  const std::vector<std::int64_t> cu = {0, 0, 1, 5, 70, 70, 150};
  std::vector<Config> out;
  for (D t : {D::kF32, D::kBF16}) {
    out.push_back({t, 1, 150, 2, 60, 432, cu, 1, true, true, true, true, true, 100000});    // dv over several tiles
    out.push_back({t, 1, 150, 2, 128, 432, cu, 2, true, false, true, false, true, 7});      // neox, dk = 128
    out.push_back({t, 2, 37, 3, 60, 48, {}, 1, true, true, false, true, false, 0});         // one dv tile: 1 pass
    out.push_back({t, 2, 70, 2, 128, 100, {}, 0, false, false, true, true, true, 3});       // no norm, no rotary
    // Every option off: the raw ops' path (forward without fusion, backward without its epilogue
    // passes, du = dy), over batch rows and over packed sequences.
    out.push_back({t, 2, 70, 3, 60, 100, {}, 0, false, false, false, false, true, 5});
    out.push_back({t, 1, 150, 2, 128, 432, cu, 0, false, false, false, false, true, 0});
  }
  out.push_back({D::kF16, 1, 150, 2, 128, 432, cu, 1, true, true, true, true, true, 1 << 20});
  // int32 cu_seqlens: all epilogue options with dv over several tiles, the neox / dk = 128 path
  // on the packing above, and every option off.
  out.push_back({D::kBF16, 1, 131, 2, 60, 432, kCu131, 1, true, true, true, true, true, 1000, true});
  out.push_back({D::kF32, 1, 150, 2, 128, 100, cu, 2, true, false, true, false, true, 7, true});
  out.push_back({D::kF16, 1, 131, 2, 64, 48, kCu131, 0, false, false, false, false, false, 0, true});
  return out;
}

std::string config_name(const testing::TestParamInfo<Config>& info) {
  const Config& c = info.param;
  return std::string(dtype_name(c.dtype)) + "_B" + std::to_string(c.B) + "_T" + std::to_string(c.T) + "_dk" +
         std::to_string(c.dk) + "_dv" + std::to_string(c.dv) + (c.cu.empty() ? "" : "_varlen") + "_rot" +
         std::to_string(c.rotary) + (c.norm ? "_norm" : "") + (c.weight ? "w" : "") + (c.gate ? "_gate" : "") +
         (c.decay_norm ? "_dn" : "") + (c.state ? "_h0" : "") + (c.cu_int32 ? "_cu32" : "");
}

rk::Bthd bthd(void* p, const Config& c, int d) {
  rk::Bthd x;
  x.ptr = p;
  x.stride_h = d;
  x.stride_t = std::int64_t(c.H) * d;
  x.stride_b = std::int64_t(c.T) * c.H * d;
  return x;
}

// Device copies of one problem.
struct DeviceMsr {
  DeviceBuffer q, k, v, g, w, decay, s0, cu, offsets;
  DeviceMsr(Msr& m)
      : q(m.q.size() * elem_size(m.c.dtype)), k(m.k.size() * elem_size(m.c.dtype)),
        v(m.v.size() * elem_size(m.c.dtype)), g(m.g.size() * elem_size(m.c.dtype)), w(m.w.size() * 4),
        decay(m.log_decay.size() * 4), s0(m.s0.size() * 4), cu(m.c.cu.size() * (m.c.cu_int32 ? 4 : 8)),
        offsets(m.offsets.size() * 8) {
    q.upload(encode(m.c.dtype, m.q).data());
    k.upload(encode(m.c.dtype, m.k).data());
    v.upload(encode(m.c.dtype, m.v).data());
    if (!m.g.empty()) g.upload(encode(m.c.dtype, m.g).data());
    for (auto& x : m.w) x = static_cast<float>(x);
    for (auto& x : m.s0) x = static_cast<float>(x);
    if (!m.w.empty()) w.upload(to_f32(m.w).data());
    decay.upload(to_f32(m.log_decay).data());
    if (!m.s0.empty()) s0.upload(to_f32(m.s0).data());
    if (!m.c.cu.empty() && m.c.cu_int32) {
      const std::vector<std::int32_t> cu32(m.c.cu.begin(), m.c.cu.end());
      cu.upload(cu32.data());
    } else if (!m.c.cu.empty()) {
      cu.upload(m.c.cu.data());
    }
    if (!m.offsets.empty()) offsets.upload(m.offsets.data());
  }
  rk::MsrSequences seq(const Msr& m) const {
    rk::MsrSequences s;
    s.cu_seqlens = m.c.cu.empty() ? nullptr : cu.ptr;
    s.cu_seqlens_int64 = !m.c.cu_int32;
    s.num_sequences = m.N;
    s.offsets = m.offsets.empty() ? nullptr : offsets.as<std::int64_t>();
    return s;
  }
  rk::MsrOptions opt(const Msr& m) const {
    rk::MsrOptions o;
    o.rotary = static_cast<rk::RotaryMode>(m.c.rotary);
    o.norm = m.c.norm;
    o.norm_weight = m.c.weight ? w.as<float>() : nullptr;
    o.eps = static_cast<float>(m.eps);
    o.decay_norm = m.c.decay_norm;
    return o;
  }
};

class MsrKernels : public testing::TestWithParam<Config> {};

struct MsrForwardOut {
  std::vector<double> y, sT;
  std::size_t workspace_bytes;
};

// The forward of m on its device copies d, writing y and the final state to the given buffers
// (no workspace yet).
rk::MsrForwardParams forward_params(const Msr& m, const DeviceMsr& d, void* y, float* final_state) {
  const Config& c = m.c;
  rk::MsrForwardParams p;
  p.dtype = c.dtype;
  p.shape = {c.B, c.T, c.H, c.dk, c.dv};
  p.q = bthd(d.q.ptr, c, c.dk);
  p.k = bthd(d.k.ptr, c, c.dk);
  p.v = bthd(d.v.ptr, c, c.dv);
  if (c.gate) p.g = bthd(d.g.ptr, c, c.dv);
  p.o = bthd(y, c, c.dv);
  p.log_decay = d.decay.as<float>();
  p.scale = static_cast<float>(m.scale);
  p.seq = d.seq(m);
  p.opt = d.opt(m);
  p.initial_state = c.state ? d.s0.as<float>() : nullptr;
  p.final_state = final_state;
  return p;
}

// One msr_forward launch on m (inputs already rounded by DeviceMsr d); split as
// MsrForwardParams::split (-1 automatic, 0 off, n segments).
MsrForwardOut run_msr_forward(const Msr& m, const DeviceMsr& d, int split = -1) {
  const Config& c = m.c;
  DeviceBuffer y(m.v.size() * elem_size(c.dtype)), sT(std::size_t(m.N) * c.H * c.dk * c.dv * 4);
  y.poison();
  sT.poison();

  rk::MsrForwardParams p = forward_params(m, d, y.ptr, sT.as<float>());
  p.split = split;
  DeviceBuffer ws(rk::msr_forward_workspace_bytes(p));
  p.workspace = ws.ptr;
  EXPECT_EQ(rk::launch_msr_forward(p), gpu::kSuccess);
  EXPECT_EQ(gpu::synchronize(), gpu::kSuccess);
  return {decode(c.dtype, y.download()), sT.download_f32(), ws.bytes};
}

TEST_P(MsrKernels, ForwardMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  Msr m = make_msr(GetParam(), 11);
  DeviceMsr d(m);  // rounds m's inputs to the element type
  const Ref ref = reference(m);
  const MsrForwardOut out = run_msr_forward(m, d);
  expect_close(out.y, ref.y, tolerance(m.c.dtype), "y");
  expect_close(out.sT, ref.sT, tolerance(m.c.dtype), "final_state");
}

// The sequence split forced on in the fused forward, against the float64 reference and the
// unsplit launch (the same bounds and reasoning as ChunkForwardSplit in test_kernels.cu): packed
// sequences of different lengths (segments of ceil(T / n) tokens of each sequence: the short
// ones end in empty segments, the empty one has none), positions offset (the rotary angle and
// the decay normaliser of a segment start where it starts), dv over several tiles (statistics
// pass, split too) and a single tile (norm in registers).
struct SplitCase {
  Config c;
  int segments;
  std::string trace() const {
    return std::string(dtype_name(c.dtype)) + " T=" + std::to_string(c.T) + " dv=" + std::to_string(c.dv) +
           " segments=" + std::to_string(segments) + (c.cu_int32 ? " cu32" : "");
  }
};

TEST(MsrForwardSplit, MatchesUnsplitAndReference) {
  SKIP_WITHOUT_DEVICE();
  using D = rk::DType;
  using Case = SplitCase;
  const std::vector<std::int64_t> cu = {0, 0, 1, 5, 70, 70, 150};
  for (const Case& k : {Case{{D::kF32, 1, 150, 2, 60, 432, cu, 1, true, true, true, true, true, 1000}, 3},
                        Case{{D::kBF16, 1, 150, 2, 128, 100, cu, 2, true, false, true, false, false, 7}, 4},
                        Case{{D::kF16, 2, 137, 3, 60, 48, {}, 1, true, true, false, true, true, 0}, 5},
                        Case{{D::kF32, 2, 70, 2, 64, 40, {}, 0, false, false, true, false, true, 0}, 2},
                        Case{{D::kBF16, 1, 131, 2, 60, 432, kCu131, 1, true, true, true, true, true, 1000, true}, 3}}) {
    const Config& c = k.c;
    SCOPED_TRACE(k.trace());
    Msr m = make_msr(c, 15);
    DeviceMsr d(m);
    const Ref ref = reference(m);
    const MsrForwardOut off = run_msr_forward(m, d, 0);
    const MsrForwardOut on = run_msr_forward(m, d, k.segments);
    EXPECT_EQ(on.workspace_bytes - off.workspace_bytes, std::size_t(k.segments - 1) * m.N * c.H * c.dk * c.dv * 4);
    expect_close(on.y, ref.y, tolerance(c.dtype), "y (split)");
    expect_close(on.sT, ref.sT, tolerance(c.dtype), "final_state (split)");
    expect_close(on.y, off.y, tolerance(c.dtype), "y (split vs unsplit)");
    expect_close(on.sT, off.sT, tolerance(c.dtype), "final_state (split vs unsplit)");
  }
}

// Device outputs of one msr_backward launch (raw bytes, for bit-exact comparisons).
struct MsrGrads {
  std::vector<unsigned char> dq, dk, dv, dg, ds0, dw;
};

// Runs msr_backward on m (inputs already rounded by DeviceMsr d) with the given dy / dsT
// (rounded here: dy to the input type in place, dsT to fp32 in place).
MsrGrads run_msr_backward(Msr& m, const DeviceMsr& d, std::vector<double>& dy, std::vector<double>& dsT,
                          int split = -1) {
  const Config& c = m.c;
  for (auto& x : dsT) x = static_cast<float>(x);
  DeviceBuffer gy(dy.size() * elem_size(c.dtype)), gsT(dsT.size() * 4);
  gy.upload(encode(c.dtype, dy).data());
  gsT.upload(to_f32(dsT).data());

  const std::size_t es = elem_size(c.dtype);
  DeviceBuffer dq(m.q.size() * es), dk(m.k.size() * es), dv(m.v.size() * es), dg(m.g.size() * es),
      ds0(dsT.size() * 4), dw(m.w.size() * 4);
  for (DeviceBuffer* b : {&dq, &dk, &dv, &dg, &ds0, &dw}) b->poison();

  rk::MsrBackwardParams p;
  p.dtype = c.dtype;
  p.shape = {c.B, c.T, c.H, c.dk, c.dv};
  p.q = bthd(d.q.ptr, c, c.dk);
  p.k = bthd(d.k.ptr, c, c.dk);
  p.v = bthd(d.v.ptr, c, c.dv);
  if (c.gate) {
    p.g = bthd(d.g.ptr, c, c.dv);
    p.grad_g = bthd(dg.ptr, c, c.dv);
  }
  p.grad_o = bthd(gy.ptr, c, c.dv);
  p.log_decay = d.decay.as<float>();
  p.scale = static_cast<float>(m.scale);
  p.seq = d.seq(m);
  p.opt = d.opt(m);
  p.initial_state = c.state ? d.s0.as<float>() : nullptr;
  p.grad_final_state = c.state ? gsT.as<float>() : nullptr;
  p.grad_q = bthd(dq.ptr, c, c.dk);
  p.grad_k = bthd(dk.ptr, c, c.dk);
  p.grad_v = bthd(dv.ptr, c, c.dv);
  p.grad_initial_state = ds0.as<float>();
  p.grad_norm_weight = c.norm && c.weight ? dw.as<float>() : nullptr;
  p.split = split;
  DeviceBuffer ws(rk::msr_backward_workspace_bytes(p));
  p.workspace = ws.ptr;
  EXPECT_EQ(rk::launch_msr_backward(p), gpu::kSuccess);
  EXPECT_EQ(gpu::synchronize(), gpu::kSuccess);
  return {dq.download(), dk.download(), dv.download(), dg.download(), ds0.download(), dw.download()};
}

// Random dy and (with a state) dsT for m.
void random_cotangents(const Msr& m, std::vector<double>& dy, std::vector<double>& dsT) {
  std::mt19937 gen(9);
  std::normal_distribution<double> n01;
  dy.resize(m.v.size());
  dsT.resize(std::size_t(m.N) * m.c.H * m.c.dk * m.c.dv);
  for (auto& x : dy) x = n01(gen);
  for (auto& x : dsT) x = m.c.state ? 0.1 * n01(gen) : 0.0;
}

void expect_grads_close(const Msr& m, const MsrGrads& got, const Ref& ref) {
  const Config& c = m.c;
  const double tol = 2 * tolerance(c.dtype);
  expect_close(decode(c.dtype, got.dq), ref.dq, tol, "grad_q");
  expect_close(decode(c.dtype, got.dk), ref.dk, tol, "grad_k");
  expect_close(decode(c.dtype, got.dv), ref.dv, tol, "grad_v");
  if (c.gate) expect_close(decode(c.dtype, got.dg), ref.dg, tol, "grad_g");
  expect_close(decode(rk::DType::kF32, got.ds0), ref.ds0, tol, "grad_initial_state");
  if (c.norm && c.weight) expect_close(decode(rk::DType::kF32, got.dw), ref.dw, tol, "grad_norm_weight");
}

TEST_P(MsrKernels, BackwardMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  Msr m = make_msr(GetParam(), 12);
  DeviceMsr d(m);
  std::vector<double> dy, dsT;
  random_cotangents(m, dy, dsT);
  const MsrGrads got = run_msr_backward(m, d, dy, dsT);
  expect_grads_close(m, got, reference(m, &dy, &dsT));
}

// dq~ / dk~ are sums over dv tiles, reduced in a fixed order (chunk_bwd.cuh): two runs give the
// same bits (and runs under other emulated schedules / block orders the same digests, for every
// MsrKernels case).  fp32, dk = 128, dv = 432: 14 and 27 dv tiles in 7 partial slices, i.e.
// several tiles per slice.
TEST(MsrDeterminism, BackwardBitIdenticalRuns) {
  SKIP_WITHOUT_DEVICE();
  Msr m = make_msr(configs()[1], 14);
  DeviceMsr d(m);
  std::vector<double> dy, dsT;
  random_cotangents(m, dy, dsT);
  const MsrGrads a = run_msr_backward(m, d, dy, dsT);
  const MsrGrads b = run_msr_backward(m, d, dy, dsT);
  EXPECT_TRUE(a.dq == b.dq) << "grad_q differs between two runs";
  EXPECT_TRUE(a.dk == b.dk) << "grad_k differs between two runs";
  EXPECT_TRUE(a.dv == b.dv) << "grad_v differs between two runs";
  EXPECT_TRUE(a.dg == b.dg) << "grad_g differs between two runs";
  EXPECT_TRUE(a.ds0 == b.ds0) << "grad_initial_state differs between two runs";
  EXPECT_TRUE(a.dw == b.dw) << "grad_norm_weight differs between two runs";
}

// The sequence split forced on in the fused backward's sweeps (packed sequences with an empty
// and a one-token one, rotation, offsets, all epilogue features): against the float64
// reference with the bound of BackwardMatchesReference, and against the unsplit launch.
TEST(MsrBackwardSplit, MatchesUnsplitAndReference) {
  SKIP_WITHOUT_DEVICE();
  using D = rk::DType;
  using Case = SplitCase;
  const std::vector<std::int64_t> cu = {0, 0, 1, 5, 70, 70, 150};
  for (const Case& k : {Case{{D::kF32, 1, 150, 2, 60, 100, cu, 1, true, true, true, true, true, 1000}, 3},
                        Case{{D::kBF16, 2, 137, 2, 128, 48, {}, 2, true, false, true, false, true, 7}, 4},
                        Case{{D::kF32, 1, 131, 2, 60, 100, kCu131, 2, true, true, true, true, true, 7, true}, 3}}) {
    const Config& c = k.c;
    SCOPED_TRACE(k.trace());
    Msr m = make_msr(c, 16);
    DeviceMsr d(m);
    std::vector<double> dy, dsT;
    random_cotangents(m, dy, dsT);
    const MsrGrads off = run_msr_backward(m, d, dy, dsT, 0);
    const MsrGrads on = run_msr_backward(m, d, dy, dsT, k.segments);
    expect_grads_close(m, on, reference(m, &dy, &dsT));
    const double tol = 2 * tolerance(c.dtype);
    expect_close(decode(c.dtype, on.dq), decode(c.dtype, off.dq), tol, "grad_q (split vs unsplit)");
    expect_close(decode(c.dtype, on.dk), decode(c.dtype, off.dk), tol, "grad_k (split vs unsplit)");
    expect_close(decode(c.dtype, on.dv), decode(c.dtype, off.dv), tol, "grad_v (split vs unsplit)");
    expect_close(decode(D::kF32, on.ds0), decode(D::kF32, off.ds0), tol, "grad_initial_state (split vs unsplit)");
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, MsrKernels, testing::ValuesIn(configs()), config_name);

// Decode steps: step t of every batch row at position offsets[b] + t (token t of the inputs),
// against the reference of a T-token sequence with that offset (y of every token, the final
// state).  The workspace comes fresh (garbage) for every call; the counters are zeroed once
// before the first, as the glue does, and every call must leave them zero again.
struct StepRun {
  std::vector<unsigned char> y;
  std::vector<double> state;
  std::vector<unsigned> counters;
};

// The step's parameters for token t of every batch row of m, writing y and updating state;
// workspace and counters are the caller's (their size depends on the plan).
rk::MsrStepParams step_params(const Msr& m, const DeviceMsr& d, int t, const DeviceBuffer& y,
                              const DeviceBuffer& state, const std::int64_t* offsets) {
  const Config& c = m.c;
  const std::size_t es = elem_size(c.dtype);
  auto at = [&](const DeviceBuffer& buf, int dim) {
    return bthd(static_cast<unsigned char*>(buf.ptr) + std::size_t(t) * c.H * dim * es, c, dim);
  };
  rk::MsrStepParams p;
  p.dtype = c.dtype;
  p.shape = {c.B, 1, c.H, c.dk, c.dv};
  p.q = at(d.q, c.dk);
  p.k = at(d.k, c.dk);
  p.v = at(d.v, c.dv);
  if (c.gate) p.g = at(d.g, c.dv);
  p.o = at(y, c.dv);
  p.log_decay = d.decay.as<float>();
  p.scale = static_cast<float>(m.scale);
  p.state = state.as<float>();
  p.offsets = offsets;
  p.opt = d.opt(m);
  return p;
}

StepRun run_steps(const Msr& m, const DeviceMsr& d) {
  const Config& c = m.c;
  const std::size_t es = elem_size(c.dtype);
  DeviceBuffer y(m.v.size() * es), state(std::size_t(c.B) * c.H * c.dk * c.dv * 4);
  DeviceBuffer counters(rk::kMsrStepCounters * sizeof(unsigned));
  y.poison();
  if (c.state) {
    state.upload(to_f32(m.s0).data());
  } else {
    gpu::memset_device(state.ptr, 0, state.bytes);
  }
  gpu::memset_device(counters.ptr, 0, counters.bytes);
  for (int t = 0; t < c.T; ++t) {
    std::vector<std::int64_t> pos(c.B);
    for (int b = 0; b < c.B; ++b) pos[b] = offset_of(m, b) + t;
    DeviceBuffer offsets(pos.size() * 8);
    offsets.upload(pos.data());
    rk::MsrStepParams p =
        step_params(m, d, t, y, state, m.offsets.empty() && t == 0 ? nullptr : offsets.as<std::int64_t>());
    DeviceBuffer workspace(rk::msr_step_workspace_bytes(p));
    p.workspace = workspace.ptr;
    p.counters = counters.as<unsigned>();
    const OneLaunch one;
    const gpu::error_t err = rk::launch_msr_step(p);
    EXPECT_EQ(err, gpu::kSuccess) << gpu::error_string(err);
    one.check("msr_step");
    EXPECT_EQ(gpu::synchronize(), gpu::kSuccess);
  }
  StepRun r{y.download(), state.download_f32(), std::vector<unsigned>(rk::kMsrStepCounters)};
  gpu::copy_to_host(r.counters.data(), counters.ptr, counters.bytes);
  return r;
}

void expect_steps_match(const Config& cfg, unsigned seed) {
  Msr m = make_msr(cfg, seed);
  DeviceMsr d(m);
  const Ref ref = reference(m);
  const StepRun got = run_steps(m, d);
  expect_close(decode(cfg.dtype, got.y), ref.y, tolerance(cfg.dtype), "y");
  expect_close(got.state, ref.sT, 1e-5, "state");
  std::size_t nonzero = 0;
  for (unsigned x : got.counters) nonzero += x != 0;
  EXPECT_EQ(nonzero, 0u) << "step counters not restored to zero";
}

class MsrStep : public testing::TestWithParam<Config> {};

TEST_P(MsrStep, MatchesReference) {
  SKIP_WITHOUT_DEVICE();
  ASSERT_EQ(GetParam().T, 1);
  expect_steps_match(GetParam(), 13);
}

// Two steps in a row: the state is carried, and the second call finds the counters at zero.
TEST_P(MsrStep, TwoStepsMatchReference) {
  SKIP_WITHOUT_DEVICE();
  Config c = GetParam();
  c.T = 2;
  expect_steps_match(c, 17);
}

std::vector<Config> step_configs() {
  using D = rk::DType;
  std::vector<Config> out;
  for (D t : {D::kF32, D::kBF16, D::kF16}) {
    out.push_back({t, 3, 1, 2, 60, 432, {}, 1, true, true, true, true, true, 123456});
    out.push_back({t, 2, 1, 3, 128, 432, {}, 2, true, false, false, false, true, 5});
  }
  // Batch 1, where each head is spread over CTAs (column tiles x dk slices): RetNet's head
  // shape, dk = 60 (slices not a multiple of the row groups), dv not a multiple of the column
  // tile, 1 to 16 heads, every epilogue option on and off.
  out.push_back({D::kF32, 1, 1, 8, 256, 512, {}, 1, true, true, true, true, true, 77});
  out.push_back({D::kBF16, 1, 1, 1, 256, 432, {}, 2, true, false, true, false, true, 3});
  out.push_back({D::kF16, 1, 1, 16, 60, 100, {}, 1, true, true, false, true, false, 9});
  out.push_back({D::kF32, 1, 1, 3, 60, 432, {}, 0, false, false, true, true, true, 0});
  out.push_back({D::kBF16, 1, 1, 5, 128, 128, {}, 2, false, false, false, false, true, 11});
  out.push_back({D::kF32, 1, 1, 2, 256, 48, {}, 1, true, true, true, false, true, 40});
  // Column tiles alone fill the SMs (no dk slices), the norm still needs them to meet.
  out.push_back({D::kF16, 4, 1, 16, 16, 520, {}, 2, true, true, true, true, true, 6});
  // Enough heads that the norm keeps one CTA per head (B H >= the SMs; the emulator has 132).
  out.push_back({D::kBF16, 12, 1, 11, 8, 130, {}, 1, true, true, true, true, true, 2});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Shapes, MsrStep, testing::ValuesIn(step_configs()), config_name);

// ------------------------------------------------------------------------------------------
// Edge cases
// ------------------------------------------------------------------------------------------

// With no (sequence, head) pair there is nothing to retain, but d_norm_weight is still an
// output of shape [dv]: a sum over no rows, i.e. exactly zero (it used to be left unwritten).
TEST(MsrEdgeCases, EmptyBackwardZeroesNormWeightGrad) {
  SKIP_WITHOUT_DEVICE();
  using D = rk::DType;
  const std::vector<Config> empty = {
      {D::kBF16, 1, 0, 2, 8, 48, {0}, 1, true, true, false, true, true, 0},   // no packed sequence
      {D::kF32, 2, 5, 0, 8, 48, {}, 1, true, true, true, false, false, 0},    // H = 0 (log_decay empty)
      {D::kF16, 0, 4, 3, 8, 48, {}, 0, true, true, false, false, false, 0},   // B = 0
      {D::kF32, 2, 0, 3, 8, 48, {}, 1, true, true, true, false, true, 0},     // T = 0 (no tokens, two sequences)
  };
  for (const Config& c : empty) {
    Msr m = make_msr(c, 15);
    DeviceMsr d(m);
    std::vector<double> dy, dsT;
    random_cotangents(m, dy, dsT);
    const MsrGrads got = run_msr_backward(m, d, dy, dsT);
    const std::vector<double> dw = decode(D::kF32, got.dw);
    ASSERT_EQ(dw.size(), std::size_t(c.dv)) << config_name(testing::TestParamInfo<Config>(c, 0));
    for (std::size_t j = 0; j < dw.size(); ++j) ASSERT_EQ(dw[j], 0.0) << "d_norm_weight[" << j << "]";
  }
}

// A device buffer with poisoned guard zones on both sides; `data` is the part the kernels see.
struct GuardedBuffer {
  static constexpr std::size_t kGuard = 1 << 16;
  DeviceBuffer all;
  std::size_t bytes;
  explicit GuardedBuffer(std::size_t n) : all(n + 2 * kGuard), bytes(n) { all.poison(); }
  void* data() const { return static_cast<unsigned char*>(all.ptr) + kGuard; }
  // Whether both guard zones still hold the poison (all-ones bytes).  Only the guard zones are
  // read back: the values in between are unspecified for bad input (overlapping sequences write
  // the same rows in schedule-dependent order), and the emulated suite compares every download
  // across schedules.
  bool guards_intact() const {
    const auto* base = static_cast<const unsigned char*>(all.ptr);
    std::vector<unsigned char> lo(kGuard), hi(kGuard);
    if (gpu::copy_to_host(lo.data(), base, kGuard) != gpu::kSuccess ||
        gpu::copy_to_host(hi.data(), base + kGuard + bytes, kGuard) != gpu::kSuccess)
      return false;
    for (std::size_t i = 0; i < kGuard; ++i)
      if (lo[i] != 0xff || hi[i] != 0xff) return false;
    return true;
  }
};

#if defined(RETENTION_HOST_EMU)
// The kernels check the values the glue cannot read without a sync (log_decay <= 0 and not NaN,
// offsets >= 0, cu_seqlens from 0 to T and non-decreasing; value_checks.cuh): a bad value stops
// the forward and the backward with a device-side assert naming the tensor.  The CTAs that ran
// before the failing one saw the bad tensor too, and must not have accessed memory outside their
// tensors (msr_sequence clamps every sequence into [0, T]): inputs are exact-size (an
// out-of-bounds read is a sanitizer error in the sanitizer build), outputs sit between guard
// zones that must stay untouched.  The outputs' values are unspecified then and not checked.
// Emulator only: on a GPU the assert ends the process's context, and every later test with it.
TEST(MsrEdgeCases, BadValuesStopTheKernelsInBounds) {
  namespace emu = retention::emu;
  const std::vector<std::int64_t> good_cu = {0, 0, 1, 5, 70, 70, 150};
  struct Bad {
    const char* what;  // the tensor the message must name
    std::vector<std::int64_t> cu;
    int head = -1;     // log_decay[head] = value (head >= 0)
    double value = 0;
    bool bad_offset = false;  // offsets[last] = -1
    bool offsets = true;      // with offsets (without: the raw forward's kernel, NoFusion)
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<Bad> bad = {
      {"cu_seqlens", {0, 5, 400}},                // ends past T
      {"cu_seqlens", {0, -40, 150}},              // negative
      {"cu_seqlens", {0, 100, 50, 150}},          // decreasing
      {"cu_seqlens", {-10, 70, 200}},             // starts before 0 and ends past T
      {"cu_seqlens", {-10, 70, 150}},             // starts before 0
      {"cu_seqlens", {0, 5, 149}},                // ends before T
      {"log_decay", good_cu, 1, 0.25},            // gamma > 1
      {"log_decay", good_cu, 0, nan},
      {"offsets", good_cu, -1, 0, true},
      {"log_decay", {}, 1, 1e-3},                 // batch rows as the sequences
      {"log_decay", {}, 0, 1e-3, false, false},   // batch rows, no offsets
      {"offsets", {}, -1, 0, true},
  };
  for (const Bad& x : bad) {
    // Every option on, and every option off (the raw ops' path: no epilogue passes in the backward).
    for (int variant = 0; variant < (x.cu.empty() ? 2 : 4); ++variant) {
      const bool fused = variant % 2 == 0, int32 = variant >= 2;
      Config c{rk::DType::kBF16, x.cu.empty() ? 2 : 1, 150, 2, 60, 100, x.cu, fused ? 1 : 0, fused, fused, fused,
               fused, true, x.offsets ? 3 : 0, int32};
      Msr m = make_msr(c, 16);
      if (x.head >= 0) m.log_decay[x.head] = x.value;
      if (x.bad_offset) m.offsets.back() = -1;
      const std::string name = std::string(x.what) + " " + testing::PrintToString(x.cu) + (int32 ? " int32" : "") +
                               (fused ? " fused" : " raw");
      DeviceMsr d(m);
      const std::size_t es = elem_size(c.dtype), nq = m.q.size() * es, nv = m.v.size() * es;
      const std::size_t ns = std::size_t(m.N) * c.H * c.dk * c.dv * 4;
      GuardedBuffer y(nv), sT(ns), dq(nq), dk(nq), dv(nv), dg(nv), ds0(ns), dw(c.dv * 4);
      const auto expect_assert = [&](gpu::error_t err, const char* pass) {
        EXPECT_EQ(err, emu::Error::kAssert) << name << ", " << pass;
        const std::string msg = gpu::error_string(err);
        EXPECT_NE(msg.find(x.what), std::string::npos) << name << ", " << pass << ": " << msg;
        emu::reset_device();
      };

      rk::MsrForwardParams f = forward_params(m, d, y.data(), static_cast<float*>(sT.data()));
      DeviceBuffer fws(rk::msr_forward_workspace_bytes(f));
      f.workspace = fws.ptr;
      gpu::error_t err = rk::launch_msr_forward(f);
      if (err == gpu::kSuccess) err = gpu::synchronize();
      expect_assert(err, "forward");

      std::vector<double> dy, dsT;
      random_cotangents(m, dy, dsT);
      DeviceBuffer gy(nv), gsT(ns);
      gy.upload(encode(c.dtype, dy).data());
      gsT.upload(to_f32(dsT).data());
      rk::MsrBackwardParams b;
      b.dtype = c.dtype;
      b.shape = f.shape;
      b.q = f.q;
      b.k = f.k;
      b.v = f.v;
      b.g = f.g;
      b.grad_o = bthd(gy.ptr, c, c.dv);
      b.log_decay = f.log_decay;
      b.scale = f.scale;
      b.seq = f.seq;
      b.opt = f.opt;
      b.initial_state = f.initial_state;
      b.grad_final_state = gsT.as<float>();
      b.grad_q = bthd(dq.data(), c, c.dk);
      b.grad_k = bthd(dk.data(), c, c.dk);
      b.grad_v = bthd(dv.data(), c, c.dv);
      if (c.gate) b.grad_g = bthd(dg.data(), c, c.dv);
      b.grad_initial_state = static_cast<float*>(ds0.data());
      b.grad_norm_weight = c.weight ? static_cast<float*>(dw.data()) : nullptr;
      DeviceBuffer bws(rk::msr_backward_workspace_bytes(b));
      b.workspace = bws.ptr;
      err = rk::launch_msr_backward(b);
      if (err == gpu::kSuccess) err = gpu::synchronize();
      expect_assert(err, "backward");

      const char* names[] = {"y", "final_state", "grad_q", "grad_k", "grad_v", "grad_g", "grad_initial_state",
                             "grad_norm_weight"};
      const GuardedBuffer* outs[] = {&y, &sT, &dq, &dk, &dv, &dg, &ds0, &dw};
      for (int i = 0; i < 8; ++i) EXPECT_TRUE(outs[i]->guards_intact()) << names[i] << " written out of bounds, " << name;
    }
  }
}

// The decode step checks the values the glue cannot read without a sync (log_decay <= 0 and not
// NaN, offsets >= 0) inside its one launch: a bad value stops it with a device-side assert.
// Emulator only: on a GPU the assert ends the process's context, and every later test with it.
TEST(MsrEdgeCases, StepChecksDecayAndOffsetsOnTheDevice) {
  namespace emu = retention::emu;
  using D = rk::DType;
  const std::vector<Config> shapes = {
      {D::kF32, 1, 1, 8, 256, 512, {}, 1, true, true, true, true, true, 77},  // split over CTAs
      {D::kBF16, 12, 1, 11, 8, 130, {}, 1, true, true, true, true, true, 2},  // one CTA per head
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct Bad {
    const char* what;
    int head;  // log_decay[head] = value, or offsets[last row] = -1 for head < 0
    double value;
  };
  for (const Config& c : shapes) {
    for (const Bad& bad : {Bad{"log_decay", c.H - 1, 0.25}, Bad{"log_decay", 0, nan}, Bad{"offsets", -1, 0}}) {
      Msr m = make_msr(c, 5);
      if (bad.head >= 0) m.log_decay[bad.head] = bad.value;
      std::vector<std::int64_t> pos(c.B, 3);
      if (bad.head < 0) pos[c.B - 1] = -1;
      DeviceMsr d(m);
      DeviceBuffer y(m.v.size() * elem_size(c.dtype)), state(std::size_t(c.B) * c.H * c.dk * c.dv * 4);
      DeviceBuffer offsets(pos.size() * 8), counters(rk::kMsrStepCounters * sizeof(unsigned));
      offsets.upload(pos.data());
      state.upload(to_f32(m.s0).data());
      gpu::memset_device(counters.ptr, 0, counters.bytes);
      rk::MsrStepParams p = step_params(m, d, 0, y, state, offsets.as<std::int64_t>());
      DeviceBuffer workspace(rk::msr_step_workspace_bytes(p));
      p.workspace = workspace.ptr;
      p.counters = counters.as<unsigned>();
      const std::string name = config_name(testing::TestParamInfo<Config>(c, 0)) + " bad " + bad.what;
      const gpu::error_t err = rk::launch_msr_step(p);
      EXPECT_EQ(err, emu::Error::kAssert) << name;
      const std::string msg = gpu::error_string(err);
      EXPECT_NE(msg.find(bad.what), std::string::npos) << name << ": " << msg;
      emu::reset_device();
    }
  }
}
#endif

}  // namespace
