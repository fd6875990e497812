// The chunk forward kernels of the fused MSR layer and the raw op for float (msr_fwd.cuh).
#include "../msr_fwd.cuh"

namespace retention::kernels {
template gpu::error_t launch_msr_chunk_pass_as<float>(const MsrChunkForward& p);
}  // namespace retention::kernels
