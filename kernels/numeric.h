// numeric.h - element types of the kernels and their conversions to/from fp32.
//
// 16-bit inputs are carried as raw bits (f16_t / bf16_t).  That is what the tensor-core
// operands want anyway (two elements packed per 32-bit register), it is byte-compatible with
// at::Half / at::BFloat16 / __half / __nv_bfloat16, and it sidesteps HIP 5.2's missing
// <hip/hip_bf16.h>.  All arithmetic happens in fp32.
//
// The host-side conversions are plain C++ so tests can build inputs and references without a
// GPU toolchain; the device side uses the native conversion instructions where there are any.
#pragma once

#include <cstdint>
#include <cstring>

#include "gpu_compat.h"

#if RETENTION_CUDA && defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace retention::kernels {

enum class DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

struct f16_t {
  std::uint16_t bits;
};
struct bf16_t {
  std::uint16_t bits;
};
static_assert(sizeof(f16_t) == 2 && sizeof(bf16_t) == 2, "raw 16-bit storage");

// launch(T{}) with T the element type of `dtype` (a launcher's dtype switch).
template <class F>
gpu::error_t dispatch_dtype(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::kF16:
      return launch(f16_t{});
    case DType::kBF16:
      return launch(bf16_t{});
    case DType::kF32:
      return launch(float{});
  }
  return gpu::kErrorInvalidValue;
}

// ------------------------------------------------------------------------------------------
// Host conversions (round-to-nearest-even, NaN/Inf preserving).
// ------------------------------------------------------------------------------------------
namespace host {

inline std::uint32_t f32_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(std::uint16_t b) { return f32_from_bits(std::uint32_t(b) << 16); }
inline std::uint16_t f32_to_bf16(float f) {
  std::uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::uint16_t(u >> 16);
}

inline float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return f32_from_bits(sign);
    // subnormal: value = man * 2^-24
    float v = float(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

inline std::uint16_t f32_to_f16(float f) {
  const std::uint32_t u = f32_bits(f);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // rounds to >= 65520: Inf
  if (a < 0x38800000u) {                                       // below 2^-14: subnormal half
    // Scale into the subnormal grid (units of 2^-24) and round half to even.
    const float v = f32_from_bits(a) * 16777216.0f;
    std::uint32_t m = std::uint32_t(v);
    const float rem = v - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return std::uint16_t(sign | m);
  }
  std::uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15, keep 23-bit mantissa
  r += 0xfffu + ((r >> 13) & 1u);     // round to nearest even at bit 13
  return std::uint16_t(sign | (r >> 13));
}

}  // namespace host

// ------------------------------------------------------------------------------------------
// Device conversions.  Elem<T> is the single customisation point the kernels use.
// ------------------------------------------------------------------------------------------
#if RETENTION_DEVICE_CODE

template <class T>
struct Elem;

template <>
struct Elem<float> {
  RT_DEVICE static float to_float(float x) { return x; }
  RT_DEVICE static float from_float(float x) { return x; }
  RT_DEVICE static float zero() { return 0.f; }
};

template <>
struct Elem<f16_t> {
  RT_DEVICE static float to_float(f16_t x) {
#if RETENTION_HIP
    return static_cast<float>(__builtin_bit_cast(_Float16, x.bits));
#else
    return __half2float(__ushort_as_half(x.bits));
#endif
  }
  RT_DEVICE static f16_t from_float(float x) {
#if RETENTION_HIP
    return f16_t{__builtin_bit_cast(std::uint16_t, static_cast<_Float16>(x))};
#else
    return f16_t{__half_as_ushort(__float2half_rn(x))};
#endif
  }
  RT_DEVICE static f16_t zero() { return f16_t{0}; }
};

template <>
struct Elem<bf16_t> {
  RT_DEVICE static float to_float(bf16_t x) { return gpu::bits_as_float(std::uint32_t(x.bits) << 16); }
  RT_DEVICE static bf16_t from_float(float x) {
#if RETENTION_HIP
    // No bf16 conversion instruction on gfx90a: round to nearest even in integer math.
    std::uint32_t u = gpu::float_as_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{std::uint16_t((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16_t{std::uint16_t(u >> 16)};
#else
    return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#endif
  }
  RT_DEVICE static bf16_t zero() { return bf16_t{0}; }
};

#endif  // device

}  // namespace retention::kernels
