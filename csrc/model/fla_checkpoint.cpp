// FLA-format checkpoint directories (see retention/fla.h): config.json and the safetensors files,
// checked completely before a weight is used. The checks and their messages follow Python's
// retention.models.check_checkpoint_dir, so a bad directory reads the same from both sides:
// every error names the file, and the tensor and config fields it concerns.
#include "retention/fla.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "retention/safetensors.h"

namespace retention {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// JSON types a config field may have (as Python's _FIELD_TYPES: a bool is not a number here,
// though JSON readers in some languages would take it as one).
enum class Kind { Int, Num, Bool, Str, Null };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Int: return "an integer";
    case Kind::Num: return "a number";
    case Kind::Bool: return "true or false";
    case Kind::Str: return "a string";
    case Kind::Null: return "null";
  }
  return "?";
}

bool is_kind(const json& v, Kind k) {
  switch (k) {
    case Kind::Int: return v.is_number_integer();
    case Kind::Num: return v.is_number();
    case Kind::Bool: return v.is_boolean();
    case Kind::Str: return v.is_string();
    case Kind::Null: return v.is_null();
  }
  return false;
}

struct Field {
  const char* name;
  std::vector<Kind> kinds;
};

// FLA 0.6.0's RetNetConfig fields (Python's _FIELD_TYPES) and the generation ids.
const std::vector<Field>& fields() {
  using K = Kind;
  static const std::vector<Field> f = {
      {"attn_mode", {K::Str}}, {"hidden_size", {K::Int}}, {"expand_k", {K::Num}},
      {"expand_v", {K::Num}}, {"hidden_ratio", {K::Num, K::Null}},
      {"intermediate_size", {K::Int, K::Null}}, {"num_hidden_layers", {K::Int}},
      {"num_heads", {K::Int}}, {"num_kv_heads", {K::Int, K::Null}},
      {"feature_map", {K::Str, K::Null}}, {"hidden_act", {K::Str}}, {"use_short_conv", {K::Bool}},
      {"conv_size", {K::Int}}, {"use_output_gate", {K::Bool}},
      {"max_position_embeddings", {K::Int}}, {"elementwise_affine", {K::Bool, K::Null}},
      {"norm_eps", {K::Num}}, {"use_cache", {K::Bool}}, {"initializer_range", {K::Num}},
      {"fuse_norm", {K::Bool}}, {"fuse_swiglu", {K::Bool}}, {"fuse_cross_entropy", {K::Bool}},
      {"fuse_linear_cross_entropy", {K::Bool}}, {"use_l2warp", {K::Bool}},
      {"vocab_size", {K::Int}}, {"attnres_block_size", {K::Int, K::Null}},
      {"tie_word_embeddings", {K::Bool}}, {"bos_token_id", {K::Int, K::Null}},
      {"eos_token_id", {K::Int, K::Null}}, {"pad_token_id", {K::Int, K::Null}}};
  return f;
}

// The feature maps the C++ model implements (transformers' ACT2FN names).
const std::set<std::string>& feature_maps() {
  static const std::set<std::string> names = {"relu", "silu", "swish", "sigmoid", "tanh", "elu",
                                              "gelu", "identity", "linear"};
  return names;
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// hidden_size * expand as an integer, or -1 when it is not one (Python: math.isclose(d, round(d))).
int64_t whole(double d) {
  const double r = std::round(d);
  return d > 0 && std::abs(d - r) <= 1e-9 * std::max(std::abs(d), std::abs(r)) ? static_cast<int64_t>(r) : -1;
}

std::string read_text(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), path, ": no ", what, " (cannot open it)");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  TORCH_CHECK(!f.bad(), path, ": cannot read ", what);
  return text;
}

json parse_json(const std::string& text, const std::string& path, const char* what) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, path, ": cannot read ", what, ": not valid JSON (", e.what(), ")");
  }
}

}  // namespace

// ---- config ------------------------------------------------------------------------------------
int64_t FlaRetNetConfig::head_k_dim() const { return whole(hidden_size * expand_k) / num_heads; }
int64_t FlaRetNetConfig::head_v_dim() const { return whole(hidden_size * expand_v) / num_heads; }

int64_t FlaRetNetConfig::mlp_dim() const {
  if (intermediate_size > 0) return intermediate_size;
  // FLA's GatedMLP: the multiple of 256 at or above 2/3 * hidden_size * hidden_ratio (4 if null).
  const double ratio = hidden_ratio == 0 ? 4.0 : hidden_ratio;
  const auto inter = static_cast<int64_t>(hidden_size * ratio * 2 / 3);
  return 256 * ((inter + 256 - 1) / 256);
}

std::string FlaRetNetConfig::head_norm_name() const {
  // FLA names the norm after whether it is fused with the swish gate.
  return fuse_norm && use_output_gate ? "g_norm_swish_gate" : "g_norm";
}

void FlaRetNetConfig::validate() const {
  const std::pair<const char*, int64_t> positive[] = {
      {"hidden_size", hidden_size}, {"num_heads", num_heads}, {"vocab_size", vocab_size}};
  for (const auto& [name, value] : positive) {
    TORCH_CHECK(value > 0, "config field '", name, "' = ", value, ": must be positive");
  }
  TORCH_CHECK(num_hidden_layers >= 0, "config field 'num_hidden_layers' = ", num_hidden_layers,
              ": must be >= 0");
  TORCH_CHECK(num_kv_heads >= 0 && num_heads % kv_heads() == 0, "config field 'num_kv_heads' = ",
              num_kv_heads, ": must divide num_heads = ", num_heads);
  const std::pair<const char*, double> expands[] = {{"expand_k", expand_k}, {"expand_v", expand_v}};
  for (const auto& [name, e] : expands) {
    const int64_t d = whole(hidden_size * e);
    TORCH_CHECK(d > 0, "config field '", name, "' = ", e, ": hidden_size * ", name, " = ",
                hidden_size * e, " must be a positive integer");
    TORCH_CHECK(d % num_heads == 0, "config field 'num_heads' = ", num_heads,
                ": must divide hidden_size * ", name, " = ", d);
  }
  TORCH_CHECK(head_k_dim() % 2 == 0 && head_k_dim() <= kMaxHeadDimK, "config field 'expand_k' = ",
              expand_k, ": head_k_dim = ", head_k_dim(), " must be even and <= ", kMaxHeadDimK,
              " (rotary)");
  TORCH_CHECK(mlp_dim() > 0, "config field 'intermediate_size': must be positive, got ", mlp_dim());
  TORCH_CHECK(feature_map.empty() || feature_maps().count(feature_map),
              "config field 'feature_map' = '", feature_map, "': the C++ model implements relu, "
              "silu/swish, sigmoid, tanh, elu, gelu and identity");
  TORCH_CHECK(norm_eps >= 0, "config field 'norm_eps' = ", norm_eps, ": must be >= 0");
}

std::vector<std::pair<std::string, std::vector<int64_t>>> FlaRetNetConfig::parameter_shapes() const {
  const int64_t D = hidden_size, V = vocab_size, H = num_heads, Hkv = kv_heads();
  const int64_t dk = head_k_dim(), dv = head_v_dim(), I = mlp_dim();
  std::vector<std::pair<std::string, std::vector<int64_t>>> out = {{"model.embeddings.weight", {V, D}}};
  for (int64_t i = 0; i < num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.push_back({p + "attn_norm.weight", {D}});
    out.push_back({p + "attn.q_proj.weight", {H * dk, D}});
    out.push_back({p + "attn.k_proj.weight", {Hkv * dk, D}});
    out.push_back({p + "attn.v_proj.weight", {Hkv * dv, D}});
    if (use_output_gate) out.push_back({p + "attn.g_proj.weight", {H * dv, D}});
    out.push_back({p + "attn.o_proj.weight", {D, H * dv}});
    if (elementwise_affine) out.push_back({p + "attn." + head_norm_name() + ".weight", {dv}});
    out.push_back({p + "mlp_norm.weight", {D}});
    out.push_back({p + "mlp.gate_proj.weight", {I, D}});
    out.push_back({p + "mlp.up_proj.weight", {I, D}});
    out.push_back({p + "mlp.down_proj.weight", {D, I}});
  }
  out.push_back({"model.norm.weight", {D}});
  if (!tie_word_embeddings) out.push_back({"lm_head.weight", {V, D}});
  return out;
}

std::string FlaRetNetConfig::shape_fields(const std::string& name) {
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  auto ends = [&](const std::string& s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  if (has("embeddings") || has("lm_head")) return "vocab_size, hidden_size";
  if (ends("attn_norm.weight") || ends("mlp_norm.weight") || name == "model.norm.weight") return "hidden_size";
  if (has(".mlp.")) return "hidden_size, hidden_ratio, intermediate_size";
  if (has(".q_proj.")) return "hidden_size, expand_k";
  if (has(".k_proj.")) return "hidden_size, expand_k, num_heads, num_kv_heads";
  if (has(".v_proj.")) return "hidden_size, expand_v, num_heads, num_kv_heads";
  if (has(".g_norm")) return "hidden_size, expand_v, num_heads";
  return "hidden_size, expand_v";  // g_proj, o_proj
}

FlaRetNetConfig FlaRetNetConfig::from_json(const std::string& text, const std::string& where) {
  const json j = parse_json(text, where, "config.json");
  TORCH_CHECK(j.is_object(), where, ": must hold a JSON object, got ", j.type_name());
  const auto mt = j.find("model_type");
  TORCH_CHECK(mt != j.end() && mt->is_string() && mt->get<std::string>() == "retnet", where,
              ": config field 'model_type' must be 'retnet' (FLA's RetNet), got ",
              mt == j.end() ? "nothing" : mt->dump());
  for (const auto& f : fields()) {
    const auto it = j.find(f.name);
    if (it == j.end()) continue;
    bool ok = false;
    std::string kinds;
    for (Kind k : f.kinds) {
      ok = ok || is_kind(*it, k);
      kinds += (kinds.empty() ? "" : " or ") + std::string(kind_name(k));
    }
    TORCH_CHECK(ok, where, ": config field '", f.name, "' must be ", kinds, ", got ", it->dump(),
                " (", it->type_name(), ")");
  }
  // The value of a field, or null when absent or null (then FLA's default applies).
  auto get = [&](const char* key) -> const json* {
    const auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  };
  auto refuse = [&](const char* key, const char* why) {
    TORCH_CHECK(false, where, ": config field '", key, "' = ", j.at(key).dump(), ": ", why);
  };
  // What FLA's RetNet can be configured to do and this implementation does not (as in Python).
  if (const json* v = get("attn_mode")) {
    const auto m = v->get<std::string>();
    if (m != "chunk" && m != "fused_chunk" && m != "parallel" && m != "fused_recurrent") {
      refuse("attn_mode", "must be one of chunk, fused_chunk, parallel, fused_recurrent");
    }
  }
  if (const json* v = get("use_short_conv"); v && v->get<bool>()) {
    refuse("use_short_conv", "short convolutions are not supported by this implementation");
  }
  if (get("attn")) refuse("attn", "hybrid standard-attention layers are not supported by this implementation");
  if (get("attnres_block_size")) {
    refuse("attnres_block_size", "attention residuals are not supported by this implementation");
  }
  if (const json* v = get("hidden_act"); v && v->get<std::string>() != "swish") {
    refuse("hidden_act", "only 'swish' (SwiGLU MLP, swish output gate) is supported");
  }

  FlaRetNetConfig c;
  auto read_int = [&](const char* key, int64_t* out) {
    if (const json* v = get(key)) *out = v->get<int64_t>();
  };
  auto read_num = [&](const char* key, double* out) {
    if (const json* v = get(key)) *out = v->get<double>();
  };
  auto read_bool = [&](const char* key, bool* out) {
    if (const json* v = get(key)) *out = v->get<bool>();
  };
  read_int("vocab_size", &c.vocab_size);
  read_int("hidden_size", &c.hidden_size);
  read_int("num_hidden_layers", &c.num_hidden_layers);
  read_int("num_heads", &c.num_heads);
  read_num("expand_k", &c.expand_k);
  read_num("expand_v", &c.expand_v);
  read_num("norm_eps", &c.norm_eps);
  read_bool("use_output_gate", &c.use_output_gate);
  read_bool("fuse_norm", &c.fuse_norm);
  read_bool("tie_word_embeddings", &c.tie_word_embeddings);
  // null means "derive" for these three (0 here), and "no affine weight" for elementwise_affine.
  read_int("num_kv_heads", &c.num_kv_heads);
  if (get("num_kv_heads") && c.num_kv_heads <= 0) refuse("num_kv_heads", "must be positive (or null: num_heads)");
  if (j.contains("hidden_ratio")) {
    c.hidden_ratio = 0;
    read_num("hidden_ratio", &c.hidden_ratio);
    if (get("hidden_ratio") && c.hidden_ratio <= 0) refuse("hidden_ratio", "must be positive (or null)");
  }
  read_int("intermediate_size", &c.intermediate_size);
  if (get("intermediate_size") && c.intermediate_size <= 0) refuse("intermediate_size", "must be positive (or null)");
  if (j.contains("elementwise_affine")) c.elementwise_affine = false;
  read_bool("elementwise_affine", &c.elementwise_affine);
  if (const json* v = get("feature_map")) c.feature_map = v->get<std::string>();
  const std::pair<const char*, int64_t*> ids[] = {
      {"bos_token_id", &c.bos_token_id}, {"eos_token_id", &c.eos_token_id}, {"pad_token_id", &c.pad_token_id}};
  for (const auto& [key, out] : ids) {
    if (j.contains(key)) *out = j.at(key).is_null() ? -1 : j.at(key).get<int64_t>();
  }
  try {
    c.validate();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, where, ": ", e.msg());
  }
  return c;
}

// ---- the directory -----------------------------------------------------------------------------
FlaRetNet FlaRetNet::load(const std::string& directory, const LoadOptions& options) {
  const fs::path dir(directory);
  TORCH_CHECK(fs::is_directory(dir), directory, ": not a directory (an FLA checkpoint is a "
              "directory with config.json and model.safetensors)");
  const std::string cfg_path = (dir / "config.json").string();
  const FlaRetNetConfig config = FlaRetNetConfig::from_json(read_text(cfg_path, "config.json"), cfg_path);

  // The files: the index's shards, or the single file.
  const std::string index_path = (dir / "model.safetensors.index.json").string();
  const bool indexed = fs::exists(index_path);
  std::map<std::string, std::string> weight_map;  // tensor -> shard, from the index
  std::vector<std::string> files;
  if (indexed) {
    const json index = parse_json(read_text(index_path, "safetensors index"), index_path, "safetensors index");
    const bool ok = index.is_object() && index.contains("weight_map") && index.at("weight_map").is_object();
    TORCH_CHECK(ok, index_path, ": field 'weight_map' must map tensor names to file names");
    std::set<std::string> shards;
    for (const auto& [name, file] : index.at("weight_map").items()) {
      TORCH_CHECK(file.is_string(), index_path, ": field 'weight_map' must map tensor names to file "
                  "names, got ", file.dump(), " for '", name, "'");
      const std::string f = file.get<std::string>();
      // A shard is a file of this directory: no path may lead out of it.
      TORCH_CHECK(!f.empty() && f.find('/') == std::string::npos && f != "." && f != "..", index_path,
                  ": shard '", f, "' (listed in 'weight_map' for '", name, "') is not a file name");
      weight_map[name] = f;
      shards.insert(f);
    }
    for (const auto& f : shards) {
      TORCH_CHECK(fs::is_regular_file(dir / f), index_path, ": shard '", f,
                  "' (listed in 'weight_map') is missing from ", directory);
    }
    files.assign(shards.begin(), shards.end());
  } else {
    TORCH_CHECK(fs::is_regular_file(dir / "model.safetensors"), directory,
                ": no model.safetensors or model.safetensors.index.json");
    files = {"model.safetensors"};
  }

  // Every tensor of every file: expected, in the file the index names, of the config's shape and
  // a float dtype; then none missing. Headers only: no tensor data is touched before all pass.
  std::map<std::string, std::vector<int64_t>> expected;
  for (const auto& [name, shape] : config.parameter_shapes()) expected[name] = shape;
  const bool tied = config.tie_word_embeddings;
  std::vector<SafetensorsFile> opened;
  std::map<std::string, std::pair<size_t, std::string>> found;  // tensor -> (file index, path)
  for (const auto& f : files) {
    const std::string fp = (dir / f).string();
    opened.emplace_back(fp);  // checks the whole header; errors name the file and tensor
    for (const auto& [name, entry] : opened.back().entries()) {
      if (indexed) {
        const auto it = weight_map.find(name);
        TORCH_CHECK(it != weight_map.end() && it->second == f, fp, ": tensor '", name,
                    "' is not listed for this file in ", index_path);
      }
      TORCH_CHECK(!found.count(name), fp, ": tensor '", name, "' is also in ", found[name].second);
      // A tied lm_head may still be stored (transformers drops it, FLA's loader ignores it).
      const bool spare_head = tied && name == "lm_head.weight";
      const auto want = expected.find(name);
      TORCH_CHECK(want != expected.end() || spare_head, fp, ": unexpected tensor '", name,
                  "' (not a parameter of FLA's RetNet with this config.json)");
      const std::vector<int64_t> shape =
          spare_head ? std::vector<int64_t>{config.vocab_size, config.hidden_size} : want->second;
      TORCH_CHECK(entry.shape == shape, fp, ": tensor '", name, "' has shape ", shape_str(entry.shape),
                  ", but config.json (", FlaRetNetConfig::shape_fields(name), ") implies ",
                  shape_str(shape));
      const auto dt = entry.dtype;
      TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, fp, ": tensor '", name,
                  "' has dtype ", dt, "; expected F32, F16 or BF16");
      found[name] = {opened.size() - 1, fp};
    }
  }
  std::vector<std::string> missing;
  for (const auto& kv : expected) {
    if (!found.count(kv.first)) missing.push_back(kv.first);
  }
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 8; ++i) list += (i ? ", '" : "'") + missing[i] + "'";
    TORCH_CHECK(false, indexed ? index_path : (dir / files[0]).string(), ": missing tensors [", list,
                missing.size() > 8 ? ", ..." : "", "] (", missing.size(), " in all)");
  }
  std::map<std::string, at::Tensor> weights;
  for (const auto& kv : expected) weights[kv.first] = opened[found.at(kv.first).first].tensor(kv.first);
  LoadOptions opts = options;
  if (!opts.dtype) opts.dtype = weights.at("model.embeddings.weight").scalar_type();
  return FlaRetNet(config, weights, opts);
}

}  // namespace retention
