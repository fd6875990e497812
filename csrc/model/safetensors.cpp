// Safetensors reader (mmap + nlohmann::json header) and writer. See retention/safetensors.h.
#include "retention/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian; this reader does not byte-swap");

namespace retention {
namespace {

using json = nlohmann::json;

// The reference implementation's limit; also keeps a corrupt length from allocating gigabytes.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

const std::vector<std::pair<std::string, at::ScalarType>>& dtype_names() {
  static const std::vector<std::pair<std::string, at::ScalarType>> names = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},   {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort},  {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}};
  return names;
}

bool parse_dtype(const std::string& s, at::ScalarType* out) {
  for (const auto& [name, type] : dtype_names()) {
    if (name == s) {
      *out = type;
      return true;
    }
  }
  return false;
}

std::string dtype_name(at::ScalarType t) {
  for (const auto& [name, type] : dtype_names()) {
    if (type == t) return name;
  }
  TORCH_CHECK(false, "save_safetensors: dtype ", t, " has no safetensors equivalent");
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// A JSON value that is a non-negative integer (json distinguishes unsigned/signed/float).
bool as_size(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

}  // namespace

struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr != nullptr) munmap(addr, size);
  }
};

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const std::string where = "safetensors file '" + path + "'";
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, where, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    TORCH_CHECK(false, where, ": not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    TORCH_CHECK(false, where, ": ", size,
                " bytes is too short for a safetensors file (8-byte header length missing)");
  }
  mapping_ = std::make_shared<Mapping>();
  // Private, writable mapping: tensors that share it may be written in place without touching
  // the file (copy-on-write).
  void* addr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  TORCH_CHECK(addr != MAP_FAILED, where, ": mmap failed: ", std::strerror(errno));
  mapping_->addr = addr;
  mapping_->size = size;
  const auto* bytes = static_cast<const unsigned char*>(addr);

  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian uint64
  TORCH_CHECK(n <= size - 8 && n <= kMaxHeaderBytes, where, ": header length ", n,
              " runs past the end of the file (", size,
              " bytes): truncated or not a safetensors file");
  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + n);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, where, ": header is not valid JSON (", e.what(), ")");
  }
  TORCH_CHECK(header.is_object(), where, ": header must be a JSON object, got ",
              header.type_name());
  data_ = bytes + 8 + n;
  const uint64_t data_size = size - 8 - n;

  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      TORCH_CHECK(value.is_object(), where, ": __metadata__ must be an object");
      for (const auto& [key, v] : value.items()) {
        TORCH_CHECK(v.is_string(), where, ": __metadata__ value '", key, "' must be a string");
        metadata_[key] = v.get<std::string>();
      }
      continue;
    }
    const std::string what = where + ": tensor '" + name + "'";
    TORCH_CHECK(value.is_object(), what, ": entry must be an object");
    Entry e;
    const auto dt = value.find("dtype");
    TORCH_CHECK(dt != value.end() && dt->is_string() && parse_dtype(dt->get<std::string>(), &e.dtype),
                what, ": unsupported or missing dtype ", dt == value.end() ? "(none)" : dt->dump(),
                " (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
    const auto sh = value.find("shape");
    TORCH_CHECK(sh != value.end() && sh->is_array(), what,
                ": shape must be a list of non-negative integers");
    uint64_t numel = 1;
    for (const auto& d : *sh) {
      uint64_t dim = 0;
      TORCH_CHECK(as_size(d, &dim) && dim <= static_cast<uint64_t>(INT64_MAX), what,
                  ": shape must be a list of non-negative integers, got ", sh->dump());
      TORCH_CHECK(!__builtin_mul_overflow(numel, dim, &numel), what, ": shape ", sh->dump(),
                  " overflows");
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto off = value.find("data_offsets");
    uint64_t begin = 0, end = 0;
    TORCH_CHECK(off != value.end() && off->is_array() && off->size() == 2 &&
                    as_size((*off)[0], &begin) && as_size((*off)[1], &end),
                what, ": data_offsets must be [begin, end] (non-negative integers)");
    TORCH_CHECK(begin <= end && end <= data_size, what, ": data_offsets [", begin, ", ", end,
                "] lie outside the data section (", data_size,
                " bytes): truncated file or corrupt header");
    uint64_t nbytes = 0;
    TORCH_CHECK(!__builtin_mul_overflow(numel, at::elementSize(e.dtype), &nbytes) &&
                    nbytes == end - begin,
                what, ": shape ", sh->dump(), " of ", dt->get<std::string>(), " needs ",
                nbytes, " bytes, data_offsets give ", end - begin);
    e.begin = static_cast<size_t>(begin);
    e.end = static_cast<size_t>(end);
    entries_.emplace(name, std::move(e));
  }
  // Tensors back to back, covering the data section exactly (as the reference implementation
  // requires): no byte belongs to two tensors, none is unaccounted for.
  std::vector<std::pair<size_t, const std::string*>> order;
  for (const auto& [name, e] : entries_) order.emplace_back(e.begin, &name);
  std::sort(order.begin(), order.end(), [&](const auto& a, const auto& b) {
    return a.first != b.first ? a.first < b.first
                              : entries_.at(*a.second).end < entries_.at(*b.second).end;
  });
  size_t pos = 0;
  for (const auto& [begin, name] : order) {
    TORCH_CHECK(begin == pos, where, ": tensor '", *name, "' starts at byte ", begin,
                " of the data section, expected ", pos,
                " (tensors must be stored back to back without gaps or overlaps)");
    pos = entries_.at(*name).end;
  }
  TORCH_CHECK(pos == data_size, where, ": ", data_size - pos,
              " bytes after the last tensor (corrupt file)");
}

std::string SafetensorsFile::metadata(const std::string& key, const std::string& fallback) const {
  const auto it = metadata_.find(key);
  return it == metadata_.end() ? fallback : it->second;
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const auto it = entries_.find(name);
  TORCH_CHECK(it != entries_.end(), "safetensors file '", path_, "': tensor '", name,
              "' is missing");
  const Entry& e = it->second;
  const auto options = at::TensorOptions().dtype(e.dtype).device(at::kCPU);
  if (e.end == e.begin) return at::empty(e.shape, options);
  auto* ptr = const_cast<unsigned char*>(data_ + e.begin);
  const size_t item = at::elementSize(e.dtype);
  if (reinterpret_cast<uintptr_t>(ptr) % item != 0) {  // unaligned for the dtype: copy
    auto out = at::empty(e.shape, options);
    std::memcpy(out.data_ptr(), ptr, e.end - e.begin);
    return out;
  }
  auto keep = mapping_;  // the tensor keeps the mapping alive
  return at::from_blob(ptr, e.shape, [keep](void*) mutable { keep.reset(); }, options);
}

at::Tensor SafetensorsFile::tensor(const std::string& name, at::IntArrayRef expected_shape,
                                   bool floating) const {
  auto t = tensor(name);
  TORCH_CHECK(t.sizes() == expected_shape, "safetensors file '", path_, "': tensor '", name,
              "' has shape ", shape_str(t.sizes()), ", the model config needs ",
              shape_str(expected_shape));
  TORCH_CHECK(!floating || at::isFloatingType(t.scalar_type()), "safetensors file '", path_,
              "': tensor '", name, "' has dtype ", t.scalar_type(),
              ", expected a floating-point dtype (F32, BF16, F16 or F64)");
  return t;
}

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(name != "__metadata__", "save_safetensors: '__metadata__' is reserved");
    TORCH_CHECK(names.insert(name).second, "save_safetensors: tensor '", name,
                "' given twice");
    TORCH_CHECK(t.defined(), "save_safetensors: tensor '", name, "' is undefined");
    auto c = t.detach().to(at::kCPU).contiguous();
    const uint64_t nbytes = c.numel() * c.element_size();
    header[name] = {{"dtype", dtype_name(c.scalar_type())},
                    {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    data.push_back(std::move(c));
  }
  std::string head = header.dump();
  head.append((8 - head.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    TORCH_CHECK(out, "save_safetensors: cannot write '", tmp, "'");
    unsigned char len[8];
    uint64_t n = head.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(head.data(), static_cast<std::streamsize>(head.size()));
    for (const auto& c : data) {
      out.write(static_cast<const char*>(c.data_ptr()),
                static_cast<std::streamsize>(c.numel() * c.element_size()));
    }
    TORCH_CHECK(out.good(), "save_safetensors: write to '", tmp, "' failed");
  }
  TORCH_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "save_safetensors: cannot rename '",
              tmp, "' to '", path, "': ", std::strerror(errno));
}

}  // namespace retention
