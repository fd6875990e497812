// Tensor -> kernel parameter translation shared by the CUDA glue files.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "retention_kernels.h"

namespace retention {
namespace glue {

namespace rk = retention::kernels;

inline rk::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return rk::DType::kF16;
    case at::kBFloat16:
      return rk::DType::kBF16;
    default:
      return rk::DType::kF32;
  }
}

// The kernels take any B/T/H strides but need a unit stride along the head dimension.
inline at::Tensor unit_inner_stride(const at::Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
}

inline rk::Bthd bthd(const at::Tensor& x) {
  rk::Bthd b;
  b.ptr = x.data_ptr();
  b.stride_b = x.stride(0);
  b.stride_t = x.stride(1);
  b.stride_h = x.stride(2);
  return b;
}

inline rk::Shape shape_of(const Dims& d) {
  rk::Shape s;
  s.B = d.B;
  s.T = d.T;
  s.H = d.H;
  s.dk = d.dk;
  s.dv = d.dv;
  return s;
}

}  // namespace glue
}  // namespace retention
