// Host/device helpers shared by the kernel GoogleTest sources (test_kernels.cu, test_msr.cu):
// device detection, element-type encoding, device buffers and the relative-RMS comparison.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gpu_compat.h"
#include "numeric.h"

namespace kernel_test {

namespace rk = retention::kernels;
namespace gpu = retention::gpu;

inline bool has_device() {
  int n = 0;
  return gpu::device_count(&n) == gpu::kSuccess && n > 0 && gpu::check_warp_size() == gpu::kSuccess;
}

// What one API call asks of the device: exactly one kernel launch and no copy or memset, so a
// decode step costs one launch and a CUDA graph can capture it. The emulator counts these; on a
// device the check is empty (bench/gpu_check.sh counts kernels with torch.profiler there).
struct OneLaunch {
#if defined(RETENTION_HOST_EMU)
  retention::emu::OpCounts before = retention::emu::op_counts();
  void check(const char* what) const {
    const auto after = retention::emu::op_counts();
    EXPECT_EQ(after.launches - before.launches, 1u) << what << ": kernel launches per call";
    EXPECT_EQ(after.downloads - before.downloads, 0u) << what << ": device-to-host copies per call";
    EXPECT_EQ(after.uploads - before.uploads, 0u) << what << ": host-to-device copies per call";
    EXPECT_EQ(after.memsets - before.memsets, 0u) << what << ": memsets per call";
  }
#else
  void check(const char*) const {}
#endif
};

#define SKIP_WITHOUT_DEVICE()                                    \
  do {                                                           \
    if (!has_device()) GTEST_SKIP() << "no GPU device available"; \
  } while (0)

#define GPU_OK(expr)                                           \
  do {                                                         \
    const gpu::error_t err_ = (expr);                          \
    ASSERT_EQ(err_, gpu::kSuccess) << gpu::error_string(err_); \
  } while (0)

// ------------------------------------------------------------------------------------------
// Host data in a given element type
// ------------------------------------------------------------------------------------------
inline std::size_t elem_size(rk::DType t) { return t == rk::DType::kF32 ? 4 : 2; }

// Round x to the element type (in place) and return its storage bytes.
inline std::vector<unsigned char> encode(rk::DType t, std::vector<double>& x) {
  std::vector<unsigned char> bytes(x.size() * elem_size(t));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float f = static_cast<float>(x[i]);
    if (t == rk::DType::kF32) {
      std::memcpy(&bytes[4 * i], &f, 4);
      x[i] = f;
    } else {
      const std::uint16_t b = t == rk::DType::kF16 ? rk::host::f32_to_f16(f) : rk::host::f32_to_bf16(f);
      std::memcpy(&bytes[2 * i], &b, 2);
      x[i] = t == rk::DType::kF16 ? rk::host::f16_to_f32(b) : rk::host::bf16_to_f32(b);
    }
  }
  return bytes;
}

inline std::vector<double> decode(rk::DType t, const std::vector<unsigned char>& bytes) {
  std::vector<double> x(bytes.size() / elem_size(t));
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (t == rk::DType::kF32) {
      float f;
      std::memcpy(&f, &bytes[4 * i], 4);
      x[i] = f;
    } else {
      std::uint16_t b;
      std::memcpy(&b, &bytes[2 * i], 2);
      x[i] = t == rk::DType::kF16 ? rk::host::f16_to_f32(b) : rk::host::bf16_to_f32(b);
    }
  }
  return x;
}

struct DeviceBuffer {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  explicit DeviceBuffer(std::size_t n) : bytes(n) {
    if (n > 0 && gpu::malloc_device(&ptr, n) != gpu::kSuccess) ptr = nullptr;
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr), bytes(o.bytes) { o.ptr = nullptr; }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(DeviceBuffer&&) = delete;
  ~DeviceBuffer() {
    if (ptr) gpu::free_device(ptr);
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
  void upload(const void* src) { gpu::copy_to_device(ptr, src, bytes); }
  void poison() { gpu::memset_device(ptr, 0xff, bytes); }  // all-ones = NaN in f16, bf16 and f32
  std::vector<unsigned char> download() const {
    std::vector<unsigned char> h(bytes);
    gpu::copy_to_host(h.data(), ptr, bytes);
    return h;
  }
  std::vector<double> download_f32() const {
    std::vector<float> f(bytes / 4);
    gpu::copy_to_host(f.data(), ptr, bytes);
    return std::vector<double>(f.begin(), f.end());
  }
};

inline DeviceBuffer upload_f32(const std::vector<double>& x) {
  std::vector<float> f(x.begin(), x.end());
  DeviceBuffer d(f.size() * 4);
  d.upload(f.data());
  return d;
}

inline double rel_rms(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

inline void expect_close(const std::vector<double>& got, const std::vector<double>& ref, double tol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  std::size_t bad = 0;
  for (double x : got) bad += !std::isfinite(x);
  EXPECT_EQ(bad, 0u) << what << ": non-finite elements (unwritten or overflow)";
  EXPECT_LT(rel_rms(got, ref), tol) << what;
}

}  // namespace kernel_test
