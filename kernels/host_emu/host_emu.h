// host_emu.h - the host execution backend: runs the kernels of kernels/ on the CPU, thread by
// thread, under the GPU's execution rules.  Test infrastructure only (never linked into the
// library); selected by compiling the unchanged kernel sources with g++ and
//   -DRETENTION_HOST_EMU -DRETENTION_EMU_WARP=32   NVIDIA model (mma.sync / SIMT fp32 paths)
//   -DRETENTION_HOST_EMU -DRETENTION_EMU_WARP=64   AMD CDNA model (v_mfma paths)
// plus host_emu/runtime.cpp.  gpu_compat.h includes this header; nothing else should.
//
// What it provides is the CUDA / HIP vocabulary the kernels and gpu_compat.h use:
// threadIdx & co. (per emulated thread), __syncthreads (a real block barrier), the warp
// intrinsics (__shfl*_sync / __shfl*, __ballot*: exact semantics at the model's width),
// atomicAdd (fp32 and uint32), __threadfence, device-side asserts (device_assert, sticky like
// the GPU's), __shared__ storage per block, the 16-bit conversion intrinsics, and the
// matrix-core instructions (matrix_isa.h, as warp collectives).  Execution model, checks and
// options: runtime.cpp.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#if !defined(RETENTION_EMU_WARP) || (RETENTION_EMU_WARP != 32 && RETENTION_EMU_WARP != 64)
#error "RETENTION_HOST_EMU needs RETENTION_EMU_WARP=32 (nvidia model) or 64 (amd model)"
#endif

// ------------------------------------------------------------------------------------------
// CUDA built-in types
// ------------------------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace retention::emu {

enum class Error : int {
  kSuccess = 0,
  kInvalidValue = 1,
  kLaunchFailure = 2,  // a check of the emulator failed (message: last_message())
  kInvalidConfiguration = 3,
  kAssert = 4,  // a device-side assert fired (cudaErrorAssert); sticky until reset_device()
};
const char* error_string(Error e);
Error take_last_error();  // the error of the last launch, then reset (cudaGetLastError)
const char* last_message();
// Thread order from now on ("forward", "reverse", "random:SEED"; RETENTION_EMU_SCHEDULE sets
// the initial one); returns the previous one.  For the emulator's own tests.
std::string set_schedule(const char* schedule);

// The emulated thread that is running now, and the launch it belongs to.
struct ThreadState {
  uint3 idx;
};
extern ThreadState* g_thread;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

// Run `body(ctx)` for every thread of every block of the grid.  kernel_id identifies the
// kernel for set_max_dynamic_smem.
Error launch_grid(dim3 grid, dim3 block, std::size_t dynamic_smem, const void* kernel_id, void (*body)(void*),
                  void* ctx);
Error set_max_dynamic_smem(const void* kernel_id, int bytes);

// Block barrier (__syncthreads).  where: "file:line" of the call, func: the enclosing function.
void syncthreads(const char* file, int line, const char* func);

// Warp collective: every lane of the calling warp deposits `in` (in_bytes <= kSlotBytes);
// when all lanes have arrived at a collective with the same `compute`, compute runs once on
// all slots, then each lane receives its `out` slot.  A lane that exited, waits at a block
// barrier or at another collective meanwhile is an error (a collective from a diverged warp).
inline constexpr std::size_t kSlotBytes = 64;
using CollectiveFn = void (*)(const unsigned char* in, unsigned char* out, int lanes);
void warp_collective(const char* what, CollectiveFn compute, const void* in, std::size_t in_bytes, void* out,
                     std::size_t out_bytes);

// Shared memory of the current block: `bytes` at a site (one allocation per block and site),
// exactly that size, filled with all-ones bytes (NaN in f16, bf16, f32 and f64) before the
// block starts using it.  dynamic: the NVIDIA model's `extern __shared__` region, which must
// fit the launch's dynamic shared-memory size.
void* block_shared(const void* site, std::size_t bytes, bool dynamic, const char* file, int line);

template <class T, class Site>
T& block_shared_object(Site, const char* file, int line) {
  static const char site = 0;  // one per (type, declaration site)
  return *static_cast<T*>(block_shared(&site, sizeof(T), false, file, line));
}

// What the host has asked of the device so far: kernel launches that ran, device-to-host and
// host-to-device copies, memsets. A test takes two snapshots around one API call to assert what
// the call costs (one launch, no copy: a decode step that a CUDA graph can capture).
struct OpCounts {
  std::uint64_t launches = 0, downloads = 0, uploads = 0, memsets = 0;
};
OpCounts op_counts();
void count_upload();
void count_memset();

// Memory and runtime shims: exact-size host allocations (an overrun is an ASan error).
Error malloc_device(void** p, std::size_t bytes);
Error free_device(void* p);
void record_download(const void* src, std::size_t bytes);  // output digests (runtime.cpp)
void digest_begin_test(const char* name);                   // label of the following digests

// A check failed in the running emulated thread: report `message` with the block and thread,
// abandon the launch (it returns kLaunchFailure).  Never returns to the caller.
[[noreturn]] void fail(const char* message);

// A device-side assert in the running thread (CUDA Programming Guide, "Assertion"; HIP's
// __assert_fail): the kernel stops, `what` is reported with the block and thread, the launch
// returns kAssert, and the context is unusable: every later launch, copy and memset fails with
// kAssert without running, as on the GPU, until reset_device() (cudaDeviceReset).  Never returns,
// but is not declared [[noreturn]]: ASan's no-return hook, which the compiler would put at every
// call site in kernel code, misreads the fiber stacks (a CHECK failure in asan_thread.cpp).
void device_assert(const char* what, const char* file, int line);
Error sticky_error();  // kAssert after a device-side assert, else kSuccess
void reset_device();

// Lane helpers of the collectives below.
inline int lane() { return static_cast<int>(g_thread->idx.x) & (RETENTION_EMU_WARP - 1); }

// value of lane src (per lane), the building block of every shuffle.
template <class T>
T shuffle_from(T v, int src_lane, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a 32/64-bit value");
  struct In {
    unsigned char value[8];
    int src;
  } in{};
  std::memcpy(in.value, &v, sizeof(T));
  in.src = src_lane;
  unsigned char out[8];
  warp_collective(
      what,
      [](const unsigned char* slots, unsigned char* outs, int lanes) {
        for (int l = 0; l < lanes; ++l) {
          In x;
          std::memcpy(&x, slots + l * kSlotBytes, sizeof(In));
          std::memcpy(outs + l * kSlotBytes, slots + x.src * kSlotBytes, 8);
        }
      },
      &in, sizeof(In), out, 8);
  T r;
  std::memcpy(&r, out, sizeof(T));
  return r;
}

// Matrix-core instructions (matrix_isa.h) on the lanes' registers.
void mma_m16n8k16_f16(float& c0, float& c1, float& c2, float& c3, const std::uint32_t (&a)[4], std::uint32_t b0,
                      std::uint32_t b1);
void mma_m16n8k16_bf16(float& c0, float& c1, float& c2, float& c3, const std::uint32_t (&a)[4], std::uint32_t b0,
                       std::uint32_t b1);
// AMD: 4 x 16-bit (raw bits) operands per lane, 4 fp32 accumulators.
void mfma_16x16x16_f16(float (&c)[4], const std::uint16_t (&a)[4], const std::uint16_t (&b)[4]);
void mfma_16x16x16_bf16(float (&c)[4], const std::uint16_t (&a)[4], const std::uint16_t (&b)[4]);
void mfma_16x16x4_f32(float (&c)[4], float a, float b);

}  // namespace retention::emu

// ------------------------------------------------------------------------------------------
// CUDA / HIP spellings
// ------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx (::retention::emu::g_thread->idx)
#define blockIdx (::retention::emu::g_block_idx)
#define blockDim (::retention::emu::g_block_dim)
#define gridDim (::retention::emu::g_grid_dim)
#define __syncthreads() ::retention::emu::syncthreads(__FILE__, __LINE__, __func__)

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float atomicAdd(float* p, float v) {  // threads of the emulator never run concurrently
  const float old = *p;
  *p = old + v;
  return old;
}
// Integer atomics and the device-scope fence (cross-block hand-offs; runtime.cpp).
unsigned atomicAdd(unsigned* p, unsigned v);
void __threadfence();
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if RETENTION_EMU_WARP == 32
// CUDA: __shfl*_sync with the full mask (the only one the kernels use).  A lane reading outside
// its width-segment reads its own value (CUDA semantics for xor; shfl wraps within the segment).
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu) ::retention::emu::fail("__shfl_xor_sync: only the full lane mask is emulated");
  const int self = ::retention::emu::lane(), src = self ^ lane_mask;
  return ::retention::emu::shuffle_from(v, src >= ((self + width) & ~(width - 1)) ? self : src, "__shfl_xor_sync");
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  if (mask != 0xffffffffu) ::retention::emu::fail("__shfl_sync: only the full lane mask is emulated");
  const int self = ::retention::emu::lane();
  return ::retention::emu::shuffle_from(v, (self & ~(width - 1)) + (src_lane & (width - 1)), "__shfl_sync");
}
unsigned __ballot_sync(unsigned mask, int pred);

// cuda_fp16.h / cuda_bf16.h conversions (round to nearest even, as the device instructions).
struct __half {
  unsigned short bits;
};
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
float __half2float(__half h);
__half __float2half_rn(float f);
struct __nv_bfloat16 {
  unsigned short bits;
};
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
__nv_bfloat16 __float2bfloat16_rn(float f);
#else
// HIP: __shfl_xor / __shfl / __ballot over the 64-lane wavefront (hip/amd_warp_functions.h).
template <class T>
T __shfl_xor(T v, int lane_mask, int width = 64) {
  const int self = ::retention::emu::lane(), src = self ^ lane_mask;
  return ::retention::emu::shuffle_from(v, src >= ((self + width) & ~(width - 1)) ? self : src, "__shfl_xor");
}
template <class T>
T __shfl(T v, int src_lane, int width = 64) {
  const int self = ::retention::emu::lane();
  return ::retention::emu::shuffle_from(v, (self & ~(width - 1)) + (src_lane & (width - 1)), "__shfl");
}
unsigned long long __ballot(int pred);
#endif
