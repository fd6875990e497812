// float64 inputs on CUDA tensors: no GPU kernel (tensor cores and the fp32 state are the point
// of the GPU path); the op's CPU kernel runs on host copies and its results come back to the
// device.  Slow, but it keeps gradcheck on CUDA tensors working.
#pragma once

#include <tuple>

#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>

#include "checks.h"
#include "msr_args.h"

namespace retention {
namespace glue {

// The redispatch of dispatch_msr_*(to_host(a), kCpu) to the op's CPU kernel.
inline const c10::DispatchKeySet kCpu{c10::DispatchKey::CPU};

inline at::Tensor to_host(const at::Tensor& t) { return t.defined() ? t.to(at::kCPU) : t; }
inline OptTensor to_host(const OptTensor& t) { return has(t) ? OptTensor(t->to(at::kCPU)) : OptTensor(); }

// A call's arguments with every tensor copied to the host (a step's state too: the caller
// copies it back).
inline MsrArgs to_host(const MsrArgs& a) {
  MsrArgs h = a;
  for (at::Tensor* t : {&h.q, &h.k, &h.v, &h.log_decay, &h.grad_y, &h.state}) *t = to_host(*t);
  for (OptTensor* t : {&h.g, &h.initial_state, &h.offsets, &h.cu_seqlens, &h.norm_weight, &h.grad_final_state})
    *t = to_host(*t);
  return h;
}

inline at::Tensor to_device(const at::Tensor& t, const at::Device& device) { return t.defined() ? t.to(device) : t; }
template <class... T>
std::tuple<T...> to_device(const std::tuple<T...>& r, const at::Device& device) {
  return std::apply([&](const auto&... t) { return std::make_tuple(to_device(t, device)...); }, r);
}

}  // namespace glue
}  // namespace retention
