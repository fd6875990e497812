// retention::FlaRetNet: the RetNet of flash-linear-attention (FLA 0.6.0) in its Hugging Face
// directory format, the model Python's retention.models.RetNetForCausalLM runs, for serving from
// C++. A directory holds
//   config.json                     FLA's RetNetConfig ("model_type": "retnet")
//   model.safetensors               or model.safetensors.index.json + the shards it lists
// (a tokenizer.model beside them is the app's business, not the library's).
//
// Same computation as retention/models/retnet_fla.py (and the same fused ops), per block:
//   a = RMSNorm(x) (fp32 statistics, times the weight in fp32, cast back)
//   q = a Wq^T [H heads], k = a Wk^T, v = a Wv^T [num_kv_heads heads], g = a Wg^T (no biases)
//   q, k = feature_map(q), feature_map(k) (if set); kv head j serves query heads j*G..j*G+G-1
//   y = msr(q, k, v, g): GPT-NeoX rotary at each token's position, raw retention with scale
//       dk^-1/2 and gamma_h = 1 - 2^(-5-h), per-head RMSNorm with one weight [dv] shared by the
//       heads, silu(g) gate (fused op; no gate when use_output_gate is false)
//   x = x + y Wo^T;  x = x + down(silu(gate(n)) * up(n)), n = RMSNorm(x)
// then logits = RMSNorm(x) W_lm^T (W_lm = the embedding when tie_word_embeddings).
//
// Weights stay in the stored dtype (bf16 checkpoints are bf16 in memory, shared with the mapped
// files when no conversion is asked for); states and norm statistics are fp32. States and
// batches are RetNetState and packed prompts, exactly as for retention::RetNet.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "retention/model.h"
#include "retention/retention.h"

namespace retention {

// FLA's RetNetConfig, the fields this implementation reads (defaults are FLA's), plus the sizes
// FLA derives from them.
struct RETENTION_API FlaRetNetConfig {
  int64_t vocab_size = 32000;
  int64_t hidden_size = 2048;
  int64_t num_hidden_layers = 24;
  int64_t num_heads = 8;
  int64_t num_kv_heads = 0;  // 0: null in config.json, i.e. num_heads
  double expand_k = 1.0, expand_v = 2.0;
  double hidden_ratio = 2.0;          // used when intermediate_size is null; 0: null (FLA then uses 4)
  int64_t intermediate_size = 0;      // 0: null in config.json (derived from hidden_ratio)
  std::string feature_map;            // empty: none
  bool use_output_gate = true;
  bool elementwise_affine = true;     // the head norm's weight exists
  bool fuse_norm = true;              // only decides that weight's name
  double norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 1, eos_token_id = 2, pad_token_id = -1;  // -1: null

  // Derived as FLA derives them (head sizes, kv heads, GatedMLP width).
  int64_t head_k_dim() const;
  int64_t head_v_dim() const;
  int64_t kv_heads() const { return num_kv_heads > 0 ? num_kv_heads : num_heads; }
  int64_t mlp_dim() const;
  // The head norm's parameter name inside a layer's "attn." ("g_norm_swish_gate" or "g_norm").
  std::string head_norm_name() const;

  // Checks what this implementation can run; errors name the config field.
  void validate() const;
  // Parameter names (FLA's state_dict keys, lm_head.weight omitted when tied) and shapes.
  std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes() const;
  // The config fields that decide the shape of parameter `name` (for error messages).
  static std::string shape_fields(const std::string& name);

  // Parses config.json text. Field types are checked as Python's RetNetConfig checks them;
  // fields this implementation does not run (short convolutions, hybrid attention layers, ...)
  // are refused. Errors start with `where` (the file) and name the field.
  static FlaRetNetConfig from_json(const std::string& text, const std::string& where = "config.json");
};

class RETENTION_API FlaRetNet {
 public:
  using GenerateStats = RetNet::GenerateStats;

  // Loads an FLA-format directory (config.json + model.safetensors or the index and its shards).
  // Every file is checked before a weight is used: a missing file or shard, a config field of the
  // wrong type, a missing, unexpected or misplaced tensor, a shape that disagrees with the config
  // or a non-float dtype is an error naming the file, the tensor and the config fields.
  static FlaRetNet load(const std::string& directory, const LoadOptions& options = {});
  // From a config and a state dict with FLA's parameter names (checked against the config).
  FlaRetNet(FlaRetNetConfig config, const std::map<std::string, at::Tensor>& weights,
            const LoadOptions& options = {});

  const FlaRetNetConfig& config() const { return config_; }
  at::ScalarType dtype() const { return embed_.scalar_type(); }
  at::Device device() const { return embed_.device(); }
  const std::map<std::string, at::Tensor>& weights() const { return weights_; }
  int64_t num_parameters() const;
  int64_t weight_bytes() const;

  // Same contracts as RetNet's: zero state for n sequences; a chunk-form pass over packed
  // sequences (tokens [T], cu_seqlens [N + 1], continuing from `state` when given); prompts in
  // one packed pass (last logits [N, V]); one recurrent step for every sequence (state updated
  // in place); prefill + max_new_tokens sampled tokens per prompt.
  RetNetState init_state(int64_t n) const;
  std::pair<at::Tensor, RetNetState> forward(const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                                             const RetNetState* state = nullptr,
                                             bool last_only = false) const;
  std::pair<at::Tensor, RetNetState> prefill(const std::vector<std::vector<int64_t>>& prompts) const;
  at::Tensor step(const at::Tensor& tokens, RetNetState& state) const;
  std::vector<std::vector<int64_t>> generate(
      const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens, Sampler& sampler,
      GenerateStats* stats = nullptr,
      const std::function<void(int64_t, const at::Tensor&)>& on_logits = {},
      const std::vector<int64_t>& eos_token_ids = {}) const;

 private:
  struct Layer {
    at::Tensor attn_norm, wq, wk, wv, wg, wo, head_norm, mlp_norm, gate_proj, up_proj, down_proj;
  };
  template <typename Retain>
  at::Tensor block(const Layer& layer, const at::Tensor& x, Retain&& retain) const;
  at::Tensor head(const at::Tensor& x) const;
  MsrOptions msr_options() const;

  FlaRetNetConfig config_;
  std::map<std::string, at::Tensor> weights_;
  std::vector<Layer> layers_;
  at::Tensor embed_, final_norm_, lm_head_, log_decay_;
};

}  // namespace retention
