// float64 inputs on CUDA tensors: no GPU kernel (tensor cores and the fp32 state are the point
// of the GPU path); the op's CPU kernel runs on host copies and its results come back to the
// device.  Slow, but it keeps gradcheck on CUDA tensors working.
#pragma once

#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "checks.h"

namespace retention {
namespace glue {

inline at::Tensor to_host(const at::Tensor& t) { return t.to(at::kCPU); }
inline OptTensor to_host(const OptTensor& t) { return has(t) ? OptTensor(t->to(at::kCPU)) : OptTensor(); }
template <class T>
T to_host(T x) {
  return x;
}

inline at::Tensor to_device(const at::Tensor& t, const at::Device& device) { return t.defined() ? t.to(device) : t; }
template <class... T>
std::tuple<T...> to_device(const std::tuple<T...>& r, const at::Device& device) {
  return std::apply([&](const auto&... t) { return std::make_tuple(to_device(t, device)...); }, r);
}

// CpuKernel<&op_cuda>::run(name, device, args...): the CPU kernel of the op `name` (the msr_*
// op's own name, which fixes the schema looked up once), whose signature is that of the CUDA
// kernel op_cuda.  A step op's state is updated in place: pass a host copy and copy it back.
template <auto Fn, class Signature = std::remove_pointer_t<decltype(Fn)>>
struct CpuKernel;

template <auto Fn, class Ret, class... Args>
struct CpuKernel<Fn, Ret(Args...)> {
  static Ret run(const char* name, const at::Device& device, Args... args) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Ret(Args...)>();
    return to_device(op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), to_host(args)...), device);
  }
};

}  // namespace glue
}  // namespace retention
