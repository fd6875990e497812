#!/usr/bin/env python3
"""Inference and training cost curves: RetNet (this library) vs a same-size Transformer (issue 6).

Measures, in the style of the RetNet paper's Figures 1 and 6:

  decoding  RetNet: recurrent decoding (``RetNet.step``: one ``recurrent_step`` per layer, O(1)
            state); Transformer: KV-cache decoding (``bench/transformer.py``).
            * context sweep at a fixed batch: throughput (tokens/s), per-token latency, memory
            * batch sweep at a fixed context: per-token latency and throughput
  training  one optimizer step (forward, cross-entropy, backward, AdamW) at several lengths for
            RetNet chunk form, RetNet parallel form and the Transformer: tokens/s, peak memory.

Decoding method: the state / KV cache is set up as if L tokens had already been consumed
(RetNet: a [B, H, dk, dv] fp32 state per layer at offset L; Transformer: a pre-allocated cache
holding L positions); then a few warm-up steps and N timed steps run. Decode cost depends on the
cache size, not its contents, so this isolates steady-state decoding at context L from the
prefill (which is not timed). Per-token latency = median time of one step for the whole batch;
throughput = batch / mean step time.

Memory method: every configuration runs in a fresh subprocess (unless --inprocess; --quick
implies it). CPU: model weights (+ AdamW state for training), computed from tensor sizes, plus
the resident-set high-water mark of the measured phase above the RSS at its start (Linux
clear_refs reset; the phase allocates the state / KV cache, so that is included). The cache and
state sizes are also reported exactly, from their tensor sizes. GPU: torch.cuda.max_memory_allocated
(reset after the model is built; weights included).

Run from the repository root (extension built in place):
    PYTHONPATH=python python3 bench/cost_curves.py                  # CPU default sizes
    PYTHONPATH=python python3 bench/cost_curves.py --quick --out DIR   # CI smoke test, < 60 s
    PYTHONPATH=python python3 bench/cost_curves.py --gpu-paper      # 1.3B shape on a GPU
"""

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import cpu_ops  # noqa: E402  (machine info, PeakRSS)

PAPER = {"throughput": 8.4, "memory": 3.4, "latency": 15.6}  # Fig. 1, 6.7B, 8K, A100 (retnet-anchors A1)

PRESETS = {
    # small model for a 2-core CPU
    "cpu": dict(vocab=8192, d=512, layers=6, heads=4, value_dim=1024, ffn=1024,
                contexts=[256, 512, 1024, 2048, 4096, 8192], decode_batch=4,
                batches=[1, 2, 4, 8, 16], train_lengths=[512, 1024, 2048], train_batch=1,
                decode_steps=16, warmup_steps=2, dtype="float32"),
    # RetNet-1.3B shape (paper Table 2): d 2048, 24 layers, 8 heads, Dv = 2d, FFN 2d (dk 256, dv 512)
    "gpu-paper": dict(vocab=32000, d=2048, layers=24, heads=8, value_dim=4096, ffn=4096,
                      contexts=[1024, 2048, 4096, 8192, 16384, 32768], decode_batch=8,
                      batches=[1, 2, 4, 8, 16, 32, 64], train_lengths=[2048, 8192, 16384], train_batch=1,
                      decode_steps=32, warmup_steps=3, dtype="bfloat16"),
    # CI smoke test
    "quick": dict(vocab=256, d=64, layers=2, heads=2, value_dim=128, ffn=128,
                  contexts=[32, 64], decode_batch=2, batches=[1, 2], train_lengths=[32, 64],
                  train_batch=1, decode_steps=3, warmup_steps=1, dtype="float32"),
}


# ---------------------------------------------------------------------------------------------
class Progress:
    """tqdm when importable, else a minimal bar on stderr."""

    def __init__(self, total, desc=""):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr)
        except ImportError:
            self.bar = None
        self.total, self.n, self.desc, self.t0 = total, 0, desc, time.perf_counter()
        self.label = ""

    def set(self, label):
        self.label = label
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        else:
            self._draw()

    def update(self):
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            self._draw()

    def _draw(self):
        w = 24
        fill = int(w * self.n / max(1, self.total))
        el = time.perf_counter() - self.t0
        sys.stderr.write(f"\r{self.desc} [{'#' * fill}{'.' * (w - fill)}] {self.n}/{self.total} "
                         f"{el:5.0f}s {self.label[:48]:<48}")
        sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


# ---------------------------------------------------------------------------------------------
# models
def build_model(cfg):
    import torch
    import retention
    from transformer import TransformerLM, matched_ffn_dim

    torch.manual_seed(0)
    if cfg["model"] == "retnet":
        m = retention.nn.RetNet(cfg["vocab"], cfg["d"], cfg["value_dim"], cfg["heads"], cfg["layers"],
                                cfg["ffn"], chunk_size=cfg.get("chunk_size", 64))
    else:
        m = TransformerLM(cfg["vocab"], cfg["d"], cfg["heads"], cfg["layers"],
                          matched_ffn_dim(cfg["d"], cfg["value_dim"], cfg["ffn"]))
    return m.to(device=cfg["device"], dtype=getattr(torch, cfg["dtype"]))


def tensor_bytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


class Peak:
    """Peak memory of a block: GPU max_memory_allocated (absolute), CPU RSS high-water delta."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def __enter__(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.rss = cpu_ops.PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
        else:
            self.rss.__exit__(*exc)
            self.bytes = self.rss.peak_bytes
            self.method = self.rss.method
        return False


def _sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _is_oom(e):
    s = str(e).lower()
    return "out of memory" in s or "not enough memory" in s or "can't allocate memory" in s


def decode_worker(cfg):
    """Steady-state decoding at context L with batch B; returns a result dict."""
    import torch
    import retention

    torch.set_num_threads(cfg["threads"])
    dev, B, L = cfg["device"], cfg["B"], cfg["L"]
    steps, warm = cfg["decode_steps"], cfg["warmup_steps"]
    if cfg.get("measure") == "memory":  # memory-only run: a few steps are enough
        steps, warm = min(steps, 2), min(warm, 1)
    dtype = getattr(torch, cfg["dtype"])
    model = build_model(cfg).eval()
    weights = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, cfg["vocab"], (warm + steps + 1, B), generator=g).to(dev)
    cuda = str(dev).startswith("cuda")
    times = []
    try:
        with torch.no_grad(), Peak(dev) as pk:
            if cfg["model"] == "retnet":
                layer = model.layers[0].retention
                state_dt = torch.float64 if dtype == torch.float64 else torch.float32
                state = retention.nn.RetNetState([
                    retention.nn.RetentionState(
                        torch.zeros(B, layer.num_heads, layer.key_dim, layer.head_dim, device=dev,
                                    dtype=state_dt), L)
                    for _ in model.layers])
                cache_bytes = tensor_bytes(s.state for s in state.layers)
                step = lambda t: model.step(t, state)[0]
            else:
                cache = model.init_cache(B, L + warm + steps + 1, device=dev, dtype=dtype)
                cache.length = L
                # bytes of the L + 1 positions the last timed step reads (capacity is a few more)
                cache_bytes = cache.nbytes() * (L + 1) // cache.capacity
                step = lambda t: model.step(t, cache)
            for i in range(warm):
                step(toks[i])
            _sync(dev)
            for i in range(warm, warm + steps):
                t0 = time.perf_counter()
                step(toks[i])
                _sync(dev)
                times.append(time.perf_counter() - t0)
    except RuntimeError as e:
        if _is_oom(e):
            return dict(error="OOM")
        raise
    peak = pk.bytes if cuda else weights + pk.bytes
    mean = sum(times) / len(times)
    return dict(latency_ms=statistics.median(times) * 1e3, mean_ms=mean * 1e3, tokens_per_s=B / mean,
                cache_bytes=cache_bytes, weight_bytes=weights, peak_bytes=peak, mem_method=pk.method,
                steps=len(times))


def train_worker(cfg):
    """One training step (fwd, CE loss, bwd, AdamW) at length T; returns a result dict."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg["threads"])
    dev, B, T = cfg["device"], cfg["B"], cfg["T"]
    model = build_model(dict(cfg, model="retnet" if cfg["form"] != "transformer" else "transformer")).train()
    weights = tensor_bytes(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(2)
    data = torch.randint(0, cfg["vocab"], (B, T + 1), generator=g).to(dev)
    x, y = data[:, :-1], data[:, 1:]
    cuda = str(dev).startswith("cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        if cfg["form"] == "transformer":
            logits = model(x)
        else:
            logits = model(x, form=cfg["form"], chunk_size=cfg.get("chunk_size"))[0]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        opt.step()
        _sync(dev)

    try:
        t0 = time.perf_counter()
        step()  # warm-up; also allocates the AdamW state
        warm = time.perf_counter() - t0
        opt_bytes = tensor_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        times = []
        with Peak(dev) as pk:
            want = 1 if (warm > cfg["slow_s"] or cfg.get("measure") == "memory") else 2
            min_time = 0.0 if cfg.get("measure") == "memory" else cfg["min_time"]
            while len(times) < want or (sum(times) < min_time and len(times) < 10):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
    except RuntimeError as e:
        if _is_oom(e):
            return dict(error="OOM")
        raise
    sec = statistics.median(times)
    peak = pk.bytes if cuda else weights + opt_bytes + pk.bytes
    return dict(step_ms=sec * 1e3, tokens_per_s=B * T / sec, peak_bytes=peak, weight_bytes=weights,
                opt_bytes=opt_bytes, mem_method=pk.method, reps=len(times))


WORKERS = {"decode": decode_worker, "train": train_worker}


def run_config(cfg, inprocess, timeout, allocator="retain", blas=None):
    if inprocess:
        try:
            return WORKERS[cfg["kind"]](cfg)
        except RuntimeError as e:
            return dict(error=("OOM" if _is_oom(e) else "error: " + str(e)[:100]))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    t0, busy0, child0 = time.perf_counter(), cpu_ops._cpu_busy_s(), cpu_ops._children_cpu_s()
    try:
        env = cpu_ops.allocator_env(allocator)
        if blas is not None:
            env["OPENBLAS_NUM_THREADS"] = str(blas)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"> {timeout:.0f} s")
    wall, busy1, child1 = time.perf_counter() - t0, cpu_ops._cpu_busy_s(), cpu_ops._children_cpu_s()
    bg = (max(0.0, (busy1 - busy0) - (child1 - child0)) / wall
          if busy0 is not None and busy1 is not None and wall > 0 else None)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            r = json.loads(line)
            if bg is not None:
                r["bg_cores"] = bg
            return r
    if p.returncode == -9:
        return dict(error="OOM (killed)")
    tail = (p.stderr.strip().splitlines() or ["?"])[-1]
    return dict(error=f"failed rc={p.returncode}: {tail[:100]}")


def run_config_quiet(cfg, inprocess, timeout, allocator, retries, bg_limit, blas=None):
    """run_config, repeated after waiting for a quiet machine while other processes used more than
    bg_limit cores during it (subprocess mode only); the fastest attempt is kept."""
    best = None
    for attempt in range(retries + 1):
        r = run_config(cfg, inprocess, timeout, allocator, blas)
        r["attempts"] = attempt + 1
        key = "latency_ms" if cfg["kind"] == "decode" else "step_ms"
        if best is None or ("error" not in r and ("error" in best or r[key] < best[key])):
            best = dict(r)
        best["attempts"] = attempt + 1
        if inprocess or "error" in r or r.get("bg_cores", 0.0) <= bg_limit:
            break
        cpu_ops.wait_quiet()
    return best


def run_config_blas(cfg, inprocess, timeout, allocator, retries, bg_limit, blas_mode):
    """Runs cfg under each OpenBLAS thread setting of blas_mode ("default": OpenBLAS's own,
    "1": single-threaded, "best": both, the faster kept) and records which one was used."""
    settings = {"default": [None], "1": ["1"], "best": [None, "1"]}[blas_mode]
    if inprocess or str(cfg["device"]).startswith("cuda"):
        settings = [None]
    key = "latency_ms" if cfg["kind"] == "decode" else "step_ms"
    best = None
    for b in settings:
        r = run_config_quiet(cfg, inprocess, timeout, allocator, retries, bg_limit, b)
        r["blas_threads"] = "1" if b else os.environ.get("OPENBLAS_NUM_THREADS", "default")
        if best is None or ("error" not in r and ("error" in best or r[key] < best[key])):
            best = r
    return best


# ---------------------------------------------------------------------------------------------
def hw_slug(device):
    import torch
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(0)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                name = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
        except (OSError, AttributeError):
            name = "cpu"
        name = "cpu-" + name
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s


def fmt_bytes(b):
    return f"{b / 2 ** 20:,.1f}"


def fmt_num(v):
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt_len(n):
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def ratio_words(key, r):
    """Ratio as RetNet-relative words: memory/latency are Trm/RetNet, throughput RetNet/Trm."""
    good = {"memory": "less memory", "throughput": "higher throughput", "latency": "lower latency"}[key]
    bad = {"memory": "more memory", "throughput": "lower throughput", "latency": "higher latency"}[key]
    return f"RetNet {r:.1f}× {good}" if r >= 1 else f"RetNet {1 / r:.1f}× {bad}"


def log2_axis(ax, values):
    ax.set_xscale("log", base=2)
    vals = sorted(set(values))
    if vals:
        ax.set_xticks(vals)
        ax.set_xticklabels([fmt_len(v) for v in vals])
        ax.minorticks_off()


def plot(res, info, paths):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C_RET, C_TRM, C_PAR = "#d62728", "#1f77b4", "#ff7f0e"
    sub = f"{info['model_desc']} · {info['hw']} · commit {info['commit']}"

    def xs_ys(rows, key, xkey):
        pts = [(r[xkey], r[key]) for r in rows if "error" not in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def mark_oom(ax, rows, xkey, color):
        for r in rows:
            if "error" in r:
                ax.axvline(r[xkey], color=color, ls=":", lw=1)
                ax.annotate("OOM" if "OOM" in r["error"] else "fail", (r[xkey], 0.95),
                            xycoords=("data", "axes fraction"), color=color, fontsize=8, ha="center")

    # ---- decoding (Figure 6 style)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    ctx = res["decode_ctx"]
    for model, color, label in (("transformer", C_TRM, "Transformer (KV cache)"), ("retnet", C_RET, "RetNet (recurrent)")):
        rows = [dict(r, L=L) for (m, L), r in ctx.items() if m == model]
        rows.sort(key=lambda r: r["L"])
        x, y = xs_ys(rows, "peak_bytes", "L")
        axes[0].plot(x, [v / 2 ** 20 for v in y], "o-", color=color, label=label)
        x, y = xs_ys(rows, "tokens_per_s", "L")
        axes[1].plot(x, y, "o-", color=color, label=label)
        mark_oom(axes[0], rows, "L", color)
        mark_oom(axes[1], rows, "L", color)
        brow = [dict(r, B=B) for (m, B), r in res["decode_batch"].items() if m == model]
        brow.sort(key=lambda r: r["B"])
        x, y = xs_ys(brow, "latency_ms", "B")
        axes[2].plot(x, y, "o-", color=color, label=label)
        mark_oom(axes[2], brow, "B", color)
    wrows = [r for r in ctx.values() if "error" not in r and "weight_bytes" in r]
    if wrows:
        axes[0].axhline(wrows[0]["weight_bytes"] / 2 ** 20, color="gray", ls="--", lw=1, label="model weights")
    axes[0].set_title(f"Memory while decoding (batch {info['decode_batch']})")
    axes[0].set_ylabel("memory (MiB)")
    axes[1].set_title(f"Decode throughput (batch {info['decode_batch']})")
    axes[1].set_ylabel("tokens / s")
    axes[2].set_title(f"Per-token latency vs batch (context {info['batch_context']})")
    axes[2].set_ylabel("latency per step (ms)")
    axes[2].set_xlabel("batch size")
    log2_axis(axes[2], [B for (_, B) in res["decode_batch"]])
    for ax in axes[:2]:
        log2_axis(ax, [L for (_, L) in ctx])
        ax.set_xlabel("context length (tokens)")
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Decoding cost: RetNet vs Transformer — " + sub, fontsize=10)
    fig.tight_layout()
    fig.savefig(paths["decode"], dpi=110)
    plt.close(fig)

    # ---- training
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for form, color, label in (("transformer", C_TRM, "Transformer"), ("chunk", C_RET, f"RetNet chunk (C={info['chunk_size']})"),
                               ("parallel", C_PAR, "RetNet parallel")):
        rows = [dict(r, T=T) for (f, T), r in res["train"].items() if f == form]
        rows.sort(key=lambda r: r["T"])
        x, y = xs_ys(rows, "tokens_per_s", "T")
        axes[0].plot(x, y, "o-", color=color, label=label)
        x, y = xs_ys(rows, "peak_bytes", "T")
        axes[1].plot(x, [v / 2 ** 20 for v in y], "o-", color=color, label=label)
        mark_oom(axes[0], rows, "T", color)
        mark_oom(axes[1], rows, "T", color)
    axes[0].set_title(f"Training throughput (batch {info['train_batch']})")
    axes[0].set_ylabel("tokens / s")
    axes[1].set_title("Training peak memory")
    axes[1].set_ylabel("memory (MiB)")
    for ax in axes:
        log2_axis(ax, [T for (_, T) in res["train"]])
        ax.set_xlabel("training length (tokens)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training cost — " + sub, fontsize=10)
    fig.tight_layout()
    fig.savefig(paths["train"], dpi=110)
    plt.close(fig)

    # ---- Figure 1 style summary at the largest context
    h = res.get("headline")
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    specs = [("memory", "memory (MiB)", "peak_bytes", 2 ** -20, "lower is better"),
             ("throughput", "tokens / s", "tokens_per_s", 1.0, "higher is better"),
             ("latency", "latency (ms)", "latency_ms", 1.0, "lower is better")]
    for ax, (key, ylabel, field, mul, note) in zip(axes, specs):
        if h and h["trm"] and h["ret"] and field in h["trm"] and field in h["ret"]:
            vals = [h["trm"][field] * mul, h["ret"][field] * mul]
            bars = ax.bar(["Transformer", "RetNet"], vals, color=[C_TRM, C_RET], width=0.6)
            ratio = h["ratios"][key]
            ax.set_title(ratio_words(key, ratio), fontsize=10)
            for b_, v in zip(bars, vals):
                ax.annotate(fmt_num(v), (b_.get_x() + b_.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        else:
            ax.text(0.5, 0.5, "Transformer OOM / no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(key, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(note, fontsize=8)
        ax.margins(y=0.15)
    L = h["L"] if h else "?"
    fig.suptitle(f"Inference cost at context {L}, batch {info['decode_batch']} — {sub}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["summary"], dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, in-process: CI smoke test (< 60 s)")
    ap.add_argument("--gpu-paper", action="store_true", help="RetNet-1.3B shape (d 2048, 24 layers, 8 heads) on CUDA")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --gpu-paper, else cpu)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (preset default)")
    for k in ("vocab", "d", "layers", "heads", "value_dim", "ffn", "decode_batch", "train_batch",
              "decode_steps", "warmup_steps"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    ap.add_argument("--contexts", default=None, help="comma-separated decode context lengths")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes for the latency sweep")
    ap.add_argument("--batch-context", type=int, default=None, help="context of the batch sweep (default: largest)")
    ap.add_argument("--train-lengths", default=None, help="comma-separated training lengths")
    ap.add_argument("--chunk-size", type=int, default=64, help="RetNet chunk size for chunk-form training")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: decode,batch,train")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs; 1 with --quick)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of repeats per training measurement")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration subprocess")
    ap.add_argument("--allocator", choices=sorted(cpu_ops.ALLOCATOR_ENV), default="retain",
                    help="glibc malloc behaviour in the subprocesses (see cpu_ops.py; default: retain freed memory)")
    ap.add_argument("--retries", type=int, default=2,
                    help="extra attempts when other processes used > --bg-limit cores during a measurement")
    ap.add_argument("--bg-limit", type=float, default=0.15, help="cores of other processes tolerated")
    ap.add_argument("--blas-threads", choices=["default", "1", "best"], default="best",
                    help="OpenBLAS threads per configuration: its default, 1, or both with the faster kept "
                         "(default: best; CPU subprocess mode only)")
    ap.add_argument("--inprocess", action="store_true", help="no subprocess per configuration (less exact memory)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"), help="output directory")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        cfg = json.loads(args.worker)
        print(json.dumps(WORKERS[cfg["kind"]](cfg)), flush=True)
        return 0

    import torch

    preset = "quick" if args.quick else ("gpu-paper" if args.gpu_paper else "cpu")
    P = dict(PRESETS[preset])
    for k in ("vocab", "d", "layers", "heads", "value_dim", "ffn", "decode_batch", "train_batch",
              "decode_steps", "warmup_steps", "dtype"):
        if getattr(args, k) is not None:
            P[k] = getattr(args, k)
    for k in ("contexts", "batches", "train_lengths"):
        if getattr(args, k):
            P[k] = [int(x) for x in getattr(args, k).split(",")]
    device = args.device or ("cuda" if args.gpu_paper else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("CUDA requested but torch.cuda.is_available() is False")
    threads = args.threads or (1 if args.quick else os.cpu_count())
    torch.set_num_threads(threads)
    inprocess = args.inprocess or args.quick
    skip = set(s for s in args.skip.split(",") if s)
    batch_ctx = args.batch_context or max(P["contexts"])

    from transformer import check_kv_cache, matched_ffn_dim, retnet_layer_params
    kv_err = check_kv_cache()

    commit, dirty = cpu_ops.git_commit()
    date = datetime.date.today().isoformat()
    hw = hw_slug(device) + ("" if device.startswith("cuda") else f"-{threads}t")
    stem = f"cost_curves_{hw}_{date}_{commit}" + ("_quick" if args.quick else "")
    os.makedirs(args.out, exist_ok=True)
    paths = {k: os.path.join(args.out, f"{stem}_{k}.png") for k in ("decode", "train", "summary")}
    md_path = os.path.join(args.out, stem + ".md")

    base = dict(vocab=P["vocab"], d=P["d"], layers=P["layers"], heads=P["heads"], value_dim=P["value_dim"],
                ffn=P["ffn"], dtype=P["dtype"], device=device, threads=threads,
                decode_steps=P["decode_steps"], warmup_steps=P["warmup_steps"], min_time=args.min_time,
                slow_s=8.0, chunk_size=args.chunk_size)
    jobs = []
    if "decode" not in skip:
        for L in P["contexts"]:
            for m in ("transformer", "retnet"):
                jobs.append(("decode_ctx", (m, L), dict(base, kind="decode", model=m, L=L, B=P["decode_batch"])))
    if "batch" not in skip:
        for B in P["batches"]:
            for m in ("transformer", "retnet"):
                jobs.append(("decode_batch", (m, B), dict(base, kind="decode", model=m, L=batch_ctx, B=B)))
    if "train" not in skip:
        for T in P["train_lengths"]:
            for f in ("transformer", "chunk", "parallel"):
                jobs.append(("train", (f, T), dict(base, kind="train", form=f, T=T, B=P["train_batch"])))

    load_start = cpu_ops.loadavg()
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    res = {"decode_ctx": {}, "decode_batch": {}, "train": {}}
    done = {}
    bar = Progress(len(jobs), "cost_curves")
    t_run = time.perf_counter()
    for part, key, cfg in jobs:
        label = f"{part} {key[0]} {key[1]}"
        bar.set(label)
        sig = json.dumps(cfg, sort_keys=True)
        r = done.get(sig)
        if r is None:
            r = run_config_blas(cfg, inprocess, args.timeout, args.allocator, args.retries, args.bg_limit,
                                args.blas_threads)
            if not inprocess and not device.startswith("cuda") and "error" not in r:
                # peak memory from a separate run with glibc's default allocator (RSS follows live
                # tensors; the retaining heap used for timing can fragment and overstate peaks)
                b = r.get("blas_threads")
                rm = run_config(dict(cfg, measure="memory"), False, args.timeout, "default",
                                "1" if b == "1" else None)
                if "peak_bytes" in rm:
                    r["peak_bytes_timing_run"] = r.get("peak_bytes")
                    r["peak_bytes"], r["mem_method"] = rm["peak_bytes"], rm["mem_method"] + ", default malloc"
                else:
                    r["mem_error"] = rm.get("error", "?")
            done[sig] = r
        res[part][key] = r
        bar.update()
    bar.close()
    run_s = time.perf_counter() - t_run
    load_end = cpu_ops.loadavg()

    # ---- headline ratios at the largest context where both decoded (and at 8K if measured)
    def pair(L):
        t, r = res["decode_ctx"].get(("transformer", L)), res["decode_ctx"].get(("retnet", L))
        if not t or not r or "error" in t or "error" in r:
            return None
        return dict(L=L, trm=t, ret=r, ratios=dict(
            throughput=r["tokens_per_s"] / t["tokens_per_s"], memory=t["peak_bytes"] / r["peak_bytes"],
            latency=t["latency_ms"] / r["latency_ms"], cache=t["cache_bytes"] / r["cache_bytes"]))

    ok = [L for L in P["contexts"] if pair(L)]
    res["headline"] = pair(max(ok)) if ok else None

    n_ret = retnet_layer_params(P["d"], P["value_dim"], P["ffn"])
    f_trm = matched_ffn_dim(P["d"], P["value_dim"], P["ffn"])
    n_trm = 4 * P["d"] ** 2 + 3 * P["d"] * f_trm + 2 * P["d"]
    emb = 2 * P["vocab"] * P["d"] + P["d"]
    tot_ret, tot_trm = P["layers"] * n_ret + emb, P["layers"] * n_trm + emb
    dk, dv = P["d"] // P["heads"], P["value_dim"] // P["heads"]
    model_desc = f"{tot_ret / 1e6:,.{1 if tot_ret >= 1e7 else 2}f}M-param models (d {P['d']}, {P['layers']} layers, {P['heads']} heads)"
    info = dict(model_desc=model_desc, hw=hw, commit=commit, decode_batch=P["decode_batch"],
                batch_context=batch_ctx, train_batch=P["train_batch"], chunk_size=args.chunk_size)
    plot(res, info, paths)

    # ---- markdown
    cuda = device.startswith("cuda")
    machine = (f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})" if cuda else
               f"{cpu_ops.cpu_model()}, {os.cpu_count()} logical CPUs, {cpu_ops.mem_total_gib():.1f} GiB RAM; "
               f"torch {torch.__version__}, {threads} threads (torch.set_num_threads; get_num_threads() = "
               f"{torch.get_num_threads()}), BLAS: {cpu_ops.blas_info(torch)}")
    mem_note = ("torch.cuda.max_memory_allocated of the measured phase (weights included)" if cuda else
                "weights (+ AdamW state when training) from tensor sizes + RSS high-water delta of the measured "
                "phase (state / KV cache allocated inside it)" + (" — in-process (--inprocess/--quick), so "
                                                                   "less isolated" if inprocess else
                                                                   ", measured in a separate fresh subprocess per "
                                                                   "configuration with glibc's default allocator (so "
                                                                   "resident memory follows live tensors)"))
    M = []
    M.append(f"# Cost curves: RetNet (retention library) vs Transformer — {hw}, {date}, commit {commit}"
             f"{' (+ uncommitted changes)' if dirty else ''}")
    M.append("")
    M.append(f"- Command: `{cpu_ops.command_line()}`")
    M.append(f"- Started {started}; measurements took {run_s:.0f} s. Load average (1/5/15 min) at start: "
             f"{load_start}; at end: {load_end}")
    M.append(f"- Machine: {machine}")
    M.append(f"- Models ({P['dtype']}, vocab {P['vocab']}): RetNet d={P['d']}, {P['layers']} layers, {P['heads']} heads, "
             f"Dv={P['value_dim']} (dk={dk}, dv={dv}), GLU FFN {P['ffn']}: {tot_ret / 1e6:.2f}M params. "
             f"Transformer: same d / layers / heads (dh={P['d'] // P['heads']}), RoPE, SwiGLU FFN {f_trm} "
             f"(chosen to match the layer parameter count): {tot_trm / 1e6:.2f}M params. Attention: "
             f"{'F.scaled_dot_product_attention' if hasattr(torch.nn.functional, 'scaled_dot_product_attention') else 'explicit softmax(QKᵀ/√d + causal mask)·V (torch has no scaled_dot_product_attention)'}; "
             f"KV cache pre-allocated and written in place (self-check vs full forward: max |Δlogits| = {kv_err:.1e}).")
    M.append(f"- Decoding: state / cache pre-set to L tokens, {P['warmup_steps']} warm-up + {P['decode_steps']} timed "
             f"steps; latency = median step time (whole batch); throughput = batch / mean step time. RetNet decodes "
             f"with `RetNet.step` (library `recurrent_step`), Transformer with its KV cache.")
    M.append(f"- Training step: forward, cross-entropy, backward, AdamW step; batch {P['train_batch']}; median of ≥ 2 "
             f"steps after 1 warm-up (1 step if a step takes > 8 s); RetNet chunk form with chunk size "
             f"{args.chunk_size}, RetNet parallel form, Transformer.")
    if not cuda and not inprocess:
        M.append("- Allocator: " + ("glibc malloc keeps and reuses freed memory in every subprocess (MALLOC_MMAP_MAX_=0, "
                                    "MALLOC_TRIM_THRESHOLD_=10^12), like a caching allocator: first-touch page faults are "
                                    "very slow on this machine (see the cpu_ops results), and with the defaults every step "
                                    "re-faults its large temporaries." if args.allocator == "retain" else
                                    "glibc malloc defaults."))
    if not cuda and not inprocess:
        M.append("- OpenBLAS threads (BLAS thr column; the torch build's BLAS is OpenBLAS with its own thread pool, "
                 "not governed by torch.set_num_threads): " + {
                     "best": "every configuration ran twice, with OpenBLAS's default threads and with "
                             "OPENBLAS_NUM_THREADS=1, and the faster run is reported (the multithreaded OpenBLAS is "
                             "faster for RetNet's weight mat-vecs but slower and erratic for the Transformer's many "
                             "small attention GEMMs over the cache, so one fixed setting would favour one model).",
                     "default": "OpenBLAS default.", "1": "OPENBLAS_NUM_THREADS=1."}[args.blas_threads])
    M.append(f"- Memory: {mem_note}. Cache column: exact bytes of the RetNet states / the Transformer KV cache "
             f"({'bf16/fp16' if P['dtype'] != 'float32' else 'fp32'} K,V; fp32 RetNet state).")
    M.append("")
    h = res["headline"]
    M.append("## Headline (largest context where both models decoded)")
    M.append("")
    if h:
        R = h["ratios"]
        M.append(f"At context {h['L']} and batch {P['decode_batch']} on this hardware: "
                 f"decode throughput RetNet/Transformer = **{R['throughput']:.2f}×**, memory Transformer/RetNet = "
                 f"**{R['memory']:.2f}×** (weights + cache + activations; the cache/state ratio alone is "
                 f"{R['cache']:.0f}×), per-token latency Transformer/RetNet = **{R['latency']:.2f}×** "
                 f"(> 1 favours RetNet everywhere), i.e. {ratio_words('throughput', R['throughput'])}, "
                 f"{ratio_words('memory', R['memory'])}, {ratio_words('latency', R['latency'])}.")
        M.append("")
        bt = {B: (res["decode_batch"].get(("transformer", B)), res["decode_batch"].get(("retnet", B)))
              for B in P["batches"]}
        lat = [(B, t["latency_ms"] / r["latency_ms"]) for B, (t, r) in bt.items()
               if t and r and "error" not in t and "error" not in r]
        if lat:
            M.append(f"Latency ratio (Transformer / RetNet) at context {batch_ctx} across batch sizes: " +
                     ", ".join(f"B={B}: {x:.1f}×" for B, x in lat) + ".")
            M.append("")
        M.append(f"Paper (Fig. 1, 6.7B model, 8K input, one A100-80GB, fp16, their own fused decoding): "
                 f"{PAPER['throughput']}× throughput, {PAPER['memory']}× less memory, {PAPER['latency']}× lower "
                 f"latency. These numbers are not directly comparable: our model is {tot_ret / 1e6:.{0 if tot_ret >= 1e7 else 2}f}M parameters "
                 f"(paper 6.7B), the hardware is {'a ' + torch.cuda.get_device_name(0) if cuda else 'a ' + str(os.cpu_count()) + '-core CPU'}, "
                 f"the batch is {P['decode_batch']}, the Transformer baseline is plain PyTorch attention over a static "
                 f"KV cache (no FlashAttention / paged cache), and the memory ratio depends on how large the "
                 f"weights are relative to the cache (the paper's 6.7B weights are 97% of RetNet's memory). "
                 f"The ratios grow with context and batch for the Transformer's O(L) cache read and storage, "
                 f"while RetNet's per-step cost is constant.")
    else:
        M.append("No context where both models decoded.")
    M.append("")

    def bt(*rs):
        return " / ".join((r or {}).get("blas_threads", "—") for r in rs)

    def cell(r, key, fmt):
        if r is None:
            return "—"
        if "error" in r:
            return r["error"]
        return fmt(r[key])

    M.append(f"## Decoding vs context length (batch {P['decode_batch']})")
    M.append("")
    M.append("| context | Trm tokens/s | RetNet tokens/s | Trm ms/token | RetNet ms/token | Trm memory MiB | RetNet memory MiB "
             "| Trm KV cache MiB | RetNet state MiB | throughput × | memory × | latency × | BLAS thr |")
    M.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for L in P["contexts"]:
        t, r = res["decode_ctx"].get(("transformer", L)), res["decode_ctx"].get(("retnet", L))
        p = pair(L)
        rat = (f"{p['ratios']['throughput']:.2f} | {p['ratios']['memory']:.2f} | {p['ratios']['latency']:.2f}"
               if p else "— | — | —")
        M.append(f"| {L} | {cell(t, 'tokens_per_s', lambda v: f'{v:,.1f}')} | {cell(r, 'tokens_per_s', lambda v: f'{v:,.1f}')} "
                 f"| {cell(t, 'latency_ms', lambda v: f'{v:.2f}')} | {cell(r, 'latency_ms', lambda v: f'{v:.2f}')} "
                 f"| {cell(t, 'peak_bytes', fmt_bytes)} | {cell(r, 'peak_bytes', fmt_bytes)} "
                 f"| {cell(t, 'cache_bytes', fmt_bytes)} | {cell(r, 'cache_bytes', fmt_bytes)} | {rat} | {bt(t, r)} |")
    M.append("")
    M.append(f"## Decoding vs batch size (context {batch_ctx})")
    M.append("")
    M.append("| batch | Trm ms/token | RetNet ms/token | Trm tokens/s | RetNet tokens/s | Trm memory MiB | RetNet memory MiB "
             "| latency × | BLAS thr |")
    M.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for B in P["batches"]:
        t, r = res["decode_batch"].get(("transformer", B)), res["decode_batch"].get(("retnet", B))
        lr = (f"{t['latency_ms'] / r['latency_ms']:.2f}" if t and r and "error" not in t and "error" not in r else "—")
        M.append(f"| {B} | {cell(t, 'latency_ms', lambda v: f'{v:.2f}')} | {cell(r, 'latency_ms', lambda v: f'{v:.2f}')} "
                 f"| {cell(t, 'tokens_per_s', lambda v: f'{v:,.1f}')} | {cell(r, 'tokens_per_s', lambda v: f'{v:,.1f}')} "
                 f"| {cell(t, 'peak_bytes', fmt_bytes)} | {cell(r, 'peak_bytes', fmt_bytes)} | {lr} | {bt(t, r)} |")
    M.append("")
    M.append(f"## Training step (batch {P['train_batch']})")
    M.append("")
    M.append("| length | Trm tokens/s | RetNet chunk tokens/s | RetNet parallel tokens/s | Trm peak MiB | chunk peak MiB "
             "| parallel peak MiB | chunk / Trm speed | chunk / Trm memory | BLAS thr |")
    M.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for T in P["train_lengths"]:
        t, c, p_ = (res["train"].get((f, T)) for f in ("transformer", "chunk", "parallel"))
        sp = (f"{c['tokens_per_s'] / t['tokens_per_s']:.2f}" if t and c and "error" not in t and "error" not in c else "—")
        mm = (f"{c['peak_bytes'] / t['peak_bytes']:.2f}" if t and c and "error" not in t and "error" not in c else "—")
        M.append(f"| {T} | {cell(t, 'tokens_per_s', lambda v: f'{v:,.0f}')} | {cell(c, 'tokens_per_s', lambda v: f'{v:,.0f}')} "
                 f"| {cell(p_, 'tokens_per_s', lambda v: f'{v:,.0f}')} | {cell(t, 'peak_bytes', fmt_bytes)} "
                 f"| {cell(c, 'peak_bytes', fmt_bytes)} | {cell(p_, 'peak_bytes', fmt_bytes)} | {sp} | {mm} | {bt(t, c, p_)} |")
    M.append("")
    M.append("## Charts")
    M.append("")
    for k, title in (("summary", "Inference cost at the largest context (Figure 1 style)"),
                     ("decode", "Decoding memory, throughput, latency (Figure 6 style)"),
                     ("train", "Training throughput and memory")):
        M.append(f"![{title}]({os.path.basename(paths[k])})")
        M.append("")
    bgs = [r["bg_cores"] for part in ("decode_ctx", "decode_batch", "train") for r in res[part].values()
           if "bg_cores" in r]
    bg_max = max(bgs) if bgs else float("nan")
    if not cuda:
        M.append(f"Quietness: 1-minute load average {load_start.split()[0]} at the start (the load at the end, "
                 f"{load_end.split()[0]}, includes this run's own threads); "
                 + ("other processes' CPU use not measured (in-process mode)." if inprocess or not bgs else
                    f"other processes used at most {bg_max:.2f} cores during any measured subprocess."))
        M.append("")
        try:
            l1s = float(load_start.split()[0])
        except ValueError:
            l1s = float("nan")
        if not inprocess and not (l1s < 0.7 and bg_max <= args.bg_limit):
            M.append(f"**Warning: the machine was not quiet (load average at start {load_start.split()[0]}, other "
                     f"processes up to {bg_max:.2f} cores); timings may be disturbed.**")
            M.append("")
    text = "\n".join(M) + "\n"
    with open(md_path, "w") as f:
        f.write(text)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({part: {f"{k[0]}@{k[1]}": v for k, v in res[part].items()}
                   for part in ("decode_ctx", "decode_batch", "train")}, f, indent=1)
    print(text)
    for p in [md_path] + list(paths.values()):
        print(f"[cost_curves] wrote {p}", file=sys.stderr)
    # quick/CI contract: the table and PNGs exist and are non-empty
    for p in [md_path] + list(paths.values()):
        if not os.path.getsize(p):
            raise SystemExit(f"empty output {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
