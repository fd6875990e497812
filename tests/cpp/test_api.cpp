// GoogleTest suite for the public C++ API (csrc/include/retention/retention.h), CPU only.
//
// Every check compares against an independent float64 reference written here from the math
//   o_n = scale * sum_{m<=n} g^(n-m) (q_n . k_m) v_m + scale * g^(n+1) q_n S_0
//   S_T = g^T S_0 + sum_m g^(T-1-m) k_m^T v_m,   g = exp(log_decay[h])
// (a token-by-token recurrence S <- g S + k^T v, o = scale q S), never against the op under test.
// Random inputs are drawn fresh per test; the seed is printed and can be fixed with
// RETENTION_TEST_SEED=<n>.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <retention/retention.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

// Fresh seed per test, printed so failures can be replayed.
class RetentionApi : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* env = std::getenv("RETENTION_TEST_SEED");
    seed_ = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    torch::manual_seed(seed_);
    std::cout << "[retention-test] seed=" << seed_ << " (replay: RETENTION_TEST_SEED=" << seed_
              << ")\n";
    RecordProperty("seed", std::to_string(seed_));
  }
  uint64_t seed_ = 0;
};

// Float64 token loop reference. Layouts: q, k [B, T, H, dk], v [B, T, H, dv], state [B, H, dk, dv].
std::tuple<Tensor, Tensor> reference(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                     const Tensor& log_decay, double scale,
                                     const Tensor& initial_state = Tensor()) {
  auto q = q_.detach().to(torch::kFloat64), k = k_.detach().to(torch::kFloat64);
  auto v = v_.detach().to(torch::kFloat64);
  const auto B = q.size(0), T = q.size(1), H = q.size(2), dk = q.size(3), dv = v.size(3);
  auto g = log_decay.detach().to(torch::kFloat64).exp().view({1, H, 1, 1});
  auto S = initial_state.defined() ? initial_state.detach().to(torch::kFloat64).clone()
                                   : torch::zeros({B, H, dk, dv}, torch::kFloat64);
  std::vector<Tensor> outs;
  for (int64_t t = 0; t < T; ++t) {
    auto kt = k.select(1, t).unsqueeze(-1);  // [B, H, dk, 1]
    auto vt = v.select(1, t).unsqueeze(-2);  // [B, H, 1, dv]
    S = g * S + kt * vt;
    auto qt = q.select(1, t).unsqueeze(-2);  // [B, H, 1, dk]
    outs.push_back(scale * torch::matmul(qt, S).squeeze(-2));  // [B, H, dv]
  }
  auto o = T > 0 ? torch::stack(outs, 1) : torch::zeros({B, 0, H, dv}, torch::kFloat64);
  return {o, S};
}

// RMS(a - b) / RMS(b), in float64.
double err_ratio(const Tensor& a, const Tensor& b) {
  auto a64 = a.detach().to(torch::kFloat64), b64 = b.detach().to(torch::kFloat64);
  const double den = b64.pow(2).mean().sqrt().item<double>();
  const double num = (a64 - b64).pow(2).mean().sqrt().item<double>();
  return den > 0 ? num / den : num;
}

// fp64: the library computes in double; differences are summation-order only (~1e-15, growing
// like sqrt(#terms)), so 1e-10 is generous yet catches any fp32 shortcut (~1e-7).
constexpr double kTolF64 = 1e-10;
// fp32: accumulation over dk products and tens of tokens gives ~1e-6 relative.
constexpr double kTolF32 = 1e-5;

#define EXPECT_REL_CLOSE(a, b, tol)                                                         \
  do {                                                                                       \
    const double _e = err_ratio((a), (b));                                                   \
    EXPECT_LE(_e, (tol)) << #a << " vs " << #b << ": RMS error ratio " << _e;                \
    EXPECT_EQ((a).sizes(), (b).sizes());                                                     \
  } while (0)

Tensor random_log_decay(int64_t H) {
  // gamma in [0.8, 0.999]
  return torch::log(0.8 + 0.199 * torch::rand({H}, torch::kFloat64)).to(torch::kFloat32);
}

struct Inputs {
  Tensor q, k, v, ld, S0;
};

Inputs make_inputs(int64_t B, int64_t T, int64_t H, int64_t dk, int64_t dv,
                   torch::Dtype dtype = torch::kFloat64) {
  const auto sdt = dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  return {torch::randn({B, T, H, dk}, dtype), torch::randn({B, T, H, dk}, dtype),
          torch::randn({B, T, H, dv}, dtype), random_log_decay(H),
          torch::randn({B, H, dk, dv}, sdt)};
}

// The test passes iff `f` throws a c10::Error whose message contains `needle`.
void expect_error_contains(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_TRUE(msg.find(needle) != std::string::npos)
        << "message does not contain \"" << needle << "\": " << msg;
    return;
  }
  ADD_FAILURE() << "expected a c10::Error containing \"" << needle << "\", nothing was thrown";
}

// ---------------------------------------------------------------------------------------------

TEST_F(RetentionApi, ReferenceSanityT1) {
  // The C++ reference on a hand-computable case: T = 1, o = scale q (g S0 + k^T v).
  auto in = make_inputs(1, 1, 2, 3, 2);
  auto [o, S] = reference(in.q, in.k, in.v, in.ld, 0.5, in.S0);
  auto g = in.ld.to(torch::kFloat64).exp();
  for (int64_t h = 0; h < 2; ++h) {
    auto Sh = g[h] * in.S0[0][h] + torch::outer(in.k[0][0][h], in.v[0][0][h]);
    auto oh = 0.5 * torch::matmul(in.q[0][0][h], Sh);
    EXPECT_TRUE(torch::allclose(o[0][0][h], oh, 1e-14, 1e-14));
    EXPECT_TRUE(torch::allclose(S[0][h], Sh, 1e-14, 1e-14));
  }
}

TEST_F(RetentionApi, FormsMatchReferenceFloat64) {
  const int64_t B = 2, T = 37, H = 3, dk = 8, dv = 5;
  auto in = make_inputs(B, T, H, dk, dv);
  const double scale = 0.3;
  auto [o_ref, S_ref] = reference(in.q, in.k, in.v, in.ld, scale, in.S0);
  std::vector<std::pair<std::string, std::tuple<Tensor, Tensor>>> outs = {
      {"chunk8", retention::chunk_forward(in.q, in.k, in.v, in.ld, scale, 8, in.S0)},
      {"chunk64", retention::chunk_forward(in.q, in.k, in.v, in.ld, scale, 64, in.S0)},
      {"chunk1", retention::chunk_forward(in.q, in.k, in.v, in.ld, scale, 1, in.S0)},
      {"parallel", retention::parallel_forward(in.q, in.k, in.v, in.ld, scale, in.S0)},
      {"recurrent", retention::recurrent_forward(in.q, in.k, in.v, in.ld, scale, in.S0)},
  };
  for (auto& [name, out] : outs) {
    SCOPED_TRACE(name);
    auto& [o, S] = out;
    EXPECT_EQ(o.scalar_type(), torch::kFloat64);
    EXPECT_EQ(S.scalar_type(), torch::kFloat64);
    EXPECT_REL_CLOSE(o, o_ref, kTolF64);
    EXPECT_REL_CLOSE(S, S_ref, kTolF64);
  }
}

TEST_F(RetentionApi, FormsAgreeFloat32NoState) {
  const int64_t B = 1, T = 70, H = 4, dk = 16, dv = 24;
  auto in = make_inputs(B, T, H, dk, dv, torch::kFloat32);
  auto ld = retention::retnet_log_decay(H);
  auto [o_c, S_c] = retention::chunk_forward(in.q, in.k, in.v, ld);  // default scale, chunk 64
  auto [o_p, S_p] = retention::parallel_forward(in.q, in.k, in.v, ld);
  auto [o_r, S_r] = retention::recurrent_forward(in.q, in.k, in.v, ld);
  auto [o_ref, S_ref] = reference(in.q, in.k, in.v, ld, 1.0 / std::sqrt(double(dk)));
  EXPECT_EQ(o_c.scalar_type(), torch::kFloat32);
  EXPECT_EQ(S_c.scalar_type(), torch::kFloat32);
  for (const auto* o : {&o_c, &o_p, &o_r}) EXPECT_REL_CLOSE(*o, o_ref, kTolF32);
  for (const auto* S : {&S_c, &S_p, &S_r}) EXPECT_REL_CLOSE(*S, S_ref, kTolF32);
  // forms agree with each other (each within kTolF32 of the exact answer)
  EXPECT_REL_CLOSE(o_c, o_p, 2 * kTolF32);
  EXPECT_REL_CLOSE(o_r, o_p, 2 * kTolF32);
}

TEST_F(RetentionApi, StridedInputs) {
  const int64_t B = 2, T = 21, H = 3, dk = 6, dv = 7;
  auto q = torch::randn({B, H, T, dk}, torch::kFloat64).transpose(1, 2);
  auto k = torch::randn({B, T, H, 2 * dk}, torch::kFloat64).slice(3, 0, 2 * dk, 2);
  auto v = torch::randn({B, 2 * T, H, dv}, torch::kFloat64).slice(1, 0, 2 * T, 2);
  ASSERT_FALSE(q.is_contiguous());
  ASSERT_FALSE(k.is_contiguous());
  ASSERT_FALSE(v.is_contiguous());
  auto ld = random_log_decay(H);
  auto [o_ref, S_ref] = reference(q, k, v, ld, 0.4);
  auto [o, S] = retention::chunk_forward(q, k, v, ld, 0.4, 4);
  EXPECT_REL_CLOSE(o, o_ref, kTolF64);
  EXPECT_REL_CLOSE(S, S_ref, kTolF64);
}

TEST_F(RetentionApi, PrefillThenDecodeEqualsOneChunkPass) {
  const int64_t B = 2, T = 40, T0 = 27, H = 3, dk = 12, dv = 20;
  auto in = make_inputs(B, T, H, dk, dv, torch::kFloat32);
  auto [o_full, S_full] = retention::chunk_forward(in.q, in.k, in.v, in.ld, {}, 16, in.S0);
  auto [o_pre, state] =
      retention::chunk_forward(in.q.slice(1, 0, T0), in.k.slice(1, 0, T0), in.v.slice(1, 0, T0),
                               in.ld, {}, 16, in.S0);
  ASSERT_EQ(state.scalar_type(), torch::kFloat32);
  ASSERT_TRUE(state.is_contiguous());
  std::vector<Tensor> outs = {o_pre};
  for (int64_t t = T0; t < T; ++t) {
    if (t % 2 == 0) {  // [B, H, d] layout
      auto o = retention::recurrent_step(in.q.select(1, t), in.k.select(1, t), in.v.select(1, t),
                                         in.ld, state);
      ASSERT_EQ(o.sizes(), (at::IntArrayRef{B, H, dv}));
      outs.push_back(o.unsqueeze(1));
    } else {  // [B, 1, H, d] layout
      auto o = retention::recurrent_step(in.q.slice(1, t, t + 1), in.k.slice(1, t, t + 1),
                                         in.v.slice(1, t, t + 1), in.ld, state);
      ASSERT_EQ(o.sizes(), (at::IntArrayRef{B, 1, H, dv}));
      outs.push_back(o);
    }
  }
  auto o_dec = torch::cat(outs, 1);
  EXPECT_REL_CLOSE(o_dec, o_full, 2 * kTolF32);
  EXPECT_REL_CLOSE(state, S_full, 2 * kTolF32);
  auto [o_ref, S_ref] = reference(in.q, in.k, in.v, in.ld, 1.0 / std::sqrt(double(dk)), in.S0);
  EXPECT_REL_CLOSE(o_dec, o_ref, kTolF32);
  EXPECT_REL_CLOSE(state, S_ref, kTolF32);
}

TEST_F(RetentionApi, RecurrentStepUpdatesStateInPlace) {
  const int64_t B = 2, H = 3, dk = 5, dv = 4;
  auto ld = random_log_decay(H);
  auto state = torch::randn({B, H, dk, dv}, torch::kFloat32);
  auto S0 = state.clone();
  const void* ptr = state.data_ptr();
  auto q = torch::randn({B, 1, H, dk}), k = torch::randn({B, 1, H, dk});
  auto v = torch::randn({B, 1, H, dv});
  auto o = retention::recurrent_step(q, k, v, ld, state, 0.5);
  EXPECT_EQ(state.data_ptr(), ptr) << "state must be updated in place";
  EXPECT_EQ(o.sizes(), (at::IntArrayRef{B, 1, H, dv}));
  EXPECT_EQ(o.scalar_type(), torch::kFloat32);
  auto [o_ref, S_ref] = reference(q, k, v, ld, 0.5, S0);
  EXPECT_REL_CLOSE(state, S_ref, kTolF32);
  EXPECT_REL_CLOSE(o, o_ref, kTolF32);
  EXPECT_GT(err_ratio(state, S0), 1e-3) << "state was not modified";
}

TEST_F(RetentionApi, RecurrentStepHalfInputs) {
  const int64_t B = 1, H = 2, dk = 8, dv = 6;
  auto ld = random_log_decay(H);
  auto state = torch::randn({B, H, dk, dv}, torch::kFloat32);
  auto S0 = state.clone();
  auto q = torch::randn({B, H, dk}).to(torch::kBFloat16), k = torch::randn({B, H, dk}).to(torch::kBFloat16);
  auto v = torch::randn({B, H, dv}).to(torch::kBFloat16);
  auto o = retention::recurrent_step(q, k, v, ld, state);
  EXPECT_EQ(o.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(state.scalar_type(), torch::kFloat32);
  auto [o_ref, S_ref] = reference(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), ld,
                                  1.0 / std::sqrt(double(dk)), S0);
  // bf16 output rounded once (unit roundoff 2^-8), state accumulated in fp32
  EXPECT_REL_CLOSE(o, o_ref.squeeze(1), 2e-2);
  EXPECT_REL_CLOSE(state, S_ref, kTolF32);
}

// ---------------------------------------------------------------------------------------------
// Gradients through the autograd-enabled C++ ops vs central finite differences (float64).

using FormFn = std::function<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                        const Tensor&, const Tensor&,
                                                        const Tensor&)>;

void check_grad_fd(const FormFn& form, uint64_t seed) {
  const int64_t B = 2, T = 9, H = 2, dk = 4, dv = 3;
  auto in = make_inputs(B, T, H, dk, dv);
  auto Wo = torch::randn({B, T, H, dv}, torch::kFloat64);
  auto Ws = torch::randn({B, H, dk, dv}, torch::kFloat64);
  auto loss_of = [&](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& S0) {
    auto [o, S] = form(q, k, v, in.ld, S0);
    return (o * Wo).sum() + (S * Ws).sum();  // final_state cotangent flows too
  };
  std::vector<Tensor> leaves = {in.q.clone().requires_grad_(), in.k.clone().requires_grad_(),
                                in.v.clone().requires_grad_(), in.S0.clone().requires_grad_()};
  auto loss = loss_of(leaves[0], leaves[1], leaves[2], leaves[3]);
  loss.backward();
  const char* names[] = {"q", "k", "v", "initial_state"};
  std::mt19937_64 rng(seed);
  torch::NoGradGuard no_grad;
  for (int which = 0; which < 4; ++which) {
    ASSERT_TRUE(leaves[which].grad().defined()) << names[which];
    ASSERT_EQ(leaves[which].grad().sizes(), leaves[which].sizes());
    const int64_t n = leaves[which].numel();
    for (int trial = 0; trial < 4; ++trial) {
      const int64_t idx = static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
      // The loss is linear in each argument separately, so the central difference is exact up
      // to rounding: |error| ~ 1e-16 * |loss| / eps ~ 1e-10.
      const double eps = 1e-4;
      std::vector<Tensor> plus, minus;
      for (int j = 0; j < 4; ++j) {
        plus.push_back(leaves[j].detach().clone());
        minus.push_back(leaves[j].detach().clone());
      }
      plus[which].view(-1)[idx] += eps;
      minus[which].view(-1)[idx] -= eps;
      const double fd = (loss_of(plus[0], plus[1], plus[2], plus[3]).item<double>() -
                         loss_of(minus[0], minus[1], minus[2], minus[3]).item<double>()) /
                        (2 * eps);
      const double an = leaves[which].grad().view(-1)[idx].item<double>();
      EXPECT_NEAR(an, fd, 1e-7 * (1.0 + std::abs(fd)))
          << "d loss / d " << names[which] << "[" << idx << "]";
    }
  }
}

TEST_F(RetentionApi, GradientChunkVsFiniteDifferences) {
  check_grad_fd(
      [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ld, const Tensor& S0) {
        return retention::chunk_forward(q, k, v, ld, 0.7, 4, S0);
      },
      seed_);
}

TEST_F(RetentionApi, GradientParallelVsFiniteDifferences) {
  check_grad_fd(
      [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ld, const Tensor& S0) {
        return retention::parallel_forward(q, k, v, ld, {}, S0);
      },
      seed_);
}

TEST_F(RetentionApi, GradientRecurrentVsFiniteDifferences) {
  check_grad_fd(
      [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ld, const Tensor& S0) {
        return retention::recurrent_forward(q, k, v, ld, 0.25, S0);
      },
      seed_);
}

TEST_F(RetentionApi, BackwardOpsMatchAutograd) {
  const int64_t B = 1, T = 11, H = 2, dk = 3, dv = 4;
  auto in = make_inputs(B, T, H, dk, dv);
  auto go = torch::randn({B, T, H, dv}, torch::kFloat64);
  auto gS = torch::randn({B, H, dk, dv}, torch::kFloat64);
  auto q = in.q.clone().requires_grad_(), k = in.k.clone().requires_grad_();
  auto v = in.v.clone().requires_grad_(), S0 = in.S0.clone().requires_grad_();
  auto [o, S] = retention::chunk_forward(q, k, v, in.ld, 0.5, 4, S0);
  torch::autograd::backward({o, S}, {go, gS});
  auto [dq, dk_, dv_, dS0] =
      retention::chunk_backward(go, gS, in.q, in.k, in.v, in.ld, 0.5, 4, in.S0);
  EXPECT_REL_CLOSE(dq, q.grad(), kTolF64);
  EXPECT_REL_CLOSE(dk_, k.grad(), kTolF64);
  EXPECT_REL_CLOSE(dv_, v.grad(), kTolF64);
  EXPECT_REL_CLOSE(dS0, S0.grad(), kTolF64);
  auto [pq, pk, pv, pS] =
      retention::parallel_backward(go, gS, in.q, in.k, in.v, in.ld, 0.5, in.S0);
  EXPECT_REL_CLOSE(pq, q.grad(), kTolF64);
  EXPECT_REL_CLOSE(pS, S0.grad(), kTolF64);
  // the unused-final-state path: grad_final_state = None
  auto [nq, nk, nv, nS] = retention::chunk_backward(go, {}, in.q, in.k, in.v, in.ld, 0.5, 4, {});
  EXPECT_EQ(nS.sizes(), (at::IntArrayRef{B, H, dk, dv}));
  EXPECT_EQ(nS.scalar_type(), torch::kFloat64);
}

// ---------------------------------------------------------------------------------------------
// Decay helpers, meta tensors, errors

TEST_F(RetentionApi, DecayHelpers) {
  auto ld = retention::retnet_log_decay(16);
  ASSERT_EQ(ld.scalar_type(), torch::kFloat32);
  ASSERT_EQ(ld.numel(), 16);
  for (int64_t h = 0; h < 16; ++h) {
    const double expect = std::log1p(-std::pow(2.0, -5.0 - h));
    EXPECT_NEAR(ld[h].item<double>(), expect, std::abs(expect) * 1.2e-7) << "h=" << h;
  }
  auto ll = retention::linspace_log_decay(8);
  const double table[] = {0.96875, 0.97897, 0.98585, 0.99048, 0.99359, 0.99569, 0.99710, 0.998047};
  for (int64_t h = 0; h < 8; ++h) {
    EXPECT_NEAR(std::exp(ll[h].item<double>()), table[h], 6e-6) << "h=" << h;
  }
}

TEST_F(RetentionApi, MetaTensorsGiveShapes) {
  auto opts = torch::TensorOptions().device(torch::kMeta).dtype(torch::kFloat16);
  auto q = torch::empty({2, 7, 3, 5}, opts), k = torch::empty({2, 7, 3, 5}, opts);
  auto v = torch::empty({2, 7, 3, 9}, opts);
  auto ld = torch::empty({3}, opts.dtype(torch::kFloat32));
  auto [o, S] = retention::chunk_forward(q, k, v, ld, {}, 4, {});
  EXPECT_TRUE(o.is_meta());
  EXPECT_EQ(o.sizes(), (at::IntArrayRef{2, 7, 3, 9}));
  EXPECT_EQ(o.scalar_type(), torch::kFloat16);
  EXPECT_EQ(S.sizes(), (at::IntArrayRef{2, 3, 5, 9}));
  EXPECT_EQ(S.scalar_type(), torch::kFloat32);
}

TEST_F(RetentionApi, ErrorMessages) {
  auto in = make_inputs(2, 5, 3, 4, 6, torch::kFloat32);
  EXPECT_THROW(retention::chunk_forward(in.q.select(2, 0), in.k, in.v, in.ld), c10::Error);
  expect_error_contains([&] { retention::chunk_forward(in.q.select(2, 0), in.k, in.v, in.ld); },
                        "retention::chunk_forward: q must be 4-D [B, T, H, dk], got 3-D");
  expect_error_contains([&] { retention::chunk_forward(in.q, in.k, in.v, in.ld, {}, 0); },
                        "chunk_size must be positive, got 0");
  expect_error_contains(
      [&] { retention::parallel_forward(in.q, in.k, in.v, in.ld.slice(0, 0, 2)); },
      "retention::parallel_forward: log_decay must have shape [H] = [3], got [2]");
  expect_error_contains(
      [&] { retention::recurrent_forward(in.q, in.k.to(torch::kFloat16), in.v, in.ld); },
      "q, k and v must have the same dtype");
  expect_error_contains(
      [&] { retention::chunk_forward(in.q, in.k, in.v, in.ld, {}, 64, in.S0.slice(1, 0, 2)); },
      "initial_state must have shape [B, H, dk, dv] = [2, 3, 4, 6]");
  expect_error_contains(
      [&] {
        auto big = torch::randn({1, 2, 1, 257});
        retention::chunk_forward(big, big, torch::randn({1, 2, 1, 3}), torch::zeros({1}));
      },
      "must be in [1, 256], got 257");
  expect_error_contains(
      [&] {
        retention::chunk_forward(in.q, torch::empty(in.k.sizes(), torch::device(torch::kMeta)),
                                 in.v, in.ld);
      },
      "all tensors must be on the same device");
  // recurrent_step
  auto state = torch::zeros({2, 3, 4, 6});
  auto q1 = torch::randn({2, 3, 4}), k1 = torch::randn({2, 3, 4}), v1 = torch::randn({2, 3, 6});
  auto strided = torch::zeros({2, 3, 6, 4}).transpose(-1, -2);
  expect_error_contains([&] { retention::recurrent_step(q1, k1, v1, in.ld, strided); },
                        "retention::recurrent_step: state must be contiguous");
  auto q_rg = q1.clone().requires_grad_();
  expect_error_contains([&] { retention::recurrent_step(q_rg, k1, v1, in.ld, state); },
                        "retention::recurrent_step");
  EXPECT_THROW(retention::recurrent_step(q_rg, k1, v1, in.ld, state), c10::Error);
  auto wrong = torch::zeros({2, 3, 4, 7});
  expect_error_contains([&] { retention::recurrent_step(q1, k1, v1, in.ld, wrong); },
                        "retention::recurrent_step: state must have shape");
  EXPECT_TRUE(torch::equal(state, torch::zeros_like(state))) << "failed calls must not write";
}

TEST_F(RetentionApi, EmptySequence) {
  auto in = make_inputs(2, 0, 3, 4, 5, torch::kFloat32);
  auto [o, S] = retention::chunk_forward(in.q, in.k, in.v, in.ld, {}, 64, in.S0);
  EXPECT_EQ(o.sizes(), (at::IntArrayRef{2, 0, 3, 5}));
  EXPECT_TRUE(torch::equal(S, in.S0));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Fused layer core (msr_*): reference = the token loop above on rotated inputs, then the
// epilogue written out here.

// torchscale's interleaved rotation of x [B, T, H, dk] at positions offset + t (float64).
Tensor rotate_interleaved(const Tensor& x, int64_t offset) {
  const auto T = x.size(1), dk = x.size(3), half = dk / 2;
  auto i = torch::arange(half, torch::kFloat64);
  auto theta = torch::pow(10000.0, -i / static_cast<double>(half - 1));
  auto p = torch::arange(T, torch::kFloat64) + static_cast<double>(offset);
  auto ang = (p.unsqueeze(1) * theta.unsqueeze(0)).view({1, T, 1, half});
  auto a = x.to(torch::kFloat64).slice(3, 0, dk, 2), b = x.to(torch::kFloat64).slice(3, 1, dk, 2);
  auto ra = a * ang.cos() - b * ang.sin(), rb = b * ang.cos() + a * ang.sin();
  return torch::stack({ra, rb}, -1).flatten(3);
}

TEST_F(RetentionApi, MsrForwardMatchesRotatedReferenceWithNormAndGate) {
  auto in = make_inputs(2, 19, 3, 8, 10);
  auto g = torch::randn({2, 19, 3, 10}, torch::kFloat64);
  const double eps = 1e-6, scale = 0.4;
  const int64_t offset = 7;
  retention::MsrOptions opt;
  opt.chunk_size = 4;
  opt.scale = scale;
  opt.eps = eps;
  auto offsets = torch::full({2}, offset, torch::kLong);
  Tensor y, S;
  std::tie(y, S) = retention::msr_forward(in.q, in.k, in.v, g, in.ld, opt, in.S0, offsets);
  Tensor u, S_ref;
  std::tie(u, S_ref) = reference(rotate_interleaved(in.q, offset),
                                 rotate_interleaved(in.k, offset), in.v, in.ld, scale, in.S0);
  auto z = u / (u.pow(2).mean(-1, true) + eps).sqrt();
  auto y_ref = z * g * torch::sigmoid(g);
  EXPECT_REL_CLOSE(y, y_ref, kTolF64);
  EXPECT_REL_CLOSE(S, S_ref, kTolF64);

  // one decode step continues where the forward pass stopped
  auto q1 = torch::randn({2, 1, 3, 8}, torch::kFloat64), k1 = torch::randn_like(q1);
  auto v1 = torch::randn({2, 1, 3, 10}, torch::kFloat64), g1 = torch::randn_like(v1);
  auto state = S.clone();
  auto y1 = retention::msr_step(q1, k1, v1, g1, in.ld, state, opt, offsets + 19);
  Tensor u1, S1;
  std::tie(u1, S1) = reference(rotate_interleaved(q1, offset + 19),
                               rotate_interleaved(k1, offset + 19), v1, in.ld, scale, S);
  auto y1_ref = u1 / (u1.pow(2).mean(-1, true) + eps).sqrt() * g1 * torch::sigmoid(g1);
  EXPECT_REL_CLOSE(y1, y1_ref, kTolF64);
  EXPECT_REL_CLOSE(state, S1, kTolF64);
}

TEST_F(RetentionApi, MsrPackedSequencesAndGradients) {
  // two packed sequences [0, 5) and [5, 12): each must equal its own raw retention
  auto in = make_inputs(1, 12, 2, 6, 4);
  auto cu = torch::tensor({0, 5, 12}, torch::kInt);
  retention::MsrOptions opt;
  opt.rotary = retention::Rotary::None;
  opt.norm = false;
  opt.chunk_size = 3;
  auto S0 = torch::randn({2, 2, 6, 4}, torch::kFloat64);
  auto q = in.q.clone().requires_grad_(), v = in.v.clone().requires_grad_();
  Tensor y, S;
  std::tie(y, S) = retention::msr_forward(q, in.k, v, {}, in.ld, opt, S0, {}, cu);
  const int64_t bounds[3] = {0, 5, 12};
  for (int s = 0; s < 2; ++s) {
    const auto t0 = bounds[s], n = bounds[s + 1] - bounds[s];
    Tensor o_ref, S_ref;
    std::tie(o_ref, S_ref) = reference(in.q.narrow(1, t0, n), in.k.narrow(1, t0, n),
                                       in.v.narrow(1, t0, n), in.ld, 1.0 / std::sqrt(6.0),
                                       S0.narrow(0, s, 1));
    EXPECT_REL_CLOSE(y.narrow(1, t0, n), o_ref, kTolF64);
    EXPECT_REL_CLOSE(S.narrow(0, s, 1), S_ref, kTolF64);
  }
  (y.pow(2).sum() + S.sum()).backward();
  ASSERT_TRUE(q.grad().defined() && v.grad().defined());
  EXPECT_GT(q.grad().abs().max().item<double>(), 0.0);
  expect_error_contains(
      [&] { retention::msr_forward(in.q, in.k, in.v, {}, in.ld, opt, {}, {},
                                   torch::tensor({0, 5, 11}, torch::kInt)); },
      "cu_seqlens[-1] must equal the packed length T = 12");
}
