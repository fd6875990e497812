// msr_fwd.cuh - the chunk forward kernel (chunk_fwd.cuh) of one dtype for the fused MSR layer
// and the raw op: launch_msr_chunk_pass_as<T>, instantiated in instances/msr_fwd_<dtype>.cu and
// launched by msr_fwd.cu.  Passes with neither prologue nor epilogue (the raw op, the split's
// state pass without rotation, a layer with every option off) run the kernel without fusion at
// the raw state budget; the others with MsrFusion (rotary prologue, decay normaliser / RMSNorm /
// gate epilogue; see msr_common.cuh for the design).  The same MsrFusion instantiation runs the
// two epilogue passes of the backward (msr_bwd.cu): the pass is a runtime value.
#pragma once

#include "chunk_fwd.cuh"
#include "msr_common.cuh"

namespace retention::kernels {

template <class T, bool kBackwardPasses>
struct MsrForward {
  template <int kMaxDk>
  struct Bucket {
    // fp32 MsrFusion passes with dk <= 64 use the 128 bucket: the 64 one spills on sm_80 (ptxas
    // settles on 168 registers there), and the wider bucket only pads dk.
    static constexpr int kMsrDk = sizeof(T) == 4 && kMaxDk == 64 ? 128 : kMaxDk;
    using Tr = ChunkTraits<T, kMsrDk, kBackwardPasses ? kMsrForwardStateRegs / 2 : kMsrForwardStateRegs,
                           MsrFusion<kBackwardPasses>>;
    using TrRaw = ChunkTraits<T, kMaxDk>;
    static gpu::error_t run(const MsrChunkForward& p) {
      const std::int64_t rows = p.seq.num_sequences * p.shape.H;
      if constexpr (kBackwardPasses) {  // never split (dw_partial has one row per (sequence, head))
        return launch_forward_kernel<Tr, SplitPass::kNoSplit>(p, rows, SegmentSplit{}, 1);
      } else if (p.pass == MsrPass::kSegmentStates) {
        // No epilogue and no q: the raw state budget fits, also with the rotary prologue
        // (wider dv tiles, fewer re-reads of k; with half of it ptxas spilled fp32 dk = 128).
        if (p.opt.rotary == RotaryMode::kNone && p.seq.cu_seqlens == nullptr)
          return launch_segment_states<TrRaw>(p, rows, p.segments);
        return launch_segment_states<ChunkTraits<T, kMsrDk, TrRaw::kStateRegs, MsrFusion<false>>>(p, rows, p.segments);
      } else {
        return p.pass == MsrPass::kForwardOutput && forward_without_fusion(p)
                   ? launch_forward_outputs<TrRaw>(p, rows, p.segments)
                   : launch_forward_outputs<Tr>(p, rows, p.segments);
      }
    }
  };
};

template <class T>
gpu::error_t launch_msr_chunk_pass_as(const MsrChunkForward& p) {
  const bool backward = p.pass == MsrPass::kBackwardStats || p.pass == MsrPass::kBackwardGrad;
  return backward ? dispatch_dk<MsrForward<T, true>::template Bucket>(p.shape.dk, p)
                  : dispatch_dk<MsrForward<T, false>::template Bucket>(p.shape.dk, p);
}

}  // namespace retention::kernels
