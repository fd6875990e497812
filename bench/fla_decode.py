#!/usr/bin/env python3
"""Serving an FLA-format RetNet on the CPU, from C++ and from Python: decode tokens/s at B=1 and 8
and prefill tokens/s of retention-generate (retention::FlaRetNet) and, with --python, of
retention.models.RetNetForCausalLM's generate() (bench/fla_decode_py.py), against the time it
takes to read the weights once.

Model: FLA's 1.3B RetNet configuration (hidden 2048, 24 layers, 8 heads, expand_k 1, expand_v 2,
hidden_ratio 2 -> GatedMLP width 2816, vocab 32000, untied head: 1.36B parameters) with random
weights, written as an FLA directory (config.json + one model.safetensors in bf16).
--quick: a 2-layer, hidden-256 model of the same shape family (checks that the script runs).

Runs, one app process each, as a user would start it:
  bf16   the weights as stored (kept bf16 in memory, shared with the mapped file)
  fp32   --dtype fp32 (converted on load; twice the bytes)

Method
- decode: `--ids <1 token> --max-new-tokens N+2` minus a run with 2 new tokens, from the app's
  own decode timing (so the first steps, which also fault the mapped weights in, and the
  prefill are not counted): seconds per step, tokens/s = 1 / that; the same with `--batch 8`
  (8 copies of the prompt decoded as one batch: tokens/s = 8 / seconds per step).
- prefill: one prompt of --prefill-len random tokens, the app's prefill timing (chunk form)
  after its --warmup (the same prefill once, untimed).
- memory read bandwidth: best `x.sum()` over 1 GiB fp32 with the same threads
  (serve_decode.bandwidth_gbs), before and after the runs; the weights' read time is their
  bytes / the higher of the two.
- the load average and the CPU time other processes took during each run are recorded: on a
  shared machine the wall-clock numbers are only indicative; CPU-time columns are given too.

--python PY: also the Python rows, run by the interpreter PY (torch 2.x with transformers and the
installed retention package; its torch is not the app's LibTorch).

Usage: PYTHONPATH=python python3 bench/fla_decode.py [--quick] [--threads N] [--python PY] [--out bench/results]
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import cpu_ops  # noqa: E402  (machine description helpers)
from serve_decode import Busy, bandwidth_gbs, set_blas_threads  # noqa: E402
from retention.checkpoint import save_file  # noqa: E402

CONFIG_13B = dict(hidden_size=2048, num_hidden_layers=24, num_heads=8, expand_k=1.0, expand_v=2.0,
                  hidden_ratio=2, vocab_size=32000)
CONFIG_QUICK = dict(hidden_size=256, num_hidden_layers=2, num_heads=2, expand_k=1.0, expand_v=2.0,
                    hidden_ratio=2, vocab_size=1000)


def fla_shapes(cfg):
    D, H, V = cfg["hidden_size"], cfg["num_heads"], cfg["vocab_size"]
    dk, dv = int(D * cfg["expand_k"]) // H, int(D * cfg["expand_v"]) // H
    inter = int(D * cfg["hidden_ratio"] * 2 / 3)
    inter = 256 * ((inter + 255) // 256)
    shapes = {"model.embeddings.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "attn_norm.weight": (D,), p + "attn.q_proj.weight": (H * dk, D),
                       p + "attn.k_proj.weight": (H * dk, D), p + "attn.v_proj.weight": (H * dv, D),
                       p + "attn.g_proj.weight": (H * dv, D), p + "attn.o_proj.weight": (D, H * dv),
                       p + "attn.g_norm_swish_gate.weight": (dv,), p + "mlp_norm.weight": (D,),
                       p + "mlp.gate_proj.weight": (inter, D), p + "mlp.up_proj.weight": (inter, D),
                       p + "mlp.down_proj.weight": (D, inter)})
    return shapes


def write_model(path, cfg):
    """Random bf16 weights (projections ~ 1/sqrt(fan_in), norms 1) as an FLA directory."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(cfg, model_type="retnet", architectures=["RetNetForCausalLM"]), f, indent=2)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in fla_shapes(cfg).items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=g) / shape[1] ** 0.5).to(torch.bfloat16)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def run_app(app, model, ids, new_tokens, threads, extra):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [app, "--checkpoint", model, "--ids", ",".join(map(str, ids)), "--threads", str(threads),
           "--max-new-tokens", str(new_tokens), "--quiet", "--json", out] + extra
    with Busy() as b:
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(out) as f:
        r = json.load(f)
    os.unlink(out)
    m = re.search(r"loaded in ([0-9.]+) s", res.stdout)
    r.update(bg_cores=b.bg_cores, load_seconds=float(m.group(1)) if m else None,
             model_line=res.stdout.splitlines()[0])
    return r


def measure(app, model, vocab, threads, steps, prefill_len, extra):
    one = [7]
    long = run_app(app, model, one, steps + 2, threads, extra)
    short = run_app(app, model, one, 2, threads, extra)
    dt = (long["decode_seconds"] - short["decode_seconds"]) / steps
    dt_cpu = (long["decode_cpu_seconds"] - short["decode_cpu_seconds"]) / steps
    long8 = run_app(app, model, one, steps + 2, threads, extra + ["--batch", "8"])
    short8 = run_app(app, model, one, 2, threads, extra + ["--batch", "8"])
    dt8 = (long8["decode_seconds"] - short8["decode_seconds"]) / steps
    ids = torch.randint(0, vocab, (prefill_len,), generator=torch.Generator().manual_seed(1)).tolist()
    pre = run_app(app, model, ids, 1, threads, extra + ["--warmup"])  # timed warm, as Python's
    return dict(step_s=dt, cpu_step_s=dt_cpu, tokens_per_s=1 / dt, step_s_b8=dt8, tokens_per_s_b8=8 / dt8,
                prefill_tokens=prefill_len,
                prefill_s=pre["prefill_seconds"], prefill_cpu_s=pre["prefill_cpu_seconds"],
                prefill_tokens_per_s=prefill_len / pre["prefill_seconds"], load_s=long["load_seconds"],
                peak_rss_mib=max(long["peak_rss_mib"], pre["peak_rss_mib"]), model_line=long["model_line"],
                bg_cores=max(x["bg_cores"] or 0 for x in (long, short, long8, short8, pre)))


def measure_python(python, model, threads, steps, prefill_len, dtype):
    """bench/fla_decode_py.py in its own process; the rows' keys as measure()'s."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package
    cmd = [python, os.path.join(HERE, "fla_decode_py.py"), model, "--dtype", dtype, "--threads", str(threads),
           "--steps", str(steps), "--prefill-len", str(prefill_len)]
    with Busy() as b:
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r.update(tokens_per_s=1 / r["step_s"], tokens_per_s_b8=8 / r["step_s_b8"], prefill_tokens=prefill_len,
             prefill_tokens_per_s=prefill_len / r["prefill_s"], bg_cores=b.bg_cores,
             model_line=f"Python {r['torch']} ({r['retention']})")
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default=os.path.join(HERE, "..", "build", "install", "bin", "retention-generate"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=0, help="decode steps timed (default 4; 16 with --quick)")
    ap.add_argument("--prefill-len", type=int, default=0, help="prefill prompt length (default 32; 64 --quick)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--python", default="", help="interpreter for the Python rows (none: C++ only)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    cfg = CONFIG_QUICK if a.quick else CONFIG_13B
    steps = a.steps or (16 if a.quick else 4)
    prefill_len = a.prefill_len or (64 if a.quick else 32)
    torch.set_num_threads(a.threads)
    blas = set_blas_threads(a.threads)
    load_start = cpu_ops.loadavg()
    bw, bw_cpu = bandwidth_gbs(a.threads)
    print(f"memory read bandwidth: {bw:.2f} GB/s wall, {bw_cpu:.2f} GB/s per CPU second", flush=True)
    tmp = tempfile.mkdtemp()
    model = os.path.join(tmp, "retnet-fla")
    n_params = write_model(model, cfg)
    print(f"wrote {n_params / 1e9:.3f}B parameters (bf16) to {model}", flush=True)
    rows = {}
    for dt in a.dtypes.split(","):
        key = "C++ " + dt
        rows[key] = measure(a.app, model, cfg["vocab_size"], a.threads, steps, prefill_len,
                            ["--dtype", dt] if dt != "bf16" else [])
        rows[key]["weight_bytes"] = n_params * (2 if dt == "bf16" else 4)
        print(key, rows[key], flush=True)
        if a.python:
            key = "Python " + dt
            rows[key] = measure_python(a.python, model, a.threads, steps, prefill_len, dt)
            rows[key]["weight_bytes"] = n_params * (2 if dt == "bf16" else 4)
            print(key, rows[key], flush=True)
    subprocess.run(["rm", "-rf", tmp], check=True)
    load_end = cpu_ops.loadavg()
    # Measured again at the end: on a shared machine the reading moves between runs, and the
    # higher one (the shorter read time, so the larger ratio) is the conservative floor.
    bw_start = bw
    bw_end, bw_cpu_end = bandwidth_gbs(a.threads)
    bw, bw_cpu = max(bw_start, bw_end), max(bw_cpu, bw_cpu_end)

    commit, dirty = cpu_ops.git_commit()
    commit += "-dirty" if dirty else ""
    date = datetime.date.today().isoformat()
    hw = f"{cpu_ops.cpu_model()}, {a.threads} threads, {cpu_ops.mem_total_gib():.0f} GiB"
    tag = "cpu-" + "".join(c if c.isalnum() else "-" for c in hw.split(",")[0].lower())[:30]
    name = "fla_decode" + ("_quick" if a.quick else "")
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"{name}_{tag}_{date}_{commit}")
    bg = max(r["bg_cores"] for r in rows.values())
    L = ["# FLA-format RetNet served from C++ (retention-generate) and Python (generate()), CPU", "",
         f"- date {date}, commit {commit}, hardware: {hw}, LibTorch {torch.__version__} (the app's)"
         + "".join(f"; {k}: {r['model_line']}" for k, r in rows.items() if k.startswith("Python")),
         f"- command: `{cpu_ops.command_line()}`",
         f"- model: {'quick test model' if a.quick else 'FLA 1.3B config'} {json.dumps(cfg)}, "
         f"{n_params / 1e9:.3f}B parameters, random weights, stored bf16",
         f"- {a.threads} threads (torch and OpenBLAS: {'set' if blas else 'OpenBLAS not found'})",
         f"- load average (`uptime`) at start {load_start}, at end {load_end}; other processes used up to "
         f"{bg:.2f} cores during a run" + ("" if bg <= 0.15 else " — **the machine was not quiet: wall-clock "
                                            "times are inflated; see the CPU-time columns**"),
         f"- memory read bandwidth (best `x.sum()` over 1 GiB fp32): {bw_start:.2f} GB/s at the start, "
         f"{bw_end:.2f} GB/s at the end; the read times below use the higher, **{bw:.2f} GB/s** "
         f"({bw_cpu:.2f} GB/s per CPU second)", "",
         "| run, weights | bytes | load | decode B=1: s/token (CPU s) | tokens/s | read weights once at the "
         "bandwidth | token / read | decode B=8: s/step | tokens/s | prefill tokens/s (CPU) | peak RSS |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for dt, r in rows.items():
        read_s = r["weight_bytes"] / bw / 1e9
        L.append(f"| {dt} | {r['weight_bytes'] / 2 ** 30:.2f} GiB | {r['load_s']:.2f} s | {r['step_s']:.3f} "
                 f"({r['cpu_step_s']:.3f}) | {r['tokens_per_s']:.2f} | {read_s:.3f} s | {r['step_s'] / read_s:.1f}x | "
                 f"{r['step_s_b8']:.3f} | {r['tokens_per_s_b8']:.2f} | "
                 f"{r['prefill_tokens_per_s']:.1f} ({r['prefill_tokens'] / max(r['prefill_cpu_s'], 1e-9) * a.threads:.1f}) | "
                 f"{r['peak_rss_mib'] / 1024:.2f} GiB |")
    L += ["", f"Decode: {steps} steps timed after 2 untimed ones, prompt of 1 token; prefill: one prompt of "
          f"{prefill_len} tokens (chunk form). CPU-time prefill rate = tokens / CPU seconds x threads. C++ load: "
          "the app's (bf16 mapped from the file); Python load: from_pretrained."]
    with open(base + ".md", "w") as f:
        f.write("\n".join(L) + "\n")
    with open(base + ".json", "w") as f:
        json.dump(dict(date=date, commit=commit, hardware=hw, torch=torch.__version__, config=cfg,
                       params=n_params, bandwidth_gbs=bw, bandwidth_start_gbs=bw_start,
                       bandwidth_end_gbs=bw_end, bandwidth_cpu_gbs=bw_cpu, load_start=load_start,
                       load_end=load_end, threads=a.threads, rows=rows), f, indent=1)
    print("\n".join(L))
    print(f"wrote {base}.md/.json")


if __name__ == "__main__":
    main()
