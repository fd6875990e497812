// retention::Sampler: greedy / temperature / top-k sampling with a seeded generator, the same
// steps as Python's RetNet._sample (so equal logits and seeds draw equal tokens).
#include <limits>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "retention/model.h"

namespace retention {

Sampler::Sampler(const SamplingOptions& options)
    : options_(options), generator_(at::make_generator<at::CPUGeneratorImpl>(options.seed)) {
  TORCH_CHECK(options.top_k >= 0, "Sampler: top_k must be >= 0, got ", options.top_k);
}

at::Tensor Sampler::operator()(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "Sampler: logits must be [N, V], got ",
              logits.sizes());
  // Sampled on the CPU: one generator for every device, and N x V is small next to the model.
  auto l = logits.to(at::kCPU).to(at::kFloat);
  if (options_.temperature <= 0) return l.argmax(-1).contiguous();
  l = l / options_.temperature;
  const int64_t V = l.size(1);
  if (options_.top_k > 0 && options_.top_k < V) {
    const auto kth = std::get<0>(at::topk(l, options_.top_k, -1)).slice(-1, options_.top_k - 1);
    l = l.masked_fill(l < kth, -std::numeric_limits<float>::infinity());
  }
  const auto probs = at::softmax(l, -1);
  return at::multinomial(probs, 1, /*replacement=*/false, generator_).select(-1, 0).contiguous();
}

}  // namespace retention
