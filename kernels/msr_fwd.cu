// msr_fwd.cu - the chunk forward kernel (chunk_fwd.cuh) for the fused MSR layer and the raw op
// (chunk_fwd.cu), and its launchers.  Passes with neither prologue nor epilogue (the raw op,
// the split's state pass without rotation, a layer with every option off) run the kernel
// without fusion at the raw state budget; the others with MsrFusion (rotary prologue, decay
// normaliser / RMSNorm / gate epilogue; see msr_common.cuh for the design).  The same
// MsrFusion instantiation runs the two epilogue passes of the backward (msr_bwd.cu): the pass
// is a runtime value.
#include "chunk_fwd.cuh"
#include "msr_common.cuh"

namespace retention::kernels {
namespace {

// MsrFusion's state budget, half the raw one (BV = 64 / 32 / 16 for dk <= 64 / 128 / 256; a
// quarter, BV = 64 / 16 / 16, for the backward's epilogue passes): the rotary prologue and the
// epilogue need registers next to the state, and with the raw budget ptxas spills (the raw
// kernels already sit at 230-255 registers).
constexpr int kMsrForwardStateRegs = 32;

// The output pass runs without fusion (NoFusion: batch rows, no prologue, no epilogue).  Given
// offsets keep MsrFusion, whose value checks (value_checks.cuh) see them: with every option off
// they change nothing, but a negative one is still an error, as on the CPU.
bool forward_without_fusion(const MsrForwardParams& p) {
  return without_fusion(p) && p.seq.cu_seqlens == nullptr && p.seq.offsets == nullptr;
}

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

// dv tiles of the output pass.
std::int64_t dv_tiles(const MsrForwardParams& p) {
  const Shape& n = p.shape;
  if (n.dk > kMaxHeadDimK) return 0;
  const int bv = forward_without_fusion(p) ? tile_width<ChunkTraits<float, 64>::kStateRegs>(p.dtype, n.dk)
                                           : msr_forward_tile_width(p.dtype, n.dk, false);
  return (n.dv + bv - 1) / bv;
}

// The segment plan (chunk_common.cuh: plan_split) over the CTAs of the unsplit grid.
SegmentSplit forward_split(const MsrForwardParams& p) {
  const Shape& n = p.shape;
  const std::int64_t tiles = dv_tiles(p);
  if (p.split == 0 || tiles <= 0 || n.T <= 1 || p.seq.num_sequences * n.H <= 0) return SegmentSplit{};
  return plan_split(p.split, p.num_sms, p.seq.num_sequences * n.H * tiles, n.T, chunk_rows(p.dtype));
}

// The statistics pass is needed when the norm is on and dv spans more than one tile.
bool needs_stats_pass(const MsrForwardParams& p) { return p.opt.norm && dv_tiles(p) > 1; }

}  // namespace

// The MsrFusion tile width (MsrForward::Bucket: fp32 dk <= 64 uses the 128 bucket).
int msr_forward_tile_width(DType dtype, std::int64_t dk, bool backward_passes) {
  if (dk > kMaxHeadDimK) return 0;
  const std::int64_t bucket_dk = dtype == DType::kF32 && dk <= 64 ? 128 : dk;
  return backward_passes ? tile_width<kMsrForwardStateRegs / 2>(dtype, bucket_dk)
                         : tile_width<kMsrForwardStateRegs>(dtype, bucket_dk);
}

gpu::error_t launch_msr_chunk_pass(const MsrChunkForward& p) {
  if (p.seq.num_sequences * p.shape.H == 0 || p.shape.dv == 0) return gpu::kSuccess;
  if (gpu::error_t e = gpu::check_warp_size(); e != gpu::kSuccess) return e;
  const bool backward = p.pass == MsrPass::kBackwardStats || p.pass == MsrPass::kBackwardGrad;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return backward ? dispatch_dk<MsrForward<T, true>::template Bucket>(p.shape.dk, p)
                    : dispatch_dk<MsrForward<T, false>::template Bucket>(p.shape.dk, p);
  });
}

// Workspace: [statistics (tiles x B*T*H x 2 fp32) |
// segment states of a split ((count - 1) x N*H x dk x dv fp32)].
static std::size_t msr_stats_bytes(const MsrForwardParams& p) {
  const Shape& n = p.shape;
  return n.B > 0 && n.T > 0 && n.H > 0 && n.dv > 0 && needs_stats_pass(p)
             ? static_cast<std::size_t>(dv_tiles(p) * msr_stats_rows(n) * 2) * sizeof(float)
             : 0;
}

std::size_t msr_forward_workspace_bytes(const MsrForwardParams& p) {
  return msr_stats_bytes(p) +
         segment_states_bytes(forward_split(p), p.seq.num_sequences * p.shape.H, p.shape);
}

// Shared argument validation of the MSR launchers.
bool msr_shape_ok(const Shape& n, const MsrSequences& seq, const MsrOptions& opt, const float* log_decay) {
  // log_decay is [H]: an empty tensor (H == 0) may have no storage.
  if (n.B < 0 || n.T < 0 || n.H < 0 || n.dk < 0 || n.dv < 0 || n.dk > kMaxHeadDimK || (log_decay == nullptr && n.H > 0))
    return false;
  if (seq.num_sequences < 0 || (seq.cu_seqlens == nullptr && seq.num_sequences != n.B)) return false;
  if (seq.cu_seqlens != nullptr && n.B != 1) return false;
  if (opt.rotary != RotaryMode::kNone && opt.rotary != RotaryMode::kTorchscale && opt.rotary != RotaryMode::kNeox)
    return false;
  if (opt.rotary != RotaryMode::kNone && n.dk % 2 != 0) return false;
  return true;
}

gpu::error_t launch_msr_forward(const MsrForwardParams& p) {
  const Shape& n = p.shape;
  if (!msr_shape_ok(n, p.seq, p.opt, p.log_decay)) return gpu::kErrorInvalidValue;
  if (p.seq.num_sequences * n.H == 0 || n.dv == 0) return gpu::kSuccess;

  if (p.workspace == nullptr && msr_forward_workspace_bytes(p) > 0) return gpu::kErrorInvalidValue;
  unsigned char* const ws = static_cast<unsigned char*>(p.workspace);
  MsrChunkForward c;
  static_cast<MsrForwardParams&>(c) = p;
  c.segments = forward_split(p);
  if (c.segments.count > 1) {
    c.segments.states = reinterpret_cast<float*>(ws + msr_stats_bytes(p));
    c.segments.state_stride = p.seq.num_sequences * n.H * n.dk * n.dv;
    c.pass = MsrPass::kSegmentStates;
    if (gpu::error_t e = launch_msr_chunk_pass(c); e != gpu::kSuccess) return e;
  }
  if (needs_stats_pass(p)) {
    c.stats = reinterpret_cast<float*>(ws);
    c.pass = MsrPass::kForwardStats;
    c.final_state = nullptr;
    if (gpu::error_t e = launch_msr_chunk_pass(c); e != gpu::kSuccess) return e;
  }
  c.pass = MsrPass::kForwardOutput;
  c.final_state = p.final_state;
  return launch_msr_chunk_pass(c);
}

}  // namespace retention::kernels
