#!/usr/bin/env python3
"""Serve from C++ vs Python: decode tokens/s of the retention-generate app (retention::RetNet)
and of Python's RetNet decode loop, prefill tokens/s, and per-token latency at B=1 against the
time it takes to read the weights once from memory.

Models (random weights, fp32, saved with RetNet.save_pretrained):
  main  the main job's model (examples/train_lm.py defaults: D 128, Dv 256, 4 heads, 3 layers,
        FFN 256, character vocabulary of 86)
  100m  D 768, Dv 1536, 12 heads, 12 layers, FFN 1536, vocab 256: 99.5M parameters

Method
- Python: chunk-form prefill, then the loop of RetNet.generate (argmax, RetNet.step); a few
  warm-up steps, then the mean step time over --steps steps. tokens/s = B / step time.
- C++: `retention-generate --ids <16 tokens> --batch B --max-new-tokens steps+1 --json`, the
  app's own decode timing (every step: embedding, layers, head, argmax on the CPU); at B=1 also
  with `--dtype bf16` (the weights cast to bf16 at load).
- Prefill: one prompt of --prefill-len tokens, chunk form (C++: packed prefill; Python: forward),
  each after a warm-up prefill in the same process (the app's --warmup), best of 3.
- Memory bandwidth: best time of `x.sum()` over a 1 GiB fp32 tensor (all threads); the weights'
  read time is measured directly too (sum of every weight tensor, best of 5).
- Both sides use the same number of threads (--threads, default every core).
- The load average and the CPU time other processes used during each measurement are recorded:
  on a shared machine the numbers are only indicative.

Usage: PYTHONPATH=python python3 bench/serve_decode.py [--models main,100m] [--out bench/results]
"""

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import cpu_ops  # noqa: E402  (machine description helpers)
from retention.nn import RetNet  # noqa: E402

THREADS = 1
MODELS = {
    "main": dict(vocab_size=86, embed_dim=128, value_dim=256, num_heads=4, num_layers=3, ffn_dim=256, chunk_size=32),
    "100m": dict(vocab_size=256, embed_dim=768, value_dim=1536, num_heads=12, num_layers=12, ffn_dim=1536,
                 chunk_size=64),
}


class Busy:
    """CPU cores used by other processes while the block ran (machine busy time minus ours)."""

    def __enter__(self):
        self.t0, self.b0 = time.time(), cpu_ops._cpu_busy_s()
        self.own0 = self._own()
        return self

    @staticmethod
    def _own():
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def __exit__(self, *exc):
        dt = max(time.time() - self.t0, 1e-9)
        busy = cpu_ops._cpu_busy_s()
        self.cpu_s = self._own() - self.own0  # this process and its finished children
        self.bg_cores = None if busy is None or self.b0 is None else max(0.0, (busy - self.b0 - self.cpu_s) / dt)
        return False


def set_blas_threads(n):
    """OpenBLAS's own thread pool (Debian's torch) is not governed by torch.set_num_threads; the
    app sets it to --threads too. Returns whether OpenBLAS was found."""
    import ctypes
    import ctypes.util
    for name in ("libopenblas.so.0", ctypes.util.find_library("openblas")):
        try:
            ctypes.CDLL(name).openblas_set_num_threads(int(n))  # the already-loaded library
            return True
        except (OSError, AttributeError, TypeError):
            continue
    return False


def bandwidth_gbs(threads):
    x = torch.ones(256 * 2 ** 20)  # 1 GiB fp32
    best, best_cpu = float("inf"), float("inf")
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        x.sum()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    n = x.numel()
    del x
    return n * 4 / best / 1e9, n * 4 / best_cpu / 1e9 * threads


def weights_read_s(model):
    ps = [p.detach() for p in model.parameters()]
    best, best_cpu = float("inf"), float("inf")
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        for p in ps:
            p.sum()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu


@torch.no_grad()
def one_row_projection(K, N, reps=20):
    """Best CPU time of one [1, K] x W^T projection (W [N, K] fp32) through GEMM (F.linear, what
    nn.Linear does), through the BLAS gemv (torch.mv) and through our gemv (retention's matvec,
    what retention.nn.Linear and the C++ models do for one row)."""
    from retention.functional import matvec
    w, x = torch.randn(N, K), torch.randn(1, K)
    out = {}
    for name, f in (("gemm", lambda: torch.nn.functional.linear(x, w)), ("gemv", lambda: torch.mv(w, x[0])),
                    ("matvec", lambda: matvec(w, x[0]))):
        f()
        best = float("inf")
        for _ in range(reps):
            c0 = time.process_time()
            f()
            best = min(best, time.process_time() - c0)
        out[name + "_cpu_ms"] = best * 1e3
    out["weight_mib"] = N * K * 4 / 2 ** 20
    return out


@torch.no_grad()
def python_decode(model, B, steps, warmup=3):
    prompt = torch.randint(0, model.vocab_size, (B, 16), generator=torch.Generator().manual_seed(B))
    logits, state = model(prompt, form="chunk")
    tok = logits[:, -1].float().argmax(-1)
    for _ in range(warmup):
        logits, state = model.step(tok, state)
        tok = logits.float().argmax(-1)
    with Busy() as b:
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, state = model.step(tok, state)
            tok = logits.float().argmax(-1)
        dt = (time.perf_counter() - t0) / steps
    return dict(step_ms=dt * 1e3, tokens_per_s=B / dt, cpu_step_ms=b.cpu_s / steps * 1e3, bg_cores=b.bg_cores)


@torch.no_grad()
def python_prefill(model, T):
    prompt = torch.randint(0, model.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    model(prompt[:, :64], form="chunk")
    best, best_cpu = float("inf"), float("inf")
    with Busy() as b:
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            model(prompt, form="chunk")
            best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return dict(seconds=best, tokens_per_s=T / best, cpu_tokens_per_s=T / best_cpu, bg_cores=b.bg_cores)


def run_app(app, ckpt, ids, B, new_tokens, dtype="auto", warmup=False):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [app, "--checkpoint", ckpt, "--ids", ",".join(map(str, ids)), "--batch", str(B), "--threads", str(THREADS),
           "--max-new-tokens", str(new_tokens), "--dtype", dtype, "--quiet", "--json", out] + (["--warmup"] if warmup else [])
    with Busy() as b:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(out) as f:
        r = json.load(f)
    os.unlink(out)
    r["bg_cores"] = b.bg_cores
    r["cpu_s"] = b.cpu_s
    return r


def cpp_decode(app, ckpt, vocab, B, steps, dtype="auto"):
    ids = torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(B)).tolist()
    # The first steps warm up the allocator and caches: time steps+4 and also run a short one to
    # subtract (both runs share the prefill, which the app times separately).
    long = run_app(app, ckpt, ids, B, steps + 5, dtype)
    short = run_app(app, ckpt, ids, B, 5, dtype)
    dt = (long["decode_seconds"] - short["decode_seconds"]) / steps
    return dict(step_ms=dt * 1e3, tokens_per_s=B / dt, cpu_step_ms=(long["decode_cpu_seconds"] - short["decode_cpu_seconds"]) / steps * 1e3,
                bg_cores=max(long["bg_cores"] or 0, short["bg_cores"] or 0), peak_rss_mib=long["peak_rss_mib"])


def cpp_prefill(app, ckpt, vocab, T):
    """The app's prefill after its --warmup (Python's is timed warm too), best of 3 runs."""
    ids = torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(T)).tolist()
    best = None
    for _ in range(3):
        r = run_app(app, ckpt, ids, 1, 1, warmup=True)
        if best is None or r["prefill_seconds"] < best["prefill_seconds"]:
            best = r
    return dict(seconds=best["prefill_seconds"], tokens_per_s=T / best["prefill_seconds"], bg_cores=best["bg_cores"])


def cpp_prefill_cpu(app, ckpt, vocab, T):
    """Prefill tokens per CPU second (the app's own CPU timing, best of 3)."""
    ids = torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(T)).tolist()
    return T / min(run_app(app, ckpt, ids, 1, 1, warmup=True)["prefill_cpu_seconds"] for _ in range(3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default=os.path.join(HERE, "..", "build", "install", "bin", "retention-generate"))
    ap.add_argument("--models", default="main,100m")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=0, help="decode steps timed (default: 64 main, 16 for 100m)")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for both sides (default: all cores; use 1 on a shared machine, where "
                         "threads of one op waiting for each other at every barrier dominate)")
    a = ap.parse_args(argv)
    global THREADS
    THREADS = threads = a.threads
    torch.set_num_threads(threads)
    blas = set_blas_threads(threads)
    load_start = cpu_ops.loadavg()
    bw, bw_cpu = bandwidth_gbs(threads)
    print(f"memory read bandwidth: {bw:.2f} GB/s wall, {bw_cpu:.2f} GB/s per CPU second "
          f"(x.sum() over 1 GiB, {threads} threads)", flush=True)
    rows = []
    tmp = tempfile.mkdtemp()
    for name in a.models.split(","):
        cfg = MODELS[name]
        torch.manual_seed(0)
        model = RetNet(**cfg).eval()
        ckpt = model.save_pretrained(os.path.join(tmp, f"{name}.safetensors"))
        n_params = sum(p.numel() for p in model.parameters())
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        steps = a.steps or (64 if name == "main" else 16)
        wr, wr_cpu = weights_read_s(model)
        row = dict(model=name, config=cfg, params=n_params, weight_bytes=wbytes, weights_read_ms=wr * 1e3,
                   weights_read_cpu_ms=wr_cpu * 1e3, bw_read_ms=wbytes / bw / 1e6, bw_cpu_read_ms=wbytes / bw_cpu / 1e6)
        for B in [int(b) for b in a.batches.split(",")]:
            row[f"py_B{B}"] = python_decode(model, B, steps)
            row[f"cpp_B{B}"] = cpp_decode(a.app, ckpt, cfg["vocab_size"], B, steps)
            print(name, B, row[f"py_B{B}"], row[f"cpp_B{B}"], flush=True)
        row["cpp_bf16_B1"] = cpp_decode(a.app, ckpt, cfg["vocab_size"], 1, steps, dtype="bf16")
        D, Dv, F, V = cfg["embed_dim"], cfg["value_dim"], cfg["ffn_dim"], cfg["vocab_size"]
        row["projections"] = {f"{K}x{N}": one_row_projection(K, N) for K, N in sorted({(D, D), (D, Dv), (Dv, D),
                                                                                    (D, F), (F, D), (D, V)})}
        row["py_prefill"] = python_prefill(model, a.prefill_len)
        row["cpp_prefill"] = cpp_prefill(a.app, ckpt, cfg["vocab_size"], a.prefill_len)
        row["cpp_prefill"]["cpu_tokens_per_s"] = cpp_prefill_cpu(a.app, ckpt, cfg["vocab_size"], a.prefill_len)
        print(name, "prefill", row["py_prefill"], row["cpp_prefill"], flush=True)
        rows.append(row)
        os.unlink(ckpt)
    load_end = cpu_ops.loadavg()

    commit, dirty = cpu_ops.git_commit()
    commit += "-dirty" if dirty else ""
    date = datetime.date.today().isoformat()
    hw = f"{cpu_ops.cpu_model()}, {threads} threads"
    tag = "cpu-" + "".join(c if c.isalnum() else "-" for c in hw.split(",")[0].lower())[:30]
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"serve_decode_{tag}_{date}_{commit}")
    bg = max((v.get("bg_cores") or 0) for r in rows for k, v in r.items() if isinstance(v, dict) and "bg_cores" in v)
    quiet = bg <= 0.15
    L = [f"# Serve from C++: retention-generate vs Python RetNet decode (CPU)", "",
         f"- date {date}, commit {commit}, hardware: {hw}, torch {torch.__version__}",
         f"- command: `{cpu_ops.command_line()}`",
         f"- {threads} threads on both sides (torch and OpenBLAS: {'set' if blas else 'OpenBLAS not found'})",
         f"- load average at start {load_start}, at end {load_end}; other processes used up to {bg:.2f} cores "
         f"during a measurement" + ("" if quiet else " — **the machine was not quiet: wall-clock times are "
                                   "inflated; the CPU-time columns (CPU seconds this process used, per step) "
                                   "are the comparable numbers**"),
         f"- memory read bandwidth (`x.sum()` over 1 GiB fp32): **{bw:.2f} GB/s** wall clock, "
         f"**{bw_cpu:.2f} GB/s** per CPU second",
         "- fp32 weights, prompts of 16 tokens, greedy; a step decodes one token for every sequence of the batch", "",
         "| model | params | weights | B | Python step (wall / CPU) | C++ step (wall / CPU) | Python tok/s (CPU) | C++ tok/s (CPU) | C++/Python (CPU) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for B in [int(b) for b in a.batches.split(",")]:
            p, c = r[f"py_B{B}"], r[f"cpp_B{B}"]
            L.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['weight_bytes'] / 2 ** 20:.1f} MiB | {B} | "
                     f"{p['step_ms']:.2f} / {p['cpu_step_ms']:.2f} ms | {c['step_ms']:.2f} / {c['cpu_step_ms']:.2f} ms | "
                     f"{B * 1e3 / p['cpu_step_ms']:.0f} | {B * 1e3 / c['cpu_step_ms']:.0f} | "
                     f"{p['cpu_step_ms'] / c['cpu_step_ms']:.2f}x |")
    L += ["", "One projection of one row ([1, K] x W^T, fp32, best CPU time of 20): GEMM (`F.linear`, what "
          "`nn.Linear` runs), the BLAS's gemv (`torch.mv`) and ours (`matvec`, what `retention.nn.Linear` and the "
          "C++ models run for one row):", "",
          "| model | K x N | weights | GEMM | BLAS gemv | matvec | GEMM / matvec | BLAS gemv / matvec |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for shape, pr in r["projections"].items():
            m = max(pr["matvec_cpu_ms"], 1e-9)
            L.append(f"| {r['model']} | {shape} | {pr['weight_mib']:.2f} MiB | {pr['gemm_cpu_ms']:.3f} ms | "
                     f"{pr['gemv_cpu_ms']:.3f} ms | {pr['matvec_cpu_ms']:.3f} ms | {pr['gemm_cpu_ms'] / m:.2f}x | "
                     f"{pr['gemv_cpu_ms'] / m:.2f}x |")
    L += ["", "Per-token latency at B=1 (C++) vs the time to read the weights once "
          "(the target: within 1.5x):", ""]
    for r in rows:
        c = r.get("cpp_B1")
        if c:
            L.append(f"- {r['model']}: {c['cpu_step_ms']:.2f} ms CPU per token vs {r['bw_cpu_read_ms']:.2f} ms to read "
                     f"{r['weight_bytes'] / 2 ** 20:.1f} MiB at {bw_cpu:.2f} GB/s per CPU second "
                     f"(**{c['cpu_step_ms'] / r['bw_cpu_read_ms']:.2f}x**; summing every weight tensor took "
                     f"{r['weights_read_cpu_ms']:.2f} ms CPU). Wall clock: {c['step_ms']:.2f} ms vs "
                     f"{r['bw_read_ms']:.2f} ms at {bw:.2f} GB/s.")
            cb = r["cpp_bf16_B1"]
            L.append(f"  - bf16 weights (`--dtype bf16`, fp32 accumulation): {cb['cpu_step_ms']:.2f} ms CPU per token, "
                     f"{cb['cpu_step_ms'] / r['bw_cpu_read_ms']:.2f}x the fp32 weights' read time, "
                     f"{2 * cb['cpu_step_ms'] / r['bw_cpu_read_ms']:.2f}x the bf16 weights' "
                     f"({r['weight_bytes'] / 2 ** 21:.1f} MiB).")
    L += ["", f"Prefill, one prompt of {a.prefill_len} tokens (chunk form), tokens/s:", "",
          "| model | Python (wall / CPU) | C++ (wall / CPU) |", "|---|---|---|"]
    for r in rows:
        p, c = r["py_prefill"], r["cpp_prefill"]
        L.append(f"| {r['model']} | {p['tokens_per_s']:.0f} / {p['cpu_tokens_per_s']:.0f} | "
                 f"{c['tokens_per_s']:.0f} / {c['cpu_tokens_per_s']:.0f} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(L) + "\n")
    with open(base + ".json", "w") as f:
        json.dump(dict(date=date, commit=commit, hardware=hw, torch=torch.__version__, bandwidth_gbs=bw,
                       bandwidth_cpu_gbs=bw_cpu,
                       load_start=load_start, load_end=load_end, rows=rows), f, indent=1)
    print("\n".join(L))
    print(f"wrote {base}.md/.json")


if __name__ == "__main__":
    main()
