// retention-generate: serve a RetNet from C++, no Python at run time. Two checkpoint formats:
//  - a file: Python's retention.nn.RetNet.save_pretrained (safetensors, config and character
//    vocabulary in its metadata), served by retention::RetNet;
//  - a directory in flash-linear-attention's format (config.json, model.safetensors or the index
//    and its shards; tokenizer.model for text), what Python's retention.models loads, served by
//    retention::FlaRetNet, text through SentencePiece.
// Prefills all prompts in one packed chunk-form pass, decodes N tokens per prompt with the
// recurrent form (batched, each sequence at its own position), and prints the text, tokens/s and
// peak memory.
//
//   retention-generate --checkpoint model.safetensors --prompt "This License " --max-new-tokens 200
//   retention-generate --checkpoint model.safetensors --ids 5,17,3 --ids 9 --temperature 0.8 --top-k 10
//   retention-generate --checkpoint fla-model-dir --prompt "The GNU General Public License" --dtype bf16
//
// --json FILE writes the prompts' and the new tokens (and with --save-logits the logits each one
// was chosen from) for scripts; --one-by-one decodes the prompts one at a time instead of as a batch.
#include <dlfcn.h>
#include <malloc.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <retention/fla.h>
#include <retention/model.h>

#include "tokenizer.h"

namespace {

void usage(const char* argv0) {
  std::printf(
      "usage: %s --checkpoint FILE|DIR [options]\n"
      "  --checkpoint FILE|DIR  a retention.nn.RetNet safetensors file, or a directory in FLA's format\n"
      "                         (config.json + model.safetensors or model.safetensors.index.json + shards)\n"
      "  --prompt TEXT          a prompt as text (through the file's character vocabulary, or the\n"
      "                         directory's SentencePiece tokenizer.model); repeatable\n"
      "  --ids 1,2,3            a prompt as token ids; repeatable\n"
      "  --tokenizer FILE       SentencePiece model for an FLA directory (default: DIR/tokenizer.model)\n"
      "  --add-bos              prepend config.json's bos_token_id to text prompts (FLA directories)\n"
      "  --batch B              repeat the prompts until there are B sequences (benchmarking)\n"
      "  --max-new-tokens N     tokens to generate per prompt (default 64)\n"
      "  --eos-token-id ID[,ID] a prompt ends at one of these tokens, included (default: config.json's\n"
      "                         eos_token_id for FLA directories, none for files); 'none': never\n"
      "  --temperature T        0 = greedy (default), else sample from softmax(logits / T)\n"
      "  --top-k K              sample among the K most likely tokens (default: all)\n"
      "  --seed S               sampling seed (default 0)\n"
      "  --dtype auto|fp32|bf16 weights dtype (default: as stored)\n"
      "  --device cpu|cuda      (default cpu)\n"
      "  --threads N            intra-op threads (default: all cores)\n"
      "  --one-by-one           decode each prompt on its own instead of as one batch\n"
      "  --warmup               run the prompts' prefill once, untimed, before the timed run\n"
      "                         (allocator, caches, thread pool: a serving process's steady state)\n"
      "  --json FILE            write prompts, tokens, timings (and --save-logits: logits) as JSON\n"
      "  --save-logits          include every step's logits in --json\n"
      "  --quiet                do not print the generated text\n",
      argv0);
}

std::vector<int64_t> parse_ids(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (*end != '\0') throw std::runtime_error("--ids: not an integer: '" + item + "'");
    out.push_back(v);
  }
  return out;
}

// UTF-8 text -> token ids through the character vocabulary (one code point per entry, as the
// main job's tokenizer). Characters outside it are skipped, like the Python trainer's prompt.
std::vector<int64_t> encode_chars(const std::string& text, const std::vector<std::string>& vocab) {
  std::map<std::string, int64_t> index;
  for (size_t i = 0; i < vocab.size(); ++i) index.emplace(vocab[i], static_cast<int64_t>(i));
  std::vector<int64_t> out;
  for (size_t i = 0; i < text.size();) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    const std::string ch = text.substr(i, n);
    const auto it = index.find(ch);
    if (it != index.end()) {
      out.push_back(it->second);
    } else {
      std::fprintf(stderr, "warning: character '%s' is not in the vocabulary; skipped\n", ch.c_str());
    }
    i += n;
  }
  return out;
}

std::string decode_chars(const std::vector<int64_t>& ids, const std::vector<std::string>& vocab) {
  std::string out;
  for (int64_t id : ids) out += vocab.empty() ? "<" + std::to_string(id) + ">" : vocab.at(id);
  return out;
}

// Peak resident memory of this process: VmHWM (reset by exec, unlike getrusage's ru_maxrss,
// which keeps the parent's peak when started from a large process).
double peak_rss_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;  // kB
  }
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;  // Linux: KiB
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  char buf[8];
  for (const unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

struct Args {
  std::string checkpoint, json_path, tokenizer, dtype = "auto", device = "cpu", eos = "auto";
  std::vector<std::pair<bool, std::string>> prompts;  // (is text, value), in command-line order
  int64_t max_new = 64, top_k = 0, batch = 0, threads = 0;
  double temperature = 0;
  uint64_t seed = 0;
  bool one_by_one = false, save_logits = false, quiet = false, add_bos = false, warmup = false;
};

// How a checkpoint turns text into ids and back; `encode` empty: text prompts are refused, for
// the reason in `missing`.
struct TextCodec {
  std::function<std::vector<int64_t>(const std::string&)> encode;
  std::function<std::string(const std::vector<int64_t>&)> decode;
  std::string missing;
};

// Prompts, generation, report: the same for both model classes (same generate() contract).
// --eos-token-id: "auto" gives `model_default` (-1: none), "none" nothing, else its ids.
std::vector<int64_t> eos_ids(const Args& args, int64_t model_default) {
  if (args.eos == "auto") return model_default >= 0 ? std::vector<int64_t>{model_default} : std::vector<int64_t>{};
  if (args.eos == "none") return {};
  auto ids = parse_ids(args.eos);
  if (ids.empty()) throw std::runtime_error("--eos-token-id: give token ids, 'none' or 'auto'");
  return ids;
}

template <typename Model>
int serve(const Model& model, const Args& args, const TextCodec& codec, const std::vector<int64_t>& eos) {
  std::vector<std::vector<int64_t>> prompts;
  for (const auto& [is_text, value] : args.prompts) {
    if (is_text && !codec.encode) throw std::runtime_error("--prompt: " + codec.missing + "; use --ids");
    prompts.push_back(is_text ? codec.encode(value) : parse_ids(value));
    if (prompts.back().empty()) throw std::runtime_error("prompt '" + value + "' has no tokens");
  }
  if (prompts.empty()) throw std::runtime_error("no prompt: give --prompt TEXT or --ids 1,2,3");
  for (size_t i = 0; args.batch > 0 && prompts.size() < static_cast<size_t>(args.batch); ++i) {
    prompts.push_back(prompts[i]);
  }

  if (args.warmup) model.prefill(prompts);

  // Generate: one packed batch, or prompt by prompt.
  retention::SamplingOptions sopt;
  sopt.temperature = args.temperature;
  sopt.top_k = args.top_k;
  sopt.seed = args.seed;
  std::vector<std::vector<int64_t>> generated(prompts.size());
  std::vector<std::vector<at::Tensor>> logits(prompts.size());  // [prompt][step] -> [V]
  retention::RetNet::GenerateStats total;
  auto run = [&](const std::vector<size_t>& which) {
    std::vector<std::vector<int64_t>> batch_prompts;
    for (size_t i : which) batch_prompts.push_back(prompts[i]);
    retention::Sampler sampler(sopt);
    retention::RetNet::GenerateStats st;
    auto out = model.generate(batch_prompts, args.max_new, sampler, &st,
                              [&](int64_t, const at::Tensor& l) {
                                if (!args.save_logits) return;
                                const auto lf = l.to(at::kCPU, at::kFloat);
                                for (size_t j = 0; j < which.size(); ++j) logits[which[j]].push_back(lf[j]);
                              },
                              eos);
    for (size_t j = 0; j < which.size(); ++j) generated[which[j]] = out[j];
    total.prefill_seconds += st.prefill_seconds;
    total.decode_seconds += st.decode_seconds;
    total.prefill_cpu_seconds += st.prefill_cpu_seconds;
    total.decode_cpu_seconds += st.decode_cpu_seconds;
    total.prefill_tokens += st.prefill_tokens;
    total.decode_tokens += st.decode_tokens;
  };
  if (args.one_by_one) {
    for (size_t i = 0; i < prompts.size(); ++i) run({i});
  } else {
    std::vector<size_t> all(prompts.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    run(all);
  }

  std::vector<std::string> texts;
  for (const auto& g : generated) texts.push_back(codec.decode(g));
  if (!args.quiet) {
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::printf("--- [%zu] %s|%s\n", i, codec.decode(prompts[i]).c_str(), texts[i].c_str());
    }
  }
  const double prefill_tps = total.prefill_tokens / std::max(total.prefill_seconds, 1e-12);
  const double decode_tps = total.decode_tokens / std::max(total.decode_seconds, 1e-12);
  const int64_t per_step = total.decode_tokens / (args.one_by_one ? 1 : static_cast<int64_t>(prompts.size()));
  std::printf("prefill: %lld tokens in %.4f s (%.0f tokens/s); decode: %lld tokens in %.4f s "
              "(%.1f tokens/s, %.3f ms per step, batch %zu%s); peak RSS %.1f MiB\n",
              (long long)total.prefill_tokens, total.prefill_seconds, prefill_tps,
              (long long)total.decode_tokens, total.decode_seconds, decode_tps,
              1e3 * total.decode_seconds / std::max<int64_t>(per_step, 1),
              args.one_by_one ? (size_t)1 : prompts.size(), args.one_by_one ? ", one prompt at a time" : "",
              peak_rss_mib());

  if (!args.json_path.empty()) {
    std::ofstream js(args.json_path);
    auto id_lists = [&](const std::vector<std::vector<int64_t>>& lists) {
      js << "[";
      for (size_t i = 0; i < lists.size(); ++i) {
        js << (i ? ", [" : "[");
        for (size_t j = 0; j < lists[i].size(); ++j) js << (j ? ", " : "") << lists[i][j];
        js << "]";
      }
      js << "]";
    };
    js << "{\"prefill_seconds\": " << total.prefill_seconds << ", \"decode_seconds\": " << total.decode_seconds
       << ", \"prefill_cpu_seconds\": " << total.prefill_cpu_seconds
       << ", \"decode_cpu_seconds\": " << total.decode_cpu_seconds
       << ", \"prefill_tokens\": " << total.prefill_tokens << ", \"decode_tokens\": " << total.decode_tokens
       << ", \"peak_rss_mib\": " << peak_rss_mib() << ", \"threads\": " << at::get_num_threads()
       << ", \"prompts\": ";
    id_lists(prompts);
    js << ", \"tokens\": ";
    id_lists(generated);
    js << ", \"texts\": [";
    for (size_t i = 0; i < texts.size(); ++i) js << (i ? ", " : "") << json_string(texts[i]);
    js << "], \"logits\": [";
    char buf[32];
    for (size_t i = 0; i < logits.size(); ++i) {
      js << (i ? ", [" : "[");
      for (size_t s = 0; s < logits[i].size(); ++s) {
        js << (s ? ", [" : "[");
        const auto row = logits[i][s].contiguous();
        const float* p = row.data_ptr<float>();
        for (int64_t v = 0; v < row.numel(); ++v) {
          std::snprintf(buf, sizeof buf, "%.9g", p[v]);  // round-trips fp32 exactly
          js << (v ? ", " : "") << buf;
        }
        js << "]";
      }
      js << "]";
    }
    js << "]}\n";
    if (!js.good()) throw std::runtime_error("cannot write " + args.json_path);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  // Freed buffers up to 32 MiB (glibc's largest mmap threshold) stay in the heap for reuse, like a
  // caching allocator: with glibc's adaptive threshold a young process gets fresh mmapped pages
  // for every large temporary, and their page faults and zeroing made the first prefills of the
  // main job's model about 20 % slower than Python's (bench/README.md, serve_decode.py).
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--checkpoint") args.checkpoint = value();
    else if (a == "--prompt") args.prompts.emplace_back(true, value());
    else if (a == "--ids") args.prompts.emplace_back(false, value());
    else if (a == "--tokenizer") args.tokenizer = value();
    else if (a == "--add-bos") args.add_bos = true;
    else if (a == "--batch") args.batch = std::stoll(value());
    else if (a == "--max-new-tokens") args.max_new = std::stoll(value());
    else if (a == "--eos-token-id") args.eos = value();
    else if (a == "--temperature") args.temperature = std::stod(value());
    else if (a == "--top-k") args.top_k = std::stoll(value());
    else if (a == "--seed") args.seed = std::stoull(value());
    else if (a == "--dtype") args.dtype = value();
    else if (a == "--device") args.device = value();
    else if (a == "--threads") args.threads = std::stoll(value());
    else if (a == "--one-by-one") args.one_by_one = true;
    else if (a == "--warmup") args.warmup = true;
    else if (a == "--json") args.json_path = value();
    else if (a == "--save-logits") args.save_logits = true;
    else if (a == "--quiet") args.quiet = true;
    else if (a == "--help" || a == "-h") {
      usage(argv[0]);
      return 0;
    } else {
      throw std::runtime_error("unknown argument '" + a + "' (see --help)");
    }
  }
  if (args.checkpoint.empty()) {
    usage(argv[0]);
    return 2;
  }
  // Debian's torch starts with one thread on small machines: default to every core.
  const int nthreads = static_cast<int>(args.threads > 0 ? args.threads
                                                         : std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(nthreads);
  // OpenBLAS (Debian's torch) runs GEMMs on its own thread pool, which at::set_num_threads does
  // not govern; left at its default it spins against a busy machine (B=16 decode: 0.66 s per
  // step with 1.8 s of CPU time in 150 s). Looked up at run time: other BLAS builds are untouched.
  if (auto set_blas = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) {
    set_blas(nthreads);
  }

  retention::LoadOptions load;
  if (args.dtype == "fp32") load.dtype = at::kFloat;
  else if (args.dtype == "bf16") load.dtype = at::kBFloat16;
  else if (args.dtype != "auto") throw std::runtime_error("--dtype must be auto, fp32 or bf16");
  load.device = at::Device(args.device);
  auto t0 = std::chrono::steady_clock::now();
  auto seconds = [&]() { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };

  if (std::filesystem::is_directory(args.checkpoint)) {  // FLA format
    const auto model = retention::FlaRetNet::load(args.checkpoint, load);
    const double load_s = seconds();
    const auto& c = model.config();
    std::printf("model: FLA RetNet V=%lld D=%lld H=%lld (kv %lld) dk=%lld dv=%lld L=%lld MLP=%lld, %.2fM "
                "parameters (%s, %.1f MiB) on %s, loaded in %.3f s; %d threads\n",
                (long long)c.vocab_size, (long long)c.hidden_size, (long long)c.num_heads,
                (long long)c.kv_heads(), (long long)c.head_k_dim(), (long long)c.head_v_dim(),
                (long long)c.num_hidden_layers, (long long)c.mlp_dim(), model.num_parameters() / 1e6,
                c10::toString(model.dtype()), model.weight_bytes() / 1048576.0, args.device.c_str(), load_s,
                at::get_num_threads());
    TextCodec codec;
    std::string tok_path = args.tokenizer;
    if (tok_path.empty() && std::filesystem::exists(std::filesystem::path(args.checkpoint) / "tokenizer.model")) {
      tok_path = (std::filesystem::path(args.checkpoint) / "tokenizer.model").string();
    }
    std::shared_ptr<SentencePieceTokenizer> tok;
    if (!tok_path.empty()) tok = std::make_shared<SentencePieceTokenizer>(tok_path);
    if (tok) {
      if (tok->size() > c.vocab_size) {
        throw std::runtime_error(tok_path + ": the tokenizer has " + std::to_string(tok->size()) +
                                 " pieces, more than the model's vocab_size " + std::to_string(c.vocab_size));
      }
      if (args.add_bos && c.bos_token_id < 0) {
        throw std::runtime_error("--add-bos: config.json has no bos_token_id");
      }
      const int64_t bos = args.add_bos ? c.bos_token_id : -1;
      codec.encode = [tok, bos](const std::string& text) {
        auto ids = tok->encode(text);
        if (bos >= 0) ids.insert(ids.begin(), bos);
        return ids;
      };
      codec.decode = [tok](const std::vector<int64_t>& ids) { return tok->decode(ids); };
    } else {
      codec.missing = "the directory has no tokenizer.model (give --tokenizer FILE)";
      codec.decode = [](const std::vector<int64_t>& ids) { return decode_chars(ids, {}); };
    }
    return serve(model, args, codec, eos_ids(args, c.eos_token_id));
  }

  const auto model = retention::RetNet::load(args.checkpoint, load);
  const double load_s = seconds();
  const auto& c = model.config();
  std::printf("model: RetNet V=%lld D=%lld Dv=%lld H=%lld L=%lld FFN=%lld, %.2fM parameters (%s, %.1f MiB) "
              "on %s, loaded in %.3f s; %d threads\n",
              (long long)c.vocab_size, (long long)c.embed_dim, (long long)c.value_dim,
              (long long)c.num_heads, (long long)c.num_layers, (long long)c.ffn_dim,
              model.num_parameters() / 1e6, c10::toString(model.dtype()),
              model.weight_bytes() / 1048576.0, args.device.c_str(), load_s, at::get_num_threads());
  TextCodec codec;
  const auto& vocab = model.vocab();
  if (!vocab.empty()) codec.encode = [&vocab](const std::string& text) { return encode_chars(text, vocab); };
  codec.missing = "needs a checkpoint with a vocabulary";
  codec.decode = [&vocab](const std::vector<int64_t>& ids) { return decode_chars(ids, vocab); };
  return serve(model, args, codec, eos_ids(args, -1));
} catch (const c10::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.msg().c_str());
  return 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
