// The chunk backward sweeps of the fused MSR layer and the raw op for float (msr_bwd.cuh).
#include "../msr_bwd.cuh"

namespace retention::kernels {
template gpu::error_t launch_msr_backward_sweeps_as<float>(const MsrChunkBackward& p, const BackwardPlan& plan);
}  // namespace retention::kernels
