// A LibTorch app: prefill a prompt with the chunkwise form, keep decoding token by token with the
// recurrent form, and check that the decoded outputs equal one chunkwise pass over everything.
#include <cstdio>

#include <torch/torch.h>

#include <retention/retention.h>

int main() {
  torch::manual_seed(0);
  const int64_t B = 2, prompt = 100, generated = 28, H = 4, dk = 64, dv = 96;
  const int64_t T = prompt + generated;
  auto q = torch::randn({B, T, H, dk}), k = torch::randn({B, T, H, dk});
  auto v = torch::randn({B, T, H, dv});
  auto log_decay = retention::retnet_log_decay(H);

  // Reference: one chunkwise pass over the whole sequence.
  auto [o_full, state_full] = retention::chunk_forward(q, k, v, log_decay);

  // Prefill the prompt (chunk form), then decode the rest one token at a time (in-place state).
  using torch::indexing::Slice;
  auto [o_prompt, state] =
      retention::chunk_forward(q.index({Slice(), Slice(0, prompt)}),
                               k.index({Slice(), Slice(0, prompt)}),
                               v.index({Slice(), Slice(0, prompt)}), log_decay);
  double max_err = (o_prompt - o_full.index({Slice(), Slice(0, prompt)})).abs().max().item<double>();
  for (int64_t t = prompt; t < T; ++t) {
    auto o_t = retention::recurrent_step(q.select(1, t), k.select(1, t), v.select(1, t),
                                         log_decay, state);
    max_err = std::max(max_err, (o_t - o_full.select(1, t)).abs().max().item<double>());
  }
  max_err = std::max(max_err, (state - state_full).abs().max().item<double>());
  const double scale = o_full.abs().max().item<double>();
  const bool ok = max_err <= 1e-5 * scale;  // fp32: both paths accumulate in fp32
  std::printf("prefill %lld tokens (chunk) + decode %lld tokens (recurrent): max |diff| = %.3g "
              "(max |o| = %.3g) -> %s\n",
              static_cast<long long>(prompt), static_cast<long long>(generated), max_err, scale,
              ok ? "agree" : "DISAGREE");
  return ok ? 0 : 1;
}
