// GoogleTest of retention::RetNet (retention/model.h) and the safetensors reader, CPU.
//
// Each test writes its own checkpoint (random weights, config in the metadata, as Python's
// RetNet.save_pretrained does) and judges the model against an independent float64 reference
// written here from the math, token by token in recurrent form:
//   x = E[token];  per layer:  h = rms(x) w1;  q = Wq h, k = Wk h / sqrt(dk), v = Wv h, g = Wg h
//   per head: rotate q, k by position p (pairs (2i, 2i+1), angle p * 10000^(-i/(dk/2-1)))
//             S = gamma S + k^T v;  o = q S / sqrt((1 - gamma^(p+1)) / (1 - gamma))
//             z = o / sqrt(mean(o^2) + eps)
//   x += Wo (silu(g) * z);  n = rms(x) w2;  x += W2 (silu(W1 n) * (Wgate n))
//   logits = Wout rms(x) wf
// Corrupt files must give an error naming the tensor (never a crash).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <retention/model.h>
#include <retention/safetensors.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

using at::Tensor;

struct Weights {
  retention::RetNetConfig config;
  std::map<std::string, Tensor> tensors;
};

Weights random_model(uint64_t seed, bool tie = false) {
  Weights w;
  auto& c = w.config;
  c.vocab_size = 37;
  c.embed_dim = 32;  // H = 4: dk = 8
  c.value_dim = 48;  // dv = 12
  c.num_heads = 4;
  c.num_layers = 2;
  c.ffn_dim = 40;
  c.chunk_size = 4;  // several chunks per prompt
  c.layernorm_eps = 1e-6;
  c.tie_embeddings = tie;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto randn = [&](std::vector<int64_t> shape, double std) {
    return at::normal(0.0, std, shape, gen, at::TensorOptions().dtype(at::kFloat));
  };
  auto ones_ish = [&](int64_t n) { return 1.0 + randn({n}, 0.2); };
  const int64_t D = c.embed_dim, Dv = c.value_dim, F = c.ffn_dim, V = c.vocab_size;
  w.tensors["embed_tokens.weight"] = randn({V, D}, 1.0);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    w.tensors[p + "retention_layer_norm.weight"] = ones_ish(D);
    w.tensors[p + "retention.q_proj.weight"] = randn({D, D}, 0.3);
    w.tensors[p + "retention.k_proj.weight"] = randn({D, D}, 0.3);
    w.tensors[p + "retention.v_proj.weight"] = randn({Dv, D}, 0.3);
    w.tensors[p + "retention.g_proj.weight"] = randn({Dv, D}, 0.3);
    w.tensors[p + "retention.out_proj.weight"] = randn({D, Dv}, 0.2);
    w.tensors[p + "final_layer_norm.weight"] = ones_ish(D);
    w.tensors[p + "ffn.fc1.weight"] = randn({F, D}, 0.3);
    w.tensors[p + "ffn.gate.weight"] = randn({F, D}, 0.3);
    w.tensors[p + "ffn.fc2.weight"] = randn({D, F}, 0.2);
  }
  w.tensors["layer_norm.weight"] = ones_ish(D);
  if (!tie) w.tensors["output_projection.weight"] = randn({V, D}, 0.3);
  return w;
}

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "retention_test_model_" + std::to_string(getpid()) + "_" + name;
}

std::string write_checkpoint(const Weights& w, const std::string& name) {
  const std::string path = temp_path(name);
  std::vector<std::pair<std::string, Tensor>> list(w.tensors.begin(), w.tensors.end());
  retention::save_safetensors(path, list,
                              {{"format", "pt"}, {"model_type", "retention.RetNet"}, {"config", w.config.to_json()}});
  return path;
}

// ---- float64 reference ------------------------------------------------------------------------
class Reference {
 public:
  explicit Reference(const Weights& w) : c_(w.config) {
    for (const auto& [k, t] : w.tensors) w_[k] = t.to(at::kDouble);
    if (c_.tie_embeddings) w_["output_projection.weight"] = w_["embed_tokens.weight"];
  }

  // Logits [T, V] for every position of one sequence (from position 0, zero state).
  Tensor run(const std::vector<int64_t>& tokens) const {
    const int64_t H = c_.num_heads, dk = c_.key_head_dim(), dv = c_.value_head_dim();
    std::vector<Tensor> S(c_.num_layers * H);
    for (auto& s : S) s = at::zeros({dk, dv}, at::kDouble);
    std::vector<Tensor> out;
    for (size_t p = 0; p < tokens.size(); ++p) {
      Tensor x = w_.at("embed_tokens.weight")[tokens[p]];
      for (int64_t l = 0; l < c_.num_layers; ++l) {
        const std::string pre = "layers." + std::to_string(l) + ".";
        const Tensor h = rms(x) * w_.at(pre + "retention_layer_norm.weight");
        const Tensor q = at::mv(w_.at(pre + "retention.q_proj.weight"), h);
        const Tensor k = at::mv(w_.at(pre + "retention.k_proj.weight"), h) / std::sqrt(double(dk));
        const Tensor v = at::mv(w_.at(pre + "retention.v_proj.weight"), h);
        const Tensor g = at::mv(w_.at(pre + "retention.g_proj.weight"), h);
        std::vector<Tensor> heads;
        for (int64_t hh = 0; hh < H; ++hh) {
          const double gamma = 1.0 - std::pow(2.0, -5.0 - hh);  // decay "retnet"
          const Tensor qh = rotate(q.slice(0, hh * dk, (hh + 1) * dk), double(p));
          const Tensor kh = rotate(k.slice(0, hh * dk, (hh + 1) * dk), double(p));
          const Tensor vh = v.slice(0, hh * dv, (hh + 1) * dv);
          Tensor& s = S[l * H + hh];
          s = gamma * s + at::outer(kh, vh);
          const double norm_s = (1.0 - std::pow(gamma, double(p + 1))) / (1.0 - gamma);
          const Tensor o = at::mv(s.t(), qh) / std::sqrt(norm_s);
          const Tensor z = o / at::sqrt((o * o).mean() + c_.layernorm_eps);
          heads.push_back(at::silu(g.slice(0, hh * dv, (hh + 1) * dv)) * z);
        }
        x = x + at::mv(w_.at(pre + "retention.out_proj.weight"), at::cat(heads));
        const Tensor n = rms(x) * w_.at(pre + "final_layer_norm.weight");
        const Tensor f = at::silu(at::mv(w_.at(pre + "ffn.fc1.weight"), n)) * at::mv(w_.at(pre + "ffn.gate.weight"), n);
        x = x + at::mv(w_.at(pre + "ffn.fc2.weight"), f);
      }
      out.push_back(at::mv(w_.at("output_projection.weight"), rms(x) * w_.at("layer_norm.weight")));
    }
    return at::stack(out);
  }

 private:
  Tensor rms(const Tensor& x) const { return x / at::sqrt((x * x).mean() + c_.layernorm_eps); }
  static Tensor rotate(const Tensor& x, double pos) {
    const int64_t half = x.size(0) / 2;
    Tensor out = at::empty_like(x);
    auto xa = x.accessor<double, 1>();
    auto oa = out.accessor<double, 1>();
    for (int64_t i = 0; i < half; ++i) {
      const double theta = half > 1 ? std::pow(10000.0, -double(i) / double(half - 1)) : 1.0;
      const double cs = std::cos(pos * theta), sn = std::sin(pos * theta);
      oa[2 * i] = xa[2 * i] * cs - xa[2 * i + 1] * sn;
      oa[2 * i + 1] = xa[2 * i + 1] * cs + xa[2 * i] * sn;
    }
    return out;
  }

  retention::RetNetConfig c_;
  std::map<std::string, Tensor> w_;
};

double max_rel_diff(const Tensor& a, const Tensor& ref) {
  const auto r = ref.to(at::kDouble);
  const double scale = std::max(1.0, r.abs().max().item<double>());
  return (a.to(at::kDouble) - r).abs().max().item<double>() / scale;
}

const std::vector<std::vector<int64_t>> kPrompts = {{5, 1, 30, 7, 7, 2, 19, 36, 0, 11, 4},
                                                    {3},
                                                    {8, 8, 21, 17, 2, 26, 9}};

// fp32 tolerance, relative to max(1, max |logit|): fp32 unit roundoff 6e-8 times the growth
// through ~2 layers of norms, projections and retention sums over <= 40 terms stays far below
// 1e-5; measured errors are ~1e-6.
constexpr double kTolF32 = 1e-5;

class RetNetModel : public ::testing::Test {
 protected:
  void SetUp() override {
    weights_ = random_model(1234);
    path_ = write_checkpoint(weights_, "model.safetensors");
  }
  void TearDown() override { std::remove(path_.c_str()); }
  Weights weights_;
  std::string path_;
};

TEST_F(RetNetModel, PackedPrefillMatchesReference) {
  const auto model = retention::RetNet::load(path_);
  EXPECT_EQ(model.dtype(), at::kFloat);
  const Reference ref(weights_);
  auto [last, state] = model.prefill(kPrompts);
  ASSERT_EQ(last.sizes(), at::IntArrayRef({3, 37}));
  EXPECT_TRUE(at::equal(state.offsets, at::tensor(std::vector<int64_t>{11, 1, 7})));
  // every position: forward without last_only
  std::vector<int64_t> flat, cu = {0};
  for (const auto& p : kPrompts) {
    flat.insert(flat.end(), p.begin(), p.end());
    cu.push_back(flat.size());
  }
  auto [all, st2] = model.forward(at::tensor(flat), at::tensor(cu));
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    const Tensor r = ref.run(kPrompts[i]);
    EXPECT_LT(max_rel_diff(last[i], r[-1]), kTolF32) << "prompt " << i;
    EXPECT_LT(max_rel_diff(all.slice(0, cu[i], cu[i + 1]), r), kTolF32) << "prompt " << i;
  }
}

TEST_F(RetNetModel, StepDecodingMatchesReference) {
  const auto model = retention::RetNet::load(path_);
  const Reference ref(weights_);
  auto [logits, state] = model.prefill(kPrompts);
  std::vector<std::vector<int64_t>> seqs = kPrompts;
  for (int step = 0; step < 20; ++step) {
    const Tensor tok = logits.argmax(-1);
    for (size_t i = 0; i < seqs.size(); ++i) seqs[i].push_back(tok[i].item<int64_t>());
    logits = model.step(tok, state);
    for (size_t i = 0; i < seqs.size(); ++i) {
      EXPECT_LT(max_rel_diff(logits[i], ref.run(seqs[i])[-1]), kTolF32) << "step " << step << " seq " << i;
      EXPECT_EQ(state.offsets[i].item<int64_t>(), static_cast<int64_t>(seqs[i].size()));
    }
  }
}

TEST_F(RetNetModel, BatchedGenerationEqualsOnePromptAtATime) {
  const auto model = retention::RetNet::load(path_);
  retention::SamplingOptions greedy;
  std::vector<Tensor> batched_logits;
  retention::Sampler s0(greedy);
  const auto batched = model.generate(kPrompts, 30, s0, nullptr,
                                      [&](int64_t, const Tensor& l) { batched_logits.push_back(l.clone()); });
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    retention::Sampler s1(greedy);
    std::vector<Tensor> single_logits;
    const auto single = model.generate({kPrompts[i]}, 30, s1, nullptr,
                                       [&](int64_t, const Tensor& l) { single_logits.push_back(l.clone()); });
    // Greedy decoding follows the argmax, and a batched GEMM may round differently from a
    // single-row one, so the two may part at a near tie (the two best logits within the
    // tolerance); up to and including that step they must agree.
    size_t agree = single[0].size();
    for (size_t s = 0; s < single[0].size(); ++s) {
      if (single[0][s] != batched[i][s]) {
        const Tensor& l = single_logits[s][0];
        const double gap = (l[single[0][s]] - l[batched[i][s]]).item<double>();
        EXPECT_LE(gap, 2 * kTolF32 * std::max(1.0, l.abs().max().item<double>()))
            << "prompt " << i << ": tokens part at step " << s << " without a near tie";
        agree = s + 1;
        break;
      }
    }
    for (size_t s = 0; s < agree; ++s) {
      EXPECT_LT(max_rel_diff(batched_logits[s][i], single_logits[s][0]), kTolF32);
    }
  }
}

// A prompt ends at its first eos token, included; the others go on unchanged (the batch keeps
// stepping the ended ones, unread), and stepping stops once every prompt has ended.
TEST_F(RetNetModel, GenerationEndsAtEos) {
  const auto model = retention::RetNet::load(path_);
  retention::SamplingOptions greedy;
  retention::Sampler s0(greedy);
  const auto base = model.generate(kPrompts, 30, s0);
  for (const std::vector<int64_t>& eos : {std::vector<int64_t>{base[0][4]},
                                          std::vector<int64_t>{base[0][4], base[1][6], base[2][2]}}) {
    retention::Sampler s1(greedy);
    retention::RetNet::GenerateStats stats;
    const auto out = model.generate(kPrompts, 30, s1, &stats, {}, eos);
    int64_t last_end = -1;
    bool all_end = true;
    for (size_t i = 0; i < kPrompts.size(); ++i) {
      size_t end = base[i].size();
      bool found = false;
      for (size_t t = 0; t < base[i].size() && !found; ++t) {
        found = std::find(eos.begin(), eos.end(), base[i][t]) != eos.end();
        if (found) end = t + 1;
      }
      all_end = all_end && found;
      last_end = std::max<int64_t>(last_end, static_cast<int64_t>(end) - 1);
      EXPECT_EQ(out[i], std::vector<int64_t>(base[i].begin(), base[i].begin() + end)) << "prompt " << i;
    }
    // steps run: up to the last prompt's end, or all 29 when some prompt never ends
    EXPECT_EQ(stats.decode_tokens, (all_end ? last_end : 29) * static_cast<int64_t>(kPrompts.size()));
  }
  retention::Sampler s2(greedy);
  EXPECT_THROW(model.generate(kPrompts, 3, s2, nullptr, {}, {-1}), c10::Error);
}

TEST_F(RetNetModel, PrefillContinuesFromAState) {
  const auto model = retention::RetNet::load(path_);
  const std::vector<int64_t> a = {5, 1, 30, 7, 7, 2}, b = {19, 36, 0, 11, 4, 9, 9};
  std::vector<int64_t> ab = a;
  ab.insert(ab.end(), b.begin(), b.end());
  auto [l_ab, s_ab] = model.prefill({ab});
  auto [l_a, s_a] = model.prefill({a});
  auto [l_b, s_b] = model.forward(at::tensor(b), at::tensor(std::vector<int64_t>{0, (int64_t)b.size()}), &s_a, true);
  EXPECT_LT(max_rel_diff(l_b, l_ab), kTolF32);
  EXPECT_EQ(s_b.offsets.item<int64_t>(), 13);
  // state selection / concatenation keep each sequence's state and position
  auto both = retention::RetNetState::cat({s_a, s_ab});
  auto picked = both.select(at::tensor(std::vector<int64_t>{1}));
  for (size_t l = 0; l < picked.layers.size(); ++l) EXPECT_TRUE(at::equal(picked.layers[l], s_ab.layers[l]));
  EXPECT_EQ(picked.offsets.item<int64_t>(), 13);
}

TEST_F(RetNetModel, Bf16WeightsStayCloseToTheReference) {
  const auto model = retention::RetNet::load(path_, {at::kBFloat16});
  EXPECT_EQ(model.dtype(), at::kBFloat16);
  // Reference on the bf16-rounded weights: what remains is bf16 activation rounding (unit
  // roundoff 2^-9 = 2e-3) through ~2 layers of ~10 rounded ops each.
  Weights rounded = weights_;
  for (auto& kv : rounded.tensors) kv.second = kv.second.to(at::kBFloat16).to(at::kFloat);
  const Reference ref(rounded);
  auto [last, state] = model.prefill(kPrompts);
  EXPECT_EQ(last.scalar_type(), at::kBFloat16);
  EXPECT_EQ(state.layers[0].scalar_type(), at::kFloat);  // states stay fp32
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_LT(max_rel_diff(last[i], ref.run(kPrompts[i])[-1]), 5e-2) << "prompt " << i;
  }
  std::vector<std::vector<int64_t>> seqs = kPrompts;
  Tensor logits = last;
  for (int step = 0; step < 5; ++step) {
    const Tensor tok = logits.argmax(-1);
    for (size_t i = 0; i < seqs.size(); ++i) seqs[i].push_back(tok[i].item<int64_t>());
    logits = model.step(tok, state);
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    EXPECT_LT(max_rel_diff(logits[i], ref.run(seqs[i])[-1]), 5e-2) << "seq " << i;
  }
}

TEST_F(RetNetModel, SaveLoadRoundTripAndTiedEmbeddings) {
  const auto model = retention::RetNet::load(path_);
  const std::string again = temp_path("again.safetensors");
  model.save(again, {{"vocab", "[" + std::string(36, ' ') + "\"a\"" + "]"}});  // wrong length: caught on load
  EXPECT_THROW(retention::RetNet::load(again), c10::Error);
  std::string vocab = "[";
  for (int i = 0; i < 37; ++i) vocab += std::string(i ? "," : "") + "\"" + char('A' + i % 26) + "\"";
  model.save(again, {{"vocab", vocab + "]"}});
  const auto loaded = retention::RetNet::load(again);
  ASSERT_EQ(loaded.vocab().size(), 37u);
  EXPECT_EQ(loaded.vocab()[27], "B");
  for (const auto& [name, t] : model.weights()) EXPECT_TRUE(at::equal(t, loaded.weights().at(name))) << name;
  std::remove(again.c_str());

  const auto tied_w = random_model(99, /*tie=*/true);
  const std::string tied = write_checkpoint(tied_w, "tied.safetensors");
  const auto tm = retention::RetNet::load(tied);
  EXPECT_EQ(tm.weights().count("output_projection.weight"), 0u);
  auto [l, s] = tm.prefill({kPrompts[0]});
  EXPECT_LT(max_rel_diff(l[0], Reference(tied_w).run(kPrompts[0])[-1]), kTolF32);
  std::remove(tied.c_str());
}

TEST_F(RetNetModel, Sampling) {
  const auto model = retention::RetNet::load(path_);
  auto [logits, state] = model.prefill(kPrompts);
  retention::Sampler greedy;
  EXPECT_TRUE(at::equal(greedy(logits), logits.argmax(-1)));
  retention::Sampler top1({2.0, 1, 7});
  EXPECT_TRUE(at::equal(top1(logits), logits.argmax(-1)));
  // same seed, same draws; top-k draws come from the k largest logits
  const Tensor wide = at::randn({64, 37}) * 3;
  retention::Sampler a({0.8, 5, 42}), b({0.8, 5, 42});
  const auto kth = std::get<0>(at::topk(wide, 5, -1)).select(-1, 4);
  for (int r = 0; r < 20; ++r) {
    const Tensor ta = a(wide), tb = b(wide);
    EXPECT_TRUE(at::equal(ta, tb));
    EXPECT_TRUE((wide.gather(1, ta.unsqueeze(1)).squeeze(1) >= kth).all().item<bool>());
  }
  // frequencies follow softmax(logits / T): 20000 draws of one row, |f - p| < 5 sigma
  const Tensor row = at::tensor(std::vector<float>{1.0f, 0.5f, -0.3f, 2.0f, 0.0f}).unsqueeze(0).repeat({20000, 1});
  retention::Sampler t({0.7, 0, 3});
  const Tensor counts = at::bincount(t(row), {}, 5).to(at::kDouble) / 20000.0;
  const Tensor p = at::softmax(row[0].to(at::kDouble) / 0.7, 0);
  const Tensor sigma = at::sqrt(p * (1 - p) / 20000.0);
  EXPECT_TRUE(((counts - p).abs() < 5 * sigma).all().item<bool>()) << counts << p;
}

// A decode step reads no value on the host (no device round trip, capturable in a CUDA graph):
// on the meta device, which has shapes but no values, any such read throws.
TEST_F(RetNetModel, StepReadsNoValueOnTheHost) {
  retention::LoadOptions meta;
  meta.device = at::kMeta;
  const auto model = retention::RetNet::load(path_, meta);
  auto state = model.init_state(2);
  const Tensor tokens = at::empty({2}, at::TensorOptions().dtype(at::kLong).device(at::kMeta));
  try {
    const Tensor logits = model.step(tokens, state);
    EXPECT_TRUE(logits.is_meta());
    EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{2, model.config().vocab_size}));
  } catch (const c10::Error& e) {
    // torch 1.13 has no meta kernel for the embedding lookup (index_select), the step's first op
    // after its checks: reaching it shows the checks read nothing (a value read fails before).
    const std::string what = e.what();
    EXPECT_NE(what.find("'aten::index_select' with arguments from the 'Meta' backend"), std::string::npos) << what;
  }
}

TEST_F(RetNetModel, BadInputsAreRejected) {
  const auto model = retention::RetNet::load(path_);
  auto state = model.init_state(2);
  EXPECT_THROW(model.step(at::tensor(std::vector<int64_t>{1, 37}), state), c10::Error);  // id >= V
  EXPECT_THROW(model.step(at::tensor(std::vector<int64_t>{1}), state), c10::Error);      // N mismatch
  EXPECT_THROW(model.prefill({{1, 2}, {}}), c10::Error);                                 // empty prompt
  EXPECT_THROW(retention::Sampler({1.0, -1, 0}), c10::Error);
}

// ---- corrupt files ------------------------------------------------------------------------------
std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), bytes.size());
}

std::string raw_file(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

// Loading `bytes` fails with a message containing every string of `expect`.
void expect_load_error(const std::string& bytes, const std::vector<std::string>& expect) {
  const std::string path = temp_path("bad.safetensors");
  write_all(path, bytes);
  try {
    retention::RetNet::load(path);
    ADD_FAILURE() << "loaded a corrupt file; expected an error containing '" << expect[0] << "'";
  } catch (const c10::Error& e) {
    for (const auto& s : expect) EXPECT_NE(e.msg().find(s), std::string::npos) << "message: " << e.msg();
  }
  std::remove(path.c_str());
}

// Rewrites the checkpoint with `edit` applied to the named tensor list (a header built here).
std::string checkpoint_with(const Weights& w, const std::function<void(std::vector<std::pair<std::string, Tensor>>&)>& edit) {
  std::vector<std::pair<std::string, Tensor>> list(w.tensors.begin(), w.tensors.end());
  edit(list);
  const std::string path = temp_path("edited.safetensors");
  retention::save_safetensors(path, list,
                              {{"format", "pt"}, {"model_type", "retention.RetNet"}, {"config", w.config.to_json()}});
  const std::string bytes = read_all(path);
  std::remove(path.c_str());
  return bytes;
}

TEST_F(RetNetModel, CorruptCheckpointsGiveClearErrors) {
  const std::string good = read_all(path_);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(good[i]);
  const std::string header = good.substr(8, n), data = good.substr(8 + n);

  // truncated inside the data: the last tensor's bytes run past the end
  expect_load_error(good.substr(0, good.size() - 10), {"tensor '", "outside the data section"});
  // truncated inside the header, and shorter than the length field
  expect_load_error(good.substr(0, 8 + n / 2), {"header length", "runs past the end"});
  expect_load_error(good.substr(0, 5), {"too short"});
  // a length field of 2^63
  expect_load_error(std::string(7, '\0') + '\x80' + header + data, {"runs past the end"});
  // header not JSON
  expect_load_error(raw_file("{\"embed_tokens.weight\": [", data), {"not valid JSON"});
  expect_load_error(raw_file("[1, 2]        ", ""), {"must be a JSON object"});
  // offsets past the end of the file
  expect_load_error(raw_file(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,1000000]}})", std::string(16, '\0')),
                    {"tensor 'x'", "outside the data section"});
  // shape inconsistent with the byte count, overflowing shape, unknown dtype, gaps
  expect_load_error(raw_file(R"({"x":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}})", std::string(16, '\0')),
                    {"tensor 'x'", "needs 20 bytes"});
  expect_load_error(raw_file(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})",
                             std::string(16, '\0')),
                    {"tensor 'x'", "overflows"});
  expect_load_error(raw_file(R"({"x":{"dtype":"F8","shape":[4],"data_offsets":[0,4]}})", std::string(4, '\0')),
                    {"tensor 'x'", "unsupported or missing dtype"});
  expect_load_error(raw_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, '\0')),
                    {"tensor 'x'", "back to back"});
  expect_load_error(raw_file(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", std::string(4, '\0')),
                    {"tensor 'x'", "non-negative"});
  // a valid file that is not a RetNet checkpoint
  expect_load_error(raw_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", std::string(4, '\0')),
                    {"model_type"});

  // missing tensor, wrong shape, wrong dtype, unexpected tensor, bad config
  const std::string fc2 = "layers.1.ffn.fc2.weight";
  expect_load_error(checkpoint_with(weights_, [&](auto& l) {
                      l.erase(std::remove_if(l.begin(), l.end(), [&](auto& kv) { return kv.first == fc2; }), l.end());
                    }),
                    {"tensor '" + fc2 + "' is missing"});
  expect_load_error(checkpoint_with(weights_, [&](auto& l) {
                      for (auto& kv : l) if (kv.first == fc2) kv.second = at::zeros({32, 41});
                    }),
                    {"tensor '" + fc2 + "' has shape [32, 41], the model config needs [32, 40]"});
  expect_load_error(checkpoint_with(weights_, [&](auto& l) {
                      for (auto& kv : l) if (kv.first == fc2) kv.second = at::zeros({32, 40}, at::kInt);
                    }),
                    {"tensor '" + fc2 + "' has dtype Int"});
  expect_load_error(checkpoint_with(weights_, [&](auto& l) { l.push_back({"extra.weight", at::zeros({2})}); }),
                    {"unexpected tensor 'extra.weight'"});
  Weights bad_config = weights_;
  bad_config.config.num_heads = 5;  // 32 % 5 != 0
  expect_load_error(checkpoint_with(bad_config, [](auto&) {}), {"divisible by num_heads"});
}

TEST(Safetensors, ReaderMatchesWriterForEveryDtype) {
  const std::string path = temp_path("dtypes.safetensors");
  std::vector<std::pair<std::string, Tensor>> list = {
      {"f64", at::randn({3, 2}, at::kDouble)}, {"f32", at::randn({5})},
      {"f16", at::randn({3}).to(at::kHalf)},  {"bf16", at::randn({7}).to(at::kBFloat16)},
      {"i64", at::arange(4, at::kLong)},       {"i32", at::arange(3, at::kInt)},
      {"u8", at::arange(5, at::kByte)},        {"b", at::ones({2}, at::kBool)},
      {"empty", at::zeros({0, 3})},            {"scalar", at::tensor(2.5)}};
  retention::save_safetensors(path, list, {{"k", "v"}});
  const retention::SafetensorsFile f(path);
  EXPECT_EQ(f.metadata("k", ""), "v");
  for (const auto& [name, t] : list) {
    const Tensor r = f.tensor(name);
    EXPECT_EQ(r.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(r, t)) << name;
  }
  EXPECT_THROW(f.tensor("nope"), c10::Error);
  std::remove(path.c_str());
}

}  // namespace
