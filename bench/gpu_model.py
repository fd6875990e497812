"""Performance model of the GPU kernels (kernels/*.cu) on H100 and H200, checked later by
measurements (bench/gpu_bench.py on the GPU machine).

For each op and shape it counts, from the kernels' real tiling (ChunkTraits of
kernels/chunk_common.cuh, printed by bench/chunk_traits.cpp, which this script compiles for the
host) and the launch grids of kernels/*.cu (mirrored below):

  * FLOPs: the algorithm's (each product of the chunkwise math once, C = 64) and as launched
    (every dv tile recomputes Q K^T, partial tiles are padded to whole MMA tiles);
  * HBM bytes: the minimum (every input read once, every output written once) and as designed
    (q / k re-read by every dv tile unless the tiles of a head are resident together, the fp32
    dq / dk partial slices of the backward and their cast);
  * CTAs, threads, registers (from the ptxas report), shared memory, CTAs per SM and the limiter,
    waves on 132 SMs;
  * predicted time on H100 and H200 (model below), for the kernels as they are and after each of
    the two changes for small grids and memory traffic (both in place): the sequence split, and q / k
    reuse across dv tiles (with the old launch order, and the model's own best backward split, beside).

Time model (per kernel; every constant is in DEVICES / ASSUMPTIONS / CALIBRATED and printed with the table):
a wave is the CTAs that are resident together (c per SM); each CTA walks its chunks one after
another, and one chunk step of an SM takes the longest of
    own latency:   (dependent global round trips) * L_mem + (one CTA's MMA work) / (SM rate)
                   + (one CTA's bytes per step) / (what one SM can pull)
    shared MMA:    c * (one CTA's MMA work) / (SM rate)
    shared bytes:  c * (one CTA's HBM bytes per chunk) / (SM share of the bandwidth)
so t = waves * chunks * step.  The round trips are the synchronous loads of the kernels (no
double buffering today): v (and dO), then q / k for each dk tile.  Decode kernels use the same
form with their own loops.  Ops add a fixed gap per launch.

Measured columns: `--measured BENCH.json` (the JSON lines written by bench/gpu_bench.py, or the
gpu_check.json of bench/gpu_check.sh) adds, per row, the measured time, measured / predicted,
and FLA's and SDPA's times at the same shape when present.

Calibration (docs/gpu-model-calibration.md): the three device constants that are fitted
(CALIBRATED: MMA efficiency, round-trip latency, launch gap) come from FLA's published H100
times, with FLA's own kernels modelled the same way as FLA launches them (chunk_fwd_h,
chunk_fwd_o; in the backward chunk_fwd_h again in fp32, chunk_bwd_dh, chunk_bwd_dqkwg,
chunk_bwd_dv: their grids, autotune configs, estimated registers and shared memory, bytes and
FLOPs), plus FLA's wrapper and host time.  Helion's kernels are modelled too, as a check that
was not fitted.  `--calibrate` prints the table (model vs published, per kernel) and the
re-prediction of our kernels with the same constants; `--calibrate --fit` repeats the fit.

Usage:
  python3 bench/gpu_model.py                          # table to bench/results/gpu_model_<date>_<commit>.md
  python3 bench/gpu_model.py --calibrate [--fit]      # calibration on FLA + re-prediction (stdout)
  python3 bench/gpu_model.py --measured run/bench.json --out-dir bench/results
  python3 bench/gpu_model.py --stdout                 # print only
Registers come from the ptxas reports of the sm_90 compiles: build/gpu-check/logs (written by
.ci/gpu_compile_check.sh) or build/gpu-carry/logs (bench/gpu_prepare.sh); --ptxas-dir overrides.
"""

import argparse
import datetime
import glob
import json
import math
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ----------------------------------------------------------------------------------------------
# Machines and assumptions
# ----------------------------------------------------------------------------------------------
# hbm: bandwidth the kernels can reach (read + write).  H100 SXM: 3.35 TB/s datasheet, 3.0 as in
# ../shared/reference/performance.md.  H200: 4.8 TB/s datasheet; a large device-to-device copy
# measured about 4.3 TB/s on one.  mma: dense bf16 tensor rate of a large GEMM (about 790 TFLOP/s
# was measured on an H200 with cuBLAS; 800 is performance.md's figure for both), times the
# efficiency below.
DEVICES = {
    "H100": {"sms": 132, "hbm_TBps": 3.0, "gemm_TFLOPs": 800.0},
    "H200": {"sms": 132, "hbm_TBps": 4.3, "gemm_TFLOPs": 800.0},
}
# The three device constants that are fitted, in one place.  Fitted on FLA's twelve published
# H100 rows only (FLA's kernels modelled as FLA launches them, section "FLA's chunk_retention"
# below; `python3 bench/gpu_model.py --calibrate --fit` repeats the fit, and
# docs/gpu-model-calibration.md has the table), then used unchanged for our kernels:
#   mma_efficiency  fraction of the GEMM rate that a chunk kernel's small (64-row) tile MMAs reach
#   mem_latency_us  one dependent global-memory round trip, barrier included (load, sync, use)
#   launch_gap_us   gap between back-to-back kernels on the stream (not the host's op overhead)
CALIBRATED = {"mma_efficiency": 0.2, "mem_latency_us": 0.9, "launch_gap_us": 0.5}
# What they were before the calibration (guesses: performance.md's 40-60 % of the GEMM rate for
# chunk kernels, a typical loaded DRAM latency, a typical launch gap).
PRE_CALIBRATION = {"mma_efficiency": 0.5, "mem_latency_us": 0.7, "launch_gap_us": 1.5}
ASSUMPTIONS = dict(
    CALIBRATED,
    # An SM alone can pull more than its 1/132 share of HBM bandwidth: cap at this multiple.
    sm_bandwidth_share_max=4.0,
    # Sequence split: segments are at least this many chunks long (kSplitMinChunks, kernels/chunk_common.cuh).
    split_min_chunks=4,
)
# Hopper SM limits used for occupancy (compute capability 9.0).
SM_LIMITS = {"regs": 65536, "threads": 2048, "ctas": 32, "smem": 228 * 1024, "smem_per_cta_reserved": 1024,
             "reg_alloc_unit": 256}

# Shapes: FLA's benchmark shapes, RetNet's head shape (dk=256, dv=512), decode.
# (label, B, T, H, dk, dv)
CHUNK_SHAPES = [
    ("FLA", 1, 8192, 96, 128, 128),
    ("FLA", 2, 16384, 16, 128, 128),
    ("FLA", 4, 2048, 16, 128, 128),
    ("FLA", 8, 2048, 32, 256, 256),
    ("RetNet", 8, 8192, 8, 256, 512),
    ("RetNet", 1, 32768, 8, 256, 512),
]
DECODE_SHAPES = [(B, H, dk, dv) for dk, dv in ((128, 128), (256, 512)) for B in (1, 8, 64) for H in (8, 16)]

# FLA chunk_retention on H100, bf16, ms (fwd, fwd+bwd): pytorch/helion examples/fla/BENCHMARKS.md,
# a third party's measurement, quoted in ../shared/reference/performance.md.
FLA_H100 = {(1, 8192, 96, 128, 128): (0.961, 3.426), (2, 16384, 16, 128, 128): (0.868, 2.776),
            (4, 2048, 16, 128, 128): (0.358, 1.225), (8, 2048, 32, 256, 256): (1.598, 9.079)}

ELEM = 2  # bf16 inputs and outputs; states and workspaces fp32


# ----------------------------------------------------------------------------------------------
# Tiling: ChunkTraits of the kernels themselves (bench/chunk_traits.cpp prints them)
# ----------------------------------------------------------------------------------------------
def bucket(dk):
    """dispatch_dk: the register-tiling bucket of a runtime dk."""
    return 64 if dk <= 64 else 128 if dk <= 128 else 256


_TRAITS = None


def kernel_traits():
    """{(elem, max_dk, state_regs): ChunkTraits} from bench/chunk_traits.cpp, compiled for the host
    against kernels/chunk_common.cuh ($CXX, else c++) once per process."""
    global _TRAITS
    if _TRAITS is None:
        import tempfile
        cxx = os.environ.get("CXX", "c++")
        with tempfile.TemporaryDirectory() as tmp:
            exe = os.path.join(tmp, "chunk_traits")
            cmd = [cxx, "-std=c++17", "-DRETENTION_HOST_EMU", "-DRETENTION_EMU_WARP=32",
                   "-I" + os.path.join(ROOT, "kernels"), os.path.join(HERE, "chunk_traits.cpp"), "-o", exe]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                rows = json.loads(subprocess.run([exe], check=True, capture_output=True, text=True).stdout)
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                raise SystemExit(f"gpu_model: cannot build bench/chunk_traits.cpp ({' '.join(cmd)}):\n{detail}")
        _TRAITS = {(r["elem"], r["max_dk"], r["state_regs"]): r for r in rows}
    return _TRAITS


def chunk_traits(max_dk, state_regs, elem=ELEM):
    key = (elem, max_dk, state_regs)
    if key not in kernel_traits():
        raise KeyError(f"bench/chunk_traits.cpp prints no ChunkTraits for (elem, max_dk, state_regs) = {key}")
    return kernel_traits()[key]


# State budgets of the launchers (chunk_fwd.cu: ChunkTraits<T, kMaxDk>; chunk_bwd.cu: the dq sweep
# with the default 64, the dk/dv sweep with 32).
STATE_REGS = {"chunk_forward": 64, "chunk_backward_dq": 64, "chunk_backward_dkv": 32}
SMEM_KEY = {"chunk_forward": "smem_fwd", "chunk_backward_dq": "smem_dq", "chunk_backward_dkv": "smem_dkv"}
STEP_COLS, STEP_GROUPS, STEP_ROWS_IN_FLIGHT = 64, 4, 8  # msr_step.cu
STEP_CTAS_PER_SM, STEP_COUNTERS = 4, 1024  # kStepCtasPerSm (msr_step.cu), kMsrStepCounters (msr_kernels.h)
STEP_MIN_SLICE_ROWS = STEP_GROUPS * STEP_ROWS_IN_FLIGHT


# ----------------------------------------------------------------------------------------------
# ptxas reports
# ----------------------------------------------------------------------------------------------
def default_ptxas_dir():
    for d in (os.path.join(ROOT, "build", "gpu-check", "logs"), os.path.join(ROOT, "build", "gpu-carry", "logs")):
        if glob.glob(os.path.join(d, "nvcc_*_sm90.log")):
            return d
    return None


def demangle(names):
    try:
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return r.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def parse_ptxas(log_dir):
    """{kernel key: {"regs", "smem_static", "spill"}} from nvcc -Xptxas -v logs of sm_90.

    Keys: ("chunk_forward", T, max_dk, state_regs) for the raw forward (NoFusion) and the
    backward sweeps (MsrFusion<true>: the raw backward runs the fused layer's sweeps), and
    ("recurrent_step", T) / ("msr_step", T) for the decode steps."""
    entries = []
    for path in sorted(glob.glob(os.path.join(log_dir, "nvcc_*_sm90.log"))):
        name = None
        smem = 0
        spill = 0
        for line in open(path, errors="replace"):
            m = re.search(r"Compiling entry function '([^']+)' for 'sm_90'", line)
            if m:
                name, smem, spill = m.group(1), 0, 0
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                spill = int(m.group(1)) + int(m.group(2))
            m = re.search(r"Used (\d+) registers.*?(?:, (\d+) bytes smem)?$", line.strip())
            if m and name:
                sm = re.search(r"(\d+) bytes smem", line)
                entries.append((name, int(m.group(1)), int(sm.group(1)) if sm else smem, spill))
                name = None
    out = {}
    for (mangled, regs, smem, spill), pretty in zip(entries, demangle([e[0] for e in entries])):
        t = re.search(r"(?:ChunkTraits|_kernel)<(?:retention::kernels::)?(f16_t|bf16_t|float)\b", pretty)
        dtype = {"f16_t": "f16", "bf16_t": "bf16", "float": "f32"}[t.group(1)] if t else None
        m = re.search(r"(chunk_forward|chunk_backward_dq|chunk_backward_dkv)_kernel<retention::kernels::"
                      r"ChunkTraits<[^,]+, (\d+), (\d+), retention::kernels::(NoFusion|MsrFusion<true> ?)>", pretty)
        if m and (m.group(4) == "NoFusion") == (m.group(1) == "chunk_forward"):
            # <Tr, SplitPass> (forward, dk/dv sweep): 1 = the split's state-only pass, 2 = its
            # segment pass; <Tr, bool> (dq sweep): true = segment pass; 0 / false = no split
            # (kernels/chunk_common.cuh)
            p = re.match(r", (?:\(retention::kernels::SplitPass\)(\d)|(true|false))>", pretty[m.end():])
            code = (p.group(1) or {"true": "2", "false": "0"}[p.group(2)]) if p else "0"
            kind = m.group(1) + {"1": "_state", "2": "_segments"}.get(code, "")
            out[(kind, dtype, int(m.group(2)), int(m.group(3)))] = {"regs": regs, "smem_static": smem,
                                                                   "spill": spill}
            continue
        m = re.search(r"(recurrent_step|msr_step)_kernel<", pretty)
        if m and dtype:
            out[(m.group(1), dtype)] = {"regs": regs, "smem_static": smem, "spill": spill}
    return out


# ----------------------------------------------------------------------------------------------
# Occupancy
# ----------------------------------------------------------------------------------------------
def occupancy(threads, regs, smem):
    """(CTAs per SM, limiter) on Hopper.  regs None (no ptxas report) -> registers not counted."""
    limits = {"threads": SM_LIMITS["threads"] // threads, "ctas": SM_LIMITS["ctas"]}
    if regs:
        unit = SM_LIMITS["reg_alloc_unit"]
        per_warp = -(-regs * 32 // unit) * unit
        warps_by_regs = SM_LIMITS["regs"] // per_warp
        limits["regs"] = warps_by_regs // (threads // 32)
    if smem:
        limits["smem"] = SM_LIMITS["smem"] // (smem + SM_LIMITS["smem_per_cta_reserved"])
    lim = min(limits, key=limits.get)
    return limits[lim], lim


# ----------------------------------------------------------------------------------------------
# Kernel descriptions.  Each is a dict: grid CTAs, threads, smem, regs, chunks per CTA, and per
# CTA and chunk: dependent round trips, MMA FLOPs, HBM bytes; plus totals.
# ----------------------------------------------------------------------------------------------
def chunk_kernel(kind, B, T, H, dk, dv, ptx, *, qk_reuse=True, segments=1):
    """One chunk sweep (forward, dq sweep or dk/dv sweep) as launched today (qk_reuse=True: dv
    tiles fastest in launch order; segments=1) or with the old launch order (qk_reuse=False) or
    the sequence split (segments > 1).  Bytes and FLOPs are per token-head below, times B*H*T."""
    tr = chunk_traits(bucket(dk), STATE_REGS[kind])
    bt, bk, bv = tr["BT"], tr["BK"], tr["BV"]
    kt_used = -(-dk // bk)
    n_vt = -(-dv // bv)
    dkp, bvp = kt_used * bk, bv  # padded to whole tiles
    chunks = -(-T // bt)
    rec = ptx.get((kind, "bf16", bucket(dk), STATE_REGS[kind]), {}) if ptx else {}
    regs = rec.get("regs")
    smem = tr[SMEM_KEY[kind]]
    ctas = B * H * n_vt * segments
    per_sm, limiter = occupancy(tr["threads"], regs, smem)
    slots = DEVICES["H200"]["sms"] * per_sm
    # How many times the q / k (or k / workspace) rows of one head come from HBM: once when all
    # dv tiles of the head are resident together (today's launch order puts them next to each
    # other: kernels/chunk_common.cuh, chunk_cta), else once per wave that holds some of them
    # (the old order: tiles of one head B*H CTAs apart).
    reads = 1 if (qk_reuse or ctas <= slots) else min(n_vt, -(-ctas // slots))
    e = ELEM
    if kind == "chunk_forward":
        # per chunk and CTA: v tile (1 round trip), then q, k per dk tile
        trips = 1 + kt_used
        fl_cta = 2 * bt * bt * dkp + 2 * bt * dkp * bvp * 2 + 2 * bt * bt * bvp  # QK^T, QS, K^T Vd, AV
        min_b = e * (2 * dk + 2 * dv)
        hbm_b = e * (2 * dk * reads + 2 * dv)
        alg_fl = 2 * bt * dk + 2 * bt * dv + 4 * dk * dv
    elif kind == "chunk_backward_dq":
        trips = 1 + kt_used  # v and dO, then k per dk tile
        fl_cta = 2 * bt * bt * bvp + 2 * bt * dkp * bvp * 2 + 2 * bt * bt * dkp  # dO V^T, dO S^T, K^T Vd, D K
        # reads k (per tile pass), v, dO; dq partials: fp32 slices stored by the first dv-tile pass
        # and read-modify-written by the others, in HBM once per pass that does not find them in L2
        min_b = e * (dk + 2 * dv)
        hbm_b = e * (dk * reads + 2 * dv) + 8 * dk * reads
        alg_fl = 2 * bt * dv + 2 * bt * dk + 4 * dk * dv
    else:  # chunk_backward_dkv
        trips = 1 + kt_used  # v and dO, then q, k per dk tile
        fl_cta = (2 * 2 * bt * bt * bvp  # dO V^T, (K Q^T .* M) dO
                  + 2 * 2 * bt * bt * dkp  # K Q^T, D^T Q
                  + 3 * 2 * bt * dkp * bvp)  # K dH, V dH^T, Q^T dOd
        min_b = e * (2 * dk + 3 * dv)  # q, k, v, dO in; dv out (dk via the workspace, below)
        hbm_b = e * (2 * dk * reads + 3 * dv) + 8 * dk * reads
        alg_fl = 4 * bt * dv + 4 * bt * dk + 6 * dk * dv
    tokens = B * H * T
    designed_fl = fl_cta * n_vt * chunks * B * H
    return {"kernel": kind, "grid": f"{n_vt * segments}x{B * H}", "ctas": ctas, "threads": tr["threads"],
            "BV": bv, "dv_tiles": n_vt, "regs": regs, "smem": smem, "per_sm": per_sm, "limiter": limiter,
            "chunks": -(-chunks // segments), "trips": trips, "cta_flops": fl_cta,
            "flops_alg": alg_fl * tokens, "flops": designed_fl, "bytes_min": min_b * tokens,
            "bytes": hbm_b * tokens, "qk_reads": reads}


def elementwise_kernel(name, nbytes, ctas=None):
    """memset / cast / scan kernels: pure bandwidth."""
    return {"kernel": name, "grid": "-", "ctas": ctas or 0, "threads": 256, "BV": None, "dv_tiles": None,
            "regs": None, "smem": 0, "per_sm": None, "limiter": "-", "chunks": 1, "trips": 1, "cta_flops": 0,
            "flops_alg": 0, "flops": 0, "bytes_min": 0, "bytes": nbytes, "qk_reads": None,
            "stream": True}


def step_plan(B, H, dk, dv, norm, may_split, sms=132):
    """plan_step of msr_step.cu: (CTAs along dv, dk slices, rows per slice, meet)."""
    heads, col_tiles = B * H, -(-dv // STEP_COLS)
    if not may_split or heads > STEP_COUNTERS or heads * (1 if norm else col_tiles) >= sms:
        return (1 if norm else col_tiles), 1, dk, False
    want = STEP_CTAS_PER_SM * sms // (heads * col_tiles)
    slices = max(1, min(want, -(-dk // STEP_MIN_SLICE_ROWS)))
    rows = (-(-dk // slices) + STEP_GROUPS - 1) // STEP_GROUPS * STEP_GROUPS
    slices = -(-dk // rows)
    return col_tiles, slices, rows, slices > 1 or (norm and col_tiles > 1)


def decode_kernel(kind, B, H, dk, dv, ptx):
    # One kernel serves both steps (msr_step.cu; the raw step is it without prologue/epilogue,
    # and never split: it has no workspace).
    rec = ptx.get(("msr_step", "bf16"), {}) if ptx else {}
    regs = rec.get("regs")
    smem = rec.get("smem_static", 0)
    threads = STEP_COLS * STEP_GROUPS
    norm = kind == "msr_step"
    col_grid, slices, rows, meet = step_plan(B, H, dk, dv, norm, may_split=norm)
    col_blocks = -(-dv // STEP_COLS)
    # Each thread issues STEP_ROWS_IN_FLIGHT state loads before its first store (the compiler
    # cannot hoist a load above a store that may alias it, so the kernel batches them by hand):
    # a column block costs ceil(rows / 4 / 8) dependent round trips, plus the barrier of the
    # q S reduction.  The first batch goes out with the prologue's loads (q / k / v, the decay),
    # before the rotary angles, so one round trip covers the prologue and that batch.
    trips_block = -(-(-(-rows // STEP_GROUPS)) // STEP_ROWS_IN_FLIGHT) + 1
    blocks_per_cta = -(-col_blocks // col_grid)
    trips = blocks_per_cta * trips_block  # the prologue rides on the first batch
    if meet:  # slots stored and fenced, the ticket (an atomic), the last CTA reads the slots
        trips += 3
    ctas = B * H * col_grid * slices
    per_sm, limiter = occupancy(threads, regs, smem)
    if regs is None:  # no ptxas report: the register budget of __launch_bounds__
        per_sm, limiter = min(per_sm, STEP_CTAS_PER_SM), "regs"
    nbytes = B * H * (8 * dk * dv + ELEM * (2 * dk + 2 * dv))
    ws = 8 * B * H * slices * dv if meet else 0  # partial u written and read once (as HBM: an upper bound)
    return {"kernel": kind, "grid": f"{B * H}x{col_grid}x{slices}", "ctas": ctas, "threads": threads, "BV": None,
            "dv_tiles": col_blocks, "regs": regs, "smem": smem, "per_sm": per_sm, "limiter": limiter, "chunks": 1,
            "trips": trips, "cta_flops": 0, "flops_alg": 4 * B * H * dk * dv, "flops": 4 * B * H * dk * dv,
            "bytes_min": nbytes, "bytes": nbytes + ws, "qk_reads": None}


def kernel_time_us(k, dev, a=None):
    """Predicted time of one kernel; `a` = the constants (default ASSUMPTIONS)."""
    d, a = DEVICES[dev], a or ASSUMPTIONS
    bw = d["hbm_TBps"] * 1e12
    if k.get("stream"):
        return k["bytes"] / bw * 1e6
    sms = d["sms"]
    sm_rate = d["gemm_TFLOPs"] * 1e12 * a["mma_efficiency"] / sms
    per_sm = k["per_sm"] or 1
    active = min(sms, k["ctas"])
    c = min(per_sm, -(-k["ctas"] // sms))  # CTAs sharing an SM in a full wave
    waves = -(-k["ctas"] // (sms * c))
    sm_bw = min(bw / active, a["sm_bandwidth_share_max"] * bw / sms)
    # a CTA of fewer than 4 warps reaches only warps/4 of the SM's tensor cores (one per
    # sub-partition); our kernels have 4 warps, FLA's Triton configs 1 to 8 (mma_share)
    # the HBM bytes of one CTA's chunk step, on average (q / k repeats served by L2 excluded)
    step_bytes = k["bytes"] / (k["ctas"] * k["chunks"])
    # A CTA waits for its loads: each dependent round trip costs the latency, and the data it
    # brings arrives no faster than one SM can pull (sm_bandwidth_share_max shares); loads that
    # a software pipeline issues ahead (FLA's state loops) expose only part of it (exposed_frac).
    own = (k["trips"] * a["mem_latency_us"] * 1e-6
           + k["cta_flops"] / (sm_rate * k.get("mma_share", 1.0))
           + (k.get("exposed_frac", 1.0) * step_bytes + k.get("local_bytes", 0))
           / (a["sm_bandwidth_share_max"] * bw / sms))
    shared_mma = c * k["cta_flops"] / sm_rate
    shared_bytes = c * step_bytes / sm_bw
    step = max(own, shared_mma, shared_bytes)
    chain = waves * k["chunks"] * step
    # whole-kernel floors: designed bytes over the bandwidth, FLOPs over the tensor rate
    floor_bytes, floor_mma = k["bytes"] / bw, k["flops"] / (sm_rate * sms)
    t = max(chain, floor_bytes, floor_mma)
    if t == chain:
        bound = "latency" if step == own else "mma" if step == shared_mma else "bandwidth"
    else:
        bound = "bandwidth" if floor_bytes >= floor_mma else "mma"
    k.setdefault("bound", {})[dev] = bound
    k["waves"] = waves
    k["wave_fill"] = k["ctas"] / (sms * per_sm)
    return t * 1e6


# ----------------------------------------------------------------------------------------------
# Ops: which kernels each op launches, as designed and after the planned changes
# ----------------------------------------------------------------------------------------------
def split_segments(B, H, dk, dv, T, kind, ptx, qk_reuse=True):
    """Planned sequence split: the number of segments S (a power of two, segments at least
    split_min_chunks long) that gives this sweep the shortest predicted H200 time, S = 1 (no split)
    included.  The launcher would pick S from the grid size and the SM count; the model shows
    which S that should be."""
    chunks = -(-T // chunk_traits(bucket(dk), STATE_REGS[kind])["BT"])
    best, best_t, s = 1, None, 1
    while chunks // s >= ASSUMPTIONS["split_min_chunks"] or s == 1:
        ks = split_extras(kind, B, T, H, dk, dv, s, ptx, qk_reuse) + [
            split_kernel(kind, B, T, H, dk, dv, ptx, qk_reuse, s)]
        t = op_time_us(ks, "H200")
        if best_t is None or t < best_t:
            best, best_t = s, t
        s *= 2
    return best


def dv_partials(nvt, rows, target=256, most=8):
    """dv-tile groups of a backward sweep (dv_partials in kernels/chunk_bwd.cuh)."""
    parts = max(1, min(-(-target // rows) if rows > 0 else 1, nvt, most))
    return -(-nvt // -(-nvt // parts))


def launcher_segments(B, T, H, dk, dv, sms=132, kind="chunk_forward"):
    """The launchers' automatic split (plan_split in kernels/chunk_common.cuh): when the
    unsplit grid has fewer CTAs than SMs, as many segments as fit in two waves (rounded down), each at least
    split_min_chunks whole chunks.  The forward plans on its grid, each backward sweep
    (plan_backward in kernels/chunk_bwd.cuh) on its own: B*H rows x its dv groups."""
    tr = chunk_traits(bucket(dk), STATE_REGS[kind])
    bt = tr["BT"]
    n_vt = -(-dv // tr["BV"])
    ctas = B * H * (n_vt if kind == "chunk_forward" else dv_partials(n_vt, B * H))
    if ctas >= sms:
        return 1
    count = min(2 * sms // ctas, -(-T // bt) // ASSUMPTIONS["split_min_chunks"])
    if count <= 1:
        return 1
    length = -(-(-(-T // count)) // bt) * bt
    return -(-T // length)


def split_kernel(kind, B, T, H, dk, dv, ptx, qk_reuse, S):
    k = chunk_kernel(kind, B, T, H, dk, dv, ptx, qk_reuse=qk_reuse, segments=S)
    k["segments"] = S
    if S > 1:  # the segment pass is its own instantiation
        rec = ptx.get((kind + "_segments", "bf16", bucket(dk), STATE_REGS[kind]), {}) if ptx else {}
        k["regs"] = rec.get("regs")
        k["per_sm"], k["limiter"] = occupancy(k["threads"], k["regs"], k["smem"])
    if S > 1:
        k["bytes"] += 4 * dk * dv * B * H * S  # each segment reads its incoming state
    return k


def split_extras(kind, B, T, H, dk, dv, S, ptx, qk_reuse):
    """Extra kernels of the split path: a pass computing each segment's local state (it reads the
    operands of the state update: k and v for the forward and dq sweeps, q and dO for the dk/dv
    sweep), and the scan over segments (reads the local states, writes the incoming ones)."""
    if S == 1:
        return []
    base = chunk_kernel(kind, B, T, H, dk, dv, ptx, qk_reuse=qk_reuse, segments=S)
    tr = chunk_traits(bucket(dk), STATE_REGS[kind])
    kt = -(-dk // tr["BK"])
    local = dict(base)
    local["kernel"] = kind + "/local_state"
    # its own instantiation (state-only): registers from ptxas.  The dq sweep's is the forward's
    # (the raw forward's tiling; the backward launches the fused layer's instantiation of it).
    state_kind = "chunk_backward_dkv_state" if kind == "chunk_backward_dkv" else "chunk_forward_state"
    rec = ptx.get((state_kind, "bf16", bucket(dk), STATE_REGS[kind]), {}) if ptx else {}
    local["regs"] = rec.get("regs")
    local["per_sm"], local["limiter"] = occupancy(local["threads"], local["regs"], local["smem"])
    local["trips"] = 1 + kt
    local["cta_flops"] = 2 * tr["BT"] * kt * tr["BK"] * tr["BV"]
    tokens = B * H * T
    local["flops"] = 2 * dk * dv * tokens
    local["flops_alg"] = local["flops"]
    local["bytes"] = ELEM * (dk * base["qk_reads"] + dv) * tokens + 4 * dk * dv * B * H * S
    local["bytes_min"] = 0
    scan = elementwise_kernel(kind + "/scan", 2 * 4 * dk * dv * B * H * S)
    return [local, scan]


def op_kernels(op, shape, ptx, *, split=False, qk_reuse=True):
    if op in ("decode_step", "msr_step"):
        B, H, dk, dv = shape
        return [decode_kernel("recurrent_step" if op == "decode_step" else "msr_step", B, H, dk, dv, ptx)]
    B, T, H, dk, dv = shape
    kinds = ["chunk_forward"] if op == "chunk_fwd" else ["chunk_forward", "chunk_backward_dq", "chunk_backward_dkv"]
    ks = []
    for kind in kinds:
        # As launched: both directions split automatically (each backward sweep on its own
        # grid); split=True puts the model's best S for each backward sweep in its place.
        if not qk_reuse:
            S = 1
        elif kind != "chunk_forward" and split:
            S = split_segments(B, H, dk, dv, T, kind, ptx, qk_reuse)
        else:
            S = launcher_segments(B, T, H, dk, dv, kind=kind)
        ks += split_extras(kind, B, T, H, dk, dv, S, ptx, qk_reuse)
        ks.append(split_kernel(kind, B, T, H, dk, dv, ptx, qk_reuse, S))
    if op == "chunk_fwdbwd":  # cast: read both fp32 workspaces, write dq and dk
        ks.append(elementwise_kernel("cast_grads", (8 + 2 * ELEM) * B * H * T * dk))
    return ks


def op_time_us(ks, dev, a=None):
    a = a or ASSUMPTIONS
    return sum(kernel_time_us(k, dev, a) for k in ks) + a["launch_gap_us"] * (len(ks) - 1)


def op_minimums(op, shape):
    """(algorithmic FLOPs, minimal HBM bytes) of the whole op."""
    if op in ("decode_step", "msr_step"):
        B, H, dk, dv = shape
        return 4 * B * H * dk * dv, B * H * (8 * dk * dv + ELEM * (2 * dk + 2 * dv))
    B, T, H, dk, dv = shape
    tok = B * H * T
    fwd_fl = (2 * 64 * (dk + dv) + 4 * dk * dv) * tok
    fwd_b = ELEM * (2 * dk + 2 * dv) * tok
    if op == "chunk_fwd":
        return fwd_fl, fwd_b
    # backward: read q, k, v, dO, write dq, dk, dv; FLOPs of both sweeps as the math needs them
    bwd_fl = (2 * 64 * (3 * dk + 2 * dv) + 10 * dk * dv) * tok
    return fwd_fl + bwd_fl, fwd_b + ELEM * (4 * dk + 3 * dv) * tok


# ----------------------------------------------------------------------------------------------
# FLA's chunk_retention as FLA launches it, and the calibration of the device constants on it
# ----------------------------------------------------------------------------------------------
# Read from the fla-core 0.6.0 wheel: fla/ops/retention/chunk.py -> fla/ops/simple_gla/chunk.py
# (chunk_simple_gla with g_gamma) -> fla/ops/common/chunk_h.py (chunk_fwd_kernel_h,
# chunk_bwd_kernel_dh) and fla/ops/common/chunk_o.py (chunk_fwd_kernel_o,
# chunk_bwd_kernel_dqkwg, chunk_bwd_kernel_dv).  The published numbers below were taken in
# mid-2026 with FLA 0.5.x, whose kernels have the same grids, tiles, loops and autotune spaces
# (0.6 replaced their block pointers by pointer arithmetic and added K, V to chunk_h's autotune
# key: fla_autotune_key); the retention wrapper differs (fla_launches).  On Hopper the TileLang backend of
# chunk_bwd_dqkwg refuses g_gamma and fp32 states, so retention runs the Triton kernels.
#
# Published H100 times (bf16, ms, forward / forward+backward), pytorch/helion
# examples/fla/BENCHMARKS.md at commit fea89d20: a third party's measurement of FLA's
# chunk_retention beside Helion's generated kernels ("quick" autotune).  Timing: Triton-style
# do_bench (L2 flushed before every repetition, CUDA events around one call, mean), no CUDA graph.
# (B, T, H, D) with dk = dv = D.  These are the twelve rows the constants are fitted on (FLA's
# only); Helion's are never used in a fit.
PUBLISHED_H100 = {
    (1, 8192, 96, 128): {"fla": (0.961, 3.426), "helion": (0.691, 2.057)},
    (2, 16384, 16, 128): {"fla": (0.868, 2.776), "helion": (0.466, 1.380)},
    (4, 2048, 16, 128): {"fla": (0.358, 1.225), "helion": (0.164, 0.758)},
    (4, 4096, 64, 128): {"fla": (1.147, 4.524), "helion": (0.905, 6.260)},
    (8, 2048, 32, 256): {"fla": (1.598, 9.079), "helion": (1.271, 3.909)},
    (8, 1024, 8, 64): {"fla": (0.316, 1.299), "helion": (0.151, 0.824)},
}
# FLA's host time (Python, autograd, Triton's launcher) is not a device constant and is not
# fitted: it comes from FLA's own H100 table (README 2025-03 to 2026-04, benchmark_retention.py,
# CUDA_LAUNCH_BLOCKING=1), whose shortest row is launch and host cost alone: B4 H8 D256 T=128,
# chunk forward 0.264 ms, forward+backward 1.302 ms.  With launch blocking every launch is
# synchronous, so anchor = sum over launches of (host + launch gap + kernel); the host share of
# each phase is what is left after the model's own kernel times at that shape
# (fla_host_per_launch_us), spread evenly over the phase's launches.
FLA_HOST_ANCHOR = {"shape": (4, 128, 8, 256), "fwd_ms": 0.264, "fwdbwd_ms": 1.302}
# do_bench flushes L2 by zeroing 256 MB just before the start event: while that runs, a host
# that does not synchronise already issues the call's first launches.
L2_FLUSH_BYTES = 256e6

# The device constants that the fit may change (and nothing else), with the grid it searches.
FIT_GRID = {
    "mma_efficiency": [0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8],
    "mem_latency_us": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0],
    "launch_gap_us": [0.5, 1.0, 2.0, 4.0],
}

FLA_BT = 64  # chunk_size default
FLA_REG_MAX = 255


def pow2(n):
    return 1 << (max(1, n) - 1).bit_length()


def triton_kernel(name, *, ctas, warps, stages, chunks, trips, cta_flops, smem, live_fp32, nbytes, flops,
                  cfg, exposed=1.0, iters=1):
    """A Triton kernel in kernel_time_us's terms.  Registers and shared memory are estimated
    from the tiles (no compiler report for FLA): registers = 40 + the fp32 values live in a
    thread (accumulators, fp32 tiles loaded for a cast); shared memory = the pipelined loop's
    tiles times its stages plus the epilogue's dot operands.  Over 255 registers the compiler
    spills: every loop iteration stores the spilled values to local memory and loads them back
    (local_bytes, through the SM's load path, not HBM)."""
    threads = 32 * warps
    need = 40 + live_fp32 // threads
    spill = max(0, need - FLA_REG_MAX)
    regs = min(need, FLA_REG_MAX)
    per_sm, limiter = occupancy(threads, regs, smem)
    if per_sm < 1:
        return None  # does not fit an SM: the autotuner skips it (out of resources)
    return {"kernel": name, "grid": str(ctas), "ctas": ctas, "threads": threads, "BV": cfg.get("BV"),
            "dv_tiles": None, "regs": regs, "smem": smem, "per_sm": per_sm, "limiter": limiter,
            "chunks": chunks, "trips": trips, "cta_flops": cta_flops,
            "local_bytes": spill * threads * 4 * 2 * iters,
            "mma_share": min(1.0, warps / 4), "exposed_frac": exposed, "flops_alg": 0, "flops": flops, "bytes_min": 0,
            "bytes": nbytes, "qk_reads": 1, "cfg": cfg, "spill_regs": spill}


def fla_kernel_configs(name, B, T, H, K, V, stack="fla"):
    """Every autotune config FLA offers this kernel on Hopper (check_shared_mem() is true on
    H100: chunk_h's BK, BV in {32, 64}; chunk_o's forward configs; the backward's BK = BV =
    min(next_pow2(D), 128) with num_warps in {2, 4}), each as a modelled kernel.

    Bytes: each tensor once, because the tiles of one chunk and head that re-read q / k / v are
    adjacent in launch order (program id 0 is the fastest index: i_k / i_v first) and meet in
    L2; the per-chunk states h (bf16 in the forward, fp32 in the backward) and dh (fp32) are
    written once and read once per consumer.  Round trips: a load the software pipeline issues
    `stages - 1` iterations ahead costs 1 / (stages - 1) of a round trip per iteration; a load
    outside a loop costs one.

    stack="helion": the same five-kernel structure as Helion's examples/fla/retention/chunk.py
    writes it (fwd_h, fwd_o; bwd_dh, bwd_dqk, bwd_dv; no h recompute: the forward's h is saved),
    with every state in the input dtype (bf16 h and dh), and a tile space of BK, BV in {32, 64,
    128}, num_warps {4, 8}, num_stages {2, 3, 4} for its autotuner (its configs are chosen at
    autotune time, so none can be read from the source: the model's fastest stands in)."""
    bt, e = FLA_BT, ELEM
    hel = stack == "helion"
    sb = e if hel else 4  # bytes per backward state element (h, dh)
    tiles = (32, 64, 128) if hel else (32, 64)
    warps_h = (4, 8) if hel else (1, 2, 4, 8)
    nt = -(-T // bt)
    bh = B * H
    tok = bh * T
    out = []
    if name in ("fwd_h", "fwd_h_fp32", "bwd_dh"):
        # chunk_fwd_kernel_h / chunk_bwd_kernel_dh: grid cdiv(K,BK)*cdiv(V,BV)*N*H, each CTA
        # walks all NT chunks (forward / reverse), a [BK, BV] fp32 state in registers; per
        # chunk: store the state (bf16 in the forward, fp32 in the backward), load k (q) and
        # v (do), decay, one dot.
        hb = 2 if name == "fwd_h" else sb
        for bk in tiles:
            for bv in tiles:
                for warps in warps_h:
                    for stages in (2, 3, 4):
                        nk, nv = -(-K // bk), -(-V // bv)
                        k = triton_kernel(
                            name, ctas=nk * nv * bh, warps=warps, stages=stages, chunks=nt,
                            trips=1 / (stages - 1), exposed=1 / (stages - 1), cta_flops=2 * bk * bt * bv,
                            smem=stages * (bk * bt + bt * bv) * e, live_fp32=bk * bv,
                            nbytes=tok * (K + V) * e + bh * nt * K * V * hb,
                            flops=2 * tok * nk * bk * nv * bv,
                            cfg={"BK": bk, "BV": bv, "warps": warps, "stages": stages})
                        if k:
                            out.append(k)
    elif name == "fwd_o":
        # chunk_fwd_kernel_o: grid (cdiv(V,BV)*NT, B*H); loop over K tiles: o += q h, A += q k^T;
        # decay, causal mask, A in bf16; o += A v; store o.
        space = ([(bk, bv, w, st) for bk in tiles for bv in tiles for w in warps_h for st in (2, 3, 4)] if hel
                 else [(128, 128, 8, 3), (64, 64, 4, 3), (32, 32, 2, 3)])
        for bk, bv, warps, stages in space:
            nk, nv = -(-K // bk), -(-V // bv)
            k = triton_kernel(
                name, ctas=nv * nt * bh, warps=warps, stages=stages, chunks=1,
                trips=1 + (nk - 1) / (stages - 1) + 1, iters=nk,
                cta_flops=nk * (2 * bt * bk * bv + 2 * bt * bk * bt) + 2 * bt * bt * bv,
                smem=min(stages, nk) * (2 * bt * bk + bk * bv) * e + bt * bv * e,
                live_fp32=bt * bv + bt * bt,
                nbytes=tok * (2 * K + 2 * V) * e + bh * nt * K * V * e,
                flops=nv * nt * bh * (nk * (2 * bt * bk * bv + 2 * bt * bk * bt) + 2 * bt * bt * bv),
                cfg={"BK": bk, "BV": bv, "warps": warps, "stages": stages})
            if k:
                out.append(k)
    elif name in ("bwd_dqkwg", "bwd_dv"):
        # FLA: BK = BV = min(next_pow2(D), 128); Helion: its tile space
        space = ([(b1, b2, w, st) for b1 in tiles for b2 in tiles for w in warps_h for st in (2, 3, 4)] if hel
                 else [(min(max(pow2(K), 16), 128), min(max(pow2(V), 16), 128), w, st)  # CONST_TILING 128
                       for w in (2, 4) for st in (2, 3, 4)])
        for bk, bv, warps, stages in space:
            nk, nv = -(-K // bk), -(-V // bv)
            cfg = {"BK": bk, "BV": bv, "warps": warps, "stages": stages}
            if name == "bwd_dqkwg":
                # grid (NK*NT, B*H); loop over V tiles: load v, do (bf16), h, dh (fp32, cast
                # to bf16 for the dots): ds += do v^T, dq += do h, dk += v dh; then load q,
                # k: dq += ds k, dk += ds^T q; store dq, dk.
                per = nv * (2 * bt * bv * bt + 4 * bt * bv * bk) + 4 * bt * bt * bk
                k = triton_kernel(
                    name, ctas=nk * nt * bh, warps=warps, stages=stages, chunks=1,
                    trips=1 + (nv - 1) / (stages - 1) + 1, cta_flops=per, iters=nv,
                    smem=min(stages, nv) * (2 * bt * bv + 2 * bv * bk) * e + 2 * bt * bk * e,
                    live_fp32=2 * bt * bk + bt * bt + (0 if hel else 2 * bv * bk),
                    nbytes=tok * (2 * V + 4 * K) * e + 2 * bh * nt * K * V * sb,
                    flops=nk * nt * bh * per, cfg=cfg)
            else:
                # grid (NV*NT, B*H); loop over K tiles: load q, k (bf16), dh (fp32):
                # A += k q^T, dv += k dh; decay, mask; load do: dv += A^T do; store dv.
                per = nk * (2 * bt * bk * bt + 2 * bt * bk * bv) + 2 * bt * bt * bv
                k = triton_kernel(
                    name, ctas=nv * nt * bh, warps=warps, stages=stages, chunks=1,
                    trips=1 + (nk - 1) / (stages - 1) + 1, cta_flops=per, iters=nk,
                    smem=min(stages, nk) * (2 * bt * bk + bk * bv) * e + bt * bv * e,
                    live_fp32=bt * bv + bt * bt + (0 if hel else bk * bv),
                    nbytes=tok * (2 * K + 2 * V) * e + bh * nt * K * V * sb,
                    flops=nv * nt * bh * per, cfg=cfg)
            if k:
                out.append(k)
    return out


def fla_autotune_key(name, H, K, V, wrapper):
    """The autotuner's cache key (Triton also appends every tensor argument's dtype, which
    separates the forward's bf16 h from the backward's fp32 one).  chunk_h's key is
    [BT, USE_G, USE_GK, USE_GV, STATE_V_FIRST] in 0.5.x (+ K, V in 0.6): no shape at all, so
    the config tuned at the first call in a process serves every later shape; chunk_o's and the
    backward's keys hold H, K, V (and BK, BV, fixed by K, V)."""
    if name in ("fwd_h", "fwd_h_fp32", "bwd_dh"):
        return (name,) if wrapper == "0.5" else (name, K, V)
    return (name, H, K, V)


def fla_kernel(name, B, T, H, K, V, a, dev="H100", stack="fla", cache=None, wrapper="0.5"):
    """The config the autotuner keeps: we assume it finds the one the model rates fastest
    (autotune times every config and keeps the fastest), at the first shape with its cache key
    when `cache` (a dict, filled in the measurement's shape order) is given; later shapes with
    that key run the same config."""
    key = fla_autotune_key(name, H, K, V, wrapper) if cache is not None else None
    configs = fla_kernel_configs(name, B, T, H, K, V, stack)
    if key in (cache or {}):
        same = [k for k in configs if k["cfg"] == cache[key]]
        configs = same or configs  # a config that no longer fits: the tuner would retune
    best = None
    for k in configs:
        t = kernel_time_us(k, dev, a)
        if best is None or t < best[0]:
            best = (t, k)
    k = dict(best[1])
    k["time_us"] = best[0]
    if cache is not None:
        cache.setdefault(key, k["cfg"])
    return k


def fla_launches(phase, wrapper):
    """What one chunk_retention call puts on the stream, in order.  'h2d' = a host-to-device
    copy from a Python value: PyTorch synchronises the stream for it.  wrapper '0.5' is FLA
    0.5.x's (measured): g_gamma = (1 - q.new_tensor(2.).pow(-5. - q.new_tensor(range(H)))).log(),
    two synchronising copies and four elementwise kernels; '0.6' builds it on the device with
    torch.arange (five elementwise kernels, no synchronisation).  Both then scale it by 1/ln 2
    (one more) and launch chunk_fwd_h (h in bf16) and chunk_fwd_o.  The backward (autograd)
    recomputes h in fp32, then runs chunk_bwd_dh, chunk_bwd_dqkwg and chunk_bwd_dv."""
    if phase == "fwd":
        pre = ["h2d", "h2d"] + ["ew"] * 4 if wrapper == "0.5" else ["ew"] * 5
        return pre + ["ew", "fwd_h", "fwd_o"]
    return ["fwd_h_fp32", "bwd_dh", "bwd_dqkwg", "bwd_dv"]


def fla_gpu_times(shape, phase, wrapper, a, dev="H100", cache=None):
    """[(launch, kernel dict or None, GPU µs)] for one phase."""
    B, T, H, D = shape
    out = []
    for name in fla_launches(phase, wrapper):
        if name in ("h2d", "ew"):
            out.append((name, None, 0.0))  # a few bytes: only its launch costs
        else:
            k = fla_kernel(name, B, T, H, D, D, a, dev, cache=cache, wrapper=wrapper)
            out.append((name, k, k["time_us"]))
    return out


def fla_host_per_launch_us(a, wrapper="0.5"):
    """(forward, backward) host µs per launch, from FLA_HOST_ANCHOR (module comment)."""
    sh, res = FLA_HOST_ANCHOR["shape"], []
    for phase, total in (("fwd", FLA_HOST_ANCHOR["fwd_ms"]),
                         ("bwd", FLA_HOST_ANCHOR["fwdbwd_ms"] - FLA_HOST_ANCHOR["fwd_ms"])):
        ks = fla_gpu_times(sh, phase, wrapper, a)
        device = sum(a["launch_gap_us"] + t for _, _, t in ks)
        res.append(max(0.0, total * 1000 - device) / len(ks))
    return tuple(res)


def fla_timeline_us(seq, host_f, host_b, a, wrapper, dev="H100"):
    """One call as do_bench times it: a timeline of host issue times and kernels.  Launch i is
    issued when the host has spent its per-launch time on it and every launch before; it starts
    at max(issued, previous kernel's end + launch gap).  t = 0 is the start event, which follows
    the L2 flush; a synchronising copy makes the host wait until the GPU is idle, so every host
    µs after it shows; without one the host has a head start of the flush's duration.
    seq: [(phase, launch, GPU µs)]."""
    flush_us = L2_FLUSH_BYTES / (DEVICES[dev]["hbm_TBps"] * 1e12) * 1e6
    host = 0.0 if wrapper == "0.5" else -flush_us
    gpu_end, first = 0.0, True
    for phase, name, t in seq:
        host += host_f if phase == "fwd" else host_b
        if name == "h2d":
            host = max(host, gpu_end)  # the copy waits for the stream
            continue
        start = max(host, gpu_end + (0.0 if first else a["launch_gap_us"]), 0.0)
        gpu_end, first = start + t, False
    return gpu_end


def fla_rows(a, wrapper="0.5", dev="H100", autotune_cache=True):
    """The calibration table: per shape and op, predicted vs published, and the kernels."""
    host_f, host_b = fla_host_per_launch_us(a, wrapper)
    rows, cache = [], {} if autotune_cache else None
    for shape, pub in PUBLISHED_H100.items():  # the measurement's order: forward, then fwd+bwd
        fwd = fla_gpu_times(shape, "fwd", wrapper, a, dev, cache)
        bwd = fla_gpu_times(shape, "bwd", wrapper, a, dev, cache)
        for i, op in enumerate(("chunk_fwd", "chunk_fwdbwd")):
            launches = [("fwd", x) for x in fwd] + ([("bwd", x) for x in bwd] if i else [])
            pred = fla_timeline_us([(ph, n, t) for ph, (n, _, t) in launches], host_f, host_b, a, wrapper, dev) / 1000
            kernels = [(n, k) for _, (n, k, _) in launches if k]
            rows.append({"shape": shape, "op": op, "pred_ms": pred, "pub_ms": pub["fla"][i],
                         "err_pct": (pred / pub["fla"][i] - 1) * 100, "kernels": kernels,
                         "gpu_ms": sum(k["time_us"] for _, k in kernels) / 1000,
                         "host_us": (host_f, host_b)})
    return rows


def helion_op_time_us(shape, op, a, dev="H100"):
    """Helion's kernels (stack="helion"), GPU time and launch gaps only: its wrapper caches the
    decay rows and does not synchronise, so the host runs ahead unless it needs longer than the
    GPU; its host time is not known, and a row where that shows is not a test of the model."""
    B, T, H, D = shape
    names = ["fwd_h", "fwd_o"] + (["bwd_dh", "bwd_dqkwg", "bwd_dv"] if op == "chunk_fwdbwd" else [])
    ks = [fla_kernel(n, B, T, H, D, D, a, dev, stack="helion") for n in names]
    return sum(k["time_us"] for k in ks) + a["launch_gap_us"] * (len(ks) - 1), ks


def fit_constants(wrapper="0.5", autotune_cache=True):
    """Grid search over FIT_GRID (everything else in ASSUMPTIONS fixed): minimise the largest
    |predicted / published - 1| over FLA's twelve rows, ties (to 0.1 %) broken by the sum of
    squared log errors.  Returns (constants, largest |error| in %)."""
    best = None
    for m in FIT_GRID["mma_efficiency"]:
        for lat in FIT_GRID["mem_latency_us"]:
            for gap in FIT_GRID["launch_gap_us"]:
                a = dict(ASSUMPTIONS, mma_efficiency=m, mem_latency_us=lat, launch_gap_us=gap)
                rows = fla_rows(a, wrapper, autotune_cache=autotune_cache)
                worst = max(abs(r["err_pct"]) for r in rows)
                score = (round(worst, 1), sum(math.log(r["pred_ms"] / r["pub_ms"]) ** 2 for r in rows))
                if best is None or score < best[0]:
                    best = (score, {"mma_efficiency": m, "mem_latency_us": lat, "launch_gap_us": gap})
    return best[1], best[0][0]


def fmt_cfg(k):
    c = k["cfg"]
    return f"{c['BK']}/{c['BV']} w{c['warps']} s{c['stages']}"


def fit_sensitivity(best, wrapper="0.5"):
    """For each fitted constant, the grid values (the others at `best`) that keep every row
    within ±25 %: how tightly the twelve rows pin it."""
    out = {}
    for name, values in FIT_GRID.items():
        ok = [v for v in values
              if max(abs(r["err_pct"]) for r in fla_rows(dict(ASSUMPTIONS, **dict(best, **{name: v})), wrapper)) <= 25]
        out[name] = (min(ok), max(ok)) if ok else None
    return out


def calibration_markdown(ptx, ptx_dir, fitted=None):
    """--calibrate: the FLA calibration table, its kernels, and the re-prediction of our kernels
    (and Helion's, unfitted) with the same constants.  All times are model predictions except
    the `published` columns."""
    a = ASSUMPTIONS
    rows = fla_rows(a)
    host_f, host_b = rows[0]["host_us"]
    worst = max(abs(r["err_pct"]) for r in rows)
    L = ["## Calibration: FLA's chunk_retention on H100, model vs published", "",
         "Model = `bench/gpu_model.py --calibrate` (FLA's kernels as fla-core 0.6.0 launches them, FLA 0.5.x's "
         "wrapper and autotune keys as measured); published = pytorch/helion `examples/fla/BENCHMARKS.md` "
         "(fea89d20), bf16, ms. error = model / published - 1.", "",
         "Fitted device constants (the only ones fitted, on these twelve rows only): "
         + ", ".join(f"`{n}` = {a[n]}" for n in CALIBRATED)
         + f". Fixed: H100 {DEVICES['H100']['hbm_TBps']} TB/s, {DEVICES['H100']['gemm_TFLOPs']:.0f} TFLOP/s GEMM rate, "
         f"{DEVICES['H100']['sms']} SMs, `sm_bandwidth_share_max` = {a['sm_bandwidth_share_max']}. "
         f"Host (not fitted; from FLA's own T=128 row): {host_f:.1f} µs per forward launch, {host_b:.1f} µs per "
         "backward launch.", ""]
    if fitted:
        best, score, sens = fitted
        same = all(abs(best[n] - a[n]) < 1e-9 for n in CALIBRATED)
        L += [f"Fit (`--fit`, grid {' x '.join(str(len(v)) for v in FIT_GRID.values())}): "
              + ", ".join(f"{n} = {best[n]}" for n in best) + f", worst row {score:.1f} %; "
              + ("equal to the constants above." if same else "**differs from the constants above**.")
              + " Range of each constant that keeps all twelve rows within ±25 % (others at the fit): "
              + "; ".join(f"{n} {r[0]}-{r[1]}" if r else f"{n} none" for n, r in sens.items()) + ".", ""]
    L += ["| shape | op | model ms | published ms | error % | GPU ms (model) | bound by |",
          "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        B, T, H, D = r["shape"]
        bound = "host" if r["gpu_ms"] < 0.5 * r["pred_ms"] else "GPU"
        L.append(f"| B{B} T{T} H{H} D{D} | {'fwd' if r['op'] == 'chunk_fwd' else 'fwd+bwd'} | {r['pred_ms']:.3f} "
                 f"| {r['pub_ms']:.3f} | {r['err_pct']:+.1f} | {r['gpu_ms']:.3f} | {bound} |")
    L += ["", f"Largest |error|: {worst:.1f} % (goal ±25 %).", ""]
    L += ["### Per kernel (model, H100; config = the autotuner's pick as modelled: BK/BV, warps, stages)", "",
          "| shape | kernel | config | CTAs | CTAs/SM (limit) | regs est. (spilled) | MB | GFLOP | bound | µs |",
          "|---|---|---|---:|---|---|---:|---:|---|---:|"]
    for r in rows:
        if r["op"] != "chunk_fwdbwd":
            continue
        B, T, H, D = r["shape"]
        for name, k in r["kernels"]:
            L.append(f"| B{B} T{T} H{H} D{D} | {name} | {fmt_cfg(k)} | {k['ctas']} | {k['per_sm']} ({k['limiter']}) "
                     f"| {k['regs']} ({k['spill_regs']}) | {k['bytes'] / 1e6:.0f} | {k['flops'] / 1e9:.1f} "
                     f"| {k['bound']['H100']} | {k['time_us']:.0f} |")
    L.append("")
    # FLA 0.6's own wrapper (no synchronising copy; chunk_h keyed on K, V): a prediction only
    r06 = {(r["shape"], r["op"]): r["pred_ms"] for r in fla_rows(a, "0.6")}
    L += ["## Re-prediction with the same constants (H100, bf16, ms; all model except `published`)", "",
          "`ours` = this library's kernels as launched today (sequence split, q/k reuse), GPU time plus "
          "launch gaps (the C++ op issues its launches without waiting, inside the L2 flush's head start); "
          "`ours, old constants` = the same with the pre-calibration guesses "
          f"({', '.join(f'{n} {v}' for n, v in PRE_CALIBRATION.items())}); `FLA 0.6` = FLA's kernels with 0.6's "
          "wrapper (no synchronising copy); `Helion model` = Helion's five kernels (unfitted check: GPU time only, "
          "its host time unknown). Registers of our kernels: "
          + (f"sm_90 ptxas report ({len(ptx)} kernels)." if ptx else "none (no ptxas report): not counted."), "",
          "| shape | op | ours | ours, old constants | FLA model | FLA 0.6 model | FLA published | Helion model "
          "| Helion published | FLA published / ours | Helion published / ours |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    old = dict(ASSUMPTIONS, **PRE_CALIBRATION)
    for r in rows:
        B, T, H, D = r["shape"]
        shape5 = (B, T, H, D, D)
        ours = op_time_us(op_kernels(r["op"], shape5, ptx), "H100", a) / 1000
        ours_old = op_time_us(op_kernels(r["op"], shape5, ptx), "H100", old) / 1000
        hel, _ = helion_op_time_us(r["shape"], r["op"], a)
        hel_pub = PUBLISHED_H100[r["shape"]]["helion"][0 if r["op"] == "chunk_fwd" else 1]
        L.append(f"| B{B} T{T} H{H} D{D} | {'fwd' if r['op'] == 'chunk_fwd' else 'fwd+bwd'} | {ours:.3f} "
                 f"| {ours_old:.3f} | {r['pred_ms']:.3f} | {r06[(r['shape'], r['op'])]:.3f} | {r['pub_ms']:.3f} "
                 f"| {hel / 1000:.3f} | {hel_pub:.3f} | {r['pub_ms'] / ours:.2f} | {hel_pub / ours:.2f} |")
    L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------
# Measured columns
# ----------------------------------------------------------------------------------------------
def shape_key(op, shape):
    if op in ("decode_step", "msr_step"):
        B, H, dk, dv = shape
        return f"{op}:B{B}_H{H}_dk{dk}_dv{dv}"
    B, T, H, dk, dv = shape
    return f"{op}:B{B}_T{T}_H{H}_dk{dk}_dv{dv}"


def load_measured(path):
    """{key: {impl: ms}} and the run's info, from bench/gpu_bench.py JSON lines or gpu_check.json."""
    rows, info = [], {}
    text = open(path).read()
    try:
        doc = json.loads(text)
        rows, info = doc.get("bench", []), doc.get("info", {}) or doc.get("environment", {})
    except json.JSONDecodeError:
        for line in text.splitlines():
            if line.strip():
                r = json.loads(line)
                if "info" in r:
                    info = r["info"]
                else:
                    rows.append(r)
    out = {}
    for r in rows:
        if r.get("ms") is None or "key" not in r:
            continue
        out.setdefault(r["key"], {})[r["impl"]] = r["ms"]
    return out, info


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def fmt_ms(us):
    return "-" if us is None else f"{us / 1000:.3f}" if us >= 100 else f"{us / 1000:.4f}"


def num(x, digits):
    return "-" if x is None else f"{x:.{digits}f}"


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def build(ptx, measured):
    ops = [("chunk_fwd", s) for s in CHUNK_SHAPES] + [("chunk_fwdbwd", s) for s in CHUNK_SHAPES] + \
          [("decode_step", s) for s in DECODE_SHAPES] + [("msr_step", s) for s in DECODE_SHAPES]
    rows = []
    for op, full in ops:
        label = full[0] if op.startswith("chunk") else "decode"
        shape = tuple(full[1:]) if op.startswith("chunk") else full
        variants = {"now": op_kernels(op, shape, ptx)}
        if op.startswith("chunk"):
            variants["split"] = op_kernels(op, shape, ptx, split=True)
            variants["old_order"] = op_kernels(op, shape, ptx, qk_reuse=False)
        row = {"op": op, "label": label, "shape": shape, "key": shape_key(op, shape)}
        row["flops_alg"], row["bytes_min"] = op_minimums(op, shape)
        for name, ks in variants.items():
            row[name] = {dev: op_time_us(ks, dev) for dev in DEVICES}
            row[name + "_bytes"] = sum(k["bytes"] for k in ks)
            row[name + "_flops"] = sum(k["flops"] for k in ks)
        row["kernels"] = variants["now"]
        row["segments"] = "/".join(str(k["segments"]) for k in variants.get("split", []) if "segments" in k) or "-"
        for dev, d in DEVICES.items():
            row.setdefault("floor", {})[dev] = max(row["bytes_min"] / (d["hbm_TBps"] * 1e12),
                                                   row["flops_alg"] / (d["gemm_TFLOPs"] * 1e12)) * 1e6
        m = measured.get(row["key"], {}) if measured else {}
        row["measured"] = m
        if op.startswith("chunk") and shape in FLA_H100:
            row["fla_h100_ms"] = FLA_H100[shape][0 if op == "chunk_fwd" else 1]
        rows.append(row)
    return rows


def shape_str(row):
    if row["op"].startswith("chunk"):
        B, T, H, dk, dv = row["shape"]
        return f"B{B} T{T} H{H} {dk}/{dv}"
    B, H, dk, dv = row["shape"]
    return f"B{B} H{H} {dk}x{dv}"


def markdown(rows, ptx_dir, ptx, measured_path, info):
    date = datetime.date.today().isoformat()
    commit = git("rev-parse", "--short", "HEAD") or str(info.get("commit") or "unknown")[:7]
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    cmd = "python3 bench/gpu_model.py" + (f" --measured {os.path.basename(measured_path)}" if measured_path else "")
    L = [f"# GPU performance model: retention kernels on H100 / H200 ({date})", "",
         f"Produced by `{cmd}` at commit `{commit}`{dirty}, from the kernels' tiling "
         "(`ChunkTraits` in `kernels/chunk_common.cuh`, launch grids in `kernels/*.cu`) and the sm_90 "
         f"ptxas report ({'`' + os.path.relpath(ptx_dir, ROOT) + '`' if ptx_dir else 'none found: registers not counted'}"
         f", {len(ptx)} kernels parsed). **All times are predictions**; "
         + ("measured columns come from " + f"`{os.path.basename(measured_path)}` "
            + f"({info.get('gpu', '?')}, {info.get('date', '?')}, commit {str(info.get('commit', '?'))[:10]})."
            if measured_path else "no measurement has been made yet: `bench/gpu_check.sh` on the GPU machine "
            "writes the JSON that `--measured` turns into measured columns beside these."), "",
         "bf16 inputs, RetNet decays, no initial/final state. Shapes: FLA's benchmark shapes, RetNet's "
         "head shape (dk=256, dv=512), decode at B = 1, 8, 64 and H = 8, 16.", ""]
    L += ["## Assumptions", "",
          "Constants: `mma efficiency`, `round trip` and `launch gap` are fitted on FLA's published H100 "
          "times (docs/gpu-model-calibration.md, `--calibrate`); the rest are fixed.", "",
          "| device | SMs | HBM TB/s | GEMM bf16 TFLOP/s | mma efficiency | round trip µs | launch gap µs |",
          "|---|---|---|---|---|---|---|"]
    for dev, d in DEVICES.items():
        L.append(f"| {dev} | {d['sms']} | {d['hbm_TBps']} | {d['gemm_TFLOPs']:.0f} | {ASSUMPTIONS['mma_efficiency']} "
                 f"| {ASSUMPTIONS['mem_latency_us']} | {ASSUMPTIONS['launch_gap_us']} |")
    L += ["", "Per kernel, each SM runs `c` resident CTAs (c = min(occupancy, CTAs/132)); one chunk step "
          "takes the longest of the CTA's own latency chain (dependent global round trips + its MMA work "
          "at 1/132 of the rate), the SM's shared MMA work and the SM's share of the bytes; a kernel takes "
          "waves x chunks x step, and at least its bytes / bandwidth and FLOPs / rate. `floor` is the op's "
          "minimal bytes and algorithmic FLOPs at full bandwidth / GEMM rate (no kernel reaches it); "
          "`% of floor` = floor / predicted (the issue's goal for the forward is at least 70 % of the HBM roofline).", ""]

    def variant_cols(r, dev):
        pct = f"{r['floor'][dev] / r['now'][dev] * 100:.0f} %"
        return " | ".join([fmt_ms(r["now"][dev]), pct] + [fmt_ms(r[v][dev]) for v in ("split", "old_order")])

    has_m = bool(measured_path)
    for title, sel in (("Chunk forward", "chunk_fwd"), ("Chunk forward + backward", "chunk_fwdbwd")):
        L += [f"## {title} (ms)", ""]
        cols = ["shape", "GFLOP alg", "GFLOP launched", "MB min", "MB designed", "MB old order", "split S",
                "floor H200", "H100 now", "H200 now", "% of floor", "H200 split", "H200 old order",
                "FLA H100 (3rd party)"]
        if has_m:
            cols += ["measured ours", "meas/pred", "FLA measured", "SDPA measured"]
        hdr, sep = "| " + " | ".join(cols), "|---" * len(cols)
        L += [hdr + " |", sep + "|"]
        for r in rows:
            if r["op"] != sel:
                continue
            line = (f"| {r['label']} {shape_str(r)} | {r['flops_alg'] / 1e9:.1f} | {r['now_flops'] / 1e9:.1f} "
                    f"| {r['bytes_min'] / 1e6:.0f} | {r['now_bytes'] / 1e6:.0f} | {r['old_order_bytes'] / 1e6:.0f} "
                    f"| {r['segments']} | {fmt_ms(r['floor']['H200'])} | {fmt_ms(r['now']['H100'])} "
                    f"| {variant_cols(r, 'H200')} | {r.get('fla_h100_ms', '-')}")
            if has_m:
                m = r["measured"]
                ours = m.get("retention")
                ratio = None if ours is None else ours * 1000 / r["now"]["H200"]
                line += " | " + " | ".join(num(x, p) for x, p in ((ours, 3), (ratio, 2), (m.get("fla"), 3),
                                                                 (m.get("sdpa_causal"), 3)))
            L.append(line + " |")
        L.append("")

    L += ["## Decode step (µs, one launch for all heads)", "",
          "`decode_step` is `recurrent_step` (raw op); `msr_step` the fused layer step (rotary, norm, gate). "
          "Bytes: the fp32 state read and written once (8·dk·dv per head) plus q, k, v in and o out. "
          "`% HBM` is minimal bytes / predicted time / bandwidth.", ""]
    cols = ["op", "shape", "state MB", "CTAs", "regs", "CTAs/SM", "bound H200", "H100 µs", "H200 µs", "% HBM H200"]
    if has_m:
        cols += ["measured µs (graph)", "meas/pred"]
    hdr, sep = "| " + " | ".join(cols), "|---" * len(cols)
    L += [hdr + " |", sep + "|"]
    for r in rows:
        if r["op"] not in ("decode_step", "msr_step"):
            continue
        k = r["kernels"][0]
        t200 = r["now"]["H200"]
        pct = r["bytes_min"] / (t200 * 1e-6) / (DEVICES["H200"]["hbm_TBps"] * 1e12) * 100
        line = (f"| {r['op']} | {shape_str(r)} | {r['bytes_min'] / 1e6:.1f} | {k['ctas']} | {k['regs'] or '?'} "
                f"| {k['per_sm']} ({k['limiter']}) | {k['bound']['H200']} | {r['now']['H100']:.1f} | {t200:.1f} "
                f"| {pct:.0f} %")
        if has_m:
            ours = r["measured"].get("retention_graph", r["measured"].get("retention"))
            line += f" | {num(None if ours is None else ours * 1000, 1)} | " + \
                num(None if ours is None else ours * 1000 / t200, 2)
        L.append(line + " |")
    L.append("")

    L += ["## Kernels as launched today (H200)", "",
          "Per kernel of each chunk op: grid (dv tiles x B·H; with the split, dv tiles x segments), BV (state columns per CTA), registers (ptxas), "
          "dynamic shared memory (ChunkTraits), CTAs per SM and what limits it, waves on 132 SMs, how many "
          "times q/k come from HBM (1: the dv tiles of a head are adjacent in launch order and share them "
          "through L2), and what bounds it.", ""]
    cols = ["op", "shape", "kernel", "grid", "BV", "threads", "regs", "smem B", "CTAs/SM", "waves", "q/k reads",
            "chunks/CTA", "MB", "bound", "H200 µs"]
    L += ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        if r["op"] not in ("chunk_fwd", "chunk_fwdbwd") or (r["op"] == "chunk_fwdbwd" and False):
            continue
        if r["op"] == "chunk_fwd":
            continue  # the forward kernel appears in the fwd+bwd rows
        for k in r["kernels"]:
            t = kernel_time_us(k, "H200")
            if k.get("stream"):
                L.append(f"| fwd+bwd | {shape_str(r)} | {k['kernel']} | - | - | - | - | - | - | - | - | - "
                         f"| {k['bytes'] / 1e6:.0f} | bandwidth | {t:.1f} |")
                continue
            L.append(f"| fwd+bwd | {shape_str(r)} | {k['kernel']} | {k['grid']} | {k['BV']} | {k['threads']} "
                     f"| {k['regs'] or '?'} | {k['smem']} | {k['per_sm']} ({k['limiter']}) | {k['waves']:.0f} "
                     f"({k['wave_fill'] * 100:.0f} % of one) | {k['qk_reads']} | {k['chunks']} "
                     f"| {k['bytes'] / 1e6:.0f} | {k['bound']['H200']} | {t:.1f} |")
    L.append("")
    L += ["## Launch order and sequence split", "",
          "* **Sequence split** (done in both directions and automatic, so `now` includes it: "
          "kernels/chunk_common.cuh, plan_split: when the unsplit grid has fewer CTAs than SMs, as many "
          f"segments as fit in two waves (rounded down), each at least {ASSUMPTIONS['split_min_chunks']} whole chunks; each backward "
          "sweep plans on its own grid, plan_backward in kernels/chunk_bwd.cuh). The `split` columns "
          "(`split S` per sweep: forward / dq / dk-dv) put the model's own best S for each backward sweep (a "
          "power of two, shortest predicted time) in place of the launcher's rule, to check that rule. Either "
          "way: a pass computing each segment's local state (reads the state-update operands again; for the "
          "dk/dv sweep in reverse), a scan over segments (fp32 states read and written), then the sweep "
          "with S times the CTAs, each walking T/S tokens from its incoming state. It trades extra bytes for "
          "a shorter chain; it pays where the chain (latency) bounds the kernel, i.e. small B·H and long T.",
          "* **q/k reuse across dv tiles** (done; `old order` columns: the launch order before it): the "
          "dv tiles of one head are adjacent in launch order (one-dimensional grid, dv tile fastest: "
          "`chunk_cta` in kernels/chunk_common.cuh), so they run together and q/k (and the dq/dk workspace "
          "rows) come from HBM once per head and chunk, the other dv tiles reading them from L2. Before, the "
          "tiles of a head were B·H CTAs apart and re-read q/k from HBM once per wave holding some of them "
          "(`MB old order`); that mattered where the grid is over one wave and the kernel is bandwidth-bound "
          "(large dk with small BV, e.g. RetNet's 256/512).",
          "* Both keep the per-dv-tile recomputation of Q K^T (`GFLOP launched` vs `GFLOP alg`).", "",
          "Expected HBM bytes per token and head as designed (bf16), forward: 2·(2·dk + 2·dv) = the minimum "
          "(1024 B at 128/128, 3072 B at 256/512); with the old order up to 2·(2·dk·tiles + 2·dv) "
          "(`MB old order` / `MB min` is that re-read factor). This assumes L2 serves the repeats of a "
          "head's q/k chunk while its dv tiles walk it together; a device run checks it.",
          ""]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ptxas-dir", help="folder with nvcc_<tu>_sm90.log ptxas reports")
    ap.add_argument("--measured", help="JSON from bench/gpu_bench.py or bench/gpu_check.sh")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--stdout", action="store_true", help="print the table only, write nothing")
    ap.add_argument("--check", action="store_true",
                    help="fail unless every modelled kernel has a ptxas entry (catches tiling drift)")
    ap.add_argument("--calibrate", action="store_true",
                    help="print the calibration on FLA's published H100 rows and the re-prediction of our "
                         "kernels (and Helion's) with the same constants, write nothing")
    ap.add_argument("--fit", action="store_true",
                    help="with --calibrate: repeat the grid-search fit; exit 1 unless it gives CALIBRATED")
    args = ap.parse_args()

    ptx_dir = args.ptxas_dir or default_ptxas_dir()
    ptx = parse_ptxas(ptx_dir) if ptx_dir else {}
    if args.calibrate:
        fitted = None
        if args.fit:
            best, score = fit_constants()
            fitted = (best, score, fit_sensitivity(best))
        print(calibration_markdown(ptx, ptx_dir, fitted))
        if fitted and any(abs(fitted[0][n] - CALIBRATED[n]) > 1e-9 for n in CALIBRATED):
            sys.exit(f"gpu_model: the fit gives {fitted[0]}, CALIBRATED says {CALIBRATED}: update CALIBRATED "
                     "and docs/gpu-model-calibration.md")
        return
    if not ptx:
        print(f"warning: no sm_90 ptxas report found ({ptx_dir or 'build/gpu-check/logs, build/gpu-carry/logs'}): "
              "registers and register-limited occupancy are not counted", file=sys.stderr)
    measured, info = load_measured(args.measured) if args.measured else ({}, {})
    rows = build(ptx, measured)
    if args.check:
        missing = sorted({k["kernel"] + " " + shape_str(r) for r in rows for k in r["kernels"]
                          if not k.get("stream") and not k["regs"]})
        if missing:
            sys.exit("gpu_model: no sm_90 ptxas entry for the bf16 instantiation that these launches use "
                     "(did the launch grids or state budgets in kernels/ change? update their mirror in bench/gpu_model.py):\n  "
                     + "\n  ".join(missing))
        print(f"gpu_model: {len(ptx)} sm_90 kernels parsed; every modelled launch has its registers")
    md = markdown(rows, ptx_dir, ptx, args.measured, info)
    if args.stdout:
        print(md)
        return
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    date = datetime.date.today().isoformat()
    if args.measured:  # named after the measured run (the GPU machine's copy may have no .git)
        commit = str(info.get("commit") or commit)[:7]
        date = str(info.get("date") or date)[:10]
    stem = f"gpu_model_{date}_{commit}" + ("_measured" if args.measured else "")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, stem + ".md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out_dir, stem + ".json"), "w") as f:
        json.dump({"devices": DEVICES, "assumptions": ASSUMPTIONS,
                   "ptxas_dir": os.path.relpath(ptx_dir, ROOT) if ptx_dir else None,
                   "rows": [{k: v for k, v in r.items()} for r in rows]}, f, indent=1, default=str)
    print(os.path.join(args.out_dir, stem + ".md"))


if __name__ == "__main__":
    main()
