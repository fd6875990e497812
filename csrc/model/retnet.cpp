// retention::RetNet (see retention/model.h): loading, the decoder blocks, prefill and step.
// Every step mirrors python/retention/nn.py (RetNet, RetNetDecoderLayer, MultiScaleRetention
// with the fused op, RMSNorm, GLU) op for op, so the two agree to fp32 rounding.
#include "retention/model.h"

#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "model/decoding.h"
#include "retention/safetensors.h"

namespace retention {
namespace {

using at::Tensor;
using json = nlohmann::json;

constexpr const char* kModelType = "retention.RetNet";  // as Python's retention.checkpoint

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// torchscale RMSNorm as in nn.RMSNorm: statistics in fp32 (fp64), cast back, times the weight.
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  auto xf = x.to(compute_dtype(x.scalar_type()));
  auto out = (xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps)).to(x.scalar_type());
  return out * weight;
}

bool is_swish(const std::string& name) { return name == "swish" || name == "silu"; }

// Parameter names of Python's RetNet with their shapes under `c`.
std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes(const RetNetConfig& c) {
  const int64_t V = c.vocab_size, D = c.embed_dim, Dv = c.value_dim, F = c.ffn_dim;
  std::vector<std::pair<std::string, std::vector<int64_t>>> out = {{"embed_tokens.weight", {V, D}}};
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    out.push_back({p + "retention_layer_norm.weight", {D}});
    out.push_back({p + "retention.q_proj.weight", {D, D}});
    out.push_back({p + "retention.k_proj.weight", {D, D}});
    out.push_back({p + "retention.v_proj.weight", {Dv, D}});
    out.push_back({p + "retention.g_proj.weight", {Dv, D}});
    out.push_back({p + "retention.out_proj.weight", {D, Dv}});
    out.push_back({p + "final_layer_norm.weight", {D}});
    out.push_back({p + "ffn.fc1.weight", {F, D}});
    out.push_back({p + "ffn.gate.weight", {F, D}});
    out.push_back({p + "ffn.fc2.weight", {D, F}});
  }
  out.push_back({"layer_norm.weight", {D}});
  if (!c.tie_embeddings) out.push_back({"output_projection.weight", {V, D}});
  return out;
}

}  // namespace

// ---- config ------------------------------------------------------------------------------------
at::Tensor RetNetConfig::log_decay() const {
  if (decay == "retnet") return retnet_log_decay(num_heads);
  if (decay == "linspace") return linspace_log_decay(num_heads);
  TORCH_CHECK(decay == "custom", "RetNet config: decay must be 'retnet', 'linspace' or a list, got '",
              decay, "'");
  // As Python: torch.tensor(list, float64).to(float32).
  return at::tensor(decay_values, at::kDouble).to(at::kFloat);
}

void RetNetConfig::validate() const {
  const std::pair<const char*, int64_t> sizes[] = {
      {"vocab_size", vocab_size}, {"embed_dim", embed_dim}, {"value_dim", value_dim},
      {"num_heads", num_heads},   {"num_layers", num_layers}, {"ffn_dim", ffn_dim},
      {"chunk_size", chunk_size}};
  for (const auto& [name, value] : sizes) {
    TORCH_CHECK(value > 0, "RetNet config: ", name, " must be positive, got ", value);
  }
  TORCH_CHECK(embed_dim % num_heads == 0 && value_dim % num_heads == 0, "RetNet config: embed_dim (",
              embed_dim, ") and value_dim (", value_dim, ") must be divisible by num_heads (",
              num_heads, ")");
  TORCH_CHECK(key_head_dim() % 2 == 0 && key_head_dim() <= kMaxHeadDimK,
              "RetNet config: key head dim embed_dim/num_heads must be even and <= ", kMaxHeadDimK,
              ", got ", key_head_dim());
  TORCH_CHECK(layernorm_eps >= 0, "RetNet config: layernorm_eps must be >= 0, got ", layernorm_eps);
  TORCH_CHECK(decay != "custom" || static_cast<int64_t>(decay_values.size()) == num_heads,
              "RetNet config: decay list has ", decay_values.size(), " values, num_heads is ",
              num_heads);
  for (double d : decay_values) {
    TORCH_CHECK(std::isfinite(d) && d <= 0, "RetNet config: decay values must be finite log decays <= 0, got ", d);
  }
}

std::string RetNetConfig::to_json() const {
  json j = {{"vocab_size", vocab_size},   {"embed_dim", embed_dim},  {"value_dim", value_dim},
            {"num_heads", num_heads},     {"num_layers", num_layers}, {"ffn_dim", ffn_dim},
            {"layernorm_eps", layernorm_eps}, {"chunk_size", chunk_size},
            {"gate_fn", "swish"},         {"activation_fn", "swish"},
            {"tie_embeddings", tie_embeddings}, {"rotary", "torchscale"}};
  if (decay == "custom") {
    j["decay"] = decay_values;
  } else {
    j["decay"] = decay;
  }
  return j.dump();
}

RetNetConfig RetNetConfig::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "RetNet config is not valid JSON (", e.what(), ")");
  }
  TORCH_CHECK(j.is_object(), "RetNet config must be a JSON object");
  RetNetConfig c;
  auto get_int = [&](const char* key, int64_t* out, bool required) {
    const auto it = j.find(key);
    if (it == j.end()) {
      TORCH_CHECK(!required, "RetNet config: '", key, "' is missing");
      return;
    }
    TORCH_CHECK(it->is_number_integer(), "RetNet config: '", key, "' must be an integer, got ", it->dump());
    *out = it->get<int64_t>();
  };
  auto get_str = [&](const char* key, const char* fallback) {
    const auto it = j.find(key);
    if (it == j.end()) return std::string(fallback);
    TORCH_CHECK(it->is_string(), "RetNet config: '", key, "' must be a string, got ", it->dump());
    return it->get<std::string>();
  };
  get_int("vocab_size", &c.vocab_size, true);
  get_int("embed_dim", &c.embed_dim, true);
  get_int("value_dim", &c.value_dim, true);
  get_int("num_heads", &c.num_heads, true);
  get_int("num_layers", &c.num_layers, true);
  get_int("ffn_dim", &c.ffn_dim, true);
  get_int("chunk_size", &c.chunk_size, false);
  if (j.contains("layernorm_eps")) {
    TORCH_CHECK(j["layernorm_eps"].is_number(), "RetNet config: 'layernorm_eps' must be a number");
    c.layernorm_eps = j["layernorm_eps"].get<double>();
  }
  if (j.contains("tie_embeddings")) {
    TORCH_CHECK(j["tie_embeddings"].is_boolean(), "RetNet config: 'tie_embeddings' must be a boolean");
    c.tie_embeddings = j["tie_embeddings"].get<bool>();
  }
  const auto decay = j.find("decay");
  if (decay != j.end() && decay->is_array()) {
    c.decay = "custom";
    for (const auto& d : *decay) {
      TORCH_CHECK(d.is_number(), "RetNet config: decay list must hold numbers, got ", d.dump());
      c.decay_values.push_back(d.get<double>());
    }
  } else {
    c.decay = get_str("decay", "retnet");
  }
  // The fused layer core has the swish gate built in; other activations are not served here.
  const std::string gate = get_str("gate_fn", "swish"), act = get_str("activation_fn", "swish");
  TORCH_CHECK(is_swish(gate) && is_swish(act), "RetNet config: the C++ model supports gate_fn and "
              "activation_fn 'swish' only, got '", gate, "' and '", act, "'");
  const std::string rotary = get_str("rotary", "torchscale");
  TORCH_CHECK(rotary == "torchscale", "RetNet config: rotary must be 'torchscale', got '", rotary, "'");
  c.validate();
  return c;
}

// ---- state -------------------------------------------------------------------------------------
RetNetState RetNetState::select(const Tensor& index) const {
  RetNetState out;
  const auto idx = index.to(offsets.device(), at::kLong);
  for (const auto& s : layers) out.layers.push_back(s.index_select(0, idx));
  out.offsets = offsets.index_select(0, idx);
  return out;
}

RetNetState RetNetState::clone() const {
  RetNetState out;
  for (const auto& s : layers) out.layers.push_back(s.clone());
  out.offsets = offsets.clone();
  return out;
}

RetNetState RetNetState::cat(const std::vector<RetNetState>& states) {
  TORCH_CHECK(!states.empty(), "RetNetState::cat: no states");
  RetNetState out;
  const size_t L = states[0].layers.size();
  std::vector<Tensor> offs;
  for (const auto& s : states) {
    TORCH_CHECK(s.layers.size() == L, "RetNetState::cat: states of models with different depths");
    offs.push_back(s.offsets);
  }
  for (size_t l = 0; l < L; ++l) {
    std::vector<Tensor> parts;
    for (const auto& s : states) parts.push_back(s.layers[l]);
    out.layers.push_back(at::cat(parts, 0));
  }
  out.offsets = at::cat(offs, 0);
  return out;
}

// ---- loading -----------------------------------------------------------------------------------
RetNet RetNet::load(const std::string& path, const LoadOptions& options) {
  SafetensorsFile file(path);
  const std::string where = "checkpoint '" + path + "'";
  const std::string type = file.metadata("model_type", "");
  TORCH_CHECK(type == kModelType, where, ": metadata model_type is '", type, "', expected '",
              kModelType, "' (written by retention.nn.RetNet.save_pretrained)");
  TORCH_CHECK(file.metadata().count("config"), where, ": metadata 'config' is missing");
  RetNetConfig config;
  try {
    config = RetNetConfig::from_json(file.metadata("config", ""));
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, where, ": ", e.msg());
  }
  std::map<std::string, Tensor> weights;
  for (const auto& [name, shape] : parameter_shapes(config)) {
    weights[name] = file.tensor(name, shape);  // errors name the tensor
  }
  for (const auto& entry : file.entries()) {
    TORCH_CHECK(weights.count(entry.first), where, ": unexpected tensor '", entry.first,
                "' (not a parameter of this config", config.tie_embeddings ? ", embeddings tied" : "",
                ")");
  }
  LoadOptions opts = options;
  if (!opts.dtype) opts.dtype = weights.at("embed_tokens.weight").scalar_type();
  RetNet model(std::move(config), weights, opts);
  const std::string vocab = file.metadata("vocab", "");
  if (!vocab.empty()) {
    json v;
    try {
      v = json::parse(vocab);
    } catch (const json::exception& e) {
      TORCH_CHECK(false, where, ": metadata 'vocab' is not valid JSON (", e.what(), ")");
    }
    TORCH_CHECK(v.is_array() && static_cast<int64_t>(v.size()) == model.config_.vocab_size, where,
                ": metadata 'vocab' must be a list of ", model.config_.vocab_size, " strings");
    for (const auto& s : v) {
      TORCH_CHECK(s.is_string(), where, ": metadata 'vocab' must hold strings");
      model.vocab_.push_back(s.get<std::string>());
    }
  }
  return model;
}

RetNet::RetNet(RetNetConfig config, const std::map<std::string, Tensor>& weights,
               const LoadOptions& options)
    : config_(std::move(config)) {
  config_.validate();
  const auto expected = parameter_shapes(config_);
  for (const auto& [name, t] : weights) {
    const bool known = std::any_of(expected.begin(), expected.end(),
                                   [&](const auto& e) { return e.first == name; });
    TORCH_CHECK(known, "RetNet: unexpected weight '", name, "'");
  }
  const at::ScalarType dtype =
      options.dtype ? *options.dtype
                    : (weights.count("embed_tokens.weight") ? weights.at("embed_tokens.weight").scalar_type()
                                                            : at::kFloat);
  TORCH_CHECK(at::isFloatingType(dtype), "RetNet: weights dtype must be floating point, got ", dtype);
  for (const auto& [name, shape] : expected) {
    const auto it = weights.find(name);
    TORCH_CHECK(it != weights.end() && it->second.defined(), "RetNet: weight '", name, "' is missing");
    TORCH_CHECK(it->second.sizes() == at::IntArrayRef(shape), "RetNet: weight '", name, "' has shape ",
                it->second.sizes(), ", the config needs ", at::IntArrayRef(shape));
    TORCH_CHECK(at::isFloatingType(it->second.scalar_type()), "RetNet: weight '", name,
                "' has dtype ", it->second.scalar_type(), ", expected floating point");
    weights_[name] = it->second.to(options.device, dtype).contiguous();
  }
  auto w = [&](const std::string& name) { return weights_.at(name); };
  embed_ = w("embed_tokens.weight");
  for (int64_t i = 0; i < config_.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    layers_.push_back({w(p + "retention_layer_norm.weight"), w(p + "retention.q_proj.weight"),
                       w(p + "retention.k_proj.weight"), w(p + "retention.v_proj.weight"),
                       w(p + "retention.g_proj.weight"), w(p + "retention.out_proj.weight"),
                       w(p + "final_layer_norm.weight"), w(p + "ffn.fc1.weight"),
                       w(p + "ffn.gate.weight"), w(p + "ffn.fc2.weight")});
  }
  final_norm_ = w("layer_norm.weight");
  output_ = config_.tie_embeddings ? embed_ : w("output_projection.weight");
  // fp32 decays (fp64 for fp64 weights), never rounded to the weights' dtype (as in Python).
  log_decay_ = config_.log_decay().to(options.device, compute_dtype(dtype));
}

void RetNet::save(const std::string& path, const std::map<std::string, std::string>& metadata) const {
  std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"model_type", kModelType}, {"config", config_.to_json()}};
  for (const auto& [key, value] : metadata) {
    TORCH_CHECK(!meta.count(key), "RetNet::save: metadata key '", key, "' is reserved");
    meta[key] = value;
  }
  if (!vocab_.empty() && !meta.count("vocab")) meta["vocab"] = json(vocab_).dump();
  save_safetensors(path, {weights_.begin(), weights_.end()}, meta);
}

int64_t RetNet::num_parameters() const {
  int64_t n = 0;
  for (const auto& kv : weights_) n += kv.second.numel();
  return n;
}

int64_t RetNet::weight_bytes() const {
  int64_t n = 0;
  for (const auto& kv : weights_) n += kv.second.numel() * kv.second.element_size();
  return n;
}

RetNetState RetNet::init_state(int64_t n) const {
  TORCH_CHECK(n >= 0, "RetNet::init_state: n must be >= 0, got ", n);
  RetNetState s;
  const auto opts = at::TensorOptions().device(device()).dtype(compute_dtype(dtype()));
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    s.layers.push_back(at::zeros({n, config_.num_heads, config_.key_head_dim(), config_.value_head_dim()}, opts));
  }
  s.offsets = at::zeros({n}, at::TensorOptions().device(device()).dtype(at::kLong));
  return s;
}

// ---- computation -------------------------------------------------------------------------------
MsrOptions RetNet::msr_options() const {
  // MultiScaleRetention._fused_options: the key is scaled before the rotation (scale 1 in the op),
  // torchscale rotation, per-head RMSNorm without affine, torchscale's decay normaliser.
  MsrOptions o;
  o.form = Form::Chunk;
  o.chunk_size = config_.chunk_size;
  o.scale = 1.0;
  o.rotary = Rotary::Torchscale;
  o.norm = true;
  o.eps = config_.layernorm_eps;
  o.decay_norm = true;
  return o;
}

template <typename Retain>
Tensor RetNet::block(const Layer& layer, const Tensor& x, Retain&& retain) const {
  const int64_t B = x.size(0), T = x.size(1), H = config_.num_heads;
  const int64_t dk = config_.key_head_dim(), dv = config_.value_head_dim();
  const auto h = rms_norm(x, layer.attn_norm, config_.layernorm_eps);
  const auto q = detail::linear(h, layer.wq).view({B, T, H, dk});
  const auto k = (detail::linear(h, layer.wk) * std::pow(static_cast<double>(dk), -0.5)).view({B, T, H, dk});
  const auto v = detail::linear(h, layer.wv).view({B, T, H, dv});
  const auto g = detail::linear(h, layer.wg).view({B, T, H, dv});
  const Tensor y = retain(q, k, v, g);
  const auto r = x + detail::linear(y.reshape({B, T, config_.value_dim}), layer.wo);
  const auto n = rms_norm(r, layer.ffn_norm, config_.layernorm_eps);
  return r + detail::linear(at::silu(detail::linear(n, layer.fc1)) * detail::linear(n, layer.gate), layer.fc2);
}

Tensor RetNet::head(const Tensor& x) const {
  return detail::linear(rms_norm(x, final_norm_, config_.layernorm_eps), output_);
}

std::pair<Tensor, RetNetState> RetNet::forward(const Tensor& tokens, const Tensor& cu_seqlens,
                                               const RetNetState* state, bool last_only) const {
  const auto cu_cpu = detail::check_packed("RetNet::forward", tokens, cu_seqlens, config_.vocab_size,
                                           last_only, state, layers_.size());
  const int64_t N = cu_cpu.numel() - 1;
  const auto cu_dev = cu_cpu.to(device());
  const auto opts = msr_options();
  RetNetState next;
  Tensor x = at::embedding(embed_, tokens.to(device(), at::kLong)).unsqueeze(0);  // [1, T, D]
  for (size_t l = 0; l < layers_.size(); ++l) {
    x = block(layers_[l], x, [&](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g) {
      OptTensor init, offsets;
      if (state != nullptr) {
        init = state->layers[l];
        offsets = state->offsets;
      }
      auto [y, final_state] = msr_forward(q, k, v, g, log_decay_, opts, init, offsets, cu_dev);
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

std::pair<Tensor, RetNetState> RetNet::prefill(const std::vector<std::vector<int64_t>>& prompts) const {
  const auto [tokens, cu] = detail::pack_prompts("RetNet::prefill", prompts);
  return forward(tokens, cu, nullptr, /*last_only=*/true);
}

Tensor RetNet::step(const Tensor& tokens, RetNetState& state) const {
  const auto ids = detail::check_step("RetNet::step", tokens, state, config_.vocab_size,
                                      layers_.size(), device());
  const auto opts = msr_options();
  Tensor x = at::embedding(embed_, ids).unsqueeze(1);  // [N, 1, D]
  for (size_t l = 0; l < layers_.size(); ++l) {
    Tensor& S = state.layers[l];
    x = block(layers_[l], x, [&](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g) {
      return msr_step(q, k, v, g, log_decay_, S, opts, state.offsets);
    });
  }
  state.offsets.add_(1);
  return head(x.squeeze(1));
}

std::vector<std::vector<int64_t>> RetNet::generate(const std::vector<std::vector<int64_t>>& prompts,
                                                   int64_t max_new_tokens, Sampler& sampler,
                                                   GenerateStats* stats,
                                                   const std::function<void(int64_t, const Tensor&)>& on_logits,
                                                   const std::vector<int64_t>& eos_token_ids) const {
  return detail::generate(*this, prompts, max_new_tokens, sampler, stats, on_logits, eos_token_ids);
}

}  // namespace retention
