// Thread safety of the public C++ API: several threads calling every op at once, each on its own
// tensors (sharing only the read-only decay, as layers of a model share their buffers), must get
// bit for bit what serial calls give. Run under ThreadSanitizer by scripts/test-sanitizers.sh.
//
// Bit equality is the right bar: the CPU kernels split work over (sequence, head) pairs with a
// fixed order inside each, so a result does not depend on which or how many threads computed it.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <retention/retention.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t B = 2, T = 29, H = 2, dk = 16, dv = 12;
constexpr int kThreads = 4, kRepeats = 2;

struct Inputs {
  Tensor q, k, v, g, S0, go, gS, offsets, w;
  explicit Inputs(uint64_t seed) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    auto r = [&](at::IntArrayRef s) { return at::randn(s, gen, at::TensorOptions(at::kFloat)); };
    q = r({B, T, H, dk});
    k = r({B, T, H, dk});
    v = r({B, T, H, dv});
    g = r({B, T, H, dv});
    S0 = r({B, H, dk, dv});
    go = r({B, T, H, dv});
    gS = r({B, H, dk, dv});
    offsets = at::arange(B, at::kLong) * 5;
    w = r({dv}).abs() + 0.5;
  }
};

// Every entry point once; returns everything it produced.
std::vector<Tensor> run_all(const Inputs& in, const Tensor& log_decay) {
  std::vector<Tensor> out;
  auto push = [&](std::initializer_list<Tensor> ts) { out.insert(out.end(), ts); };
  const double scale = 0.25;
  {
    auto [o, S] = retention::chunk_forward(in.q, in.k, in.v, log_decay, scale, 8, in.S0);
    push({o, S});
  }
  {
    auto [o, S] = retention::parallel_forward(in.q, in.k, in.v, log_decay, scale, in.S0);
    push({o, S});
  }
  {
    auto [o, S] = retention::recurrent_forward(in.q, in.k, in.v, log_decay, scale, in.S0);
    push({o, S});
  }
  {
    auto [dq, dk_, dv_, dS0] = retention::chunk_backward(in.go, in.gS, in.q, in.k, in.v,
                                                         log_decay, scale, 8, in.S0);
    push({dq, dk_, dv_, dS0});
  }
  retention::MsrOptions mo;
  mo.chunk_size = 8;
  mo.decay_norm = true;
  {
    auto [y, S] = retention::msr_forward(in.q, in.k, in.v, in.g, log_decay, mo, in.S0,
                                         in.offsets, {}, in.w);
    push({y, S});
    auto grads = retention::msr_backward(in.go, in.gS, in.q, in.k, in.v, in.g, log_decay, mo,
                                         in.S0, in.offsets, {}, in.w);
    push({std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), std::get<3>(grads),
          std::get<4>(grads), std::get<5>(grads)});
  }
  {  // decoding: the in-place steps on a state owned by this thread
    auto state = in.S0.clone(), fused_state = in.S0.clone();
    for (int64_t t = 0; t < T; ++t) {
      push({retention::recurrent_step(in.q.select(1, t), in.k.select(1, t), in.v.select(1, t),
                                      log_decay, state, scale)});
      push({retention::msr_step(in.q.select(1, t), in.k.select(1, t), in.v.select(1, t),
                                in.g.select(1, t), log_decay, fused_state, mo, in.offsets + t,
                                in.w)});
    }
    push({state, fused_state});
  }
  {  // autograd through the dispatcher (the backward runs on the calling thread)
    auto q = in.q.clone().requires_grad_();
    auto [o, S] = retention::chunk_forward(q, in.k, in.v, log_decay, scale, 8, in.S0);
    auto dq = torch::autograd::grad({(o * in.go).sum() + (S * in.gS).sum()}, {q})[0];
    push({dq});
  }
  return out;
}

TEST(RetentionThreads, ConcurrentCallsEqualSerialCalls) {
  const Tensor log_decay = retention::retnet_log_decay(H);
  std::vector<Inputs> inputs;
  std::vector<std::vector<Tensor>> serial;
  for (int i = 0; i < kThreads; ++i) {
    inputs.emplace_back(1000 + i);
    serial.push_back(run_all(inputs.back(), log_decay));
  }
  std::atomic<int> mismatches{0};
  std::vector<std::thread> pool;
  for (int i = 0; i < kThreads; ++i) {
    pool.emplace_back([&, i] {
      for (int rep = 0; rep < kRepeats; ++rep) {
        const auto got = run_all(inputs[i], log_decay);
        if (got.size() != serial[i].size()) {
          ++mismatches;
          continue;
        }
        for (size_t j = 0; j < got.size(); ++j) {
          if (!at::equal(got[j], serial[i][j])) ++mismatches;
        }
      }
    });
  }
  for (auto& t : pool) t.join();
  EXPECT_EQ(mismatches.load(), 0) << "concurrent results differ from serial ones";
}

// Errors raised concurrently stay in their thread and leave the others' results intact.
TEST(RetentionThreads, ConcurrentErrorsAreIsolated) {
  const Tensor log_decay = retention::retnet_log_decay(H);
  const Inputs in(7);
  const auto expect = run_all(in, log_decay);
  std::atomic<int> errors{0}, mismatches{0};
  std::vector<std::thread> pool;
  for (int i = 0; i < kThreads; ++i) {
    pool.emplace_back([&, i] {
      if (i % 2) {
        try {
          retention::chunk_forward(in.q, in.k.narrow(3, 0, dk - 1), in.v, log_decay);
        } catch (const c10::Error& e) {
          if (std::string(e.what()).find("k must have the shape of q") != std::string::npos) {
            ++errors;
          }
        }
      } else {
        const auto got = run_all(in, log_decay);
        for (size_t j = 0; j < got.size(); ++j) {
          if (!at::equal(got[j], expect[j])) ++mismatches;
        }
      }
    });
  }
  for (auto& t : pool) t.join();
  EXPECT_EQ(errors.load(), kThreads / 2);
  EXPECT_EQ(mismatches.load(), 0);
}

}  // namespace
