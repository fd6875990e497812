"""GPU benchmarks of the retention ops (run by bench/gpu_check.sh on a machine with a GPU).

Measures, per shape (bf16 inputs, [B, T, H, d] layout, RetNet decays):
  * chunk forward and forward+backward of retention.chunk_retention
  * the same computed by eager PyTorch (bench/eager_reference.py, chunkwise form, autograd)
  * causal SDPA with the same B, H, T and head dims (the Transformer baseline)
  * FLA's chunk_retention when importable from third_party_bench/fla (git-ignored checkout)
  * one decode step (retention.recurrent_step) against its memory floor 8*dk*dv bytes per head

Times are CUDA-event medians over repeated runs after warm-up.  Each row also reports the
minimal-traffic floor from performance.md (q, k, v read once, o written once; states in fp32)
so the achieved fraction of bandwidth is visible.  Results go to --out as JSON lines (one
object per measurement) and to stdout as a table.
"""

import argparse
import datetime
import json
import math
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, HERE)

import retention  # noqa: E402
from eager_reference import chunk_retention_eager, to_head_first  # noqa: E402

# (B, H, T, dk, dv): performance.md §4.3 worked tables plus the RetNet default head dims.
CHUNK_SHAPES = [
    (8, 8, 2048, 128, 128),
    (8, 8, 8192, 128, 128),
    (8, 8, 32768, 128, 128),
    (8, 8, 2048, 128, 256),
    (8, 8, 8192, 128, 256),
    (8, 16, 8192, 128, 128),
    (8, 8, 2048, 256, 512),
    (8, 8, 8192, 256, 512),
    (4, 8, 16384, 256, 256),   # FLA's old H100 README configuration
    (1, 8, 32768, 128, 128),   # small B*H: the sequential chunk chain dominates
]
DECODE_SHAPES = [
    (8, 8, 128, 128),
    (8, 16, 128, 256),
    (64, 16, 128, 128),
    (64, 16, 128, 256),
    (256, 16, 128, 256),
    (8, 8, 256, 512),
]


def timeit(fn, warmup=5, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def load_fla():
    path = os.path.join(ROOT, "third_party_bench", "fla")
    if not os.path.isdir(path):
        return None
    sys.path.insert(0, path)
    try:
        from fla.ops.retention import chunk_retention as fla_chunk
        return fla_chunk
    except Exception as e:  # FLA missing, or its Triton does not match this torch
        print(f"FLA not usable: {e!r}", file=sys.stderr)
        return None


def gpu_info():
    p = torch.cuda.get_device_properties(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "gpu": p.name, "sm": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
        "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit,
        "date": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
    }


def chunk_rows(shape, dtype, fla, args):
    B, H, T, dk, dv = shape
    dev = "cuda"
    q = torch.randn(B, T, H, dk, device=dev, dtype=dtype)
    k = torch.randn(B, T, H, dk, device=dev, dtype=dtype) * dk ** -0.5
    v = torch.randn(B, T, H, dv, device=dev, dtype=dtype)
    do = torch.randn(B, T, H, dv, device=dev, dtype=dtype)
    log_decay = retention.retnet_log_decay(H, device=dev)
    bytes_min = 2 * B * H * T * (2 * dk + 2 * dv)  # bf16 q, k, v in, o out
    flops = 2 * B * H * T * (64 * (dk + dv) + 2 * dk * dv)
    base = {"B": B, "H": H, "T": T, "dk": dk, "dv": dv, "dtype": str(dtype).replace("torch.", ""),
            "floor_bytes": bytes_min, "flops_c64": flops}
    rows = []

    def add(impl, mode, fn):
        try:
            ms = timeit(fn, reps=args.reps)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({**base, "impl": impl, "mode": mode, "ms": None, "note": "OOM"})
            return
        row = {**base, "impl": impl, "mode": mode, "ms": ms}
        if mode == "fwd":
            row["useful_TBps"] = bytes_min / (ms * 1e-3) / 1e12
        rows.append(row)

    def ours_fwd():
        return retention.chunk_retention(q, k, v, log_decay)

    def ours_fwdbwd():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        retention.chunk_retention(qq, kk, vv, log_decay).backward(do)

    add("retention", "fwd", ours_fwd)
    add("retention", "fwd+bwd", ours_fwdbwd)

    if fla is not None:
        add("fla", "fwd", lambda: fla(q, k, v))
        def fla_fwdbwd():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            fla(qq, kk, vv)[0].backward(do)
        add("fla", "fwd+bwd", fla_fwdbwd)

    qh, kh, vh = (to_head_first(t) for t in (q, k, v))
    if T <= args.max_eager_T:
        add("eager", "fwd", lambda: chunk_retention_eager(qh, kh, vh, log_decay))
        def eager_fwdbwd():
            qq, kk, vv = (t.detach().requires_grad_() for t in (qh, kh, vh))
            chunk_retention_eager(qq, kk, vv, log_decay).backward(to_head_first(do))
        add("eager", "fwd+bwd", eager_fwdbwd)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    add("sdpa_causal", "fwd", lambda: sdpa(qh, kh, vh, is_causal=True))
    def sdpa_fwdbwd():
        qq, kk, vv = (t.detach().requires_grad_() for t in (qh, kh, vh))
        sdpa(qq, kk, vv, is_causal=True).backward(to_head_first(do))
    add("sdpa_causal", "fwd+bwd", sdpa_fwdbwd)
    del q, k, v, do, qh, kh, vh
    torch.cuda.empty_cache()
    return rows


def decode_rows(shape, dtype, args):
    B, H, dk, dv = shape
    dev = "cuda"
    q = torch.randn(B, H, dk, device=dev, dtype=dtype)
    k = torch.randn(B, H, dk, device=dev, dtype=dtype)
    v = torch.randn(B, H, dv, device=dev, dtype=dtype)
    state = torch.zeros(B, H, dk, dv, device=dev, dtype=torch.float32)
    log_decay = retention.retnet_log_decay(H, device=dev)
    floor = 8 * B * H * dk * dv
    ms = timeit(lambda: retention.recurrent_step(q, k, v, log_decay, state), reps=args.reps * 5)

    def eager():
        g = log_decay.exp()[None, :, None, None]
        state.mul_(g).add_(k.float()[..., :, None] * v.float()[..., None, :])
        return (q.float()[..., None, :] @ state).squeeze(-2) * dk ** -0.5
    ms_eager = timeit(eager, reps=args.reps * 5)
    base = {"B": B, "H": H, "dk": dk, "dv": dv, "dtype": str(dtype).replace("torch.", ""),
            "floor_bytes": floor, "mode": "decode"}
    return [{**base, "impl": "retention", "ms": ms, "useful_TBps": floor / (ms * 1e-3) / 1e12},
            {**base, "impl": "eager", "ms": ms_eager, "useful_TBps": floor / (ms_eager * 1e-3) / 1e12}]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-eager-T", type=int, default=8192, help="skip the eager chunk form above this T")
    ap.add_argument("--quick", action="store_true", help="first two shapes of each list only")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    torch.backends.cuda.matmul.allow_tf32 = False

    info = gpu_info()
    print(json.dumps(info))
    fla = load_fla()
    chunk_shapes = CHUNK_SHAPES[:2] if args.quick else CHUNK_SHAPES
    decode_shapes = DECODE_SHAPES[:2] if args.quick else DECODE_SHAPES

    rows = []
    for shape in chunk_shapes:
        rows += chunk_rows(shape, torch.bfloat16, fla, args)
    for shape in decode_shapes:
        rows += decode_rows(shape, torch.bfloat16, args)

    with open(args.out, "w") as f:
        f.write(json.dumps({"info": info}) + "\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")

    print(f"\n{'shape':34s} {'impl':12s} {'mode':8s} {'ms':>10s} {'TB/s useful':>12s}")
    for r in rows:
        if r["mode"] == "decode":
            shape = f"decode B{r['B']} H{r['H']} {r['dk']}x{r['dv']}"
        else:
            shape = f"B{r['B']} H{r['H']} T{r['T']} {r['dk']}/{r['dv']}"
        ms = "OOM" if r["ms"] is None else f"{r['ms']:.3f}"
        bw = f"{r['useful_TBps']:.2f}" if r.get("useful_TBps") else ""
        print(f"{shape:34s} {r['impl']:12s} {r['mode']:8s} {ms:>10s} {bw:>12s}")


if __name__ == "__main__":
    main()
