// SentencePieceTokenizer (see tokenizer.h): SentencePiece loaded in a module of its own.
//
// Why not link libsentencepiece into the app: Debian's libsentencepiece carries its own copy of
// protobuf-lite and exports its symbols, and LibTorch brings the system libprotobuf (through
// libonnx_proto). Linked together, libprotobuf's static initialisers bind to
// libsentencepiece's copies of the same functions and the process crashes before main. So the
// app loads libretention_sentencepiece.so (the only thing linked against libsentencepiece) with
// RTLD_LOCAL, which keeps its symbols out of the global scope that libprotobuf resolves in, and
// RTLD_DEEPBIND, which makes libsentencepiece bind to its own protobuf rather than the system's.
#include "tokenizer.h"

#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <stdexcept>

#include "sentencepiece_shim.h"

namespace {

// The module's candidate paths: beside the executable (build tree), then <bin>/../<libdir>
// (installed).
std::vector<std::string> module_paths() {
  std::vector<std::string> out;
  char exe[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) {
    const std::string path(exe, static_cast<size_t>(n));
    const std::string dir = path.substr(0, path.rfind('/'));
    out.push_back(dir + "/" RETENTION_SPM_MODULE);
    out.push_back(dir + "/../" RETENTION_SPM_LIBDIR "/" RETENTION_SPM_MODULE);
  }
  return out;
}

using OpenFn = TokenizerBackend* (*)(const char*, std::string*);

OpenFn open_function() {
  static OpenFn fn = [] {
    std::string tried;
    for (const auto& path : module_paths()) {
      if (void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND)) {
        if (auto f = reinterpret_cast<OpenFn>(dlsym(handle, "retention_sentencepiece_open"))) return f;
      }
      tried += "\n  " + path + ": " + dlerror();
    }
    throw std::runtime_error("cannot load the SentencePiece module " RETENTION_SPM_MODULE ":" + tried);
  }();
  return fn;
}

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& path) {
  std::string error;
  backend_.reset(open_function()(path.c_str(), &error));
  if (!backend_) throw std::runtime_error(path + ": cannot load the SentencePiece model: " + error);
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::vector<int64_t> SentencePieceTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids;
  std::string error;
  if (!backend_->encode(text, &ids, &error)) throw std::runtime_error("SentencePiece encode failed: " + error);
  return ids;
}

std::string SentencePieceTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string out, error;
  std::vector<int> run;  // consecutive ids the tokenizer knows, decoded together (spaces join)
  auto flush = [&]() {
    if (run.empty()) return;
    std::string text;
    if (!backend_->decode(run, &text, &error)) throw std::runtime_error("SentencePiece decode failed: " + error);
    out += text;
    run.clear();
  };
  for (int64_t id : ids) {
    if (id >= 0 && id < size()) {
      run.push_back(static_cast<int>(id));
    } else {
      flush();
      out += "<" + std::to_string(id) + ">";
    }
  }
  flush();
  return out;
}

int64_t SentencePieceTokenizer::size() const { return backend_->size(); }

int64_t SentencePieceTokenizer::bos_id() const { return backend_->bos_id(); }
