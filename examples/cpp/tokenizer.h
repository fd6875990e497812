// Text <-> token ids for retention-generate: a SentencePiece model (the tokenizer.model that FLA
// checkpoints ship beside config.json), through Debian's libsentencepiece, which lives in a
// module of its own (libretention_sentencepiece.so; see tokenizer.cpp). Kept out of the library:
// only the app reads text.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

class TokenizerBackend;

class SentencePieceTokenizer {
 public:
  // Loads a SentencePiece model file; throws std::runtime_error naming the file.
  explicit SentencePieceTokenizer(const std::string& path);
  ~SentencePieceTokenizer();

  std::vector<int64_t> encode(const std::string& text) const;
  // Ids outside the tokenizer's vocabulary (a model's vocab_size may be padded beyond it) come
  // out as "<id>" instead of failing the whole decode.
  std::string decode(const std::vector<int64_t>& ids) const;
  int64_t size() const;
  int64_t bos_id() const;  // -1 when the model has none

 private:
  std::unique_ptr<TokenizerBackend> backend_;
};
