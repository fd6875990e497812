// Prints the chunk kernels' tiling, ChunkTraits (kernels/chunk_common.cuh), as JSON for
// bench/gpu_model.py, so that the performance model reads the kernels' own constants instead of
// a copy of them.  Built for the host against the emulator's headers with 32-wide warps (the
// NVIDIA targets the model describes); nothing here runs a kernel.
//
//   c++ -std=c++17 -DRETENTION_HOST_EMU -DRETENTION_EMU_WARP=32 -Ikernels bench/chunk_traits.cpp
#include <cstdio>

#include "chunk_common.cuh"

namespace rk = retention::kernels;

namespace {

bool first = true;

template <class T, int kMaxDk, int kStateRegs>
void print_traits() {
  using Tr = rk::ChunkTraits<T, kMaxDk, kStateRegs>;
  std::printf("%s\n  {\"elem\": %d, \"max_dk\": %d, \"state_regs\": %d, \"BT\": %d, \"BK\": %d, \"KT\": %d, "
              "\"BV\": %d, \"threads\": %d, \"smem_fwd\": %d, \"smem_dq\": %d, \"smem_dkv\": %d}",
              first ? "" : ",", static_cast<int>(sizeof(T)), kMaxDk, kStateRegs, Tr::BT, Tr::BK, Tr::KT, Tr::BV,
              Tr::kThreads, Tr::kSmemForward, Tr::kSmemDq, Tr::kSmemDkv);
  first = false;
}

// Every dk bucket (dispatch_dk) at the state budgets the launchers use.
template <class T>
void print_buckets() {
  print_traits<T, 64, 64>();
  print_traits<T, 64, 32>();
  print_traits<T, 64, 16>();
  print_traits<T, 128, 64>();
  print_traits<T, 128, 32>();
  print_traits<T, 128, 16>();
  print_traits<T, 256, 64>();
  print_traits<T, 256, 32>();
  print_traits<T, 256, 16>();
}

}  // namespace

int main() {
  std::printf("[");
  print_buckets<rk::f16_t>();  // bf16 tiles as f16
  print_buckets<float>();
  std::printf("\n]\n");
}
