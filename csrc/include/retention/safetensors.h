// Safetensors files (https://huggingface.co/docs/safetensors): the checkpoint format of
// retention::RetNet and of Python's retention.nn.RetNet.save_pretrained.
//
//   8 bytes  little-endian uint64 N;  N bytes  JSON header {"__metadata__": {str: str},
//   name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...};  then the data
//   section, tensors stored back to back (row-major, little-endian) at [begin, end).
//
// SafetensorsFile maps the file (mmap, copy-on-write) and validates the whole header before
// anything is read: a truncated file, a header that is not JSON, an unknown dtype, a shape that
// does not match the byte count, offsets past the end of the file, gaps or overlaps all raise a
// c10::Error naming the file and the tensor. Tensor data is never read outside the mapping.
// (Truncating the file on disk *while* it is mapped is not detectable: don't.)
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "retention/retention.h"

namespace retention {

class RETENTION_API SafetensorsFile {
 public:
  struct Entry {
    at::ScalarType dtype;
    std::vector<int64_t> shape;
    size_t begin = 0, end = 0;  // byte range in the data section
  };

  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Metadata value, or `fallback` when the key is absent.
  std::string metadata(const std::string& key, const std::string& fallback) const;
  const std::map<std::string, Entry>& entries() const { return entries_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }

  // The tensor `name` (error naming it when absent) on the CPU. It shares the mapped pages
  // (copy-on-write, the mapping lives as long as any such tensor) when the bytes are aligned
  // for the dtype, and is a copy otherwise.
  at::Tensor tensor(const std::string& name) const;
  // Same, and checks the shape (error naming the tensor, both shapes) and that the dtype is a
  // floating-point one when `floating` is set.
  at::Tensor tensor(const std::string& name, at::IntArrayRef expected_shape,
                    bool floating = true) const;

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  const unsigned char* data_ = nullptr;  // start of the data section inside the mapping
  std::map<std::string, std::string> metadata_;
  std::map<std::string, Entry> entries_;
};

// Writes `tensors` (any device and layout; copied to contiguous CPU bytes) with `metadata`.
// Names must be unique and not "__metadata__". Written to `path`.tmp, then renamed.
RETENTION_API void save_safetensors(
    const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata = {});

}  // namespace retention
