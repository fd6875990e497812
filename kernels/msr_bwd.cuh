// msr_bwd.cuh - the two backward sweeps of chunk_bwd.cuh of one dtype, for the fused MSR
// layer and the raw op: launch_msr_backward_sweeps_as<T>, instantiated in
// instances/msr_bwd_<dtype>.cu and launched by msr_bwd.cu (step 3 of its plan).
#pragma once

#include "chunk_bwd.cuh"
#include "msr_common.cuh"

namespace retention::kernels {

template <class T>
struct MsrSweeps {
  template <int kMaxDk>
  struct Bucket {
    // MsrFusion<true> for its sequence map alone: q~ / k~ come pre-rotated, so the sweeps carry no
    // prologue (the raw op runs these same sweeps, its batch rows as sequences).
    static gpu::error_t run(const MsrChunkBackward& p, const BackwardPlan& plan) {
      using Fusion = MsrFusion<true>;
      return launch_backward_sweeps<ChunkTraits<T, kMaxDk, 64, Fusion>, ChunkTraits<T, kMaxDk, 32, Fusion>>(
          p, p.seq.num_sequences * p.shape.H, plan);
    }
  };
};

template <class T>
gpu::error_t launch_msr_backward_sweeps_as(const MsrChunkBackward& p, const BackwardPlan& plan) {
  return dispatch_dk<MsrSweeps<T>::template Bucket>(p.shape.dk, p, plan);
}

}  // namespace retention::kernels
