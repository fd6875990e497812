// The chunk backward sweeps of the fused MSR layer and the raw op for bf16_t (msr_bwd.cuh).
#include "../msr_bwd.cuh"

namespace retention::kernels {
template gpu::error_t launch_msr_backward_sweeps_as<bf16_t>(const MsrChunkBackward& p, const BackwardPlan& plan);
}  // namespace retention::kernels
