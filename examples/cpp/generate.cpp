// retention-generate: serve a RetNet trained in Python (RetNet.save_pretrained) from C++.
// Loads the safetensors checkpoint, prefills all prompts in one packed chunk-form pass, decodes
// N tokens per prompt with the recurrent form (batched, each sequence at its own position), and
// prints the text, tokens/s and peak memory. No Python at run time.
//
//   retention-generate --checkpoint model.safetensors --prompt "This License " --max-new-tokens 200
//   retention-generate --checkpoint model.safetensors --ids 5,17,3 --ids 9 --temperature 0.8 --top-k 10
//
// --json FILE writes the new tokens (and with --save-logits the logits each one was chosen
// from) for scripts; --one-by-one decodes the prompts one at a time instead of as a batch.
#include <dlfcn.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <retention/model.h>

namespace {

void usage(const char* argv0) {
  std::printf(
      "usage: %s --checkpoint FILE [options]\n"
      "  --prompt TEXT          a prompt as text (needs the checkpoint's character vocabulary); repeatable\n"
      "  --ids 1,2,3            a prompt as token ids; repeatable\n"
      "  --batch B              repeat the prompts until there are B sequences (benchmarking)\n"
      "  --max-new-tokens N     tokens to generate per prompt (default 64)\n"
      "  --temperature T        0 = greedy (default), else sample from softmax(logits / T)\n"
      "  --top-k K              sample among the K most likely tokens (default: all)\n"
      "  --seed S               sampling seed (default 0)\n"
      "  --dtype auto|fp32|bf16 weights dtype (default: as stored)\n"
      "  --device cpu|cuda      (default cpu)\n"
      "  --threads N            intra-op threads (default: all cores)\n"
      "  --one-by-one           decode each prompt on its own instead of as one batch\n"
      "  --json FILE            write tokens, timings (and --save-logits: logits) as JSON\n"
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
std::vector<int64_t> encode(const std::string& text, const std::vector<std::string>& vocab) {
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

std::string decode(const std::vector<int64_t>& ids, const std::vector<std::string>& vocab) {
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

}  // namespace

int main(int argc, char** argv) try {
  std::string checkpoint, json_path, dtype = "auto", device = "cpu";
  std::vector<std::pair<bool, std::string>> prompt_args;  // (is text, value), in command-line order
  std::vector<std::vector<int64_t>> prompts;
  int64_t max_new = 64, top_k = 0, batch = 0, threads = 0;
  double temperature = 0;
  uint64_t seed = 0;
  bool one_by_one = false, save_logits = false, quiet = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--checkpoint") checkpoint = value();
    else if (a == "--prompt") prompt_args.emplace_back(true, value());
    else if (a == "--ids") prompt_args.emplace_back(false, value());
    else if (a == "--batch") batch = std::stoll(value());
    else if (a == "--max-new-tokens") max_new = std::stoll(value());
    else if (a == "--temperature") temperature = std::stod(value());
    else if (a == "--top-k") top_k = std::stoll(value());
    else if (a == "--seed") seed = std::stoull(value());
    else if (a == "--dtype") dtype = value();
    else if (a == "--device") device = value();
    else if (a == "--threads") threads = std::stoll(value());
    else if (a == "--one-by-one") one_by_one = true;
    else if (a == "--json") json_path = value();
    else if (a == "--save-logits") save_logits = true;
    else if (a == "--quiet") quiet = true;
    else if (a == "--help" || a == "-h") {
      usage(argv[0]);
      return 0;
    } else {
      throw std::runtime_error("unknown argument '" + a + "' (see --help)");
    }
  }
  if (checkpoint.empty()) {
    usage(argv[0]);
    return 2;
  }
  // Debian's torch starts with one thread on small machines: default to every core.
  const int nthreads = static_cast<int>(threads > 0 ? threads : std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(nthreads);
  // OpenBLAS (Debian's torch) runs GEMMs on its own thread pool, which at::set_num_threads does
  // not govern; left at its default it spins against a busy machine (B=16 decode: 0.66 s per
  // step with 1.8 s of CPU time in 150 s). Looked up at run time: other BLAS builds are untouched.
  if (auto set_blas = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) {
    set_blas(nthreads);
  }

  retention::LoadOptions load;
  if (dtype == "fp32") load.dtype = at::kFloat;
  else if (dtype == "bf16") load.dtype = at::kBFloat16;
  else if (dtype != "auto") throw std::runtime_error("--dtype must be auto, fp32 or bf16");
  load.device = at::Device(device);
  auto t0 = std::chrono::steady_clock::now();
  const auto model = retention::RetNet::load(checkpoint, load);
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto& c = model.config();
  std::printf("model: RetNet V=%lld D=%lld Dv=%lld H=%lld L=%lld FFN=%lld, %.2fM parameters (%s, %.1f MiB) "
              "on %s, loaded in %.3f s; %d threads\n",
              (long long)c.vocab_size, (long long)c.embed_dim, (long long)c.value_dim,
              (long long)c.num_heads, (long long)c.num_layers, (long long)c.ffn_dim,
              model.num_parameters() / 1e6, c10::toString(model.dtype()),
              model.weight_bytes() / 1048576.0, device.c_str(), load_s, at::get_num_threads());

  for (const auto& [is_text, value] : prompt_args) {
    if (is_text && model.vocab().empty()) {
      throw std::runtime_error("--prompt needs a checkpoint with a vocabulary; use --ids");
    }
    prompts.push_back(is_text ? encode(value, model.vocab()) : parse_ids(value));
  }
  if (prompts.empty()) throw std::runtime_error("no prompt: give --prompt TEXT or --ids 1,2,3");
  for (size_t i = 0; batch > 0 && prompts.size() < static_cast<size_t>(batch); ++i) prompts.push_back(prompts[i]);

  // Generate: one packed batch, or prompt by prompt.
  retention::SamplingOptions sopt;
  sopt.temperature = temperature;
  sopt.top_k = top_k;
  sopt.seed = seed;
  std::vector<std::vector<int64_t>> generated(prompts.size());
  std::vector<std::vector<at::Tensor>> logits(prompts.size());  // [prompt][step] -> [V]
  retention::RetNet::GenerateStats total;
  auto run = [&](const std::vector<size_t>& which) {
    std::vector<std::vector<int64_t>> batch_prompts;
    for (size_t i : which) batch_prompts.push_back(prompts[i]);
    retention::Sampler sampler(sopt);
    retention::RetNet::GenerateStats st;
    auto out = model.generate(batch_prompts, max_new, sampler, &st,
                              [&](int64_t, const at::Tensor& l) {
                                if (!save_logits) return;
                                const auto lf = l.to(at::kCPU, at::kFloat);
                                for (size_t j = 0; j < which.size(); ++j) logits[which[j]].push_back(lf[j]);
                              });
    for (size_t j = 0; j < which.size(); ++j) generated[which[j]] = out[j];
    total.prefill_seconds += st.prefill_seconds;
    total.decode_seconds += st.decode_seconds;
    total.prefill_cpu_seconds += st.prefill_cpu_seconds;
    total.decode_cpu_seconds += st.decode_cpu_seconds;
    total.prefill_tokens += st.prefill_tokens;
    total.decode_tokens += st.decode_tokens;
  };
  if (one_by_one) {
    for (size_t i = 0; i < prompts.size(); ++i) run({i});
  } else {
    std::vector<size_t> all(prompts.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    run(all);
  }

  if (!quiet) {
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::printf("--- [%zu] %s|%s\n", i, decode(prompts[i], model.vocab()).c_str(),
                  decode(generated[i], model.vocab()).c_str());
    }
  }
  const double prefill_tps = total.prefill_tokens / std::max(total.prefill_seconds, 1e-12);
  const double decode_tps = total.decode_tokens / std::max(total.decode_seconds, 1e-12);
  std::printf("prefill: %lld tokens in %.4f s (%.0f tokens/s); decode: %lld tokens in %.4f s "
              "(%.1f tokens/s, %.3f ms per step, batch %zu%s); peak RSS %.1f MiB\n",
              (long long)total.prefill_tokens, total.prefill_seconds, prefill_tps,
              (long long)total.decode_tokens, total.decode_seconds, decode_tps,
              1e3 * total.decode_seconds / std::max<int64_t>(total.decode_tokens / (one_by_one ? 1 : (int64_t)prompts.size()), 1),
              one_by_one ? (size_t)1 : prompts.size(), one_by_one ? ", one prompt at a time" : "",
              peak_rss_mib());

  if (!json_path.empty()) {
    std::ofstream js(json_path);
    js << "{\"prefill_seconds\": " << total.prefill_seconds << ", \"decode_seconds\": " << total.decode_seconds
       << ", \"prefill_cpu_seconds\": " << total.prefill_cpu_seconds
       << ", \"decode_cpu_seconds\": " << total.decode_cpu_seconds
       << ", \"prefill_tokens\": " << total.prefill_tokens << ", \"decode_tokens\": " << total.decode_tokens
       << ", \"peak_rss_mib\": " << peak_rss_mib() << ", \"threads\": " << at::get_num_threads()
       << ", \"tokens\": [";
    for (size_t i = 0; i < generated.size(); ++i) {
      js << (i ? ", [" : "[");
      for (size_t j = 0; j < generated[i].size(); ++j) js << (j ? ", " : "") << generated[i][j];
      js << "]";
    }
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
    if (!js.good()) throw std::runtime_error("cannot write " + json_path);
  }
  return 0;
} catch (const c10::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.msg().c_str());
  return 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
