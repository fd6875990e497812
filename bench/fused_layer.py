#!/usr/bin/env python3
"""Fused MultiScaleRetention layer vs the unfused composition (CPU; GPU when available).

Both variants are the same module with the same weights (retention.nn.MultiScaleRetention,
``fused=True`` / ``fused=False``): projections, then either

  * fused:   one ``retention.msr`` call (rotation in the prologue, decay normaliser + RMSNorm +
             swish gate in the epilogue, backward fused the same way), or
  * unfused: rotation of q and k, the raw chunk op, then the normaliser, RMSNorm and gate as
             eager torch ops (each writing a full [B, T, H, d] tensor),

then out_proj.  Each (variant, T) runs in a fresh subprocess: forward and forward+backward time
(median of repeats) and the peak resident memory of one forward+backward above the process's
baseline (CPU) or torch.cuda.max_memory_allocated (GPU).  Writes a markdown table and JSON to
bench/results/fused_layer_<device>_<date>_<commit>.{md,json}.

    PYTHONPATH=python /usr/bin/python3 bench/fused_layer.py            # CPU, T = 512,2048,8192
    PYTHONPATH=python /usr/bin/python3 bench/fused_layer.py --quick    # smoke test
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import cpu_ops  # noqa: E402  (PeakRSS, machine description helpers)

VARIANTS = ("fused", "unfused")


def worker(cfg):
    import torch

    sys.path.insert(0, os.path.join(REPO, "python"))
    from retention.nn import MultiScaleRetention

    torch.set_num_threads(cfg["threads"])
    dev = cfg["device"]
    torch.manual_seed(0)
    D, H = cfg["H"] * cfg["dk"], cfg["H"]
    m = MultiScaleRetention(D, cfg["H"] * cfg["dv"], H, chunk_size=64,
                            fused=cfg["variant"] == "fused").to(dev)
    dtype = getattr(torch, cfg["dtype"])
    m = m.to(dtype)
    x = torch.randn(cfg["B"], cfg["T"], D, device=dev, dtype=dtype, requires_grad=True)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            m(x)
        sync()

    def fwdbwd():
        y, _ = m(x)
        y.float().pow(2).mean().backward()
        sync()

    out = {}
    for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        fn()  # warm-up
        times = []
        while len(times) < cfg["max_reps"] and (len(times) < 3 or sum(times) < cfg["min_time"]):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name + "_ms"] = statistics.median(times) * 1e3
    # memory of one forward+backward
    x.grad = None
    for p in m.parameters():
        p.grad = None
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwdbwd()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with cpu_ops.PeakRSS() as pk:
            fwdbwd()
        out["peak_mib"] = pk.peak_bytes / 2**20
    print(json.dumps(out))


def run(cfg, timeout):
    env = dict(os.environ)
    if cfg["device"] == "cpu":
        env.update(cpu_ops.allocator_env("retain"))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:120]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--T", default="512,2048,8192")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--max-reps", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))
    if a.quick:
        a.T, a.H, a.dk, a.dv, a.min_time, a.max_reps = "64,200", 2, 16, 16, 0.0, 3
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    import torch

    rows = []
    for T in [int(t) for t in a.T.split(",")]:
        for variant in VARIANTS:
            cfg = dict(variant=variant, T=T, B=a.B, H=a.H, dk=a.dk, dv=a.dv, dtype=dtype,
                       device=a.device, threads=a.threads, min_time=a.min_time,
                       max_reps=a.max_reps)
            r = run(cfg, a.timeout)
            r.update(variant=variant, T=T)
            rows.append(r)
            print(json.dumps(r), flush=True)
    commit, dirty = cpu_ops.git_commit()
    commit += "-dirty" if dirty else ""
    date = datetime.date.today().isoformat()
    if a.device == "cuda":
        hw = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
    else:
        hw = f"{cpu_ops.cpu_model()}, {a.threads} threads"
    tag = "".join(c if c.isalnum() else "-" for c in (a.device + "-" + hw.split(",")[0].lower()))[:40]
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"fused_layer_{tag}_{date}_{commit}" + ("_quick" if a.quick else ""))
    lines = [f"# Fused vs unfused MultiScaleRetention layer ({a.device})", "",
             f"- date {date}, commit {commit}, hardware: {hw}, torch {torch.__version__}",
             f"- command: `{cpu_ops.command_line()}`",
             f"- B={a.B}, H={a.H}, dk={a.dk}, dv={a.dv}, D={a.H * a.dk}, dtype {dtype}, chunk form (64)",
             f"- load average at the end: {cpu_ops.loadavg()}", "",
             "| T | variant | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | fused/unfused fwd+bwd time | memory saved |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["T"], r["variant"]): r for r in rows}
    for T in sorted({r["T"] for r in rows}):
        for variant in VARIANTS:
            r = by[(T, variant)]
            if "error" in r:
                lines.append(f"| {T} | {variant} | {r['error']} | | | | |")
                continue
            ratio = saved = ""
            u = by.get((T, "unfused"), {})
            if variant == "fused" and "error" not in u:
                ratio = f"{r['fwdbwd_ms'] / u['fwdbwd_ms']:.2f}x"
                saved = f"{u['peak_mib'] - r['peak_mib']:.0f} MiB ({1 - r['peak_mib'] / max(u['peak_mib'], 1e-9):.0%})"
            lines.append(f"| {T} | {variant} | {r['fwd_ms']:.1f} | {r['fwdbwd_ms']:.1f} | "
                         f"{r['peak_mib']:.0f} | {ratio} | {saved} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(base + ".json", "w") as f:
        json.dump(dict(date=date, commit=commit, hardware=hw, args=vars(a), rows=rows), f, indent=1)
    print("wrote", base + ".md")
    bad = [r for r in rows if "error" in r]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
