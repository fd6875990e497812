// retention::RetNet: the decoder-only RetNet language model of Python's retention.nn.RetNet,
// loaded from its safetensors checkpoint (RetNet.save_pretrained), for serving from C++.
//
// Same computation as the Python model (and the same ops underneath), per layer:
//   h = RMSNorm(x) (fp32 statistics, affine weight)
//   q = h Wq^T, k = (h Wk^T) * dk^-1/2, v = h Wv^T, g = h Wg^T          (no biases)
//   y = msr(q, k, v, g): torchscale rotation at each token's absolute position, raw retention,
//       1/sqrt(S_{p+1}) decay normaliser, per-head RMSNorm (eps), silu(g) gate    (fused op)
//   x = x + y Wo^T;  x = x + fc2(silu(fc1(n)) * gate(n)), n = RMSNorm(x)
// then logits = RMSNorm(x) W_out^T (W_out = the embedding when tie_embeddings).
//
// Batches are sets of sequences at their own positions: `prefill` packs prompts of different
// lengths into one chunk-form pass (cu_seqlens), `step` decodes one token for every sequence in
// the recurrent form. Weights in fp32, bf16 (or fp16/fp64); states and normalisation statistics
// are fp32 (fp64 for fp64 weights). Device: wherever the weights are (CPU, or CUDA through the
// same ops).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "retention/retention.h"

namespace retention {

// The constructor arguments of Python's RetNet (the checkpoint's "config" metadata).
struct RETENTION_API RetNetConfig {
  int64_t vocab_size = 0;
  int64_t embed_dim = 0;   // D (keys: dk = D / num_heads)
  int64_t value_dim = 0;   // Dv (values: dv = Dv / num_heads)
  int64_t num_heads = 0;
  int64_t num_layers = 0;
  int64_t ffn_dim = 0;
  double layernorm_eps = 1e-6;
  int64_t chunk_size = kDefaultChunkSize;
  std::string decay = "retnet";   // "retnet", "linspace", or "custom" (then decay_values)
  std::vector<double> decay_values;  // natural-log decays [num_heads] for "custom"
  bool tie_embeddings = false;

  int64_t key_head_dim() const { return embed_dim / num_heads; }
  int64_t value_head_dim() const { return value_dim / num_heads; }
  // fp32 [num_heads] log decays as the Python model computes them.
  at::Tensor log_decay() const;
  // Checks the sizes (positive, divisible, even dk <= 256); errors name the field.
  void validate() const;
  // JSON in the format of Python's retention.checkpoint.model_config.
  std::string to_json() const;
  static RetNetConfig from_json(const std::string& text);
};

// Decoding state of N sequences: per layer the retention state [N, H, dk, dv] (fp32) and each
// sequence's position (= tokens consumed so far).
struct RETENTION_API RetNetState {
  std::vector<at::Tensor> layers;
  at::Tensor offsets;  // int64 [N], on the model's device

  int64_t num_sequences() const { return offsets.defined() ? offsets.size(0) : 0; }
  // Sequences `index` (int64 [M], repeats allowed): splitting a batch, beam search.
  RetNetState select(const at::Tensor& index) const;
  RetNetState clone() const;
  // Several states (same model) as one batch, sequences in order.
  static RetNetState cat(const std::vector<RetNetState>& states);
};

struct SamplingOptions {
  double temperature = 0.0;  // <= 0: greedy (argmax)
  int64_t top_k = 0;         // > 0: sample among the k largest logits only
  uint64_t seed = 0;
};

// Token sampling with its own seeded generator: same steps as Python's RetNet._sample
// (logits.float() / temperature, top-k mask, softmax, multinomial), so a torch.Generator with
// the same seed draws the same tokens from the same logits.
class RETENTION_API Sampler {
 public:
  explicit Sampler(const SamplingOptions& options = {});
  // logits [N, V] (any float dtype / device) -> int64 [N] on the CPU.
  at::Tensor operator()(const at::Tensor& logits);
  const SamplingOptions& options() const { return options_; }

 private:
  SamplingOptions options_;
  at::Generator generator_;
};

struct LoadOptions {
  // Weights dtype (default: as stored). fp32 and bf16 are the tested ones.
  c10::optional<at::ScalarType> dtype;
  at::Device device = at::kCPU;
};

class RETENTION_API RetNet {
 public:
  // Reads a checkpoint of Python's RetNet.save_pretrained (or RetNet::save). Errors name the
  // file and the tensor (missing, wrong shape or dtype, corrupt file).
  static RetNet load(const std::string& path, const LoadOptions& options = {});
  // From a config and a state dict with Python's parameter names (checked against the config).
  RetNet(RetNetConfig config, const std::map<std::string, at::Tensor>& weights,
         const LoadOptions& options = {});

  // Writes a checkpoint Python's RetNet.from_pretrained reads. `metadata` is added (e.g.
  // "vocab"), reserved keys excepted.
  void save(const std::string& path, const std::map<std::string, std::string>& metadata = {}) const;

  const RetNetConfig& config() const { return config_; }
  at::ScalarType dtype() const { return embed_.scalar_type(); }
  at::Device device() const { return embed_.device(); }
  // Token id -> text, when the checkpoint has a "vocab" (character vocabulary); else empty.
  const std::vector<std::string>& vocab() const { return vocab_; }
  const std::map<std::string, at::Tensor>& weights() const { return weights_; }
  int64_t num_parameters() const;
  int64_t weight_bytes() const;

  // Zero state for n sequences at position 0.
  RetNetState init_state(int64_t n) const;

  // Chunk-form pass over N packed sequences: tokens int64 [T] (T = cu_seqlens[N]), cu_seqlens
  // int64/int32 [N + 1]. Continues from `state` (not modified) when given, else from position 0.
  // Returns (logits, new state): logits [T, V] for every token, or [N, V] for each sequence's
  // last token when last_only (empty sequences are not allowed then).
  std::pair<at::Tensor, RetNetState> forward(const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                                             const RetNetState* state = nullptr,
                                             bool last_only = false) const;
  // Prompts of different lengths (each >= 1 token) in one packed pass: (last logits [N, V],
  // state).
  std::pair<at::Tensor, RetNetState> prefill(const std::vector<std::vector<int64_t>>& prompts) const;
  // One recurrent step: tokens int64 [N] (one per sequence). Updates `state` in place (states
  // and offsets). Returns logits [N, V].
  at::Tensor step(const at::Tensor& tokens, RetNetState& state) const;

  struct GenerateStats {
    double prefill_seconds = 0, decode_seconds = 0;  // wall clock
    double prefill_cpu_seconds = 0, decode_cpu_seconds = 0;  // CPU time of the process (std::clock)
    int64_t prefill_tokens = 0;
    int64_t decode_tokens = 0;  // tokens run through step() (the first new token comes from prefill)
  };
  // Prefill, then max_new_tokens sampled tokens per prompt (as Python's RetNet.generate).
  // Returns the new tokens per prompt.
  // `on_logits(i, logits [N, V])` (optional) sees the logits each new token i is sampled from.
  // A prompt ends early at a token of `eos_token_ids`, which is included in its output.
  std::vector<std::vector<int64_t>> generate(
      const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens, Sampler& sampler,
      GenerateStats* stats = nullptr,
      const std::function<void(int64_t, const at::Tensor&)>& on_logits = {},
      const std::vector<int64_t>& eos_token_ids = {}) const;

 private:
  struct Layer {
    at::Tensor attn_norm, wq, wk, wv, wg, wo, ffn_norm, fc1, gate, fc2;
  };
  // One decoder block around the retention core `retain` (q, k, v, g [B, T, H, d] -> y).
  template <typename Retain>
  at::Tensor block(const Layer& layer, const at::Tensor& x, Retain&& retain) const;
  at::Tensor head(const at::Tensor& x) const;
  MsrOptions msr_options() const;

  RetNetConfig config_;
  std::map<std::string, at::Tensor> weights_;
  std::vector<Layer> layers_;
  at::Tensor embed_, final_norm_, output_, log_decay_;
  std::vector<std::string> vocab_;
};

}  // namespace retention
