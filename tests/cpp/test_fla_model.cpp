// GoogleTest of retention::FlaRetNet (retention/fla.h): FLA-format checkpoint directories, CPU.
//
// Each test writes its own small directories in FLA's layout (config.json + model.safetensors,
// or model.safetensors.index.json + shards), with FLA's parameter names and shapes written out
// here independently of the library (as tests/python/fla_retnet_reference.py does), and judges
// the model against a float64 reference of FLA's forward written here from the math, per
// sequence in the parallel form:
//   x = E[ids];  per layer:  a = rms(x) w_attn_norm
//     q = a Wq^T [T, H, dk], k = a Wk^T [T, Hkv, dk], v = a Wv^T [T, Hkv, dv]; feature map on q, k
//     rotate q, k (GPT-NeoX halves, angle n * 10000^(-2i/dk)); kv head j serves heads j*G..j*G+G-1
//     o[n, h] = dk^-1/2 sum_{m<=n} gamma_h^(n-m) (q_n . k_m) v_m, gamma_h = 1 - 2^(-5-h)
//     o = rms_dv(o) w_gn * silu(a Wg^T);  x += o Wo^T;  m = rms(x) w_mlp;  x += (silu(m Wg'^T) * m Wu^T) Wd^T
//   logits = rms(x) w_norm W_lm^T (W_lm = E when tied)
// The bad-directory matrix: each kind of broken directory must fail with a message naming the
// file and the field or tensor (never a crash, never random weights).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <retention/fla.h>
#include <retention/safetensors.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

namespace fs = std::filesystem;
using at::Tensor;

// A test config: the config.json fields as raw JSON values (so a test can give a field any
// type), and the sizes FLA derives from them, computed here from FLA's formulas.
struct Config {
  std::map<std::string, std::string> fields;
  int64_t D, V, L, H, Hkv, dk, dv, inter;
  bool tied, gate, affine;
  std::string norm_name, feature_map;
  double eps;

  std::string json() const {
    std::string out = "{\n  \"model_type\": \"retnet\", \"architectures\": [\"RetNetForCausalLM\"]";
    for (const auto& [k, v] : fields) out += ",\n  \"" + k + "\": " + v;
    return out + "\n}\n";
  }
};

Config make_config(const std::map<std::string, std::string>& f) {
  Config c;
  c.fields = f;
  auto num = [&](const char* k, double d) { return f.count(k) ? std::stod(f.at(k)) : d; };
  auto flag = [&](const char* k, bool d) { return f.count(k) ? f.at(k) == "true" : d; };
  c.D = static_cast<int64_t>(num("hidden_size", 2048));
  c.V = static_cast<int64_t>(num("vocab_size", 32000));
  c.L = static_cast<int64_t>(num("num_hidden_layers", 24));
  c.H = static_cast<int64_t>(num("num_heads", 8));
  c.Hkv = static_cast<int64_t>(num("num_kv_heads", static_cast<double>(c.H)));
  c.dk = static_cast<int64_t>(std::llround(c.D * num("expand_k", 1.0))) / c.H;
  c.dv = static_cast<int64_t>(std::llround(c.D * num("expand_v", 2.0))) / c.H;
  if (f.count("intermediate_size")) {
    c.inter = std::stoll(f.at("intermediate_size"));
  } else {
    const auto i = static_cast<int64_t>(c.D * num("hidden_ratio", 2) * 2 / 3);
    c.inter = 256 * ((i + 255) / 256);
  }
  c.tied = flag("tie_word_embeddings", false);
  c.gate = flag("use_output_gate", true);
  c.affine = flag("elementwise_affine", true);
  c.norm_name = flag("fuse_norm", true) && c.gate ? "g_norm_swish_gate" : "g_norm";
  c.feature_map = f.count("feature_map") ? f.at("feature_map").substr(1, f.at("feature_map").size() - 2) : "";
  c.eps = num("norm_eps", 1e-6);
  return c;
}

const std::map<std::string, std::map<std::string, std::string>> kConfigs = {
    {"base", {{"hidden_size", "32"}, {"num_hidden_layers", "2"}, {"num_heads", "4"}, {"vocab_size", "61"},
              {"hidden_ratio", "2"}}},
    // GQA (3 query heads per kv head), tied embeddings, odd head dims (dk 6, dv 9), explicit MLP width
    {"gqa_tied_odd", {{"hidden_size", "36"}, {"num_hidden_layers", "2"}, {"num_heads", "6"},
                      {"num_kv_heads", "2"}, {"expand_v", "1.5"}, {"vocab_size", "53"},
                      {"tie_word_embeddings", "true"}, {"intermediate_size", "70"}}},
    // unfused norm (parameter g_norm), no affine head norm, relu feature map, hidden_ratio 3
    {"unfused_featuremap", {{"hidden_size", "32"}, {"num_hidden_layers", "2"}, {"num_heads", "4"},
                            {"vocab_size", "61"}, {"fuse_norm", "false"}, {"elementwise_affine", "false"},
                            {"feature_map", "\"relu\""}, {"hidden_ratio", "3"}, {"norm_eps", "1e-05"}}},
    // no output gate (no g_proj, parameter g_norm), MQA
    {"no_gate_mqa", {{"hidden_size", "32"}, {"num_hidden_layers", "2"}, {"num_heads", "4"}, {"vocab_size", "61"},
                     {"hidden_ratio", "2"}, {"use_output_gate", "false"}, {"num_kv_heads", "1"}}},
};

// FLA's RetNetForCausalLM parameter names and shapes (lm_head omitted when tied, as saved).
std::vector<std::pair<std::string, std::vector<int64_t>>> fla_shapes(const Config& c) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> s = {{"model.embeddings.weight", {c.V, c.D}}};
  for (int64_t i = 0; i < c.L; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    s.push_back({p + "attn_norm.weight", {c.D}});
    s.push_back({p + "attn.q_proj.weight", {c.H * c.dk, c.D}});
    s.push_back({p + "attn.k_proj.weight", {c.Hkv * c.dk, c.D}});
    s.push_back({p + "attn.v_proj.weight", {c.Hkv * c.dv, c.D}});
    if (c.gate) s.push_back({p + "attn.g_proj.weight", {c.H * c.dv, c.D}});
    s.push_back({p + "attn.o_proj.weight", {c.D, c.H * c.dv}});
    if (c.affine) s.push_back({p + "attn." + c.norm_name + ".weight", {c.dv}});
    s.push_back({p + "mlp_norm.weight", {c.D}});
    s.push_back({p + "mlp.gate_proj.weight", {c.inter, c.D}});
    s.push_back({p + "mlp.up_proj.weight", {c.inter, c.D}});
    s.push_back({p + "mlp.down_proj.weight", {c.D, c.inter}});
  }
  s.push_back({"model.norm.weight", {c.D}});
  if (!c.tied) s.push_back({"lm_head.weight", {c.V, c.D}});
  return s;
}

using Weights = std::vector<std::pair<std::string, Tensor>>;

// Random fp32 weights of a size that keeps every layer's contribution visible (as the Python
// test's random_state_dict): projections ~ 1/sqrt(fan_in), embeddings 0.3, norm weights ~ 1.
Weights random_weights(const Config& c, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  Weights w;
  for (const auto& [name, shape] : fla_shapes(c)) {
    Tensor t;
    if (shape.size() == 1) {
      t = 1.0 + at::normal(0.0, 0.2, shape, gen, at::TensorOptions().dtype(at::kFloat));
    } else {
      const double spread = name.find("embeddings") != std::string::npos ? 0.3 : 1.0 / std::sqrt(double(shape[1]));
      t = at::normal(0.0, spread, shape, gen, at::TensorOptions().dtype(at::kFloat));
    }
    w.emplace_back(name, t);
  }
  return w;
}

std::string test_dir(const std::string& name) {
  const fs::path p = fs::path(::testing::TempDir()) / ("retention_test_fla_" + std::to_string(getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
}

// config.json plus model.safetensors, or `shards` files and the index (tensors dealt round-robin,
// as the Python test's writer does), in `dtype`.
std::string write_dir(const std::string& name, const Config& c, const Weights& w, int shards = 1,
                      at::ScalarType dtype = at::kFloat) {
  const std::string dir = test_dir(name);
  write_text(fs::path(dir) / "config.json", c.json());
  Weights cast;
  for (const auto& [n, t] : w) cast.emplace_back(n, t.to(dtype));
  if (shards == 1) {
    retention::save_safetensors((fs::path(dir) / "model.safetensors").string(), cast, {{"format", "pt"}});
    return dir;
  }
  std::string map;
  for (int s = 0; s < shards; ++s) {
    char fname[64];
    std::snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", s + 1, shards);
    Weights part;
    for (size_t i = s; i < cast.size(); i += shards) {
      part.push_back(cast[i]);
      map += std::string(map.empty() ? "" : ",\n    ") + "\"" + cast[i].first + "\": \"" + fname + "\"";
    }
    retention::save_safetensors((fs::path(dir) / fname).string(), part, {{"format", "pt"}});
  }
  write_text(fs::path(dir) / "model.safetensors.index.json",
             "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {\n    " + map + "\n}}\n");
  return dir;
}

// ---- float64 reference of FLA's forward ----------------------------------------------------------
Tensor rms(const Tensor& x, const Tensor& w, double eps) {
  const Tensor y = x * at::rsqrt(x.pow(2).mean(-1, true) + eps);
  return w.defined() ? y * w : y;
}

Tensor rotate_neox(const Tensor& x) {  // x [T, h, dk], positions 0..T-1
  const int64_t T = x.size(0), dk = x.size(2);
  const Tensor inv = at::pow(10000.0, -at::arange(0, dk, 2, at::kDouble) / double(dk));
  const Tensor ang = at::arange(T, at::kDouble).unsqueeze(1) * inv.unsqueeze(0);  // [T, dk/2]
  const Tensor cs = ang.cos().unsqueeze(1), sn = ang.sin().unsqueeze(1);
  const Tensor x1 = x.slice(2, 0, dk / 2), x2 = x.slice(2, dk / 2);
  return at::cat({x1 * cs - x2 * sn, x1 * sn + x2 * cs}, -1);
}

Tensor act(const std::string& name, const Tensor& x) {
  if (name == "relu") return at::relu(x);
  if (name == "silu" || name == "swish") return at::silu(x);
  if (name.empty()) return x;
  ADD_FAILURE() << "reference has no feature map " << name;
  return x;
}

Tensor reference_logits(const Config& c, const Weights& weights, const std::vector<int64_t>& ids) {
  std::map<std::string, Tensor> W;
  for (const auto& [n, t] : weights) W[n] = t.to(at::kDouble);
  auto get = [&](const std::string& n) { return W.count(n) ? W.at(n) : Tensor(); };
  const int64_t T = static_cast<int64_t>(ids.size()), H = c.H, dk = c.dk, dv = c.dv;
  const Tensor gamma = 1.0 - at::pow(2.0, -5.0 - at::arange(H, at::kDouble));
  const Tensor n = at::arange(T, at::kDouble);
  const Tensor diff = n.unsqueeze(1) - n.unsqueeze(0);
  const Tensor decay = at::pow(gamma.view({H, 1, 1}), diff.clamp_min(0)) * (diff >= 0).to(at::kDouble);  // [H, T, T]
  std::vector<int64_t> heads;  // the kv head of each query head
  for (int64_t h = 0; h < H; ++h) heads.push_back(h / (H / c.Hkv));
  const Tensor kv_of = at::tensor(heads, at::kLong);
  Tensor x = W.at("model.embeddings.weight").index_select(0, at::tensor(ids, at::kLong));
  for (int64_t i = 0; i < c.L; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const Tensor a = rms(x, W.at(p + "attn_norm.weight"), c.eps);
    Tensor q = at::matmul(a, W.at(p + "attn.q_proj.weight").t()).view({T, H, dk});
    Tensor k = at::matmul(a, W.at(p + "attn.k_proj.weight").t()).view({T, c.Hkv, dk});
    Tensor v = at::matmul(a, W.at(p + "attn.v_proj.weight").t()).view({T, c.Hkv, dv});
    q = rotate_neox(act(c.feature_map, q));
    k = rotate_neox(act(c.feature_map, k)).index_select(1, kv_of);
    v = v.index_select(1, kv_of);
    const Tensor scores = at::einsum("nhd,mhd->hnm", {q, k}) * std::pow(double(dk), -0.5) * decay;
    Tensor o = rms(at::einsum("hnm,mhd->nhd", {scores, v}), get(p + "attn." + c.norm_name + ".weight"), c.eps);
    if (c.gate) o = o * at::silu(at::matmul(a, W.at(p + "attn.g_proj.weight").t()).view({T, H, dv}));
    x = x + at::matmul(o.reshape({T, H * dv}), W.at(p + "attn.o_proj.weight").t());
    const Tensor m = rms(x, W.at(p + "mlp_norm.weight"), c.eps);
    x = x + at::matmul(at::silu(at::matmul(m, W.at(p + "mlp.gate_proj.weight").t())) *
                           at::matmul(m, W.at(p + "mlp.up_proj.weight").t()),
                       W.at(p + "mlp.down_proj.weight").t());
  }
  x = rms(x, W.at("model.norm.weight"), c.eps);
  return at::matmul(x, (c.tied ? W.at("model.embeddings.weight") : W.at("lm_head.weight")).t());
}

double max_rel_diff(const Tensor& a, const Tensor& ref) {
  const auto r = ref.to(at::kDouble);
  const double scale = std::max(1.0, r.abs().max().item<double>());
  return (a.to(at::kDouble) - r).abs().max().item<double>() / scale;
}

// fp32 tolerance relative to max(1, max |logit|): two layers of fp32 GEMMs, norms and retention
// sums over <= 37 terms give ~1e-6 (as in test_model.cpp).
constexpr double kTolF32 = 1e-5;

const std::vector<std::vector<int64_t>> kPrompts = {
    {5, 1, 30, 7, 7, 2, 19, 36, 0, 11, 4, 17, 8, 8, 21, 17, 2, 26, 9, 44, 50, 3, 12, 33, 40, 1, 6, 29,
     31, 15, 14, 13, 22, 10, 47, 45, 2},  // 37 tokens: not a multiple of the chunk size 64's divisors
    {3},
    {8, 8, 21, 17, 2, 26, 9}};

std::vector<int64_t> concat(std::vector<int64_t> a, const std::vector<int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// ---- the model against the reference --------------------------------------------------------------
class FlaConfigs : public ::testing::TestWithParam<std::string> {};

TEST_P(FlaConfigs, PrefillAndDecodeMatchTheReference) {
  const Config c = make_config(kConfigs.at(GetParam()));
  const Weights w = random_weights(c, 7);
  const std::string dir = write_dir(GetParam(), c, w);
  const auto model = retention::FlaRetNet::load(dir);
  EXPECT_EQ(model.dtype(), at::kFloat);
  EXPECT_EQ(model.config().head_k_dim(), c.dk);
  EXPECT_EQ(model.config().head_v_dim(), c.dv);
  EXPECT_EQ(model.config().mlp_dim(), c.inter);
  // packed prefill, every position
  std::vector<int64_t> flat, cu = {0};
  for (const auto& p : kPrompts) {
    flat.insert(flat.end(), p.begin(), p.end());
    cu.push_back(static_cast<int64_t>(flat.size()));
  }
  auto [all, st] = model.forward(at::tensor(flat), at::tensor(cu));
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_LT(max_rel_diff(all.slice(0, cu[i], cu[i + 1]), reference_logits(c, w, kPrompts[i])), kTolF32)
        << "prompt " << i;
  }
  // prefill, then greedy recurrent steps: each step's logits equal the reference on the sequence so far
  auto [logits, state] = model.prefill(kPrompts);
  std::vector<std::vector<int64_t>> seqs = kPrompts;
  for (int s = 0; s < 8; ++s) {
    const Tensor tok = logits.argmax(-1);
    for (size_t i = 0; i < seqs.size(); ++i) seqs[i].push_back(tok[i].item<int64_t>());
    logits = model.step(tok, state);
    for (size_t i = 0; i < seqs.size(); ++i) {
      EXPECT_LT(max_rel_diff(logits[i], reference_logits(c, w, seqs[i])[-1]), kTolF32) << "step " << s << " seq " << i;
      EXPECT_EQ(state.offsets[i].item<int64_t>(), static_cast<int64_t>(seqs[i].size()));
    }
  }
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Fla, FlaConfigs,
                         ::testing::Values("base", "gqa_tied_odd", "unfused_featuremap", "no_gate_mqa"));

TEST(FlaRetNet, ShardedDirectoryEqualsSingleFile) {
  const Config c = make_config(kConfigs.at("gqa_tied_odd"));
  const Weights w = random_weights(c, 3);
  const std::string one = write_dir("single", c, w), three = write_dir("sharded", c, w, 3);
  ASSERT_TRUE(fs::exists(fs::path(three) / "model-00003-of-00003.safetensors"));
  const auto a = retention::FlaRetNet::load(one), b = retention::FlaRetNet::load(three);
  EXPECT_EQ(b.weights().count("lm_head.weight"), 0u);  // tied: the embedding serves as the head
  EXPECT_EQ(a.num_parameters(), b.num_parameters());
  EXPECT_TRUE(at::equal(a.prefill(kPrompts).first, b.prefill(kPrompts).first));
  fs::remove_all(one);
  fs::remove_all(three);
}

TEST(FlaRetNet, PrefillContinuesFromAState) {
  const Config c = make_config(kConfigs.at("base"));
  const std::string dir = write_dir("continue", c, random_weights(c, 5));
  const auto model = retention::FlaRetNet::load(dir);
  fs::remove_all(dir);  // the weights stay mapped
  const std::vector<int64_t> a = {5, 1, 30, 7, 7, 2}, b = {19, 36, 0, 11, 4, 9, 9};
  auto [l_ab, s_ab] = model.prefill({concat(a, b)});
  auto [l_a, s_a] = model.prefill({a});
  auto [l_b, s_b] = model.forward(at::tensor(b), at::tensor(std::vector<int64_t>{0, (int64_t)b.size()}), &s_a, true);
  EXPECT_LT(max_rel_diff(l_b, l_ab), kTolF32);
  EXPECT_EQ(s_b.offsets.item<int64_t>(), 13);
}

TEST(FlaRetNet, Bf16DirectoryStaysBf16) {
  const Config c = make_config(kConfigs.at("base"));
  const Weights w = random_weights(c, 11);
  const std::string dir = write_dir("bf16", c, w, 2, at::kBFloat16);
  const auto model = retention::FlaRetNet::load(dir);
  EXPECT_EQ(model.dtype(), at::kBFloat16);
  for (const auto& [name, t] : model.weights()) EXPECT_EQ(t.scalar_type(), at::kBFloat16) << name;
  EXPECT_EQ(model.weight_bytes(), 2 * model.num_parameters());
  // reference on the bf16-rounded weights: what remains is bf16 activation rounding (2^-9)
  // through ~10 rounded ops per layer over 2 layers
  Weights rounded;
  for (const auto& [n, t] : w) rounded.emplace_back(n, t.to(at::kBFloat16).to(at::kFloat));
  auto [last, state] = model.prefill(kPrompts);
  EXPECT_EQ(last.scalar_type(), at::kBFloat16);
  EXPECT_EQ(state.layers[0].scalar_type(), at::kFloat);  // states stay fp32
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_LT(max_rel_diff(last[i], reference_logits(c, rounded, kPrompts[i])[-1]), 5e-2) << "prompt " << i;
  }
  const auto fp32 = retention::FlaRetNet::load(dir, {at::kFloat});  // converted on load
  EXPECT_EQ(fp32.dtype(), at::kFloat);
  fs::remove_all(dir);
}

TEST(FlaRetNet, GreedyGenerateEqualsPrefillAndSteps) {
  const Config c = make_config(kConfigs.at("gqa_tied_odd"));
  const std::string dir = write_dir("generate", c, random_weights(c, 2));
  const auto model = retention::FlaRetNet::load(dir);
  fs::remove_all(dir);
  retention::Sampler greedy;
  retention::FlaRetNet::GenerateStats stats;
  const auto out = model.generate({kPrompts[2]}, 12, greedy, &stats);
  ASSERT_EQ(out.size(), 1u);
  ASSERT_EQ(out[0].size(), 12u);
  EXPECT_EQ(stats.decode_tokens, 11);
  auto [logits, state] = model.prefill({kPrompts[2]});
  for (int64_t t : out[0]) {
    EXPECT_EQ(logits.argmax(-1).item<int64_t>(), t);
    logits = model.step(at::tensor(std::vector<int64_t>{t}), state);
  }
}

// ---- bad directories ------------------------------------------------------------------------------
struct BadCase {
  const char* name;
  // Edits a good directory (base config, 2 shards when `sharded`) in place.
  std::function<void(const fs::path& dir, const Config& c, const Weights& w)> edit;
  std::vector<std::string> expect;  // substrings of the error; "{dir}" is replaced by the directory
  bool sharded = false;
};

void rewrite_config(const fs::path& dir, std::map<std::string, std::string> fields) {
  Config c;
  c.fields = std::move(fields);
  write_text(dir / "config.json", c.json());
}

std::map<std::string, std::string> with(const std::string& key, const std::string& value) {
  auto f = kConfigs.at("base");
  f[key] = value;
  return f;
}

void save_file(const fs::path& path, const Weights& w) {
  retention::save_safetensors(path.string(), w, {{"format", "pt"}});
}

Weights without(const Weights& w, const std::string& name) {
  Weights out;
  for (const auto& kv : w) {
    if (kv.first != name) out.push_back(kv);
  }
  return out;
}

TEST(FlaRetNet, BadDirectoriesGiveClearErrors) {
  const Config c = make_config(kConfigs.at("base"));
  const Weights w = random_weights(c, 1);
  const std::string kv = "model.layers.0.attn.k_proj.weight", up = "model.layers.1.mlp.up_proj.weight";
  const std::vector<BadCase> cases = {
      // config.json
      {"no config", [](auto& d, auto&, auto&) { fs::remove(d / "config.json"); },
       {"{dir}/config.json", "no config.json"}},
      {"config not JSON", [](auto& d, auto&, auto&) { write_text(d / "config.json", "{\"hidden_size\": 32,"); },
       {"{dir}/config.json", "not valid JSON"}},
      {"config not an object", [](auto& d, auto&, auto&) { write_text(d / "config.json", "[1, 2]"); },
       {"{dir}/config.json", "must hold a JSON object"}},
      {"wrong model_type", [](auto& d, auto&, auto&) { write_text(d / "config.json", "{\"model_type\": \"llama\"}"); },
       {"{dir}/config.json", "'model_type' must be 'retnet'", "\"llama\""}},
      {"num_heads a string", [](auto& d, auto&, auto&) { rewrite_config(d, with("num_heads", "\"4\"")); },
       {"{dir}/config.json", "config field 'num_heads' must be an integer", "\"4\"", "string"}},
      {"hidden_size a float", [](auto& d, auto&, auto&) { rewrite_config(d, with("hidden_size", "32.0")); },
       {"{dir}/config.json", "config field 'hidden_size' must be an integer", "32.0"}},
      {"norm_eps a bool", [](auto& d, auto&, auto&) { rewrite_config(d, with("norm_eps", "true")); },
       {"{dir}/config.json", "config field 'norm_eps' must be a number", "boolean"}},
      {"tie_word_embeddings a number", [](auto& d, auto&, auto&) { rewrite_config(d, with("tie_word_embeddings", "1")); },
       {"{dir}/config.json", "config field 'tie_word_embeddings' must be true or false"}},
      {"num_kv_heads a list", [](auto& d, auto&, auto&) { rewrite_config(d, with("num_kv_heads", "[2]")); },
       {"{dir}/config.json", "config field 'num_kv_heads' must be an integer or null"}},
      {"short convolutions", [](auto& d, auto&, auto&) { rewrite_config(d, with("use_short_conv", "true")); },
       {"{dir}/config.json", "'use_short_conv'", "not supported"}},
      {"hybrid attention", [](auto& d, auto&, auto&) { rewrite_config(d, with("attn", "{\"layers\": [1]}")); },
       {"{dir}/config.json", "'attn'", "not supported"}},
      {"attention residuals", [](auto& d, auto&, auto&) { rewrite_config(d, with("attnres_block_size", "2")); },
       {"{dir}/config.json", "'attnres_block_size'"}},
      {"other activation", [](auto& d, auto&, auto&) { rewrite_config(d, with("hidden_act", "\"gelu\"")); },
       {"{dir}/config.json", "'hidden_act'", "swish"}},
      {"unknown feature map", [](auto& d, auto&, auto&) { rewrite_config(d, with("feature_map", "\"softplus\"")); },
       {"{dir}/config.json", "'feature_map'", "softplus"}},
      {"kv heads do not divide", [](auto& d, auto&, auto&) { rewrite_config(d, with("num_kv_heads", "3")); },
       {"{dir}/config.json", "'num_kv_heads'", "must divide num_heads = 4"}},
      {"head dim not an integer", [](auto& d, auto&, auto&) { rewrite_config(d, with("expand_k", "0.3")); },
       {"{dir}/config.json", "'expand_k'", "positive integer"}},
      {"odd key head dim", [](auto& d, auto&, auto&) { rewrite_config(d, with("expand_k", "0.375")); },
       {"{dir}/config.json", "'expand_k'", "head_k_dim = 3", "even"}},
      {"negative vocab", [](auto& d, auto&, auto&) { rewrite_config(d, with("vocab_size", "-5")); },
       {"{dir}/config.json", "'vocab_size'", "positive"}},
      // files
      {"no weights", [](auto& d, auto&, auto&) { fs::remove(d / "model.safetensors"); },
       {"{dir}", "no model.safetensors or model.safetensors.index.json"}},
      {"missing shard", [](auto& d, auto&, auto&) { fs::remove(d / "model-00002-of-00002.safetensors"); },
       {"{dir}/model.safetensors.index.json", "shard 'model-00002-of-00002.safetensors'", "is missing from {dir}"},
       true},
      {"index not JSON", [](auto& d, auto&, auto&) { write_text(d / "model.safetensors.index.json", "{"); },
       {"{dir}/model.safetensors.index.json", "not valid JSON"}, true},
      {"index without weight_map", [](auto& d, auto&, auto&) { write_text(d / "model.safetensors.index.json", "{\"weight_map\": [1]}"); },
       {"{dir}/model.safetensors.index.json", "'weight_map' must map tensor names to file names"}, true},
      {"shard outside the directory",
       [](auto& d, auto&, auto&) {
         write_text(d / "model.safetensors.index.json", "{\"weight_map\": {\"model.norm.weight\": \"../x.safetensors\"}}");
       },
       {"{dir}/model.safetensors.index.json", "'../x.safetensors'", "not a file name"}, true},
      {"tensor in another shard than listed",
       [&](auto& d, auto&, auto& ws) {
         Weights one = ws;  // everything in shard 1; the index still lists half of it in shard 2
         save_file(d / "model-00001-of-00002.safetensors", one);
       },
       {"{dir}/model-00001-of-00002.safetensors", "is not listed for this file in {dir}/model.safetensors.index.json"},
       true},
      {"corrupt safetensors",
       [](auto& d, auto&, auto&) {
         const auto p = d / "model.safetensors";
         fs::resize_file(p, fs::file_size(p) - 10);
       },
       {"{dir}/model.safetensors", "outside the data section"}},
      // tensors against the config
      {"shape disagrees with the config",
       [](auto& d, auto&, auto&) { rewrite_config(d, with("num_kv_heads", "2")); },  // weights made for 4 kv heads
       {"{dir}/model.safetensors", "tensor '" + kv + "' has shape [32, 32]",
        "config.json (hidden_size, expand_k, num_heads, num_kv_heads) implies [16, 32]"}},
      {"mlp width disagrees", [](auto& d, auto&, auto&) { rewrite_config(d, with("intermediate_size", "64")); },
       {"{dir}/model.safetensors", "'model.layers.0.mlp.down_proj.weight' has shape [32, 256]", "intermediate_size", "[32, 64]"}},
      {"missing tensor", [&](auto& d, auto&, auto& ws) { save_file(d / "model.safetensors", without(ws, up)); },
       {"{dir}/model.safetensors", "missing tensors ['" + up + "'] (1 in all)"}},
      {"unexpected tensor",
       [&](auto& d, auto&, auto& ws) {
         Weights more = ws;
         more.emplace_back("model.layers.0.attn.extra.weight", at::zeros({2}));
         save_file(d / "model.safetensors", more);
       },
       {"{dir}/model.safetensors", "unexpected tensor 'model.layers.0.attn.extra.weight'"}},
      {"integer weights",
       [&](auto& d, auto&, auto& ws) {
         Weights ints = without(ws, up);
         ints.emplace_back(up, at::zeros({256, 32}, at::kInt));
         save_file(d / "model.safetensors", ints);
       },
       {"{dir}/model.safetensors", "tensor '" + up + "' has dtype Int", "F32, F16 or BF16"}},
  };
  for (const auto& bc : cases) {
    const std::string dir = write_dir("bad", c, w, bc.sharded ? 2 : 1);
    bc.edit(fs::path(dir), c, w);
    try {
      retention::FlaRetNet::load(dir);
      ADD_FAILURE() << bc.name << ": loaded a bad directory";
    } catch (const c10::Error& e) {
      for (std::string s : bc.expect) {
        for (size_t pos = s.find("{dir}"); pos != std::string::npos; pos = s.find("{dir}")) s.replace(pos, 5, dir);
        EXPECT_NE(e.msg().find(s), std::string::npos) << bc.name << ": expected '" << s << "' in: " << e.msg();
      }
    }
    fs::remove_all(dir);
  }
  // not a directory at all
  const std::string parent = test_dir("x");
  EXPECT_THROW(retention::FlaRetNet::load(parent + "/absent"), c10::Error);
  fs::remove_all(parent);
}

TEST(FlaRetNet, StateDictOfTheWrongShapeIsRefused) {
  const Config c = make_config(kConfigs.at("base"));
  Weights w = random_weights(c, 1);
  std::map<std::string, Tensor> sd(w.begin(), w.end());
  const auto config = retention::FlaRetNetConfig::from_json(c.json());
  EXPECT_NO_THROW((void)retention::FlaRetNet(config, sd));
  sd["model.norm.weight"] = at::ones({31});
  EXPECT_THROW((void)retention::FlaRetNet(config, sd), c10::Error);
  sd.erase("model.norm.weight");
  EXPECT_THROW((void)retention::FlaRetNet(config, sd), c10::Error);
}

}  // namespace
