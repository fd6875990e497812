// msr_fwd.cu - the launchers of the chunk forward for the fused MSR layer and the raw op
// (chunk_fwd.cu): the pass plan (split, statistics, output), its workspace and its argument
// checks.  The kernels' instantiations are in msr_fwd.cuh, one dtype per translation unit.
#include "msr_common.cuh"

namespace retention::kernels {
namespace {

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
  return dispatch_dtype(p.dtype, [&](auto t) { return launch_msr_chunk_pass_as<decltype(t)>(p); });
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
