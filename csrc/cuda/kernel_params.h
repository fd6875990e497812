// Tensor -> kernel parameter translation shared by the CUDA glue files: the inputs every
// launcher takes, fp32 states, workspaces, and the launch status check.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include "checks.h"
#include "retention_kernels.h"

namespace retention {
namespace glue {

namespace rk = retention::kernels;

inline rk::DType kernel_dtype(at::ScalarType t) {
  return t == at::kHalf ? rk::DType::kF16 : t == at::kBFloat16 ? rk::DType::kBF16 : rk::DType::kF32;
}

// The kernels take any B/T/H strides but need a unit stride along the head dimension.
inline at::Tensor unit_inner_stride(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }
inline at::Tensor unit_inner_stride(const OptTensor& x) { return has(x) ? unit_inner_stride(*x) : at::Tensor(); }

inline rk::Bthd bthd(const at::Tensor& x) {
  rk::Bthd b;
  b.ptr = x.data_ptr();
  b.stride_b = x.stride(0);
  b.stride_t = x.stride(1);
  b.stride_h = x.stride(2);
  return b;
}

// fp32 contiguous copy of an optional tensor (states, norm weight), or an undefined tensor.
inline at::Tensor fp32_contiguous(const OptTensor& s) { return has(s) ? s->to(at::kFloat).contiguous() : at::Tensor(); }
inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// A new fp32 [N, H, dk, dv] state.
inline at::Tensor empty_state(const at::Tensor& q, int64_t N, const Dims& d) {
  return at::empty({N, d.H, d.dk, d.dv}, q.options().dtype(at::kFloat));
}

// Byte workspace from the caching allocator (16-byte aligned, as the launchers require); it
// needs no zero-fill.
inline at::Tensor workspace(std::size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

inline void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(e));
}

// The SMs the forward's sequence split plans for.  torch caches the device properties, so the
// plan (made once for the workspace size, once by the launcher) needs no device query per call.
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// q, k, v with a unit inner stride and log_decay in fp32, kept alive for the launch.
struct Inputs {
  at::Tensor q, k, v, log_decay;
};

// What every launcher takes: dtype, fp32 log_decay, scale, the current stream, and the shape and
// q / k / v as [B, T, H, d] operands (T = 1 for the decode steps).
template <class Params>
Inputs fill_inputs(Params& p, const Dims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& log_decay, double scale) {
  Inputs in{unit_inner_stride(q), unit_inner_stride(k), unit_inner_stride(v), log_decay.to(at::kFloat).contiguous()};
  p.dtype = kernel_dtype(q.scalar_type());
  p.log_decay = in.log_decay.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  p.shape.B = d.B, p.shape.T = d.T, p.shape.H = d.H, p.shape.dk = d.dk, p.shape.dv = d.dv;
  p.q = bthd(in.q), p.k = bthd(in.k), p.v = bthd(in.v);
  return in;
}

}  // namespace glue
}  // namespace retention
