// Argument checks and prompt packing shared by retention::RetNet and retention::FlaRetNet
// (see decoding.h).
#include "model/decoding.h"

#include "cpu/gemv.h"

namespace retention {
namespace detail {

at::Tensor check_packed(const char* who, const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                        int64_t vocab_size, bool last_only, const RetNetState* state,
                        size_t num_layers) {
  TORCH_CHECK(tokens.dim() == 1 && !at::isFloatingType(tokens.scalar_type()), who,
              ": tokens must be an integer tensor [T], got ", tokens.scalar_type(), " ",
              tokens.sizes());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2 &&
                  (cu_seqlens.scalar_type() == at::kLong || cu_seqlens.scalar_type() == at::kInt),
              who, ": cu_seqlens must be int32/int64 [N + 1] with N >= 1");
  auto cu_cpu = cu_seqlens.to(at::kCPU, at::kLong).contiguous();
  const int64_t* cu = cu_cpu.data_ptr<int64_t>();
  const int64_t N = cu_cpu.numel() - 1, T = tokens.numel();
  TORCH_CHECK(cu[0] == 0 && cu[N] == T, who, ": cu_seqlens must start at 0 and end at T = ", T,
              ", got ", cu[0], " ... ", cu[N]);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(cu[i + 1] >= cu[i] + (last_only ? 1 : 0), who, ": cu_seqlens must be ",
                last_only ? "increasing (every sequence needs a token)" : "non-decreasing",
                ", got cu_seqlens[", i, "] = ", cu[i], ", cu_seqlens[", i + 1, "] = ", cu[i + 1]);
  }
  if (T > 0) {
    const auto lo = tokens.min().item<int64_t>(), hi = tokens.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < vocab_size, who, ": token ids must be in [0, ", vocab_size,
                "), got ", lo < 0 ? lo : hi);
  }
  if (state != nullptr) {
    TORCH_CHECK(state->num_sequences() == N && state->layers.size() == num_layers, who,
                ": state holds ", state->num_sequences(), " sequences of ", state->layers.size(),
                " layers, expected ", N, " of ", num_layers);
  }
  return cu_cpu;
}

at::Tensor check_step(const char* who, const at::Tensor& tokens, const RetNetState& state,
                      int64_t vocab_size, size_t num_layers, at::Device device) {
  const int64_t N = state.num_sequences();
  TORCH_CHECK(tokens.dim() == 1 && tokens.numel() == N && !at::isFloatingType(tokens.scalar_type()),
              who, ": tokens must be an integer tensor [N] = [", N, "] (one per sequence), got ",
              tokens.sizes());
  TORCH_CHECK(state.layers.size() == num_layers, who, ": state has ", state.layers.size(),
              " layers, the model ", num_layers);
  // The id range is checked where that costs no device round trip: on the host for host tokens;
  // for tokens already on a GPU by an asynchronous device assert, so a decode step never waits
  // for the device (and can be captured in a CUDA graph).
  if (N > 0 && tokens.device().is_cpu()) {
    const auto lo = tokens.min().item<int64_t>(), hi = tokens.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < vocab_size, who, ": token ids must be in [0, ", vocab_size,
                "), got ", lo < 0 ? lo : hi);
  }
  auto ids = tokens.to(device, at::kLong);
  if (N > 0 && ids.is_cuda() && !tokens.device().is_cpu()) {
    at::_assert_async(at::logical_and(ids >= 0, ids < vocab_size).all());
  }
  for (size_t l = 0; l < num_layers; ++l) {
    TORCH_CHECK(state.layers[l].is_contiguous() && state.layers[l].device() == device, who,
                ": state of layer ", l, " must be contiguous and on ", device);
  }
  return ids;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
  const bool one_row = x.dim() >= 1 && x.numel() == x.size(-1);
  const bool needs_grad = at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad());
  if (!one_row || !x.is_cpu() || !weight.is_cpu() || weight.dim() != 2 || weight.size(1) != x.size(-1) ||
      !weight.is_contiguous() || !matvec_dtype(x) || !matvec_dtype(weight) || needs_grad) {
    return at::linear(x, weight);
  }
  auto sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  return matvec_cpu(weight, x.reshape({-1})).view(sizes);
}

std::pair<at::Tensor, at::Tensor> pack_prompts(const char* who,
                                               const std::vector<std::vector<int64_t>>& prompts) {
  TORCH_CHECK(!prompts.empty(), who, ": no prompts");
  std::vector<int64_t> flat, cu = {0};
  for (size_t i = 0; i < prompts.size(); ++i) {
    TORCH_CHECK(!prompts[i].empty(), who, ": prompt ", i, " is empty (needs >= 1 token)");
    flat.insert(flat.end(), prompts[i].begin(), prompts[i].end());
    cu.push_back(static_cast<int64_t>(flat.size()));
  }
  return {at::tensor(flat, at::kLong), at::tensor(cu, at::kLong)};
}

}  // namespace detail
}  // namespace retention
