// Tests of the host execution backend itself (kernels/host_emu/): that it enforces the GPU's
// execution rules the kernel tests rely on.  Built only into the emulated test binary
// (scripts/test-kernels-host.sh).  Each kernel below is deliberately wrong in one way, and the
// launch must fail with a message naming the function and line instead of hanging or passing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "gpu_compat.h"
#include "kernel_test_util.h"

namespace gpu = retention::gpu;
namespace emu = retention::emu;

namespace {

using kernel_test::DeviceBuffer;

constexpr int W = gpu::kWarpSize;

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();  // a different barrier: synccheck's "divergent barrier"
  }
  out[threadIdx.x] = 1;
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x >= W) return;  // the second warp leaves, the first waits below
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void diverged_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (gpu::lane_id() < W / 2) v = gpu::warp_reduce_sum(v);  // half a warp in a full-mask shuffle
  out[threadIdx.x] = v;
}

__global__ void uniform_kernel(float* out) {
  RETENTION_SHARED(float, tile, [2 * W]);
  const int t = static_cast<int>(threadIdx.x);
  out[2 * W + t] = tile[t];  // poison: not written yet in this block
  tile[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = gpu::warp_reduce_sum(tile[(t + W) % (2 * W)]);
}

// Reads a neighbour's shared-memory value without a barrier in between: the result depends on
// the thread order.
__global__ void missing_barrier_kernel(float* out) {
  RETENTION_SHARED(float, tile, [2 * W]);
  const int t = static_cast<int>(threadIdx.x);
  tile[t] = static_cast<float>(t);
  out[t] = tile[(t + W) % (2 * W)];
}

__global__ void dynamic_smem_kernel(float* out) {
  RETENTION_SMEM(smem, 4096);
  reinterpret_cast<float*>(smem)[threadIdx.x] = 1.f;
  out[threadIdx.x] = 1.f;
}

// Every thread takes a ticket from one counter and counts it in slot t (which thread draws which
// ticket depends on the order, the counts must not: the suite compares downloads across orders).
__global__ void ticket_kernel(unsigned* counter, unsigned* tickets, unsigned* wrap) {
  const unsigned t = gpu::atomic_add(counter, 1u);
  if (t < gridDim.x * blockDim.x) tickets[t] += 1u;
  if (blockIdx.x == 0 && threadIdx.x == 0) wrap[1] = gpu::atomic_add(&wrap[0], 2u);  // wraps modulo 2^32
  gpu::fence_device();
}

__global__ void misaligned_atomic_kernel(unsigned char* p) {
  gpu::atomic_add(reinterpret_cast<unsigned*>(p + 2), 1u);
}

// Copies x to out after checking every value on the device, as the kernels check their inputs.
__global__ void checked_copy_kernel(const float* x, float* out) {
  RT_DEVICE_CHECK(x[threadIdx.x] <= 0.f, "x must be <= 0");
  out[threadIdx.x] = x[threadIdx.x];
}

std::vector<float> download(const DeviceBuffer& d) {
  std::vector<float> h(d.bytes / 4);
  gpu::copy_to_host(h.data(), d.ptr, d.bytes);
  return h;
}

}  // namespace

TEST(HostEmu, DivergentBarrierIsAnErrorNamingTheLine) {
  DeviceBuffer out(2 * W * sizeof(int));
  EXPECT_EQ(gpu::launch(&divergent_barrier_kernel, 1, 2 * W, 0, nullptr, out.as<int>()), emu::Error::kLaunchFailure);
  const std::string msg = emu::last_message();
  EXPECT_NE(msg.find("divergent __syncthreads"), std::string::npos) << msg;
  EXPECT_NE(msg.find("divergent_barrier_kernel"), std::string::npos) << msg;
  EXPECT_NE(msg.find("test_host_emu.cpp:"), std::string::npos) << msg;
}

TEST(HostEmu, EarlyExitWhileOthersWaitIsAnError) {
  DeviceBuffer out(2 * W * sizeof(int));
  EXPECT_EQ(gpu::launch(&early_exit_kernel, 1, 2 * W, 0, nullptr, out.as<int>()), emu::Error::kLaunchFailure);
  const std::string msg = emu::last_message();
  EXPECT_NE(msg.find("have exited"), std::string::npos) << msg;
  EXPECT_NE(msg.find("early_exit_kernel"), std::string::npos) << msg;
}

TEST(HostEmu, ShuffleFromADivergedWarpIsAnError) {
  DeviceBuffer out(W * sizeof(float));
  EXPECT_EQ(gpu::launch(&diverged_shuffle_kernel, 1, W, 0, nullptr, out.as<float>()), emu::Error::kLaunchFailure);
  const std::string msg = emu::last_message();
  EXPECT_NE(msg.find("diverged warp"), std::string::npos) << msg;
}

TEST(HostEmu, SharedMemoryIsPoisonedPerBlockAndBarriersWork) {
  DeviceBuffer out(3 * W * sizeof(float) * 2);
  for (const char* order : {"forward", "reverse", "random:7"}) {
    const std::string before = emu::set_schedule(order);
    ASSERT_EQ(gpu::launch(&uniform_kernel, 1, 2 * W, 0, nullptr, out.as<float>()), gpu::kSuccess);
    emu::set_schedule(before.c_str());
    const std::vector<float> h = download(out);
    for (int t = 0; t < 2 * W; ++t) {
      EXPECT_TRUE(std::isnan(h[2 * W + t])) << order << " thread " << t;
      // Lanes of warp w read the other warp's values: sum of that warp's thread indices.
      const int other = (t / W + 1) % 2;
      EXPECT_EQ(h[t], static_cast<float>(W * (other * W) + W * (W - 1) / 2)) << order << " thread " << t;
    }
  }
}

TEST(HostEmu, MissingBarrierChangesTheResultBetweenSchedules) {
  DeviceBuffer out(2 * W * sizeof(float));
  std::vector<float> results[2];
  const char* orders[2] = {"forward", "reverse"};
  for (int i = 0; i < 2; ++i) {
    const std::string before = emu::set_schedule(orders[i]);
    ASSERT_EQ(gpu::launch(&missing_barrier_kernel, 1, 2 * W, 0, nullptr, out.as<float>()), gpu::kSuccess);
    emu::set_schedule(before.c_str());
    results[i] = download(out);
  }
  // Forward: warp 0 runs to completion first and reads warp 1's slots before they are written.
  EXPECT_TRUE(std::isnan(results[0][0]));
  EXPECT_EQ(results[0][W], 0.f);
  EXPECT_EQ(results[1][0], static_cast<float>(W));
  EXPECT_TRUE(std::isnan(results[1][W]));
}

TEST(HostEmu, SharedMemoryBeyondTheLaunchIsAnError) {
  DeviceBuffer out(W * sizeof(float));
  const std::size_t launch_smem = gpu::dynamic_smem_bytes(1024);  // declared: 4096
  const gpu::error_t e = gpu::launch(&dynamic_smem_kernel, 1, W, launch_smem, nullptr, out.as<float>());
  if (gpu::kIsHip) {
    EXPECT_EQ(e, gpu::kSuccess);  // a static LDS array on CDNA: no launch size involved
  } else {
    EXPECT_EQ(e, emu::Error::kLaunchFailure);
    EXPECT_NE(std::string(emu::last_message()).find("dynamic shared memory"), std::string::npos);
  }
  EXPECT_EQ(gpu::launch(&dynamic_smem_kernel, 1, 2048, 0, nullptr, out.as<float>()),
            emu::Error::kInvalidConfiguration);  // more than 1024 threads
}

TEST(HostEmu, IntegerAtomicAddHandsOutEachTicketOnce) {
  constexpr int kBlocks = 3, kThreads = 2 * W, kN = kBlocks * kThreads;
  DeviceBuffer counter(sizeof(unsigned)), tickets(kN * sizeof(unsigned)), wrap(2 * sizeof(unsigned));
  const unsigned zero = 0, wrap0[2] = {0xffffffffu, 0};
  const std::vector<unsigned> zeros(kN, 0);
  counter.upload(&zero);
  tickets.upload(zeros.data());
  wrap.upload(wrap0);
  ASSERT_EQ(gpu::launch(&ticket_kernel, kBlocks, kThreads, 0, nullptr, counter.as<unsigned>(), tickets.as<unsigned>(),
                        wrap.as<unsigned>()),
            gpu::kSuccess);
  unsigned count = 0, w[2];
  std::vector<unsigned> who(kN);
  gpu::copy_to_host(&count, counter.ptr, sizeof count);
  gpu::copy_to_host(who.data(), tickets.ptr, tickets.bytes);
  gpu::copy_to_host(w, wrap.ptr, sizeof w);
  EXPECT_EQ(count, unsigned(kN));
  for (int i = 0; i < kN; ++i) EXPECT_EQ(who[i], 1u) << "ticket " << i;
  EXPECT_EQ(w[0], 1u);            // 0xffffffff + 2 modulo 2^32
  EXPECT_EQ(w[1], 0xffffffffu);   // the old value
}

TEST(HostEmu, MisalignedAtomicIsAnError) {
  DeviceBuffer buf(16);
  EXPECT_EQ(gpu::launch(&misaligned_atomic_kernel, 1, W, 0, nullptr, buf.as<unsigned char>()),
            emu::Error::kLaunchFailure);
  EXPECT_NE(std::string(emu::last_message()).find("misaligned"), std::string::npos) << emu::last_message();
}

TEST(HostEmu, DeviceAssertStopsTheLaunchAndEveryLaterCallUntilReset) {
  DeviceBuffer x(W * sizeof(float)), out(W * sizeof(float));
  std::vector<float> ok(W, -1.f), bad(ok), poison(W, 7.f);
  bad[W - 3] = 0.5f;
  x.upload(ok.data());
  ASSERT_EQ(gpu::launch(&checked_copy_kernel, 1, W, 0, nullptr, x.as<float>(), out.as<float>()), gpu::kSuccess);
  EXPECT_EQ(download(out), ok);

  out.upload(poison.data());
  x.upload(bad.data());
  EXPECT_EQ(gpu::launch(&checked_copy_kernel, 1, W, 0, nullptr, x.as<float>(), out.as<float>()), emu::Error::kAssert);
  const std::string msg = emu::last_message();
  EXPECT_NE(msg.find("x must be <= 0"), std::string::npos) << msg;
  EXPECT_NE(msg.find("test_host_emu.cpp:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("thread " + std::to_string(W - 3)), std::string::npos) << msg;

  // The context is lost: nothing runs or copies until the device is reset.
  std::vector<float> h(W, 0.f);
  EXPECT_EQ(gpu::copy_to_host(h.data(), out.ptr, out.bytes), emu::Error::kAssert);
  EXPECT_EQ(gpu::copy_to_device(x.ptr, ok.data(), x.bytes), emu::Error::kAssert);
  EXPECT_EQ(gpu::synchronize(), emu::Error::kAssert);
  EXPECT_EQ(gpu::launch(&checked_copy_kernel, 1, W, 0, nullptr, x.as<float>(), out.as<float>()), emu::Error::kAssert);
  emu::reset_device();
  EXPECT_EQ(gpu::synchronize(), gpu::kSuccess);
  x.upload(ok.data());
  ASSERT_EQ(gpu::launch(&checked_copy_kernel, 1, W, 0, nullptr, x.as<float>(), out.as<float>()), gpu::kSuccess);
  EXPECT_EQ(download(out), ok);
}
