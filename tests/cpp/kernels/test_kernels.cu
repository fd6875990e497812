// GoogleTest tests of the torch-free GPU kernels (kernels/*.cu), one source for nvcc and hipcc.
//
// Every kernel is compared against a float64 CPU evaluation of the recurrence written here
// (S <- g S + k^T v, o = scale q S; the backward as the reverse scan of retnet-math §9), computed
// from the *rounded* inputs, so the tolerance only covers the kernels' own rounding.  Outputs
// are poisoned with NaN before each launch, so an element a kernel forgets to write fails.
// Metric: relative RMS error, RMS(got - ref) / RMS(ref) (FLA's assert_close), plus finiteness.
// Tests skip when there is no GPU; the numeric-conversion tests are host-only and always run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gpu_compat.h"
#include "numeric.h"
#include "kernel_test_util.h"
#include "retention_kernels.h"

namespace rk = retention::kernels;
namespace gpu = retention::gpu;

namespace {

using namespace kernel_test;

double tolerance(rk::DType t) { return t == rk::DType::kF32 ? 1e-4 : t == rk::DType::kF16 ? 5e-3 : 1.5e-2; }
const char* name(rk::DType t) { return t == rk::DType::kF32 ? "f32" : t == rk::DType::kF16 ? "f16" : "bf16"; }

// ------------------------------------------------------------------------------------------
// float64 reference (per (b, h), token by token)
// ------------------------------------------------------------------------------------------
struct Problem {
  int B, T, H, dk, dv;
  bool with_state;
  std::vector<double> q, k, v, log_decay, s0;  // [B,T,H,dk] x2, [B,T,H,dv], [H], [B,H,dk,dv]
  double scale;

  std::size_t qi(int b, int t, int h, int d) const { return ((std::size_t(b) * T + t) * H + h) * dk + d; }
  std::size_t vi(int b, int t, int h, int d) const { return ((std::size_t(b) * T + t) * H + h) * dv + d; }
  std::size_t si(int b, int h, int r, int c) const { return ((std::size_t(b) * H + h) * dk + r) * dv + c; }
};

Problem make_problem(int B, int T, int H, int dk, int dv, bool with_state, unsigned seed) {
  Problem p{B, T, H, dk, dv, with_state, {}, {}, {}, {}, {}, 1.0 / std::sqrt(double(dk))};
  std::mt19937 gen(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  auto fill = [&](std::vector<double>& x, std::size_t n, double s) {
    x.resize(n);
    for (auto& e : x) e = s * n01(gen);
  };
  fill(p.q, std::size_t(B) * T * H * dk, 1.0);
  fill(p.k, std::size_t(B) * T * H * dk, 1.0);
  fill(p.v, std::size_t(B) * T * H * dv, 1.0);
  fill(p.s0, std::size_t(B) * H * dk * dv, with_state ? 0.5 : 0.0);
  // RetNet decays, log(1 - 2^(-5-h)): head 15 has gamma = 1 - 2^-20 (practically undecayed).
  for (int h = 0; h < H; ++h) p.log_decay.push_back(std::log1p(-std::ldexp(1.0, -5 - h)));
  return p;
}

struct Reference {
  std::vector<double> o, sT;              // forward
  std::vector<double> dq, dk, dv, ds0;    // backward
};

Reference reference(const Problem& p, const std::vector<double>* dO = nullptr, const std::vector<double>* dsT = nullptr) {
  Reference r;
  r.o.assign(std::size_t(p.B) * p.T * p.H * p.dv, 0.0);
  r.sT.assign(p.s0.size(), 0.0);
  if (dO) {
    r.dq.assign(p.q.size(), 0.0);
    r.dk.assign(p.k.size(), 0.0);
    r.dv.assign(p.v.size(), 0.0);
    r.ds0.assign(p.s0.size(), 0.0);
  }
  std::vector<double> S(std::size_t(p.dk) * p.dv);
  for (int b = 0; b < p.B; ++b)
    for (int h = 0; h < p.H; ++h) {
      const double g = std::exp(p.log_decay[h]);
      for (int i = 0; i < p.dk * p.dv; ++i) S[i] = p.s0[p.si(b, h, 0, 0) + i];
      for (int t = 0; t < p.T; ++t) {
        for (int rr = 0; rr < p.dk; ++rr)
          for (int c = 0; c < p.dv; ++c)
            S[rr * p.dv + c] = g * S[rr * p.dv + c] + p.k[p.qi(b, t, h, rr)] * p.v[p.vi(b, t, h, c)];
        for (int c = 0; c < p.dv; ++c) {
          double acc = 0;
          for (int rr = 0; rr < p.dk; ++rr) acc += p.q[p.qi(b, t, h, rr)] * S[rr * p.dv + c];
          r.o[p.vi(b, t, h, c)] = p.scale * acc;
        }
        if (dO)  // dq_t = scale * S_t do_t
          for (int rr = 0; rr < p.dk; ++rr) {
            double acc = 0;
            for (int c = 0; c < p.dv; ++c) acc += S[rr * p.dv + c] * (*dO)[p.vi(b, t, h, c)];
            r.dq[p.qi(b, t, h, rr)] = p.scale * acc;
          }
      }
      for (int i = 0; i < p.dk * p.dv; ++i) r.sT[p.si(b, h, 0, 0) + i] = S[i];
      if (!dO) continue;
      // Reverse scan: dU = dS_T; dU += scale q_t do_t^T; dk_t = dU v_t; dv_t = dU^T k_t; dU *= g.
      std::vector<double> dU(std::size_t(p.dk) * p.dv, 0.0);
      if (dsT)
        for (int i = 0; i < p.dk * p.dv; ++i) dU[i] = (*dsT)[p.si(b, h, 0, 0) + i];
      for (int t = p.T - 1; t >= 0; --t) {
        for (int rr = 0; rr < p.dk; ++rr)
          for (int c = 0; c < p.dv; ++c) dU[rr * p.dv + c] += p.scale * p.q[p.qi(b, t, h, rr)] * (*dO)[p.vi(b, t, h, c)];
        for (int rr = 0; rr < p.dk; ++rr) {
          double acc = 0;
          for (int c = 0; c < p.dv; ++c) acc += dU[rr * p.dv + c] * p.v[p.vi(b, t, h, c)];
          r.dk[p.qi(b, t, h, rr)] = acc;
        }
        for (int c = 0; c < p.dv; ++c) {
          double acc = 0;
          for (int rr = 0; rr < p.dk; ++rr) acc += dU[rr * p.dv + c] * p.k[p.qi(b, t, h, rr)];
          r.dv[p.vi(b, t, h, c)] = acc;
        }
        for (auto& x : dU) x *= g;
      }
      for (int i = 0; i < p.dk * p.dv; ++i) r.ds0[p.si(b, h, 0, 0) + i] = dU[i];
    }
  return r;
}

// Contiguous [B, T, H, d] operand description.  `offset_elems` shifts the base pointer to
// exercise the unaligned (scalar) load path.
rk::Bthd bthd(void* base, const Problem& p, int d, int offset_elems, rk::DType t) {
  rk::Bthd x;
  x.ptr = static_cast<unsigned char*>(base) + offset_elems * elem_size(t);
  x.stride_h = d;
  x.stride_t = std::int64_t(p.H) * d;
  x.stride_b = std::int64_t(p.T) * p.H * d;
  return x;
}

// The forward's workspace (the sequence split's segment states), allocated as the op's glue
// does; the split is automatic unless prm.split says otherwise.
DeviceBuffer forward_workspace(rk::ChunkForwardParams& prm) {
  DeviceBuffer ws(rk::chunk_forward_workspace_bytes(prm));
  prm.workspace = ws.ptr;
  return ws;
}

// ------------------------------------------------------------------------------------------
// Parameterised over (dtype, shape)
// ------------------------------------------------------------------------------------------
struct Case {
  rk::DType dtype;
  int B, T, H, dk, dv;
  bool with_state;
  int offset;  // element offset of every operand (0: aligned vector path, 1: scalar path)
};

std::string case_name(const testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return std::string(name(c.dtype)) + "_B" + std::to_string(c.B) + "_T" + std::to_string(c.T) + "_H" +
         std::to_string(c.H) + "_dk" + std::to_string(c.dk) + "_dv" + std::to_string(c.dv) +
         (c.with_state ? "_h0" : "") + (c.offset ? "_unaligned" : "");
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (rk::DType t : {rk::DType::kF16, rk::DType::kBF16, rk::DType::kF32}) {
    out.push_back({t, 2, 1, 1, 64, 64, false, 0});      // a single token
    out.push_back({t, 2, 63, 3, 60, 64, true, 0});      // partial chunk, ragged dk
    out.push_back({t, 1, 65, 2, 256, 432, true, 0});    // one token past a chunk, dk=256, dv=432
    out.push_back({t, 1, 1000, 16, 60, 48, false, 0});  // long, 16 heads (gamma up to 1 - 2^-20)
    out.push_back({t, 2, 130, 5, 128, 100, true, 1});   // unaligned operands, dk=128 bucket
  }
  return out;
}

class RetentionKernels : public testing::TestWithParam<Case> {};

TEST_P(RetentionKernels, ChunkForwardMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const Case c = GetParam();
  Problem p = make_problem(c.B, c.T, c.H, c.dk, c.dv, c.with_state, 1234);
  const auto qb = encode(c.dtype, p.q), kb = encode(c.dtype, p.k), vb = encode(c.dtype, p.v);
  const Reference ref = reference(p);

  const std::size_t pad = c.offset * elem_size(c.dtype);
  DeviceBuffer dq(qb.size() + pad), dk(kb.size() + pad), dv(vb.size() + pad), dO(vb.size() + pad);
  gpu::copy_to_device(static_cast<char*>(dq.ptr) + pad, qb.data(), qb.size());
  gpu::copy_to_device(static_cast<char*>(dk.ptr) + pad, kb.data(), kb.size());
  gpu::copy_to_device(static_cast<char*>(dv.ptr) + pad, vb.data(), vb.size());
  DeviceBuffer decay = upload_f32(p.log_decay), s0 = upload_f32(p.s0), sT(p.s0.size() * 4);
  dO.poison();
  sT.poison();

  rk::ChunkForwardParams prm;
  prm.dtype = c.dtype;
  prm.shape = {c.B, c.T, c.H, c.dk, c.dv};
  prm.q = bthd(dq.ptr, p, c.dk, c.offset, c.dtype);
  prm.k = bthd(dk.ptr, p, c.dk, c.offset, c.dtype);
  prm.v = bthd(dv.ptr, p, c.dv, c.offset, c.dtype);
  prm.o = bthd(dO.ptr, p, c.dv, c.offset, c.dtype);
  prm.log_decay = decay.as<float>();
  prm.scale = static_cast<float>(p.scale);
  prm.initial_state = c.with_state ? s0.as<float>() : nullptr;
  prm.final_state = sT.as<float>();
  const DeviceBuffer ws = forward_workspace(prm);
  GPU_OK(rk::launch_chunk_forward(prm));
  GPU_OK(gpu::synchronize());

  auto ob = dO.download();
  ob.erase(ob.begin(), ob.begin() + pad);
  expect_close(decode(c.dtype, ob), ref.o, tolerance(c.dtype), "o");
  expect_close(sT.download_f32(), ref.sT, tolerance(c.dtype), "final_state");
}

TEST_P(RetentionKernels, RecurrentForwardMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const Case c = GetParam();
  Problem p = make_problem(c.B, c.T, c.H, c.dk, c.dv, c.with_state, 99);
  const auto qb = encode(c.dtype, p.q), kb = encode(c.dtype, p.k), vb = encode(c.dtype, p.v);
  const Reference ref = reference(p);

  DeviceBuffer dq(qb.size()), dk(kb.size()), dv(vb.size()), dO(vb.size());
  dq.upload(qb.data());
  dk.upload(kb.data());
  dv.upload(vb.data());
  DeviceBuffer decay = upload_f32(p.log_decay), s0 = upload_f32(p.s0), sT(p.s0.size() * 4);
  dO.poison();
  sT.poison();

  rk::RecurrentForwardParams prm;
  prm.dtype = c.dtype;
  prm.shape = {c.B, c.T, c.H, c.dk, c.dv};
  prm.q = bthd(dq.ptr, p, c.dk, 0, c.dtype);
  prm.k = bthd(dk.ptr, p, c.dk, 0, c.dtype);
  prm.v = bthd(dv.ptr, p, c.dv, 0, c.dtype);
  prm.o = bthd(dO.ptr, p, c.dv, 0, c.dtype);
  prm.log_decay = decay.as<float>();
  prm.scale = static_cast<float>(p.scale);
  prm.initial_state = c.with_state ? s0.as<float>() : nullptr;
  prm.final_state = sT.as<float>();
  GPU_OK(rk::launch_recurrent_forward(prm));
  GPU_OK(gpu::synchronize());

  // The scan keeps everything in fp32: only the output rounding remains.
  expect_close(decode(c.dtype, dO.download()), ref.o, tolerance(c.dtype), "o");
  expect_close(sT.download_f32(), ref.sT, 1e-5, "final_state");
}

TEST_P(RetentionKernels, ChunkBackwardMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const Case c = GetParam();
  Problem p = make_problem(c.B, c.T, c.H, c.dk, c.dv, c.with_state, 4321);
  const auto qb = encode(c.dtype, p.q), kb = encode(c.dtype, p.k), vb = encode(c.dtype, p.v);
  std::vector<double> grad_o(p.v.size()), grad_sT(p.s0.size());
  std::mt19937 gen(77);
  std::normal_distribution<double> n01;
  for (auto& x : grad_o) x = n01(gen);
  for (auto& x : grad_sT) x = c.with_state ? 0.1 * n01(gen) : 0.0;
  const auto gob = encode(c.dtype, grad_o);
  const Reference ref = reference(p, &grad_o, &grad_sT);

  DeviceBuffer dq(qb.size()), dk(kb.size()), dv(vb.size()), dgo(gob.size());
  dq.upload(qb.data());
  dk.upload(kb.data());
  dv.upload(vb.data());
  dgo.upload(gob.data());
  DeviceBuffer decay = upload_f32(p.log_decay), s0 = upload_f32(p.s0), gsT = upload_f32(grad_sT);
  DeviceBuffer gq(qb.size()), gk(kb.size()), gv(vb.size()), gs0(p.s0.size() * 4);
  for (DeviceBuffer* d : {&gq, &gk, &gv, &gs0}) d->poison();

  rk::ChunkBackwardParams prm;
  prm.dtype = c.dtype;
  prm.shape = {c.B, c.T, c.H, c.dk, c.dv};
  prm.q = bthd(dq.ptr, p, c.dk, 0, c.dtype);
  prm.k = bthd(dk.ptr, p, c.dk, 0, c.dtype);
  prm.v = bthd(dv.ptr, p, c.dv, 0, c.dtype);
  prm.grad_o = bthd(dgo.ptr, p, c.dv, 0, c.dtype);
  prm.grad_q = bthd(gq.ptr, p, c.dk, 0, c.dtype);
  prm.grad_k = bthd(gk.ptr, p, c.dk, 0, c.dtype);
  prm.grad_v = bthd(gv.ptr, p, c.dv, 0, c.dtype);
  prm.log_decay = decay.as<float>();
  prm.scale = static_cast<float>(p.scale);
  prm.initial_state = c.with_state ? s0.as<float>() : nullptr;
  prm.grad_final_state = c.with_state ? gsT.as<float>() : nullptr;
  prm.grad_initial_state = gs0.as<float>();
  DeviceBuffer ws(rk::chunk_backward_workspace_bytes(prm));
  prm.workspace = ws.ptr;
  GPU_OK(rk::launch_chunk_backward(prm));
  GPU_OK(gpu::synchronize());

  const double tol = 2 * tolerance(c.dtype);
  expect_close(decode(c.dtype, gq.download()), ref.dq, tol, "grad_q");
  expect_close(decode(c.dtype, gk.download()), ref.dk, tol, "grad_k");
  expect_close(decode(c.dtype, gv.download()), ref.dv, tol, "grad_v");
  expect_close(gs0.download_f32(), ref.ds0, tol, "grad_initial_state");
}

INSTANTIATE_TEST_SUITE_P(Shapes, RetentionKernels, testing::ValuesIn(cases()), case_name);

// One decode step on a random state, in place.
class RecurrentStep : public testing::TestWithParam<rk::DType> {};

TEST_P(RecurrentStep, UpdatesStateInPlace) {
  SKIP_WITHOUT_DEVICE();
  const rk::DType t = GetParam();
  Problem p = make_problem(3, 1, 5, 60, 432, true, 5);
  const auto qb = encode(t, p.q), kb = encode(t, p.k), vb = encode(t, p.v);
  const Reference ref = reference(p);
  DeviceBuffer dq(qb.size()), dk(kb.size()), dv(vb.size()), dO(vb.size());
  dq.upload(qb.data());
  dk.upload(kb.data());
  dv.upload(vb.data());
  dO.poison();
  DeviceBuffer decay = upload_f32(p.log_decay), state = upload_f32(p.s0);

  rk::RecurrentStepParams prm;
  prm.dtype = t;
  prm.shape = {p.B, 1, p.H, p.dk, p.dv};
  prm.q = bthd(dq.ptr, p, p.dk, 0, t);
  prm.k = bthd(dk.ptr, p, p.dk, 0, t);
  prm.v = bthd(dv.ptr, p, p.dv, 0, t);
  prm.o = bthd(dO.ptr, p, p.dv, 0, t);
  prm.log_decay = decay.as<float>();
  prm.scale = static_cast<float>(p.scale);
  prm.state = state.as<float>();
  const OneLaunch one;
  GPU_OK(rk::launch_recurrent_step(prm));
  one.check("recurrent_step");
  GPU_OK(gpu::synchronize());

  expect_close(decode(t, dO.download()), ref.o, tolerance(t), "o");
  expect_close(state.download_f32(), ref.sT, 1e-6, "state");
}

INSTANTIATE_TEST_SUITE_P(DTypes, RecurrentStep, testing::Values(rk::DType::kF16, rk::DType::kBF16, rk::DType::kF32),
                         [](const testing::TestParamInfo<rk::DType>& i) { return std::string(name(i.param)); });

// The token-by-token update near gamma = 1 (scan and decode step): gamma = expf(log gamma)
// rounded to fp32 is off by up to 2^-25, a relative error of 2^-25 / (1 - gamma) in the decay
// rate that every step repeats in the same direction; the kernels take 1 - gamma from expm1f
// (kernels/recurrence.cuh).  log gamma ~ -3e-6 is picked where fp32 rounds gamma the most: over
// T tokens the rounded gamma drifts by ~T 2^-25 / sqrt(3) relative to the state (~3.5e-5 at
// T = 2048, random inputs), while the per-step rounding of the fp32 state is noise of order
// sqrt(T) 2^-24 (~3e-6).  The chunk forward (split off and on) never forms gamma alone: it raises
// it to chunk powers, gamma^L = exp2f(L log2 gamma), whose fp32 rounding (~2^-25 relative) also
// repeats once per chunk; with 32-token fp32 chunks that is T / 32 repeats (~2e-6 here), so the
// same bound holds.
TEST(DecayNumerics, NearOneNotRoundedToFp32InAnyForm) {
  SKIP_WITHOUT_DEVICE();
  const int T = 2048, dk = 32, dv = 40;
  Problem p = make_problem(1, T, 1, dk, dv, true, 21);
  double worst = 0.0;
  for (int i = 0; i < 2000; ++i) {
    const float lg = static_cast<float>(-3e-6 * (1.0 + 1e-3 * i));
    const double err = std::abs(double(std::exp(lg)) - std::exp(double(lg)));
    if (err > worst) worst = err, p.log_decay = {double(lg)};
  }
  ASSERT_GT(worst, 0.45 * std::ldexp(1.0, -24));
  const rk::DType t = rk::DType::kF32;
  const auto qb = encode(t, p.q), kb = encode(t, p.k), vb = encode(t, p.v);
  const Reference ref = reference(p);
  DeviceBuffer dq(qb.size()), dk_(kb.size()), dv_(vb.size()), dO(vb.size());
  dq.upload(qb.data());
  dk_.upload(kb.data());
  dv_.upload(vb.data());
  DeviceBuffer decay = upload_f32(p.log_decay), s0 = upload_f32(p.s0), sT(p.s0.size() * 4);

  // The multi-token forms (scan, chunk) on these buffers.
  const auto inputs = [&](auto& prm) {
    prm.dtype = t;
    prm.shape = {1, T, 1, dk, dv};
    prm.q = bthd(dq.ptr, p, dk, 0, t);
    prm.k = bthd(dk_.ptr, p, dk, 0, t);
    prm.v = bthd(dv_.ptr, p, dv, 0, t);
    prm.o = bthd(dO.ptr, p, dv, 0, t);
    prm.log_decay = decay.as<float>();
    prm.scale = static_cast<float>(p.scale);
    prm.initial_state = s0.as<float>();
    prm.final_state = sT.as<float>();
  };
  rk::RecurrentForwardParams scan;
  inputs(scan);
  GPU_OK(rk::launch_recurrent_forward(scan));
  GPU_OK(gpu::synchronize());
  expect_close(sT.download_f32(), ref.sT, 1e-5, "scan final_state");

  rk::RecurrentStepParams st;  // token t: q, k, v, o at element offset t * d
  st.dtype = t;
  st.shape = {1, 1, 1, dk, dv};
  st.log_decay = decay.as<float>();
  st.scale = static_cast<float>(p.scale);
  st.state = s0.as<float>();
  for (int i = 0; i < T; ++i) {
    st.q = bthd(dq.ptr, p, dk, i * dk, t);
    st.k = bthd(dk_.ptr, p, dk, i * dk, t);
    st.v = bthd(dv_.ptr, p, dv, i * dv, t);
    st.o = bthd(dO.ptr, p, dv, i * dv, t);
    GPU_OK(rk::launch_recurrent_step(st));
  }
  GPU_OK(gpu::synchronize());
  expect_close(s0.download_f32(), ref.sT, 1e-5, "step state");
  expect_close(decode(t, dO.download()), ref.o, 1e-5, "step o");

  for (int split : {0, 4}) {
    const std::string form = split ? "chunk (4 segments)" : "chunk";
    s0.upload(std::vector<float>(p.s0.begin(), p.s0.end()).data());
    dO.poison();
    sT.poison();
    rk::ChunkForwardParams chunk;
    inputs(chunk);
    chunk.split = split;
    const DeviceBuffer ws = forward_workspace(chunk);
    GPU_OK(rk::launch_chunk_forward(chunk));
    GPU_OK(gpu::synchronize());
    expect_close(sT.download_f32(), ref.sT, 1e-5, form + " final_state");
    expect_close(decode(t, dO.download()), ref.o, 1e-5, form + " o");
  }
}

// fp16 output stays finite on the slowest-decaying head over a long sequence (the state grows
// like 1 / (1 - gamma); it must be carried in fp32).
TEST(RetentionKernelsNumerics, Fp16FiniteOnSlowestHead) {
  SKIP_WITHOUT_DEVICE();
  Problem p = make_problem(1, 4096, 16, 64, 64, false, 11);
  for (auto& x : p.v) x = std::fabs(x);  // same-sign values: the worst case for growth
  for (auto& x : p.k) x = std::fabs(x);
  const auto qb = encode(rk::DType::kF16, p.q), kb = encode(rk::DType::kF16, p.k), vb = encode(rk::DType::kF16, p.v);
  DeviceBuffer dq(qb.size()), dk(kb.size()), dv(vb.size()), dO(vb.size()), sT(std::size_t(16) * 64 * 64 * 4);
  dq.upload(qb.data());
  dk.upload(kb.data());
  dv.upload(vb.data());
  dO.poison();
  DeviceBuffer decay = upload_f32(p.log_decay);
  rk::ChunkForwardParams prm;
  prm.dtype = rk::DType::kF16;
  prm.shape = {1, 4096, 16, 64, 64};
  prm.q = bthd(dq.ptr, p, 64, 0, prm.dtype);
  prm.k = bthd(dk.ptr, p, 64, 0, prm.dtype);
  prm.v = bthd(dv.ptr, p, 64, 0, prm.dtype);
  prm.o = bthd(dO.ptr, p, 64, 0, prm.dtype);
  prm.log_decay = decay.as<float>();
  prm.scale = 0.125f;
  prm.final_state = sT.as<float>();
  const DeviceBuffer ws = forward_workspace(prm);
  GPU_OK(rk::launch_chunk_forward(prm));
  GPU_OK(gpu::synchronize());
  const auto o = decode(rk::DType::kF16, dO.download());
  std::size_t bad = 0;
  for (double x : o) bad += !std::isfinite(x);
  EXPECT_EQ(bad, 0u);
}

// ------------------------------------------------------------------------------------------
// Device runs of the chunk kernels on a Problem (inputs rounded to t in place, so a reference
// computed afterwards sees the kernels' inputs).  Outputs are poisoned first.
// ------------------------------------------------------------------------------------------
struct ForwardOut {
  std::vector<double> o, sT;
  std::size_t workspace_bytes;  // non-zero: the sequence split ran
};

// split: ChunkForwardParams::split (-1 automatic, 0 off, n segments).
ForwardOut run_chunk_forward(Problem& p, rk::DType t, int split = -1) {
  const auto qb = encode(t, p.q), kb = encode(t, p.k), vb = encode(t, p.v);
  DeviceBuffer dq(qb.size()), dk(kb.size()), dv(vb.size()), dO(vb.size()), sT(p.s0.size() * 4);
  dq.upload(qb.data());
  dk.upload(kb.data());
  dv.upload(vb.data());
  dO.poison();
  sT.poison();
  for (auto& x : p.s0) x = static_cast<float>(x);
  DeviceBuffer decay = upload_f32(p.log_decay), s0 = upload_f32(p.s0);
  rk::ChunkForwardParams prm;
  prm.dtype = t;
  prm.shape = {p.B, p.T, p.H, p.dk, p.dv};
  prm.q = bthd(dq.ptr, p, p.dk, 0, t);
  prm.k = bthd(dk.ptr, p, p.dk, 0, t);
  prm.v = bthd(dv.ptr, p, p.dv, 0, t);
  prm.o = bthd(dO.ptr, p, p.dv, 0, t);
  prm.log_decay = decay.as<float>();
  prm.scale = static_cast<float>(p.scale);
  prm.initial_state = p.with_state ? s0.as<float>() : nullptr;
  prm.final_state = sT.as<float>();
  prm.split = split;
  const DeviceBuffer ws = forward_workspace(prm);
  EXPECT_EQ(rk::launch_chunk_forward(prm), gpu::kSuccess);
  EXPECT_EQ(gpu::synchronize(), gpu::kSuccess);
  return {decode(t, dO.download()), sT.download_f32(), ws.bytes};
}

// The sequence split forced on (segments of ceil(T / n) tokens, so neither T nor the segments
// are whole chunks of the kernel: 64 tokens for f16 / bf16, 32 for fp32) against the float64
// reference and against the unsplit forward.  Tolerance: the split changes which sums are
// rounded - the state entering a segment is summed in another fp32 order and, for f16 / bf16,
// rounded to the input type as an MMA operand at other chunk boundaries (they move with the
// segment start) - so the split result meets the same dtype bound against the reference as the
// unsplit kernel (ChunkForwardMatchesReference), and split vs unsplit differ by rounding of
// that order: the same relative RMS bound is asserted (the triangle inequality gives 2x; no
// slack is taken).  Bit-identity is not expected.
class ChunkForwardSplit : public testing::TestWithParam<rk::DType> {};

// The forced splits of the split tests (B = 1): dv = 100 is two or more dv tiles; 5 segments of
// 41 tokens; 24 segments of 4 tokens (many scan steps, every segment a partial chunk).
struct SplitConfig {
  int T, H, dk, dv, segments;
  bool with_state;
  std::string trace() const {
    return "T=" + std::to_string(T) + " segments=" + std::to_string(segments) + (with_state ? " with states" : "");
  }
};
const SplitConfig kSplitConfigs[] = {{201, 2, 60, 100, 2, true}, {201, 2, 60, 100, 3, false}, {201, 1, 128, 40, 5, true},
                                     {93, 2, 64, 64, 24, true}};

TEST_P(ChunkForwardSplit, MatchesUnsplitAndReference) {
  SKIP_WITHOUT_DEVICE();
  const rk::DType t = GetParam();
  for (const SplitConfig& cfg : kSplitConfigs) {
    SCOPED_TRACE(cfg.trace());
    Problem p = make_problem(1, cfg.T, cfg.H, cfg.dk, cfg.dv, cfg.with_state, 555 + cfg.segments);
    const ForwardOut off = run_chunk_forward(p, t, 0);
    const ForwardOut on = run_chunk_forward(p, t, cfg.segments);
    EXPECT_EQ(off.workspace_bytes, 0u);
    EXPECT_EQ(on.workspace_bytes, std::size_t(cfg.segments - 1) * cfg.H * cfg.dk * cfg.dv * 4);
    const Reference ref = reference(p);
    expect_close(on.o, ref.o, tolerance(t), "o (split)");
    expect_close(on.sT, ref.sT, tolerance(t), "final_state (split)");
    expect_close(on.o, off.o, tolerance(t), "o (split vs unsplit)");
    expect_close(on.sT, off.sT, tolerance(t), "final_state (split vs unsplit)");
  }
}

INSTANTIATE_TEST_SUITE_P(DTypes, ChunkForwardSplit, testing::Values(rk::DType::kF16, rk::DType::kBF16, rk::DType::kF32),
                         [](const testing::TestParamInfo<rk::DType>& i) { return std::string(name(i.param)); });

// The automatic choice (host only): split when the unsplit grid has fewer CTAs than the
// SMs, into segments of whole chunks, at least 4 chunks each; no split when told so.
TEST(Launchers, ForwardSplitPlan) {
  const float decay = -0.1f;
  rk::ChunkForwardParams f;
  f.dtype = rk::DType::kF16;  // 64-token chunks; dk = dv = 64: one dv tile, 2 CTAs unsplit
  f.shape = {1, 1000, 2, 64, 64};
  f.log_decay = &decay;
  f.num_sms = 132;  // 2 CTAs, two waves are 264: as many segments as 4-chunk minimum allows
  const std::size_t state = 2 * 64 * 64 * 4;
  EXPECT_EQ(rk::chunk_forward_workspace_bytes(f), 3 * state);  // 16 chunks -> 4 segments of 256
  f.num_sms = 2;                                               // the grid already has a CTA per SM
  EXPECT_EQ(rk::chunk_forward_workspace_bytes(f), 0u);
  f.num_sms = 132;
  f.shape.T = 255;  // under 2 x 4 chunks: too short to split
  EXPECT_EQ(rk::chunk_forward_workspace_bytes(f), 0u);
  f.split = 0;
  f.shape.T = 1000;
  EXPECT_EQ(rk::chunk_forward_workspace_bytes(f), 0u);
  f.split = 3;  // forced: ceil(1000 / 3) = 334 tokens
  EXPECT_EQ(rk::chunk_forward_workspace_bytes(f), 2 * state);
}

// Each backward sweep plans its split on its own grid, and the workspace grows by the
// forward's and the reverse segment states (count - 1 of each).
TEST(Launchers, BackwardSplitPlan) {
  const float decay = -0.1f;
  rk::ChunkBackwardParams b;
  b.dtype = rk::DType::kF16;  // dk = dv = 64: one dv tile in both sweeps, 2 CTAs each unsplit
  b.shape = {1, 1000, 2, 64, 64};
  b.log_decay = &decay;
  b.num_sms = 132;
  b.split = 0;
  const std::size_t unsplit = rk::chunk_backward_workspace_bytes(b), state = 2 * 64 * 64 * 4;
  EXPECT_EQ(unsplit, 2u * 2 * 1000 * 64 * 4);  // one dq and one dk partial slice
  b.split = 3;
  EXPECT_EQ(rk::chunk_backward_workspace_bytes(b), unsplit + 2 * 2 * state);
  b.split = -1;  // as the forward: 4 segments of 256 tokens
  EXPECT_EQ(rk::chunk_backward_workspace_bytes(b), unsplit + 2 * 3 * state);
  b.num_sms = 2;
  EXPECT_EQ(rk::chunk_backward_workspace_bytes(b), unsplit);
}

struct BackwardOut {
  std::vector<unsigned char> dq, dk, dv, ds0;  // raw bytes (bit-exact comparisons)
};

// grad_o is rounded to t in place; grad_sT is fp32 (pass it rounded).  split as
// ChunkBackwardParams::split (-1 automatic, 0 off, n segments).
BackwardOut run_chunk_backward(Problem& p, rk::DType t, std::vector<double>& grad_o, const std::vector<double>& grad_sT,
                               int split = -1, int num_sms = 0, std::size_t* workspace_bytes = nullptr) {
  const auto qb = encode(t, p.q), kb = encode(t, p.k), vb = encode(t, p.v), gob = encode(t, grad_o);
  DeviceBuffer dq(qb.size()), dk(kb.size()), dv(vb.size()), dgo(gob.size());
  dq.upload(qb.data());
  dk.upload(kb.data());
  dv.upload(vb.data());
  dgo.upload(gob.data());
  for (auto& x : p.s0) x = static_cast<float>(x);
  DeviceBuffer decay = upload_f32(p.log_decay), s0 = upload_f32(p.s0), gsT = upload_f32(grad_sT);
  DeviceBuffer gq(qb.size()), gk(kb.size()), gv(vb.size()), gs0(p.s0.size() * 4);
  for (DeviceBuffer* d : {&gq, &gk, &gv, &gs0}) d->poison();
  rk::ChunkBackwardParams prm;
  prm.dtype = t;
  prm.shape = {p.B, p.T, p.H, p.dk, p.dv};
  prm.q = bthd(dq.ptr, p, p.dk, 0, t);
  prm.k = bthd(dk.ptr, p, p.dk, 0, t);
  prm.v = bthd(dv.ptr, p, p.dv, 0, t);
  prm.grad_o = bthd(dgo.ptr, p, p.dv, 0, t);
  prm.grad_q = bthd(gq.ptr, p, p.dk, 0, t);
  prm.grad_k = bthd(gk.ptr, p, p.dk, 0, t);
  prm.grad_v = bthd(gv.ptr, p, p.dv, 0, t);
  prm.log_decay = decay.as<float>();
  prm.scale = static_cast<float>(p.scale);
  prm.initial_state = p.with_state ? s0.as<float>() : nullptr;
  prm.grad_final_state = gsT.as<float>();
  prm.grad_initial_state = gs0.as<float>();
  prm.split = split;
  prm.num_sms = num_sms;
  DeviceBuffer ws(rk::chunk_backward_workspace_bytes(prm));
  if (workspace_bytes != nullptr) *workspace_bytes = ws.bytes;
  prm.workspace = ws.ptr;
  EXPECT_EQ(rk::launch_chunk_backward(prm), gpu::kSuccess);
  EXPECT_EQ(gpu::synchronize(), gpu::kSuccess);
  return {gq.download(), gk.download(), gv.download(), gs0.download()};
}

std::vector<double> decode_f32(const std::vector<unsigned char>& bytes) { return decode(rk::DType::kF32, bytes); }

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::fabs(e));
  return m;
}

// ------------------------------------------------------------------------------------------
// fp16 range.  The kernels round the score tile and the fp32 state (forward S, backward dH) to
// the input type as MMA operands.  With fp16 that must not overflow while the true outputs fit:
// the score tile is scaled before it is rounded, and the state operand carries a per-chunk
// power-of-two factor (chunk_common.cuh).  Each case makes one intermediate exceed fp16's 65504
// on the slowest-decaying head that matters (gamma = 1 - 2^-12, i.e. ~4096 tokens of memory,
// over T = 4096) while every output of the float64 reference fits in fp16.  Before those fixes
// the intermediates rounded to inf and the outputs were inf / NaN.
// ------------------------------------------------------------------------------------------
enum class Large { kScores, kState, kStateGradient };

// Inputs with the named intermediate beyond fp16 range (magnitudes in the comments: scale =
// 1/8, dk = dv = 64, sum of gamma^j over 4096 tokens ~ 2589, E|N(0,1)|^2 ~ 0.64).
Problem fp16_range_problem(Large what, unsigned seed) {
  Problem p = make_problem(1, 4096, 1, 64, 64, false, seed);
  p.log_decay[0] = std::log1p(-std::ldexp(1.0, -12));
  auto scale_by = [](std::vector<double>& x, double s, bool positive) {
    for (auto& e : x) e = s * (positive ? std::fabs(e) : e);
  };
  switch (what) {
    case Large::kScores:  // q.k ~ 64 * 48^2 * 0.64 ~ 94000; scale q.k ~ 12000, o ~ 3000
      scale_by(p.q, 48, true);
      scale_by(p.k, 48, true);
      scale_by(p.v, 1.0 / 256, false);
      break;
    case Large::kState:  // S ~ 2589 * 64 * 0.64 ~ 106000; o = scale q.S ~ 100
      scale_by(p.q, 1.0 / 1024, false);
      scale_by(p.k, 8, true);
      scale_by(p.v, 8, true);
      break;
    case Large::kStateGradient:  // dH ~ 2589 * scale * 400 * 0.64 ~ 83000; dk, dv ~ 650
      scale_by(p.q, 20, true);
      scale_by(p.k, 1.0 / 1024, false);
      scale_by(p.v, 1.0 / 1024, false);
      break;
  }
  return p;
}

TEST(Fp16Range, ForwardLargeScores) {
  SKIP_WITHOUT_DEVICE();
  Problem p = fp16_range_problem(Large::kScores, 21);
  const ForwardOut got = run_chunk_forward(p, rk::DType::kF16);
  const Reference ref = reference(p);
  ASSERT_LT(max_abs(ref.o), 65504.0) << "the test needs a reference output that fits in fp16";
  expect_close(got.o, ref.o, tolerance(rk::DType::kF16), "o");
  expect_close(got.sT, ref.sT, tolerance(rk::DType::kF16), "final_state");
}

TEST(Fp16Range, ForwardLargeState) {
  SKIP_WITHOUT_DEVICE();
  Problem p = fp16_range_problem(Large::kState, 22);
  const ForwardOut got = run_chunk_forward(p, rk::DType::kF16);
  const Reference ref = reference(p);
  ASSERT_GT(max_abs(ref.sT), 65504.0) << "the state must exceed fp16 range";
  ASSERT_LT(max_abs(ref.o), 65504.0) << "the test needs a reference output that fits in fp16";
  expect_close(got.o, ref.o, tolerance(rk::DType::kF16), "o");
  expect_close(got.sT, ref.sT, tolerance(rk::DType::kF16), "final_state");
}

// grad_o ~ 20 |N| with kStateGradient (dH large), ~ N / 1024 with kState (S large in the dq
// sweep: dq = scale dO S^T ~ 100).
void check_fp16_backward(Large what, unsigned seed) {
  Problem p = fp16_range_problem(what, seed);
  std::mt19937 gen(seed + 100);
  std::normal_distribution<double> n01;
  std::vector<double> grad_o(p.v.size()), grad_sT(p.s0.size(), 0.0);
  for (auto& x : grad_o) x = what == Large::kStateGradient ? 20 * std::fabs(n01(gen)) : n01(gen) / 1024;
  const BackwardOut got = run_chunk_backward(p, rk::DType::kF16, grad_o, grad_sT);
  const Reference ref = reference(p, &grad_o, &grad_sT);
  for (const auto* r : {&ref.dq, &ref.dk, &ref.dv})
    ASSERT_LT(max_abs(*r), 65504.0) << "the test needs reference gradients that fit in fp16";
  const double tol = 2 * tolerance(rk::DType::kF16);
  expect_close(decode(rk::DType::kF16, got.dq), ref.dq, tol, "grad_q");
  expect_close(decode(rk::DType::kF16, got.dk), ref.dk, tol, "grad_k");
  expect_close(decode(rk::DType::kF16, got.dv), ref.dv, tol, "grad_v");
  expect_close(decode_f32(got.ds0), ref.ds0, tol, "grad_initial_state");
}

TEST(Fp16Range, BackwardLargeState) {
  SKIP_WITHOUT_DEVICE();
  check_fp16_backward(Large::kState, 23);
}

TEST(Fp16Range, BackwardLargeStateGradient) {
  SKIP_WITHOUT_DEVICE();
  check_fp16_backward(Large::kStateGradient, 24);
}

// ------------------------------------------------------------------------------------------
// Deterministic backward.  dq and dk are sums over dv tiles; the kernels reduce them in a fixed
// order (chunk_bwd.cuh), so two runs give the same bits, and so do runs under different
// emulated schedules and block orders (the emulator's output digests of these downloads are
// compared across runs by scripts/test-kernels-host.sh).  The shapes cover several dv tiles
// per CTA (more tiles than partial slices) and a grid large enough for a single slice.
// ------------------------------------------------------------------------------------------
class DeterministicBackward : public testing::TestWithParam<Case> {};

TEST_P(DeterministicBackward, BitIdenticalRunsAndMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const Case c = GetParam();
  Problem p = make_problem(c.B, c.T, c.H, c.dk, c.dv, c.with_state, 31);
  std::mt19937 gen(32);
  std::normal_distribution<double> n01;
  std::vector<double> grad_o(p.v.size()), grad_sT(p.s0.size());
  for (auto& x : grad_o) x = n01(gen);
  for (auto& x : grad_sT) x = c.with_state ? static_cast<float>(0.1 * n01(gen)) : 0.0;
  const BackwardOut a = run_chunk_backward(p, c.dtype, grad_o, grad_sT);
  const BackwardOut b = run_chunk_backward(p, c.dtype, grad_o, grad_sT);
  EXPECT_TRUE(a.dq == b.dq) << "grad_q differs between two runs";
  EXPECT_TRUE(a.dk == b.dk) << "grad_k differs between two runs";
  EXPECT_TRUE(a.dv == b.dv) << "grad_v differs between two runs";
  EXPECT_TRUE(a.ds0 == b.ds0) << "grad_initial_state differs between two runs";
  const Reference ref = reference(p, &grad_o, &grad_sT);
  const double tol = 2 * tolerance(c.dtype);
  expect_close(decode(c.dtype, a.dq), ref.dq, tol, "grad_q");
  expect_close(decode(c.dtype, a.dk), ref.dk, tol, "grad_k");
  expect_close(decode(c.dtype, a.dv), ref.dv, tol, "grad_v");
  expect_close(decode_f32(a.ds0), ref.ds0, tol, "grad_initial_state");
}

// The sequence split forced on in both sweeps (configurations and bounds as ChunkForwardSplit:
// the split only moves where fp32 sums of the states and their gradients are rounded; with a
// state both ends are live: initial_state into the dq sweep, grad_final_state into the last
// segment of the dk / dv sweep).  Also bit-identical from run to run.
class ChunkBackwardSplit : public testing::TestWithParam<rk::DType> {};

TEST_P(ChunkBackwardSplit, MatchesUnsplitAndReference) {
  SKIP_WITHOUT_DEVICE();
  const rk::DType t = GetParam();
  for (const SplitConfig& cfg : kSplitConfigs) {
    SCOPED_TRACE(cfg.trace());
    Problem p = make_problem(1, cfg.T, cfg.H, cfg.dk, cfg.dv, cfg.with_state, 777 + cfg.segments);
    std::mt19937 gen(78 + cfg.segments);
    std::normal_distribution<double> n01;
    std::vector<double> grad_o(p.v.size()), grad_sT(p.s0.size());
    for (auto& x : grad_o) x = n01(gen);
    for (auto& x : grad_sT) x = cfg.with_state ? static_cast<float>(0.1 * n01(gen)) : 0.0;
    const BackwardOut off = run_chunk_backward(p, t, grad_o, grad_sT, 0);
    const BackwardOut on = run_chunk_backward(p, t, grad_o, grad_sT, cfg.segments);
    const BackwardOut again = run_chunk_backward(p, t, grad_o, grad_sT, cfg.segments);
    EXPECT_TRUE(on.dq == again.dq && on.dk == again.dk && on.dv == again.dv && on.ds0 == again.ds0)
        << "split backward differs between two runs";
    const Reference ref = reference(p, &grad_o, &grad_sT);
    const double tol = 2 * tolerance(t);
    expect_close(decode(t, on.dq), ref.dq, tol, "grad_q (split)");
    expect_close(decode(t, on.dk), ref.dk, tol, "grad_k (split)");
    expect_close(decode(t, on.dv), ref.dv, tol, "grad_v (split)");
    expect_close(decode_f32(on.ds0), ref.ds0, tol, "grad_initial_state (split)");
    expect_close(decode(t, on.dq), decode(t, off.dq), tol, "grad_q (split vs unsplit)");
    expect_close(decode(t, on.dk), decode(t, off.dk), tol, "grad_k (split vs unsplit)");
    expect_close(decode(t, on.dv), decode(t, off.dv), tol, "grad_v (split vs unsplit)");
    expect_close(decode_f32(on.ds0), decode_f32(off.ds0), tol, "grad_initial_state (split vs unsplit)");
  }
}

// The automatic plan splits each sweep on its own grid.  bf16, dk = dv = 128, H = 2: the dq
// sweep has 2 dv tiles of 64 (4 CTAs), the dk / dv sweep 4 of 32 (8 CTAs); told the GPU has 6
// SMs, only the dq sweep splits (into 2 * 6 / 4 = 3 segments of 5 chunks; T = 960 is 15
// chunks).  Same results as unsplit, and the workspace holds the dq sweep's 2 segment states only.
TEST(ChunkBackwardSplitPlan, SweepsSplitIndependently) {
  SKIP_WITHOUT_DEVICE();
  const rk::DType t = rk::DType::kBF16;
  Problem p = make_problem(1, 960, 2, 128, 128, true, 901);
  std::mt19937 gen(902);
  std::normal_distribution<double> n01;
  std::vector<double> grad_o(p.v.size()), grad_sT(p.s0.size());
  for (auto& x : grad_o) x = n01(gen);
  for (auto& x : grad_sT) x = static_cast<float>(0.1 * n01(gen));
  std::size_t off_bytes = 0, on_bytes = 0;
  const BackwardOut off = run_chunk_backward(p, t, grad_o, grad_sT, 0, 6, &off_bytes);
  const BackwardOut on = run_chunk_backward(p, t, grad_o, grad_sT, -1, 6, &on_bytes);
  EXPECT_EQ(on_bytes - off_bytes, std::size_t(2) * 2 * 128 * 128 * 4);
  const Reference ref = reference(p, &grad_o, &grad_sT);
  const double tol = 2 * tolerance(t);
  expect_close(decode(t, on.dq), ref.dq, tol, "grad_q (dq sweep split)");
  expect_close(decode(t, on.dk), ref.dk, tol, "grad_k");
  expect_close(decode(t, on.dq), decode(t, off.dq), tol, "grad_q (split vs unsplit)");
  EXPECT_TRUE(on.dk == off.dk && on.dv == off.dv && on.ds0 == off.ds0) << "the unsplit dk / dv sweep changed";
}

INSTANTIATE_TEST_SUITE_P(DTypes, ChunkBackwardSplit, testing::Values(rk::DType::kF16, rk::DType::kBF16, rk::DType::kF32),
                         [](const testing::TestParamInfo<rk::DType>& i) { return std::string(name(i.param)); });

INSTANTIATE_TEST_SUITE_P(Shapes, DeterministicBackward,
                         testing::Values(Case{rk::DType::kF16, 1, 130, 2, 256, 432, true, 0},   // 2 and 4 tiles per CTA
                                         Case{rk::DType::kF32, 1, 65, 1, 256, 432, true, 0},    // 27 tiles, 8 slices
                                         Case{rk::DType::kBF16, 16, 3, 16, 64, 100, false, 0}), // 256 rows: 1 slice
                         case_name);

// The compat header's reductions at full and partial width, on whatever wavefront size the
// target has (32 or 64).
__global__ void warp_reduce_kernel(float* full, float* part) {
  const float x = static_cast<float>(threadIdx.x + 1);
  full[threadIdx.x] = gpu::warp_reduce_sum(x);
  part[threadIdx.x] = gpu::warp_reduce_sum<8>(x);
}

TEST(GpuCompat, WarpReduceSum) {
  SKIP_WITHOUT_DEVICE();
  constexpr int W = gpu::kWarpSize;
  DeviceBuffer full(W * 4), part(W * 4);
  GPU_OK(gpu::launch(&warp_reduce_kernel, 1, W, 0, nullptr, full.as<float>(), part.as<float>()));
  GPU_OK(gpu::synchronize());
  const auto f = full.download_f32(), q = part.download_f32();
  for (int l = 0; l < W; ++l) {
    EXPECT_EQ(f[l], W * (W + 1) / 2.0);
    const int g = l / 8;
    EXPECT_EQ(q[l], 8 * (8 * g + 1) + 28.0);  // sum of 8g+1 .. 8g+8
  }
}

// The launchers validate their arguments before touching a device: bad shapes are rejected,
// empty problems succeed without a launch (host-only, runs with or without a GPU).
TEST(Launchers, RejectBadArgumentsAndAcceptEmptyProblems) {
  const float decay = -0.1f;
  rk::ChunkForwardParams f;
  f.shape = {1, 4, 1, 257, 8};  // dk above kMaxHeadDimK
  f.log_decay = &decay;
  EXPECT_EQ(rk::launch_chunk_forward(f), gpu::kErrorInvalidValue);
  f.shape = {-1, 4, 1, 64, 8};
  EXPECT_EQ(rk::launch_chunk_forward(f), gpu::kErrorInvalidValue);
  f.shape = {1, 4, 1, 64, 8};
  f.log_decay = nullptr;
  EXPECT_EQ(rk::launch_chunk_forward(f), gpu::kErrorInvalidValue);
  f.log_decay = &decay;
  f.shape = {0, 4, 1, 64, 8};
  EXPECT_EQ(rk::launch_chunk_forward(f), gpu::kSuccess);

  rk::ChunkBackwardParams b;
  b.shape = {1, 4, 1, 64, 8};
  b.log_decay = &decay;  // grad_initial_state missing
  EXPECT_EQ(rk::launch_chunk_backward(b), gpu::kErrorInvalidValue);
  b.shape = {1, 4, 1, 300, 8};
  EXPECT_EQ(rk::launch_chunk_backward(b), gpu::kErrorInvalidValue);
  b.shape = {1, 4, 1, 64, 0};  // dv == 0 with T * dk > 0: the caller must zero-fill
  float dummy = 0.f;
  b.grad_initial_state = &dummy;
  EXPECT_EQ(rk::launch_chunk_backward(b), gpu::kErrorInvalidValue);
  b.shape = {0, 4, 1, 64, 8};
  EXPECT_EQ(rk::launch_chunk_backward(b), gpu::kSuccess);
  b.shape = {1, 0, 1, 0, 0};
  EXPECT_EQ(rk::launch_chunk_backward(b), gpu::kSuccess);
  EXPECT_EQ(rk::chunk_backward_workspace_bytes(b), 0u);

  rk::RecurrentForwardParams r;
  r.shape = {1, 4, 1, 257, 8};
  r.log_decay = &decay;
  EXPECT_EQ(rk::launch_recurrent_forward(r), gpu::kErrorInvalidValue);
  r.shape = {1, 4, 0, 64, 8};
  EXPECT_EQ(rk::launch_recurrent_forward(r), gpu::kSuccess);

  rk::RecurrentStepParams st;
  st.shape = {1, 1, 1, 257, 8};
  st.log_decay = &decay;
  EXPECT_EQ(rk::launch_recurrent_step(st), gpu::kErrorInvalidValue);
  st.shape.dk = 64, st.shape.dv = 0;
  EXPECT_EQ(rk::launch_recurrent_step(st), gpu::kSuccess);

  // An unknown dtype value is rejected by every dispatch (after the device check).
  if (!has_device()) return;
  f.shape = {1, 4, 1, 64, 8};
  f.dtype = static_cast<rk::DType>(7);
  EXPECT_EQ(rk::launch_chunk_forward(f), gpu::kErrorInvalidValue);
  b.shape = {1, 4, 1, 64, 8};
  b.dtype = static_cast<rk::DType>(7);
  EXPECT_EQ(rk::launch_chunk_backward(b), gpu::kErrorInvalidValue);
  r.shape = {1, 4, 1, 64, 8};
  r.dtype = static_cast<rk::DType>(7);
  EXPECT_EQ(rk::launch_recurrent_forward(r), gpu::kErrorInvalidValue);
  st.shape.dv = 8;
  st.dtype = static_cast<rk::DType>(7);
  EXPECT_EQ(rk::launch_recurrent_step(st), gpu::kErrorInvalidValue);
}

#if defined(RETENTION_HOST_EMU)
// The raw launchers check log_decay on the device too (value_checks.cuh): the scan, and the chunk
// forward without fusion, stop with a device-side assert naming it.  Emulator only: on a GPU the
// assert ends the process's context.
TEST(Launchers, RawKernelsCheckDecayOnTheDevice) {
  namespace emu = retention::emu;
  for (const double bad : {0.5, std::numeric_limits<double>::quiet_NaN()}) {
    Problem p = make_problem(2, 40, 3, 60, 48, true, 7);
    p.log_decay[2] = bad;
    const auto qb = encode(rk::DType::kBF16, p.q), kb = encode(rk::DType::kBF16, p.k), vb = encode(rk::DType::kBF16, p.v);
    DeviceBuffer dq(qb.size()), dk(kb.size()), dv(vb.size()), dO(vb.size());
    dq.upload(qb.data());
    dk.upload(kb.data());
    dv.upload(vb.data());
    DeviceBuffer decay = upload_f32(p.log_decay), sT(p.s0.size() * 4);
    const auto fill = [&](auto& prm) {
      prm.dtype = rk::DType::kBF16;
      prm.shape = {2, 40, 3, 60, 48};
      prm.q = bthd(dq.ptr, p, 60, 0, rk::DType::kBF16);
      prm.k = bthd(dk.ptr, p, 60, 0, rk::DType::kBF16);
      prm.v = bthd(dv.ptr, p, 48, 0, rk::DType::kBF16);
      prm.o = bthd(dO.ptr, p, 48, 0, rk::DType::kBF16);
      prm.log_decay = decay.as<float>();
      prm.scale = static_cast<float>(p.scale);
      prm.final_state = sT.as<float>();
    };
    rk::RecurrentForwardParams scan;
    fill(scan);
    rk::ChunkForwardParams chunk;
    fill(chunk);
    const DeviceBuffer ws = forward_workspace(chunk);
    for (int which = 0; which < 2; ++which) {
      const gpu::error_t err = which == 0 ? rk::launch_recurrent_forward(scan) : rk::launch_chunk_forward(chunk);
      EXPECT_EQ(err, emu::Error::kAssert) << (which == 0 ? "scan" : "chunk") << ", log_decay " << bad;
      EXPECT_NE(std::string(gpu::error_string(err)).find("log_decay"), std::string::npos) << gpu::error_string(err);
      emu::reset_device();
    }
  }
}
#endif

// ------------------------------------------------------------------------------------------
// Host-only: the bit conversions the tests (and the torch glue's expectations) rely on.
// ------------------------------------------------------------------------------------------
TEST(Numeric, HalfConversions) {
  using namespace rk::host;
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);        // rounds to infinity
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -26)), 0x0000);  // below half of it
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie -> even
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(NAN))));
  for (std::uint32_t b = 0; b < 0x7c00; ++b)  // every finite positive half round-trips
    ASSERT_EQ(f32_to_f16(f16_to_f32(static_cast<std::uint16_t>(b))), b);
}

TEST(Numeric, BFloat16Conversions) {
  using namespace rk::host;
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // tie -> even
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie -> even (up)
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  for (std::uint32_t b = 0; b < 0x7f80; ++b)
    ASSERT_EQ(f32_to_bf16(bf16_to_f32(static_cast<std::uint16_t>(b))), b);
}

}  // namespace
