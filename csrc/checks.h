// Argument validation shared by every backend (CPU, CUDA, HIP, Meta), so each op rejects bad input
// with the same message whatever the device.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "retention/compat.h"
#include "retention/retention.h"
#include "msr_args.h"

namespace retention {

struct Dims {
  int64_t B, T, H, dk, dv;
};

// The raw ops (chunk_forward ... recurrent_step) are their msr_* op with every option off
// (ops.cpp). While one runs, it names itself here for its thread, so the msr_* kernels' checks
// name the op the user called.
class CalledAs {
 public:
  explicit CalledAs(const char* raw_op);
  ~CalledAs();
  CalledAs(const CalledAs&) = delete;
  CalledAs& operator=(const CalledAs&) = delete;
  static const char* raw_op();  // nullptr outside a raw op

 private:
  const char* outer_;
};

// `msr_op`, or the raw op that runs as it.
inline const char* op_name(const char* msr_op) {
  const char* raw = CalledAs::raw_op();
  return raw != nullptr ? raw : msr_op;
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// fp32 everywhere, fp64 when the inputs are fp64 (gradcheck).
inline at::ScalarType state_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_state(const char* op, const char* name, const at::Tensor& s, const at::Tensor& q,
                        const Dims& d) {
  TORCH_CHECK(s.dim() == 4 && s.size(0) == d.B && s.size(1) == d.H && s.size(2) == d.dk &&
                  s.size(3) == d.dv,
              op, ": ", name, " must have shape [B, H, dk, dv] = [", d.B, ", ", d.H, ", ", d.dk,
              ", ", d.dv, "], got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 (or float64), got ", s.scalar_type());
  TORCH_CHECK(s.device() == q.device(), op, ": all tensors must be on the same device, but q is on ",
              q.device(), " and ", name, " is on ", s.device());
}

// Values a shape check cannot see. CPU tensors are read on the host, with a message naming the bad
// element. Device tensors are checked by the kernels that read them (kernels/value_checks.cuh): a
// host read would cost a sync per call and break CUDA-graph capture; a bad value stops the launch
// with a device-side assert and fails the next synchronising call.
// Meta tensors have no values (shape propagation only).
inline bool has_values(const at::Tensor& t) { return !t.is_meta() && t.numel() > 0; }

// gamma = exp(log_decay) must lie in [0, 1]: log_decay in [-inf, 0]. gamma > 1 grows without bound
// (gamma^T overflows; the GPU kernels' decay powers are inf), NaN poisons every output and state.
inline void check_log_decay_values(const char* op, const at::Tensor& log_decay) {
  if (!has_values(log_decay) || !log_decay.is_cpu()) return;
  const auto host = log_decay.detach().to(at::kDouble).contiguous();
  const double* x = host.data_ptr<double>();
  for (int64_t h = 0; h < host.numel(); ++h) {
    TORCH_CHECK(x[h] <= 0.0, op, ": log_decay must be <= 0 and not NaN (decay gamma = exp(log_decay) in [0, 1]), ",
                "got log_decay[", h, "] = ", x[h]);  // also false for NaN
  }
}

// offsets: absolute start positions, int64 [N] (shape checked by the caller).
inline void check_offsets_values(const char* op, const at::Tensor& offsets) {
  if (!has_values(offsets) || !offsets.is_cpu()) return;
  const int64_t lo = offsets.detach().min().item<int64_t>();
  TORCH_CHECK(lo >= 0, op, ": offsets must be non-negative positions, got a minimum of ", lo);
}

// q, k: [B, T, H, dk]; v: [B, T, H, dv]; log_decay: [H].
inline Dims check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& log_decay,
                         const OptTensor& initial_state,
                         const char* state_name = "initial_state") {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B, T, H, dk], got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D [B, T, H, dk], got ", k.dim(), "-D");
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D [B, T, H, dv], got ", v.dim(), "-D");
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == d.B && k.size(1) == d.T && k.size(2) == d.H && k.size(3) == d.dk, op,
              ": k must have the shape of q [B, T, H, dk] = ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == d.B && v.size(1) == d.T && v.size(2) == d.H, op,
              ": v must be [B, T, H, dv] with B, T, H of q = (", d.B, ", ", d.T, ", ", d.H,
              "), got ", v.sizes());
  TORCH_CHECK(d.dk >= 1 && d.dk <= kMaxHeadDimK, op, ": dk (last dim of q and k) must be in [1, ",
              kMaxHeadDimK, "], got ", d.dk);
  TORCH_CHECK(d.dv >= 1, op, ": dv (last dim of v) must be positive, got ", d.dv);
  TORCH_CHECK(is_float_type(q.scalar_type()), op,
              ": q, k and v must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have the same dtype, got q ", q.scalar_type(), ", k ",
              k.scalar_type(), ", v ", v.scalar_type());
  TORCH_CHECK(log_decay.dim() == 1 && log_decay.size(0) == d.H, op,
              ": log_decay must have shape [H] = [", d.H, "], got ", log_decay.sizes());
  TORCH_CHECK(log_decay.scalar_type() == at::kFloat || log_decay.scalar_type() == at::kDouble, op,
              ": log_decay must be float32 (or float64), got ", log_decay.scalar_type());
  check_log_decay_values(op, log_decay);
  for (const auto* t : {&k, &v, &log_decay}) {
    TORCH_CHECK(t->device() == q.device(), op,
                ": all tensors must be on the same device, but q is on ", q.device(),
                " and another argument is on ", t->device());
  }
  if (initial_state.has_value() && initial_state->defined()) {
    check_state(op, state_name, *initial_state, q, d);
  }
  return d;
}

inline void check_chunk_size(const char* op, int64_t chunk_size) {
  TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive, got ", chunk_size);
}

inline void check_grad_o(const char* op, const at::Tensor& grad_o, const Dims& d,
                         const at::Tensor& q, const OptTensor& grad_final_state,
                         const char* name = "grad_o") {
  TORCH_CHECK(grad_o.dim() == 4 && grad_o.size(0) == d.B && grad_o.size(1) == d.T &&
                  grad_o.size(2) == d.H && grad_o.size(3) == d.dv,
              op, ": ", name, " must have shape [B, T, H, dv] = [", d.B, ", ", d.T, ", ", d.H,
              ", ", d.dv, "], got ", grad_o.sizes());
  TORCH_CHECK(is_float_type(grad_o.scalar_type()), op, ": ", name, " must be a float tensor, got ",
              grad_o.scalar_type());
  TORCH_CHECK(grad_o.device() == q.device(), op,
              ": all tensors must be on the same device, but q is on ", q.device(), " and ", name,
              " is on ", grad_o.device());
  if (grad_final_state.has_value() && grad_final_state->defined()) {
    check_state(op, "grad_final_state", *grad_final_state, q, d);
  }
}

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// recurrent_step takes [B, H, d] or [B, 1, H, d]; returns the 4-D view [B, 1, H, d].
inline at::Tensor as_single_step(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 || (x.dim() == 4 && x.size(1) == 1), op, ": ", name,
              " must be [B, H, d] or [B, 1, H, d] for a single decode step, got ", x.sizes());
  return x.dim() == 3 ? x.unsqueeze(1) : x;
}

// recurrent_step / msr_step update the state in place.
inline void check_step_state(const char* op, const at::Tensor& state, const at::Tensor& q) {
  TORCH_CHECK(state.scalar_type() == state_dtype(q.scalar_type()), op, ": state must be ",
              state_dtype(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ",
              state.scalar_type());
  TORCH_CHECK(state.is_contiguous(), op, ": state must be contiguous (it is updated in place)");
}

// First and last byte a tensor's elements can occupy (torch strides are never negative).
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size()) - 1};
}

// The step ops write `state` while they read their inputs: an input sharing memory with the state
// (e.g. q a view of it) would be read after part of it was overwritten, giving an order-dependent
// result. Compared by address ranges, so any view of the state's memory is refused, whatever its
// strides (a strided view interleaved with the state without touching it is refused too: rare,
// and cheap to avoid with a copy).
inline void check_state_not_aliased(
    const char* op, const at::Tensor& state,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  if (!has_values(state)) return;
  const auto s = byte_span(state);
  for (const auto& in : inputs) {
    if (in.second == nullptr || !in.second->defined() || !has_values(*in.second)) continue;
    const auto x = byte_span(*in.second);
    TORCH_CHECK(x.second < s.first || s.second < x.first, op,
                ": state (updated in place) must not share memory with ", in.first);
  }
}

// Shapes of a fused-layer call: N sequences (= B, or the number of packed sequences).
struct MsrDims {
  Dims d;
  int64_t N;
};

// The inputs of a fused-layer call (msr_step: with [B, 1, H, d] inputs and its state as
// initial_state, named `state_name`).
inline MsrDims check_msr_inputs(const char* op, const MsrArgs& a,
                                const char* state_name = "initial_state") {
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  const OptTensor &g = a.g, &offsets = a.offsets, &cu_seqlens = a.cu_seqlens;
  const OptTensor &initial_state = a.initial_state, &norm_weight = a.norm_weight;
  const auto form = static_cast<int64_t>(a.opt.form), rotary = static_cast<int64_t>(a.opt.rotary);
  const double eps = a.opt.eps;
  const Dims d = check_inputs(op, q, k, v, a.log_decay, {});
  TORCH_CHECK(form >= 0 && form <= 2, op, ": form must be 0 (chunk), 1 (parallel) or 2 (recurrent), got ", form);
  check_chunk_size(op, a.opt.chunk_size);
  TORCH_CHECK(rotary >= 0 && rotary <= 2, op,
              ": rotary must be 0 (none), 1 (torchscale) or 2 (neox), got ", rotary);
  TORCH_CHECK(rotary == 0 || d.dk % 2 == 0, op, ": a rotary embedding needs an even dk, got dk = ",
              d.dk);
  TORCH_CHECK(eps >= 0.0 && eps < INFINITY, op, ": eps must be finite and non-negative, got ", eps);
  if (has(g)) {
    TORCH_CHECK(g->dim() == 4 && g->size(0) == d.B && g->size(1) == d.T && g->size(2) == d.H &&
                    g->size(3) == d.dv,
                op, ": g must have the shape of v [B, T, H, dv] = ", v.sizes(), ", got ", g->sizes());
    TORCH_CHECK(g->scalar_type() == q.scalar_type(), op, ": g must have the dtype of q (",
                q.scalar_type(), "), got ", g->scalar_type());
    TORCH_CHECK(g->device() == q.device(), op, ": all tensors must be on the same device, but q is on ",
                q.device(), " and g is on ", g->device());
  }
  int64_t N = d.B;
  if (has(cu_seqlens)) {
    const auto& cu = *cu_seqlens;
    TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, op,
                ": cu_seqlens must be 1-D [N + 1] with N >= 1 sequences, got shape ", cu.sizes());
    TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op,
                ": cu_seqlens must be int32 or int64, got ", cu.scalar_type());
    TORCH_CHECK(d.B == 1, op, ": packed sequences (cu_seqlens) need B == 1, got B = ", d.B);
    TORCH_CHECK(cu.device() == q.device(), op, ": cu_seqlens must be on the device of q (",
                q.device(), "), got ", cu.device());
    N = cu.numel() - 1;
  }
  if (has(offsets)) {
    TORCH_CHECK(offsets->dim() == 1 && offsets->numel() == N, op,
                ": offsets must be 1-D [N] = [", N, "] (one start position per sequence), got ",
                offsets->sizes());
    TORCH_CHECK(offsets->scalar_type() == at::kLong, op, ": offsets must be int64, got ",
                offsets->scalar_type());
    TORCH_CHECK(offsets->device() == q.device(), op, ": offsets must be on the device of q (",
                q.device(), "), got ", offsets->device());
    check_offsets_values(op, *offsets);
  }
  if (has(norm_weight)) {
    TORCH_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == d.dv, op,
                ": norm_weight must have shape [dv] = [", d.dv, "], got ", norm_weight->sizes());
    TORCH_CHECK(is_float_type(norm_weight->scalar_type()), op,
                ": norm_weight must be a float tensor, got ", norm_weight->scalar_type());
    TORCH_CHECK(norm_weight->device() == q.device(), op,
                ": norm_weight must be on the device of q (", q.device(), "), got ",
                norm_weight->device());
  }
  if (has(initial_state)) check_state(op, state_name, *initial_state, q, Dims{N, d.T, d.H, d.dk, d.dv});
  return {d, N};
}

// msr_step's arguments as check_msr_inputs takes them: q, k, v, g in their [B, 1, H, d] form
// (single_step: as_single_step, or the Meta kernels' stand-in) and the state as initial_state.
template <class SingleStep>
MsrArgs msr_step_form(const char* op, const MsrArgs& a, SingleStep&& single_step) {
  MsrArgs s = a;
  s.q = single_step(op, "q", a.q);
  s.k = single_step(op, "k", a.k);
  s.v = single_step(op, "v", a.v);
  if (has(a.g)) s.g = single_step(op, "g", *a.g);
  s.initial_state = a.state;
  return s;
}

// The checks of a decode step beyond its inputs': the state it updates in place.
inline void check_msr_step_state(const char* op, const MsrArgs& a) {
  check_step_state(op, a.state, a.q);
  check_state_not_aliased(op, a.state,
                          {{"q", &a.q}, {"k", &a.k}, {"v", &a.v}, {"g", has(a.g) ? &*a.g : nullptr},
                           {"log_decay", &a.log_decay}, {"offsets", has(a.offsets) ? &*a.offsets : nullptr},
                           {"norm_weight", has(a.norm_weight) ? &*a.norm_weight : nullptr}});
}

inline void check_msr_grads(const char* op, const MsrDims& m, const MsrArgs& a) {
  // The raw backward ops call their output's gradient grad_o.
  check_grad_o(op, a.grad_y, m.d, a.q, {}, CalledAs::raw_op() != nullptr ? "grad_o" : "grad_y");
  if (has(a.grad_final_state)) {
    check_state(op, "grad_final_state", *a.grad_final_state, a.q,
                Dims{m.N, m.d.T, m.d.H, m.d.dk, m.d.dv});
  }
}

}  // namespace retention
