// What retention::RetNet and retention::FlaRetNet share around their layers (internal, not
// installed): the argument checks of a packed forward and of a decode step, packing prompts, and
// the generate loop. Both models keep the same state (RetNetState) and batch conventions, so an
// app serves either the same way.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "retention/model.h"

namespace retention {
namespace detail {

// Checks tokens (integer [T]), cu_seqlens (int32/int64 [N + 1], 0 .. T, non-decreasing, increasing
// when last_only), token ids in [0, vocab_size) and, when given, that `state` holds N sequences
// of `num_layers` layers. Returns cu_seqlens as int64 on the CPU. Errors start with `who`.
at::Tensor check_packed(const char* who, const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                        int64_t vocab_size, bool last_only, const RetNetState* state,
                        size_t num_layers);

// Checks one decode step's tokens (integer [N], ids in range) against `state`; returns them as
// int64 on `device`.
at::Tensor check_step(const char* who, const at::Tensor& tokens, const RetNetState& state,
                      int64_t vocab_size, size_t num_layers, at::Device device);

// Prompts (each >= 1 token) -> (tokens [T], cu_seqlens [N + 1]), int64 on the CPU.
std::pair<at::Tensor, at::Tensor> pack_prompts(const char* who,
                                               const std::vector<std::vector<int64_t>>& prompts);

// at::linear(x, weight) without bias. A single row on the CPU (decode at batch 1) with fp32 or
// bf16 weights goes to detail::gemv (fp32 products and sums, the result in x's dtype): OpenBLAS's
// GEMM of one row costs several times its gemv on matrices of a few MiB, its gemv streams the
// weights at two thirds of the rate of ours, and torch's bf16 CPU kernels are slower than fp32
// (measured: docs/cpu-performance.md, "Decode at batch 1").
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight);

// Prefill, then max_new_tokens sampled tokens per prompt (Python's RetNet.generate order: the
// first new token comes from the prefill's logits). Model: prefill(prompts) and step(tokens, state).
// A prompt whose new token is one of eos_token_ids ends there, that token included (as
// transformers' generate); the batch stops stepping once every prompt has ended.
template <typename Model>
std::vector<std::vector<int64_t>> generate(const Model& model,
                                           const std::vector<std::vector<int64_t>>& prompts,
                                           int64_t max_new_tokens, Sampler& sampler,
                                           RetNet::GenerateStats* stats,
                                           const std::function<void(int64_t, const at::Tensor&)>& on_logits,
                                           const std::vector<int64_t>& eos_token_ids) {
  TORCH_CHECK(max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  for (const int64_t id : eos_token_ids) {
    TORCH_CHECK(id >= 0, "generate: eos_token_ids must be token ids (>= 0), got ", id);
  }
  auto seconds_since = [](std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  auto cpu_seconds_since = [](std::clock_t c0) {
    return static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
  };
  std::vector<std::vector<int64_t>> out(prompts.size());
  auto t0 = std::chrono::steady_clock::now();
  auto c0 = std::clock();
  auto [logits, state] = model.prefill(prompts);
  if (on_logits && max_new_tokens > 0) on_logits(0, logits);
  at::Tensor tok = sampler(logits);  // syncs with the device: the prefill time is complete
  RetNet::GenerateStats s;
  s.prefill_seconds = seconds_since(t0);
  s.prefill_cpu_seconds = cpu_seconds_since(c0);
  for (const auto& p : prompts) s.prefill_tokens += static_cast<int64_t>(p.size());
  t0 = std::chrono::steady_clock::now();
  c0 = std::clock();
  std::vector<char> ended(prompts.size(), 0);
  size_t running = prompts.size();
  int64_t steps = 0;
  for (int64_t i = 0; i < max_new_tokens && running > 0; ++i) {
    const int64_t* t = tok.data_ptr<int64_t>();
    for (size_t b = 0; b < prompts.size(); ++b) {
      if (ended[b]) continue;
      out[b].push_back(t[b]);
      if (std::find(eos_token_ids.begin(), eos_token_ids.end(), t[b]) != eos_token_ids.end()) {
        ended[b] = 1;
        --running;
      }
    }
    if (i + 1 < max_new_tokens && running > 0) {
      logits = model.step(tok, state);  // ended prompts step too (on their last token), unread
      ++steps;
      if (on_logits) on_logits(i + 1, logits);
      tok = sampler(logits);
    }
  }
  s.decode_seconds = seconds_since(t0);
  s.decode_cpu_seconds = cpu_seconds_since(c0);
  s.decode_tokens = steps * static_cast<int64_t>(prompts.size());
  if (stats != nullptr) *stats = s;
  return out;
}

}  // namespace detail
}  // namespace retention
