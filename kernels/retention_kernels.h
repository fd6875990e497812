// retention_kernels.h - the torch-free interface of the GPU kernels.
//
// Plain parameter structs (raw pointers, element strides) in, a gpu::error_t out.  The launch
// functions dispatch on `dtype` to kernels instantiated for f16, bf16 and fp32 inputs; states
// are always fp32.  Layout conventions (the op contract):
//   q, k: [B, T, H, dk]; v, o: [B, T, H, dv]   any strides for B/T/H, unit stride along d
//   state: [B, H, dk, dv] fp32, contiguous
//   log_decay: [H] fp32 on the device, natural log of gamma, must be <= 0
// Outputs are fully written by the kernels (no pre-zeroing needed).
#pragma once

#include <cstddef>
#include <cstdint>

#include "gpu_compat.h"
#include "numeric.h"

namespace retention::kernels {

// One [B, T, H, d] operand.  d has unit stride.
struct Bthd {
  void* ptr = nullptr;
  std::int64_t stride_b = 0;
  std::int64_t stride_t = 0;
  std::int64_t stride_h = 0;
};

struct Shape {
  std::int64_t B = 0, T = 0, H = 0, dk = 0, dv = 0;
};

inline constexpr int kMaxHeadDimK = 256;

// What every chunk launch takes.  The kernels use their own chunk (a tile constant: 64 rows for
// 16-bit inputs, 32 for fp32) whatever the op's chunk_size: the result is the same function of
// the inputs up to rounding.
struct ChunkInputs {
  DType dtype = DType::kF32;
  Shape shape;
  Bthd q, k, v;
  const float* log_decay = nullptr;
  float scale = 1.f;
  const float* initial_state = nullptr;  // optional
  // Sequence split (chunk_common.cuh): when the grid of CTAs is under two waves, T is cut into
  // segments run by separate CTAs.  -1: chosen from the shape and the SM count; 0: off; n > 0:
  // n segments of ceil(T / n) tokens (tests).
  int split = -1;
  int num_sms = 0;  // SMs the automatic choice plans for; 0: the current device's
  // Scratch of *_workspace_bytes() bytes, 16-byte aligned, no zero-fill needed; may be null
  // when that size is 0.
  void* workspace = nullptr;
  gpu::stream_t stream = nullptr;
};

struct ChunkForwardParams : ChunkInputs {
  Bthd o;
  float* final_state = nullptr;  // optional
};

struct ChunkBackwardParams : ChunkInputs {
  Bthd grad_o;
  Bthd grad_q, grad_k, grad_v;
  const float* grad_final_state = nullptr;  // optional (zero when absent)
  float* grad_initial_state = nullptr;      // required, [B, H, dk, dv]
};

// Token-by-token scan; same math as the chunk form, one state update per token.
struct RecurrentForwardParams {
  DType dtype = DType::kF32;
  Shape shape;
  Bthd q, k, v, o;
  const float* log_decay = nullptr;
  float scale = 1.f;
  const float* initial_state = nullptr;
  float* final_state = nullptr;
  gpu::stream_t stream = nullptr;
};

// One decode step: S <- gamma S + k^T v (in place), o = scale * q S_new.  shape.T is 1: q, k
// are [B, 1, H, dk], v, o [B, 1, H, dv] (stride_t unused).
struct RecurrentStepParams {
  DType dtype = DType::kF32;
  Shape shape;
  Bthd q, k, v, o;
  const float* log_decay = nullptr;
  float scale = 1.f;
  float* state = nullptr;  // [B, H, dk, dv], updated in place
  gpu::stream_t stream = nullptr;
};

std::size_t chunk_forward_workspace_bytes(const ChunkForwardParams& p);
gpu::error_t launch_chunk_forward(const ChunkForwardParams& p);
std::size_t chunk_backward_workspace_bytes(const ChunkBackwardParams& p);
gpu::error_t launch_chunk_backward(const ChunkBackwardParams& p);
gpu::error_t launch_recurrent_forward(const RecurrentForwardParams& p);
gpu::error_t launch_recurrent_step(const RecurrentStepParams& p);

}  // namespace retention::kernels
