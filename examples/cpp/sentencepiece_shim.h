// The SentencePiece tokenizer behind one C entry point, built as its own shared module
// (libretention_sentencepiece.so) that retention-generate loads at run time; why it is kept
// apart is explained in tokenizer.cpp. Errors come back as strings, not exceptions, so nothing
// unwinds across the module boundary.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

class TokenizerBackend {
 public:
  virtual ~TokenizerBackend() = default;
  // Return false and set `error` on failure.
  virtual bool encode(const std::string& text, std::vector<int64_t>* ids, std::string* error) const = 0;
  virtual bool decode(const std::vector<int>& ids, std::string* text, std::string* error) const = 0;
  virtual int64_t size() const = 0;
  virtual int64_t bos_id() const = 0;  // -1: none
};

// nullptr and `error` set when the model cannot be loaded.
extern "C" TokenizerBackend* retention_sentencepiece_open(const char* path, std::string* error);
