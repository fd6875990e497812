// gpu_compat.h - the one place where CUDA and HIP differ.
//
// Every kernel in kernels/ is a single source compiled by nvcc (sm_80+) and by hipcc
// (--offload-arch=gfx90a).  Nothing outside this header may spell a vendor API, a warp width,
// or a lane mask.  The rules it encodes:
//
//  * The warp (wavefront) width is a compile-time constant of the *target*: 32 on NVIDIA,
//    64 on CDNA.  RDNA (wave32 HIP) has no MFMA and is not a target; the device pass refuses
//    it below, and the host checks the device's warp size at launch (check_warp_size()).
//    warpSize is deliberately not used: it stops being a constant expression in ROCm 7.
//  * Lane masks are lane_mask_t (64-bit on HIP).  HIP 5.2 has no *_sync shuffles.
//  * HIP 5.2 has no <hip/hip_bf16.h>; 16-bit floats are carried as raw bits (numeric.h) and
//    converted with integer math or the native _Float16 type, so no vendor half/bf16 class is
//    needed in device code.
//
// A third target, RETENTION_HOST_EMU, runs the same kernel sources on the CPU under the GPU's
// execution rules (host_emu/host_emu.h; test infrastructure, never part of the library).  It
// takes the CUDA code paths with RETENTION_EMU_WARP=32 and the HIP ones with 64, so both
// vendors' device code is executed.  RETENTION_DEVICE_CODE is true wherever device code is
// compiled: by nvcc, by hipcc, or by the host compiler for the emulator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#if defined(RETENTION_HOST_EMU)
#include "host_emu/host_emu.h"
#if RETENTION_EMU_WARP == 64
#define RETENTION_HIP 1
#else
#define RETENTION_CUDA 1
#endif
#elif defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define RETENTION_HIP 1
#include <hip/hip_runtime.h>
#else
#define RETENTION_CUDA 1
#include <cassert>  // __assert_fail, the device-side assert of RT_DEVICE_CHECK
#include <cuda_runtime.h>
#if defined(NDEBUG) && !defined(__CUDA_ARCH__)
// With NDEBUG glibc's <assert.h> does not declare __assert_fail, but nvcc's host pass still
// parses the device code that calls it (the device pass gets CUDA's own declaration).
extern "C" void __assert_fail(const char*, const char*, unsigned int, const char*) noexcept
    __attribute__((__noreturn__));
#endif
#endif

#if defined(__CUDACC__) || defined(__HIPCC__) || defined(RETENTION_HOST_EMU)
#define RETENTION_DEVICE_CODE 1
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RT_HOST_DEVICE __host__ __device__
#define RT_DEVICE __device__ __forceinline__
#else
#define RT_HOST_DEVICE
#define RT_DEVICE inline
#endif

// Device-pass guards: fail loudly instead of silently producing wrong lane math.
#if defined(__HIP_DEVICE_COMPILE__) && defined(__AMDGCN_WAVEFRONT_SIZE) && (__AMDGCN_WAVEFRONT_SIZE != 64)
#error "retention kernels target CDNA (wave64); wave32 AMD targets are not supported"
#endif
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
#error "retention kernels need sm_80 or newer (mma.sync m16n8k16 with bf16)"
#endif

namespace retention::gpu {

// ------------------------------------------------------------------------------------------
// Target traits
// ------------------------------------------------------------------------------------------
#if defined(RETENTION_HOST_EMU)
inline constexpr int kWarpSize = RETENTION_EMU_WARP;
using lane_mask_t = std::conditional_t<kWarpSize == 64, std::uint64_t, std::uint32_t>;
struct emu_stream;
using stream_t = emu_stream*;
using error_t = emu::Error;
inline constexpr error_t kSuccess = emu::Error::kSuccess;
inline constexpr error_t kErrorInvalidValue = emu::Error::kInvalidValue;
#elif RETENTION_HIP
inline constexpr int kWarpSize = 64;
using lane_mask_t = std::uint64_t;
using stream_t = hipStream_t;
using error_t = hipError_t;
inline constexpr error_t kSuccess = hipSuccess;
inline constexpr error_t kErrorInvalidValue = hipErrorInvalidValue;
#else
inline constexpr int kWarpSize = 32;
using lane_mask_t = std::uint32_t;
using stream_t = cudaStream_t;
using error_t = cudaError_t;
inline constexpr error_t kSuccess = cudaSuccess;
inline constexpr error_t kErrorInvalidValue = cudaErrorInvalidValue;
#endif
inline constexpr bool kIsHip = kWarpSize == 64;  // the HIP code paths (also the emulator's amd model)
inline constexpr lane_mask_t kFullLaneMask = ~lane_mask_t(0);
static_assert(sizeof(lane_mask_t) * 8 == kWarpSize, "one mask bit per lane");

// ------------------------------------------------------------------------------------------
// Runtime API (host).  Thin renames so tests and launchers are vendor-neutral.
// ------------------------------------------------------------------------------------------
#if defined(RETENTION_HOST_EMU)
// Exact-size host allocations; launches run to completion, so synchronisation is a no-op.
inline error_t device_count(int* n) { *n = 1; return kSuccess; }
inline error_t malloc_device(void** p, std::size_t bytes) { return emu::malloc_device(p, bytes); }
inline error_t free_device(void* p) { return emu::free_device(p); }
// (Zero-byte copies of empty buffers are legal on the GPU runtimes; memcpy of a null pointer
// is not, hence the size checks.)
inline error_t copy_to_device(void* dst, const void* src, std::size_t bytes) {
  if (emu::sticky_error() != kSuccess) return emu::sticky_error();
  emu::count_upload();
  if (bytes != 0) std::memcpy(dst, src, bytes);
  return kSuccess;
}
inline error_t copy_to_host(void* dst, const void* src, std::size_t bytes) {
  if (emu::sticky_error() != kSuccess) return emu::sticky_error();
  emu::record_download(src, bytes);
  if (bytes != 0) std::memcpy(dst, src, bytes);
  return kSuccess;
}
inline error_t memset_device(void* p, int byte, std::size_t bytes) {
  if (emu::sticky_error() != kSuccess) return emu::sticky_error();
  emu::count_memset();
  if (bytes != 0) std::memset(p, byte, bytes);
  return kSuccess;
}
inline error_t synchronize() { return emu::sticky_error(); }
inline error_t last_error() { return emu::take_last_error(); }
inline const char* error_string(error_t e) { return emu::error_string(e); }
inline error_t check_warp_size() { return kSuccess; }
// A fixed, deterministic count (an H100's), so launchers that plan from it (the sequence split
// of msr_fwd.cu) choose the same launches on every host.
inline error_t multiprocessor_count(int* n) { *n = 132; return kSuccess; }
template <class Kernel>
inline error_t set_max_dynamic_smem(Kernel* kernel, int bytes) {
  return emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}
inline error_t memset_async(void* p, int byte, std::size_t bytes, stream_t) { return memset_device(p, byte, bytes); }
#else
#if RETENTION_HIP
#define RT_API(name) hip##name
#else
#define RT_API(name) cuda##name
#endif

inline error_t device_count(int* n) { return RT_API(GetDeviceCount)(n); }
inline error_t malloc_device(void** p, std::size_t bytes) { return RT_API(Malloc)(p, bytes); }
inline error_t free_device(void* p) { return RT_API(Free)(p); }
inline error_t copy_to_device(void* dst, const void* src, std::size_t bytes) {
  return RT_API(Memcpy)(dst, src, bytes, RT_API(MemcpyHostToDevice));
}
inline error_t copy_to_host(void* dst, const void* src, std::size_t bytes) {
  return RT_API(Memcpy)(dst, src, bytes, RT_API(MemcpyDeviceToHost));
}
inline error_t memset_device(void* p, int byte, std::size_t bytes) { return RT_API(Memset)(p, byte, bytes); }
inline error_t synchronize() { return RT_API(DeviceSynchronize)(); }
inline error_t last_error() { return RT_API(GetLastError)(); }
inline const char* error_string(error_t e) { return RT_API(GetErrorString)(e); }

// The device this launch runs on must have the wavefront width the code was compiled for.
inline error_t check_warp_size() {
  int dev = 0, ws = 0;
  error_t e = RT_API(GetDevice)(&dev);
  if (e != kSuccess) return e;
#if RETENTION_HIP
  e = hipDeviceGetAttribute(&ws, hipDeviceAttributeWarpSize, dev);
  if (e == kSuccess && ws != kWarpSize) return hipErrorInvalidDeviceFunction;
#else
  e = cudaDeviceGetAttribute(&ws, cudaDevAttrWarpSize, dev);
  if (e == kSuccess && ws != kWarpSize) return cudaErrorInvalidDeviceFunction;
#endif
  return e;
}

// Number of SMs (CUs on AMD) of the current device.
inline error_t multiprocessor_count(int* n) {
  int dev = 0;
  error_t e = RT_API(GetDevice)(&dev);
  if (e != kSuccess) return e;
#if RETENTION_HIP
  return hipDeviceGetAttribute(n, hipDeviceAttributeMultiprocessorCount, dev);
#else
  return cudaDeviceGetAttribute(n, cudaDevAttrMultiProcessorCount, dev);
#endif
}

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) shim.  On CDNA the LDS limit is a fixed
// 64 KiB and the call is a no-op, but it exists and takes a void*.
template <class Kernel>
inline error_t set_max_dynamic_smem(Kernel* kernel, int bytes) {
#if RETENTION_HIP
  return hipFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                             hipFuncAttributeMaxDynamicSharedMemorySize, bytes);
#else
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
#endif
}

inline error_t memset_async(void* p, int byte, std::size_t bytes, stream_t s) { return RT_API(MemsetAsync)(p, byte, bytes, s); }
#undef RT_API
#endif  // runtime API

// ------------------------------------------------------------------------------------------
// Kernel launch: every launch site goes through this instead of <<<...>>>, so the host
// execution backend can run the same launchers.  Returns the launch error (last_error()).
// ------------------------------------------------------------------------------------------
#if defined(RETENTION_HOST_EMU)
template <class... Params, class... Args>
inline error_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, stream_t,
                      Args&&... args) {
  // The arguments are copied once, like a kernel's parameter buffer; each emulated thread
  // gets its own copy of the by-value parameters from it.
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
    static void run(void* self) {
      Call* c = static_cast<Call*>(self);
      std::apply(c->kernel, c->params);
    }
  } call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  emu::take_last_error();
  return emu::launch_grid(grid, block, smem, reinterpret_cast<const void*>(kernel), &Call::run, &call);
}
#elif defined(__CUDACC__) || defined(__HIPCC__)
template <class... Params, class... Args>
inline error_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, stream_t stream,
                      Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return last_error();
}
#endif

// Shared memory of a kernel whose size is a compile-time constant.  HIP: a static array, so
// exceeding the 64 KiB of LDS is a compile error and the size appears in the code-object
// metadata (group_segment_fixed_size).  CUDA: dynamic shared memory, because static shared
// memory is capped at 48 KiB; launch with dynamic_smem_bytes(bytes) and raise the limit with
// set_max_dynamic_smem().
//
// RETENTION_SHARED(type, name, dims) declares a static __shared__ array (dims: "[N]" or
// "[N][M]"); every static shared array goes through it so that the host backend can give
// each block its own poisoned copy.
#if defined(RETENTION_HOST_EMU)
#define RETENTION_SMEM(name, bytes)                                                                    \
  unsigned char* const name = static_cast<unsigned char*>(::retention::emu::block_shared(             \
      static_cast<const void*>(__FILE__ ":" RETENTION_EMU_STR(__LINE__)), (bytes), !::retention::gpu::kIsHip, \
      __FILE__, __LINE__))
#define RETENTION_EMU_STR2(x) #x
#define RETENTION_EMU_STR(x) RETENTION_EMU_STR2(x)
#define RETENTION_SHARED(type, name, dims) \
  type(&name) dims = ::retention::emu::block_shared_object<type dims>([] {}, __FILE__, __LINE__)
#elif RETENTION_HIP
#define RETENTION_SMEM(name, bytes) __shared__ __attribute__((aligned(16))) unsigned char name[bytes]
#define RETENTION_SHARED(type, name, dims) __shared__ type name dims
#else
#define RETENTION_SMEM(name, bytes) extern __shared__ __align__(16) unsigned char name[]
#define RETENTION_SHARED(type, name, dims) __shared__ type name dims
#endif
constexpr int dynamic_smem_bytes(int bytes) { return kIsHip ? 0 : bytes; }

// ------------------------------------------------------------------------------------------
// Lanes, shuffles, reductions (device)
// ------------------------------------------------------------------------------------------
#if RETENTION_DEVICE_CODE

RT_DEVICE int lane_id() { return static_cast<int>(threadIdx.x) & (kWarpSize - 1); }
RT_DEVICE int warp_id() { return static_cast<int>(threadIdx.x) / kWarpSize; }

template <class T>
RT_DEVICE T shfl_xor(T v, int lane_mask, int width = kWarpSize) {
#if RETENTION_HIP
  return __shfl_xor(v, lane_mask, width);
#else
  return __shfl_xor_sync(kFullLaneMask, v, lane_mask, width);
#endif
}

// Butterfly reduction over groups of kWidth consecutive lanes; every lane gets the result.
template <int kWidth = kWarpSize, class T>
RT_DEVICE T warp_reduce_sum(T v) {
  static_assert(kWidth > 0 && kWidth <= kWarpSize && (kWidth & (kWidth - 1)) == 0, "width");
#pragma unroll
  for (int m = kWidth / 2; m > 0; m >>= 1) v += shfl_xor(v, m, kWidth);
  return v;
}

template <int kWidth = kWarpSize, class T>
RT_DEVICE T warp_reduce_max(T v) {
  static_assert(kWidth > 0 && kWidth <= kWarpSize && (kWidth & (kWidth - 1)) == 0, "width");
#pragma unroll
  for (int m = kWidth / 2; m > 0; m >>= 1) {
    T o = shfl_xor(v, m, kWidth);
    v = v > o ? v : o;
  }
  return v;
}

// Hand-off of data between CTAs of one launch (a ticket from a counter): fence_device orders
// this thread's global-memory accesses before it against those after it for every thread of
// the device (CUDA and HIP __threadfence: device scope, release and acquire), so a CTA fences
// after writing what it hands over and before taking a ticket, and the CTA that draws the last
// ticket fences before reading the others' data.  atomic_add: device-scope, returns the old value.
RT_DEVICE void fence_device() { __threadfence(); }

// A check of an input value on the device, where the host would need a synchronising copy to
// read it: a failed check stops the kernel as a device-side assert does, and every later call
// reports it.  CUDA's __assert_fail prints `what`; on AMD a bare trap, because HIP's
// __assert_fail is an out-of-line call with a printf buffer (scratch in every caller), so the
// message is lost there.  Unlike assert(), NDEBUG does not remove it.
#if defined(RETENTION_HOST_EMU)
#define RT_DEVICE_CHECK(cond, what) \
  ((cond) ? (void)0 : ::retention::emu::device_assert(what, __FILE__, __LINE__))
#elif RETENTION_HIP
#define RT_DEVICE_CHECK(cond, what) ((cond) ? (void)0 : __builtin_trap())
#else
#define RT_DEVICE_CHECK(cond, what) \
  ((cond) ? (void)0 : __assert_fail(what, __FILE__, static_cast<unsigned>(__LINE__), __func__))
#endif
RT_DEVICE unsigned atomic_add(unsigned* p, unsigned v) { return atomicAdd(p, v); }

RT_DEVICE std::uint32_t float_as_bits(float f) { return __float_as_uint(f); }
RT_DEVICE float bits_as_float(std::uint32_t u) { return __uint_as_float(u); }

#endif  // device

}  // namespace retention::gpu
