#!/usr/bin/env python3
"""CPU benchmark of the retention ops against eager PyTorch references (issue 2).

For each sequence length T it times, on CPU, the forward and the forward+backward of

  * eager-parallel : torchscale-style parallel form in plain torch ops (decay mask D [H,T,T] and
                     T x T scores materialised), autograd backward      (bench/eager_reference.py)
  * eager-chunk64  : torchscale-style chunkwise form in Python (batched intra-chunk matmuls, a
                     Python loop over chunks for the state), autograd backward
  * chunk64/128    : retention.chunk_retention, chunk size 64 / 128
  * parallel       : retention.parallel_retention (only for T <= --parallel-max)
  * recurrent      : retention.recurrent_retention (token loop; its backward is the chunk backward)

and reports the median time, the speed-up over both eager references, the achieved GFLOP/s (the
FLOP formulas of performance.md sec. 4.1/4.2, see ``flops``), that rate as a percentage of the
machine's sgemm rate measured in the same run, and the peak memory.

Peak memory method: every (implementation, T) runs in a fresh Python subprocess. Inside it the
inputs are created and a tiny call of the same implementation warms up the thread pool and BLAS;
then, before each phase (forward, forward+backward), freed heap memory is handed back to the OS
(glibc malloc_trim), the kernel's resident-set high-water mark is reset (write "5" to
/proc/self/clear_refs) and the current RSS is read; after the phase the peak is read from VmHWM.
Peak = VmHWM - RSS at the reset: all memory the phase touched on top of the inputs (outputs,
saved tensors, gradients, temporaries, allocator slack). Where the reset is not allowed the
fallback is ru_maxrss (then the number is an upper bound that includes everything before it).

Run (from the repository root; the extension must be built in place):

    PYTHONPATH=python python3 bench/cpu_ops.py                 # full run, writes bench/results/
    PYTHONPATH=python python3 bench/cpu_ops.py --quick --out "$(mktemp -d)"   # seconds, tiny sizes
"""

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# glibc malloc settings for the measured subprocesses ("retain"): never mmap a block (so no block
# is unmapped on free) and never trim the heap, i.e. freed memory is kept and reused, as a caching
# allocator would. See measure_first_touch() / the results text for why.
ALLOCATOR_ENV = {"retain": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(10 ** 12)}, "default": {}}

IMPLS = ["eager-parallel", "eager-chunk64", "chunk64", "chunk128", "parallel", "recurrent"]
RECURRENT_BWD_CHUNK = 64  # the recurrent op's backward runs the chunk backward with this chunk size


# ---------------------------------------------------------------------------------------------
# FLOP model (performance.md sec. 4.1 / 4.2), per (batch, head); 2 FLOPs per multiply-add.
def flops(impl, T, dk, dv):
    """(forward FLOPs, backward FLOPs) per (b, h) for one implementation.

    chunk C   : fwd 2T[C(dk+dv) + 2 dk dv]        (4.1)   bwd 2T[C(3dk+2dv) + 5 dk dv]  (4.2)
    parallel  : fwd T^2 (dk+dv)                   (4.1, causal half counted)
                bwd T^2 (3dk+2dv)  = the intra terms of 4.2 with C = T, causal half, no state terms
    recurrent : fwd 5 T dk dv                     (4.4: decay, rank-1 update, q.S per token)
                bwd = chunk bwd with C = 64 (what the op runs)
    The eager references are charged the same useful FLOPs as the library form they mirror
    (eager-parallel really executes the full T x T products, i.e. 2x the causal count)."""
    def chunk(C):
        return 2 * T * (C * (dk + dv) + 2 * dk * dv), 2 * T * (C * (3 * dk + 2 * dv) + 5 * dk * dv)

    if impl in ("parallel", "eager-parallel"):
        return T * T * (dk + dv), T * T * (3 * dk + 2 * dv)
    if impl == "recurrent":
        return 5 * T * dk * dv, chunk(RECURRENT_BWD_CHUNK)[1]
    m = re.search(r"chunk(\d+)$", impl)
    if m:
        return chunk(int(m.group(1)))
    raise ValueError(impl)


# ---------------------------------------------------------------------------------------------
# memory helpers (Linux)
_libc = None


def _trim():
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:
        pass


def _status_kib(key):
    with open("/proc/self/status") as f:
        m = re.search(key + r":\s+(\d+)\s+kB", f.read())
    return int(m.group(1)) if m else None


class PeakRSS:
    """Peak resident memory (bytes) of a block of work above the RSS at its start."""

    def __enter__(self):
        _trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM reset"
        except OSError:
            self.method = "ru_maxrss (no reset)"
        self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.method == "VmHWM reset":
            hwm = _status_kib("VmHWM")
        else:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_bytes = max(0, hwm - self.base) * 1024
        return False


# ---------------------------------------------------------------------------------------------
# worker: one implementation at one T, in a fresh process; prints one JSON line per phase
def _time_loop(fn, min_time, max_reps, slow_s=4.0):
    """Warm-up call, then repeats until >= min_time s and >= 3 reps (1 rep when the warm-up took
    more than slow_s: then 2 reps, so that at least one call runs on an already-grown heap).
    Returns (best s, median s, reps, warm-up s)."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    times = []
    want = 2 if warm > slow_s else 3
    while len(times) < max_reps and (len(times) < want or sum(times) < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), len(times), warm


def worker(cfg):
    """One implementation at one T, in a fresh process. cfg["measure"] == "time": timing loops;
    == "memory": one call per phase inside PeakRSS. Prints one JSON line per phase."""
    import torch

    sys.path.insert(0, HERE)
    torch.set_num_threads(cfg["threads"])
    import retention
    from eager_reference import chunk_retention_eager, parallel_retention_eager

    B, T, H, dk, dv, impl = cfg["B"], cfg["T"], cfg["H"], cfg["dk"], cfg["dv"], cfg["impl"]
    dtype = torch.float32
    torch.manual_seed(0)
    ld = retention.retnet_log_decay(H)
    eager = impl.startswith("eager")

    def make(T_):
        shape_q = (B, H, T_, dk) if eager else (B, T_, H, dk)
        shape_v = (B, H, T_, dv) if eager else (B, T_, H, dv)
        # unit-variance rows keep the outputs O(1) at every T (values do not affect speed)
        return (torch.randn(shape_q, dtype=dtype), torch.randn(shape_q, dtype=dtype) * dk ** -0.5,
                torch.randn(shape_v, dtype=dtype))

    if impl == "eager-parallel":
        f = lambda q, k, v: parallel_retention_eager(q, k, v, ld)
    elif impl.startswith("eager-chunk"):
        C = int(impl[len("eager-chunk"):])
        f = lambda q, k, v: chunk_retention_eager(q, k, v, ld, chunk_size=C)
    elif impl.startswith("chunk"):
        C = int(impl[len("chunk"):])
        f = lambda q, k, v: retention.chunk_retention(q, k, v, ld, chunk_size=C)
    elif impl == "parallel":
        f = lambda q, k, v: retention.parallel_retention(q, k, v, ld)
    elif impl == "recurrent":
        f = lambda q, k, v: retention.recurrent_retention(q, k, v, ld)
    else:
        raise ValueError(impl)

    # warm up threads / BLAS / lazy library state on a tiny problem of the same kind
    small = [x.requires_grad_() for x in make(min(T, 128))]
    f(*small).sum().backward()
    del small

    q, k, v = make(T)
    g = torch.randn(B, H, T, dv) if eager else torch.randn(B, T, H, dv)
    common = dict(impl=impl, T=T, threads=torch.get_num_threads(), measure=cfg["measure"])

    def emit(**kw):
        print(json.dumps(dict(common, **kw)), flush=True)

    def fwd():  # inference: inputs do not require grad
        o = f(q, k, v)
        del o

    def fwd_bwd():
        for x in (q, k, v):
            x.grad = None
        o = f(q, k, v)
        o.backward(g)
        del o

    for phase, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
        if phase == "fwdbwd":
            for x in (q, k, v):
                x.requires_grad_()
        try:
            if cfg["measure"] == "time":
                best, med, reps, warm = _time_loop(fn, cfg["min_time"], cfg["max_reps"])
                emit(phase=phase, ms=best * 1e3, median_ms=med * 1e3, reps=reps, warm_ms=warm * 1e3)
            else:
                with PeakRSS() as mem:
                    fn()
                emit(phase=phase, peak_bytes=mem.peak_bytes, mem_method=mem.method)
        except RuntimeError as e:  # allocation failure
            emit(phase=phase, error=("OOM" if "memory" in str(e).lower() else "error: " + str(e)[:120]))
            return


def allocator_env(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(ALLOCATOR_ENV[mode])
    return env


def _cpu_busy_s():
    """Busy CPU seconds of the whole machine so far (all CPUs; steal time counts as busy)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    busy = sum(v[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_quiet(max_wait=90.0, level=0.7):
    """Sleeps until the 1-minute load average is below level (at most max_wait s)."""
    t0 = time.time()
    while time.time() - t0 < max_wait:
        try:
            if float(loadavg().split()[0]) < level:
                return
        except ValueError:
            return
        time.sleep(5)


def run_worker(cfg, timeout, allocator="retain"):
    """Runs one configuration in a fresh interpreter; returns {phase: result dict, "bg_cores": ...}.
    bg_cores = CPU used by other processes during the run, in cores (machine busy time minus the
    child's own CPU time, over the wall time)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    env = allocator_env(allocator)
    t0 = time.perf_counter()
    busy0, child0 = _cpu_busy_s(), _children_cpu_s()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, rc, timed_out = p.stdout, p.returncode, False
        err = p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc, timed_out = "", None, True
    res = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            res[r["phase"]] = r
    for ph in ("fwd", "fwdbwd"):
        if ph not in res:
            if timed_out:
                res[ph] = {"error": f"> {timeout:.0f} s"}
            elif rc is not None and rc < 0 and -rc == 9:
                res[ph] = {"error": "OOM (killed)"}
            else:
                tail = (err or "").strip().splitlines()[-1:] or ["?"]
                res[ph] = {"error": f"failed rc={rc}: {tail[0][:100]}"}
            if ph == "fwd":  # no backward either
                res["fwdbwd"] = dict(res[ph])
                break
    res["wall_s"] = time.perf_counter() - t0
    busy1, child1 = _cpu_busy_s(), _children_cpu_s()
    if busy0 is not None and busy1 is not None and res["wall_s"] > 0:
        res["bg_cores"] = max(0.0, (busy1 - busy0) - (child1 - child0)) / res["wall_s"]
    return res


def run_timing(cfg, timeout, allocator, retries, bg_limit):
    """Timing subprocess, repeated (after waiting for a quiet machine) while other processes used
    more than bg_limit cores during it, at most `retries` extra times; per phase the fastest attempt
    is kept (interference only ever adds time)."""
    best = None
    for attempt in range(retries + 1):
        r = run_worker(dict(cfg, measure="time"), timeout, allocator)
        bg = r.get("bg_cores", 0.0)
        for ph in ("fwd", "fwdbwd"):
            r[ph]["bg_cores"] = bg
            r[ph]["attempts"] = attempt + 1
        if best is None:
            best = r
        else:
            for ph in ("fwd", "fwdbwd"):
                if "ms" in r[ph] and ("ms" not in best[ph] or r[ph]["ms"] < best[ph]["ms"]):
                    best[ph] = r[ph]
                best[ph]["attempts"] = attempt + 1
        if bg <= bg_limit or any("OOM" in r[ph].get("error", "") or ">" in r[ph].get("error", "")
                                 for ph in ("fwd", "fwdbwd")):
            break
        wait_quiet()
    return best


# ---------------------------------------------------------------------------------------------
# machine / run information
def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def cpu_model():
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    info.setdefault(k.strip(), v.strip())
    except OSError:
        return platform.processor() or "unknown"
    name = info.get("model name", "unknown")
    fam, mod = info.get("cpu family"), info.get("model")
    flags = info.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "")
    return f"{name} (family {fam}, model {mod}; {isa})"


def blas_info(torch):
    """Name of the BLAS library loaded into this process (file names only, no paths)."""
    names = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                base = os.path.basename(line.split()[-1]) if "/" in line else ""
                if re.search(r"blas|mkl|dnnl|lapack", base, re.I):
                    names.add(base)
    except OSError:
        pass
    cfg = torch.__config__.show()
    m = re.search(r"BLAS_INFO=(\w+)", cfg)
    s = ", ".join(sorted(names)) or "unknown"
    return f"{s} (torch BLAS_INFO={m.group(1) if m else '?'})"


def mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s+(\d+)", f.read())
        return int(m.group(1)) / 2 ** 20
    except (OSError, AttributeError):
        return float("nan")


def mem_available_bytes():
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemAvailable:\s+(\d+)", f.read())
        return int(m.group(1)) * 1024
    except (OSError, AttributeError):
        return None


def git_commit():
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return c or "unknown", bool(dirty)
    except OSError:
        return "unknown", False


def command_line():
    exe = os.path.basename(sys.executable)
    pp = os.environ.get("PYTHONPATH")
    pre = "PYTHONPATH=python " if pp else ""
    return pre + exe + " " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:])


def measure_sgemm(torch, n, threads):
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def measure_first_touch(torch, mib=256):
    """GB/s of writing freshly mapped memory (page faults) vs rewriting it, 1 thread."""
    n = mib * 2 ** 18
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.empty(n)  # > mmap threshold with default glibc: fresh pages
        t0 = time.perf_counter()
        a.fill_(1.0)
        t1 = time.perf_counter()
        a.fill_(2.0)
        t2 = time.perf_counter()
    finally:
        torch.set_num_threads(prev)
    gb = n * 4 / 1e9
    return gb / (t1 - t0), gb / (t2 - t1)


def eager_parallel_bytes(B, H, T, dk, dv, backward):
    """Rough peak of eager-parallel (fp32): D [H,T,T] + dist [T,T] + [B,H,T,T] tensors: scores and
    scores*D forward; saved scores*D, its gradient and the scores' gradient backward."""
    tt = T * T * 4
    return H * tt + tt + B * H * tt * (3 if backward else 2)


def correctness_check(torch, B, H, dk, dv, T=256):
    """Max |o - o_eager_parallel| of every form on one small problem (sanity, not a test)."""
    sys.path.insert(0, HERE)
    import retention
    from eager_reference import chunk_retention_eager, parallel_retention_eager, to_head_first, to_time_first

    torch.manual_seed(1)
    q, k, v = torch.randn(B, T, H, dk), torch.randn(B, T, H, dk) * dk ** -0.5, torch.randn(B, T, H, dv)
    ld = retention.retnet_log_decay(H)
    hf = [to_head_first(x) for x in (q, k, v)]
    ref = to_time_first(parallel_retention_eager(*hf, ld))
    outs = {
        "eager-chunk64": to_time_first(chunk_retention_eager(*hf, ld, chunk_size=64)),
        "chunk64": retention.chunk_retention(q, k, v, ld, chunk_size=64),
        "chunk128": retention.chunk_retention(q, k, v, ld, chunk_size=128),
        "parallel": retention.parallel_retention(q, k, v, ld),
        "recurrent": retention.recurrent_retention(q, k, v, ld),
    }
    scale = ref.abs().max().item()
    return {k_: (o - ref).abs().max().item() for k_, o in outs.items()}, scale


# ---------------------------------------------------------------------------------------------
def _ms(ms):
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def fmt_ms(r):
    if "error" in r:
        return r["error"]
    return _ms(r["ms"]) + (" †" if r.get("fallback") else "")


def fmt_bg(r):
    if "bg_cores" not in r:
        return "—"
    n = r.get("attempts", 1)
    return f"{r['bg_cores']:.2f}" + (f" ({n} tries)" if n > 1 else "")


def fmt_mib(r):
    if "peak_bytes" not in r:
        return r.get("mem_error", "—")
    return f"{r['peak_bytes'] / 2 ** 20:,.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="512,2048,8192", help="comma-separated sequence lengths")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--parallel-max", type=int, default=2048, help="largest T for the library's parallel form")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of repeats per measurement")
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per (impl, T) subprocess")
    ap.add_argument("--retries", type=int, default=2,
                    help="extra timing attempts when other processes used > --bg-limit cores meanwhile")
    ap.add_argument("--bg-limit", type=float, default=0.15, help="cores of other processes tolerated while timing")
    ap.add_argument("--sgemm-n", type=int, default=2048)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"), help="output directory")
    ap.add_argument("--allocator", choices=sorted(ALLOCATOR_ENV), default="retain",
                    help="glibc malloc behaviour in the measured subprocesses (default: retain freed memory)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(json.loads(args.worker))
        return 0

    import torch

    if args.quick:
        args.T, args.H, args.dk, args.dv = "128,256", 2, 32, 32
        args.min_time, args.max_reps, args.sgemm_n = 0.05, 5, 512

    Ts = [int(t) for t in args.T.split(",")]
    impls = [i for i in args.impls.split(",") if i]
    torch.set_num_threads(args.threads)
    commit, dirty = git_commit()
    date = datetime.date.today().isoformat()
    load_start = loadavg()
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    print(f"[cpu_ops] load average at start: {load_start}", file=sys.stderr)
    sgemm_start = measure_sgemm(torch, args.sgemm_n, args.threads)
    print(f"[cpu_ops] sgemm {args.sgemm_n}^3, {args.threads} threads: {sgemm_start:.1f} GFLOP/s", file=sys.stderr)
    errs, ref_scale = correctness_check(torch, args.B, args.H, args.dk, args.dv)
    ft_fresh, ft_reuse = measure_first_touch(torch)

    results = {}
    jobs = [(T, i) for T in Ts for i in impls if not (i == "parallel" and T > args.parallel_max)]
    t_run = time.perf_counter()
    avail = mem_available_bytes()
    for n, (T, impl) in enumerate(jobs):
        cfg = dict(impl=impl, T=T, B=args.B, H=args.H, dk=args.dk, dv=args.dv, threads=args.threads,
                   min_time=args.min_time, max_reps=args.max_reps)
        if impl == "eager-parallel" and avail is not None:
            need_f = eager_parallel_bytes(args.B, args.H, T, args.dk, args.dv, False)
            need_b = eager_parallel_bytes(args.B, args.H, T, args.dk, args.dv, True)
            if need_f > 0.9 * avail:
                est = {"error": f"OOM (est. {need_f / 2**30:.0f} GiB > {avail / 2**30:.0f} GiB free)"}
                results[(T, impl)] = {"fwd": est, "fwdbwd": est, "wall_s": 0}
                continue
        print(f"[cpu_ops] ({n + 1}/{len(jobs)}) T={T} {impl} ...", file=sys.stderr, end="", flush=True)
        t0 = time.perf_counter()
        rt = run_timing(cfg, args.timeout, args.allocator, args.retries, args.bg_limit)
        # a retaining heap can fragment: if timing ran out of memory, time with glibc defaults
        if args.allocator != "default" and any("OOM" in rt[ph].get("error", "") for ph in ("fwd", "fwdbwd")):
            rd = run_worker(dict(cfg, measure="time"), args.timeout, "default")
            for ph in ("fwd", "fwdbwd"):
                if "OOM" in rt[ph].get("error", "") and "error" not in rd[ph]:
                    rt[ph] = dict(rd[ph], fallback=True)
        rm = run_worker(dict(cfg, measure="memory"), args.timeout, "default")
        r = {"wall_s": time.perf_counter() - t0}
        for ph in ("fwd", "fwdbwd"):
            r[ph] = dict(rt[ph])
            if "peak_bytes" in rm[ph]:
                r[ph]["peak_bytes"], r[ph]["mem_method"] = rm[ph]["peak_bytes"], rm[ph]["mem_method"]
            else:
                r[ph]["mem_error"] = rm[ph].get("error", "?")
        results[(T, impl)] = r
        print(f" fwd {fmt_ms(r['fwd'])} ms, fwd+bwd {fmt_ms(r['fwdbwd'])} ms ({r['wall_s']:.0f} s)",
              file=sys.stderr)
    run_s = time.perf_counter() - t_run
    sgemm_end = measure_sgemm(torch, args.sgemm_n, args.threads)
    load_end = loadavg()
    sgemm = max(sgemm_start, sgemm_end)
    print(f"[cpu_ops] load average at end: {load_end}; sgemm at end {sgemm_end:.1f} GFLOP/s", file=sys.stderr)

    # ----- report
    B, H, dk, dv = args.B, args.H, args.dk, args.dv
    mem_methods = {r[ph].get("mem_method") for r in results.values() for ph in ("fwd", "fwdbwd")
                   if isinstance(r.get(ph), dict) and r[ph].get("mem_method")}
    L = []
    L.append(f"# Retention ops on CPU vs eager PyTorch — {date}, commit {commit}{' (+ uncommitted changes)' if dirty else ''}")
    L.append("")
    L.append(f"- Command: `{command_line()}`")
    L.append(f"- Started {started}; benchmark body {run_s:.0f} s")
    L.append(f"- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {mem_total_gib():.1f} GiB RAM; "
             f"{platform.system()} {platform.machine()}, Python {platform.python_version()}")
    L.append(f"- torch {torch.__version__}, threads = {args.threads} (torch.set_num_threads; "
             f"torch.get_num_threads() = {torch.get_num_threads()}), BLAS: {blas_info(torch)}; "
             f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset (OpenBLAS default: one per CPU)')}, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    L.append(f"- Load average (1/5/15 min) at start: {load_start}; at end: {load_end}")
    L.append(f"- sgemm rate ({args.sgemm_n}³ fp32 torch.mm, {args.threads} threads, median of 5): "
             f"{sgemm_start:.1f} GFLOP/s at start, {sgemm_end:.1f} at end; % columns use the larger, {sgemm:.1f}")
    alloc_txt = {
        "retain": "glibc malloc told to keep and reuse freed memory in every measured subprocess "
                  "(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=10^12), like a caching allocator",
        "default": "glibc malloc defaults (blocks above the mmap threshold are mapped and unmapped on every call)"}
    L.append(f"- Allocator: {alloc_txt[args.allocator]}. Why: on this machine writing freshly mapped pages runs at "
             f"{ft_fresh:.2f} GB/s (1 thread, page faults) against {ft_reuse:.1f} GB/s for rewriting them, so "
             f"with the defaults every call that allocates large new tensors pays page faults that dominate "
             f"its time (mostly the eager references, whose T×T tensors are far above the mmap threshold).")
    L.append(f"- Problem: B={B}, H={H}, dk={dk}, dv={dv}, fp32, time-first [B,T,H,d] for the library ops, "
             f"head-first [B,H,T,d] for the eager references (each in its native layout); "
             f"log_decay = retnet_log_decay(H); default scale dk^-0.5.")
    mx = eager_parallel_bytes(B, H, max(Ts), dk, dv, True) / 2 ** 30
    L.append(f"- Sizes chosen so that the eager parallel reference fits in memory at the largest T: its "
             f"D [H,T,T] and T×T score tensors (and their gradients) need ≈ {mx:.1f} GiB for fwd+bwd at "
             f"T={max(Ts)} (B={B}); B=2 would need about twice that, too close to the machine's RAM.")
    L.append("- Sanity check (T=256, same B/H/dk/dv): max |o − o_eager-parallel| = " +
             ", ".join(f"{k_} {v_:.1e}" for k_, v_ in errs.items()) + f" (max |o| = {ref_scale:.1f})")
    L.append("")
    L.append("Columns: best / median = fastest and median wall time of repeated calls after one warm-up "
             f"(≥ 3 repeats and ≥ {args.min_time:g} s, or 2 repeats when the warm-up took > 4 s); the best time is "
             "used for the ratios and rates (it is the least disturbed by other processes); ×eager = eager time / "
             "this time (> 1: faster than eager); GFLOP/s = useful FLOPs (performance.md §4.1/§4.2, below) / time; "
             "%sgemm = that rate / the sgemm rate; peak MiB = resident-memory high-water of one call above "
             "the resident memory before it (inputs excluded; outputs, saved tensors, gradients and "
             "temporaries included; see Memory method). † = timed with glibc's default allocator because the "
             "retaining heap ran out of memory (includes the page-fault cost described above). bg cores = CPU "
             "used by other processes while the timing subprocess ran (machine busy time from /proc/stat minus "
             f"the subprocess's own CPU time, per wall second); above {args.bg_limit:g} the configuration was "
             f"timed again after waiting for a quiet machine (up to {args.retries} more tries, fastest kept).")
    L.append("")

    def base(T, name, ph):
        r = results.get((T, name), {}).get(ph)
        return r["ms"] if r and "error" not in r else None

    for ph, title in (("fwd", "Forward (inference, inputs without grad)"),
                      ("fwdbwd", "Forward + backward (o.backward(grad) into q, k, v)")):
        L.append(f"## {title}")
        L.append("")
        L.append("| T | impl | best (ms) | median (ms) | ×eager-parallel | ×eager-chunk64 | GFLOP/s | %sgemm | peak MiB | bg cores |")
        L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for T in Ts:
            bp, bc = base(T, "eager-parallel", ph), base(T, "eager-chunk64", ph)
            for impl in impls:
                if (T, impl) not in results:
                    continue
                r = results[(T, impl)][ph]
                ff, fb = flops(impl, T, dk, dv)
                fl = B * H * (ff if ph == "fwd" else ff + fb)
                if "error" in r:
                    L.append(f"| {T} | {impl} | {r['error']} | — | — | — | — | — | {fmt_mib(r)} | {fmt_bg(r)} |")
                    continue
                ms = r["ms"]
                gf = fl / (ms * 1e-3) / 1e9
                rp = f"{bp / ms:.2f}" if bp else "—"
                rc = f"{bc / ms:.2f}" if bc else "—"
                L.append(f"| {T} | {impl} | {fmt_ms(r)} | {_ms(r['median_ms'])} | {rp} | {rc} | {gf:.1f} | "
                         f"{100 * gf / sgemm:.0f}% | {fmt_mib(r)} | {fmt_bg(r)} |")
        L.append("")

    L.append("## FLOP model (per batch and head; FLOPs = 2 × multiply-adds)")
    L.append("")
    L.append("- chunk C (library chunk64/128 and eager-chunk64): fwd 2T[C(dk+dv) + 2dk·dv] (§4.1); "
             "bwd 2T[C(3dk+2dv) + 5dk·dv] (§4.2).")
    L.append("- parallel (library and eager-parallel): fwd T²(dk+dv) (§4.1, causal half); bwd T²(3dk+2dv) "
             "(the intra-chunk terms of §4.2 with C = T, causal half, no state terms). eager-parallel "
             "actually multiplies the full T×T matrices (2× these), so its GFLOP/s is useful work only.")
    L.append(f"- recurrent: fwd 5T·dk·dv (§4.4); bwd = chunk bwd with C = {RECURRENT_BWD_CHUNK} "
             "(the op's backward is the chunk backward).")
    L.append("")
    L.append("## Memory method")
    L.append("")
    L.append("Memory is measured in its own fresh Python subprocess per (impl, T), separate from the timing "
             "subprocess, with glibc's default allocator (large blocks mapped on allocation and unmapped on free, "
             "so resident memory follows live tensors; the retaining heap used for timing fragments and would "
             "overstate peaks). After creating the inputs and one tiny warm-up call of the same implementation "
             "(T ≤ 128, with backward), each phase returns freed heap pages to the OS (glibc malloc_trim(0)), "
             "resets the kernel's RSS high-water mark (writes 5 to /proc/self/clear_refs), reads VmRSS, runs one "
             "call, and reports peak = VmHWM − that VmRSS: every page the call touched beyond the inputs "
             "(outputs, saved tensors, temporaries, allocator slack and, for fwd+bwd, the gradient buffers). "
             f"Method used in this run: {', '.join(sorted(mem_methods)) or 'n/a'}.")
    L.append("")
    bgs = [r[ph]["bg_cores"] for r in results.values() for ph in ("fwd", "fwdbwd")
           if isinstance(r.get(ph), dict) and "bg_cores" in r[ph]]
    bg_max = max(bgs) if bgs else float("nan")
    L.append(f"Quietness: 1-minute load average {load_start.split()[0]} at the start (the load at the end, "
             f"{load_end.split()[0]}, includes this benchmark's own threads); other processes used at most "
             f"{bg_max:.2f} cores during any timing subprocess (bg cores column).")
    L.append("")
    try:
        load1_s = float(load_start.split()[0])
    except ValueError:
        load1_s = float("nan")
    if not (load1_s < 0.7 and bg_max <= args.bg_limit):
        L.append(f"**Warning: the machine was not quiet (load average at start {load_start.split()[0]}, other "
                 f"processes up to {bg_max:.2f} cores while timing); timings may be disturbed.**")
        L.append("")

    text = "\n".join(L) + "\n"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cpu_ops_{date}_{commit}{'_quick' if args.quick else ''}"
                        f"{'_glibc-default' if args.allocator == 'default' else ''}.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"[cpu_ops] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
