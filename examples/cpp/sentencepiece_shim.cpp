// libretention_sentencepiece.so: TokenizerBackend (sentencepiece_shim.h) on Debian's
// libsentencepiece. Linked only into this module, never into the app (see tokenizer.cpp).
#include <sentencepiece_processor.h>

#include "sentencepiece_shim.h"

namespace {

class SentencePieceBackend : public TokenizerBackend {
 public:
  bool load(const std::string& path, std::string* error) {
    const auto status = sp_.Load(path);
    if (!status.ok()) *error = status.ToString();
    return status.ok();
  }
  bool encode(const std::string& text, std::vector<int64_t>* ids, std::string* error) const override {
    std::vector<int> out;
    const auto status = sp_.Encode(text, &out);
    if (!status.ok()) {
      *error = status.ToString();
      return false;
    }
    ids->assign(out.begin(), out.end());
    return true;
  }
  bool decode(const std::vector<int>& ids, std::string* text, std::string* error) const override {
    const auto status = sp_.Decode(ids, text);
    if (!status.ok()) *error = status.ToString();
    return status.ok();
  }
  int64_t size() const override { return sp_.GetPieceSize(); }
  int64_t bos_id() const override { return sp_.bos_id(); }

 private:
  sentencepiece::SentencePieceProcessor sp_;
};

}  // namespace

extern "C" __attribute__((visibility("default"))) TokenizerBackend* retention_sentencepiece_open(
    const char* path, std::string* error) {
  auto* backend = new SentencePieceBackend();
  if (!backend->load(path, error)) {
    delete backend;
    return nullptr;
  }
  return backend;
}
