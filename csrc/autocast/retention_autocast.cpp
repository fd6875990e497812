// Autocast kernels (AutocastCPU, AutocastCUDA): every op runs in the dtype of its inputs, with
// autocast switched off inside it. The kernels are built from ATen ops (bmm, baddbmm, ...) whose
// accumulators and states are fp32 on purpose; left on, autocast would round those internal
// products to bf16/fp16 (and the CPU kernels' fp32 helpers would be handed bf16 tensors). Inputs
// are not cast: under autocast the layer's projections already give the op bf16/fp16 q, k, v, g,
// while the decay and the states stay fp32, which is what the ops take.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace retention {
namespace {

void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

// The raw ops need no entry: they run as these (ops.cpp), whose entries then apply.
constexpr const char* kOps[] = {"msr_forward", "msr_backward", "msr_step"};

void register_all(torch::Library& m) {
  for (const char* name : kOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(retention, AutocastCPU, m) { register_all(m); }
TORCH_LIBRARY_IMPL(retention, AutocastCUDA, m) { register_all(m); }

}  // namespace retention
