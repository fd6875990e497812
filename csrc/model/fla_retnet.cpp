// retention::FlaRetNet (see retention/fla.h): the blocks, prefill and step of FLA's RetNet.
// Every step mirrors python/retention/models/retnet_fla.py op for op (RetNetRMSNorm,
// MultiScaleRetention on the fused op, GatedMLP), so the two pick the same greedy tokens and
// agree to the rounding of their matmuls.
#include "retention/fla.h"

#include <algorithm>

#include <ATen/ATen.h>

#include "model/decoding.h"

namespace retention {
namespace {

using at::Tensor;

// fla.modules.RMSNorm as Python's RetNetRMSNorm: statistics and the weight in fp32, then cast
// back (the order matters for bf16: one rounding, after the weight).
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  const auto xf = x.to(at::kFloat);
  const auto y = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight.to(at::kFloat);
  return y.to(x.scalar_type());
}

// transformers' ACT2FN entries that FlaRetNetConfig::validate accepts.
Tensor feature_map(const std::string& name, const Tensor& x) {
  if (name == "relu") return at::relu(x);
  if (name == "silu" || name == "swish") return at::silu(x);
  if (name == "sigmoid") return at::sigmoid(x);
  if (name == "tanh") return at::tanh(x);
  if (name == "elu") return at::elu(x);
  if (name == "gelu") return at::gelu(x);  // exact (erf) GELU, as ACT2FN["gelu"]
  return x;                                // identity / linear
}

OptTensor opt_tensor(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

}  // namespace

FlaRetNet::FlaRetNet(FlaRetNetConfig config, const std::map<std::string, Tensor>& weights,
                     const LoadOptions& options)
    : config_(std::move(config)) {
  config_.validate();
  const auto expected = config_.parameter_shapes();
  const bool tied = config_.tie_word_embeddings;
  for (const auto& kv : weights) {
    const bool known = std::any_of(expected.begin(), expected.end(),
                                   [&](const auto& e) { return e.first == kv.first; });
    // a tied lm_head (state_dict() lists it) is the embedding: ignored
    TORCH_CHECK(known || (tied && kv.first == "lm_head.weight"), "FlaRetNet: unexpected weight '",
                kv.first, "' (not a parameter of FLA's RetNet with this config)");
  }
  const auto embed = weights.find("model.embeddings.weight");
  const at::ScalarType dtype =
      options.dtype ? *options.dtype : (embed != weights.end() ? embed->second.scalar_type() : at::kFloat);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "FlaRetNet: weights dtype must be fp32, bf16 or fp16, got ", dtype);
  for (const auto& [name, shape] : expected) {
    const auto it = weights.find(name);
    TORCH_CHECK(it != weights.end() && it->second.defined(), "FlaRetNet: weight '", name, "' is missing");
    TORCH_CHECK(it->second.sizes() == at::IntArrayRef(shape), "FlaRetNet: weight '", name, "' has shape ",
                it->second.sizes(), ", the config (", FlaRetNetConfig::shape_fields(name), ") implies ",
                at::IntArrayRef(shape));
    TORCH_CHECK(at::isFloatingType(it->second.scalar_type()), "FlaRetNet: weight '", name,
                "' has dtype ", it->second.scalar_type(), ", expected floating point");
    // no copy when device and dtype already match: the tensor keeps sharing the mapped file
    weights_[name] = it->second.to(options.device, dtype).contiguous();
  }
  auto w = [&](const std::string& name) { return weights_.at(name); };
  auto maybe = [&](const std::string& name) { return weights_.count(name) ? weights_.at(name) : Tensor(); };
  embed_ = w("model.embeddings.weight");
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    layers_.push_back({w(p + "attn_norm.weight"), w(p + "attn.q_proj.weight"), w(p + "attn.k_proj.weight"),
                       w(p + "attn.v_proj.weight"), maybe(p + "attn.g_proj.weight"),
                       w(p + "attn.o_proj.weight"), maybe(p + "attn." + config_.head_norm_name() + ".weight"),
                       w(p + "mlp_norm.weight"), w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight"),
                       w(p + "mlp.down_proj.weight")});
  }
  final_norm_ = w("model.norm.weight");
  lm_head_ = tied ? embed_ : w("lm_head.weight");
  // fp32 decays gamma_h = 1 - 2^(-5-h), as Python's retnet_log_decay (never in the weights' dtype)
  log_decay_ = retnet_log_decay(config_.num_heads).to(options.device);
}

int64_t FlaRetNet::num_parameters() const {
  int64_t n = 0;
  for (const auto& kv : weights_) n += kv.second.numel();
  return n;
}

int64_t FlaRetNet::weight_bytes() const {
  int64_t n = 0;
  for (const auto& kv : weights_) n += kv.second.numel() * kv.second.element_size();
  return n;
}

RetNetState FlaRetNet::init_state(int64_t n) const {
  TORCH_CHECK(n >= 0, "FlaRetNet::init_state: n must be >= 0, got ", n);
  RetNetState s;
  const auto opts = at::TensorOptions().device(device()).dtype(at::kFloat);
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    s.layers.push_back(at::zeros({n, config_.num_heads, config_.head_k_dim(), config_.head_v_dim()}, opts));
  }
  s.offsets = at::zeros({n}, at::TensorOptions().device(device()).dtype(at::kLong));
  return s;
}

MsrOptions FlaRetNet::msr_options() const {
  // MultiScaleRetention.forward in retnet_fla.py: GPT-NeoX rotary, the op's default scale dk^-1/2
  // on q.k (FLA does not scale the key), per-head RMSNorm with the shared weight, no decay
  // normaliser; the default chunk size.
  MsrOptions o;
  o.form = Form::Chunk;
  o.chunk_size = kDefaultChunkSize;
  o.rotary = Rotary::Neox;
  o.norm = true;
  o.eps = config_.norm_eps;
  o.decay_norm = false;
  return o;
}

template <typename Retain>
Tensor FlaRetNet::block(const Layer& layer, const Tensor& x, Retain&& retain) const {
  const int64_t B = x.size(0), T = x.size(1), H = config_.num_heads, Hkv = config_.kv_heads();
  const int64_t dk = config_.head_k_dim(), dv = config_.head_v_dim();
  const double eps = config_.norm_eps;
  const auto a = rms_norm(x, layer.attn_norm, eps);
  Tensor q = detail::linear(a, layer.wq).view({B, T, H, dk});
  Tensor k = detail::linear(a, layer.wk).view({B, T, Hkv, dk});
  Tensor v = detail::linear(a, layer.wv).view({B, T, Hkv, dv});
  if (!config_.feature_map.empty()) {
    q = feature_map(config_.feature_map, q);
    k = feature_map(config_.feature_map, k);
  }
  if (Hkv != H) {  // FLA's repeat(k, '... h d -> ... (h g) d'): kv head j serves q heads j*G..j*G+G-1
    k = k.repeat_interleave(H / Hkv, 2);
    v = v.repeat_interleave(H / Hkv, 2);
  }
  Tensor g;
  if (config_.use_output_gate) g = detail::linear(a, layer.wg).view({B, T, H, dv});
  const Tensor y = retain(q, k, v, g);  // [B, T, H, dv]
  const auto h = x + detail::linear(y.reshape({B, T, H * dv}), layer.wo);
  const auto n = rms_norm(h, layer.mlp_norm, eps);
  return h + detail::linear(at::silu(detail::linear(n, layer.gate_proj)) * detail::linear(n, layer.up_proj),
                        layer.down_proj);
}

Tensor FlaRetNet::head(const Tensor& x) const {
  return detail::linear(rms_norm(x, final_norm_, config_.norm_eps), lm_head_);
}

std::pair<Tensor, RetNetState> FlaRetNet::forward(const Tensor& tokens, const Tensor& cu_seqlens,
                                                  const RetNetState* state, bool last_only) const {
  const auto cu_cpu = detail::check_packed("FlaRetNet::forward", tokens, cu_seqlens, config_.vocab_size,
                                           last_only, state, layers_.size());
  const int64_t N = cu_cpu.numel() - 1;
  const auto cu_dev = cu_cpu.to(device());
  const auto opts = msr_options();
  RetNetState next;
  // Prompts packed as variable-length sequences (as Python packs a padded batch): none sees
  // another's tokens, each starts at its own position.
  Tensor x = at::embedding(embed_, tokens.to(device(), at::kLong)).unsqueeze(0);  // [1, T, D]
  for (size_t l = 0; l < layers_.size(); ++l) {
    x = block(layers_[l], x, [&](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g) {
      OptTensor init, offsets;
      if (state != nullptr) {
        init = state->layers[l];
        offsets = state->offsets;
      }
      auto [y, final_state] = msr_forward(q, k, v, opt_tensor(g), log_decay_, opts, init, offsets, cu_dev,
                                          opt_tensor(layers_[l].head_norm));
      next.layers.push_back(final_state);
      return y;
    });
  }
  const auto lengths = cu_dev.slice(0, 1) - cu_dev.slice(0, 0, N);
  next.offsets = (state != nullptr ? state->offsets : at::zeros_like(lengths)) + lengths;
  x = x.squeeze(0);
  if (last_only) x = x.index_select(0, cu_dev.slice(0, 1) - 1);
  return {head(x), std::move(next)};
}

std::pair<Tensor, RetNetState> FlaRetNet::prefill(const std::vector<std::vector<int64_t>>& prompts) const {
  const auto [tokens, cu] = detail::pack_prompts("FlaRetNet::prefill", prompts);
  return forward(tokens, cu, nullptr, /*last_only=*/true);
}

Tensor FlaRetNet::step(const Tensor& tokens, RetNetState& state) const {
  const auto ids = detail::check_step("FlaRetNet::step", tokens, state, config_.vocab_size,
                                      layers_.size(), device());
  const auto opts = msr_options();
  Tensor x = at::embedding(embed_, ids).unsqueeze(1);  // [N, 1, D]
  for (size_t l = 0; l < layers_.size(); ++l) {
    Tensor& S = state.layers[l];
    x = block(layers_[l], x, [&](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g) {
      return msr_step(q, k, v, opt_tensor(g), log_decay_, S, opts, state.offsets,
                      opt_tensor(layers_[l].head_norm));
    });
  }
  state.offsets.add_(1);
  return head(x.squeeze(1));
}

std::vector<std::vector<int64_t>> FlaRetNet::generate(
    const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens, Sampler& sampler,
    GenerateStats* stats, const std::function<void(int64_t, const Tensor&)>& on_logits,
    const std::vector<int64_t>& eos_token_ids) const {
  return detail::generate(*this, prompts, max_new_tokens, sampler, stats, on_logits, eos_token_ids);
}

}  // namespace retention
