"""GPU benchmarks of the retention ops (run by bench/gpu_check.sh on a machine with a GPU).

Shapes are bench/gpu_model.py's (FLA's benchmark shapes, RetNet's dk=256/dv=512, decode at
B = 1, 8, 64 and H = 8, 16), so `gpu_model.py --measured` can put each measurement beside its
prediction (rows carry the model's `key`).  bf16 inputs, RetNet decays.

  * correctness first (small shapes): our chunk op and FLA's chunk_retention, forward and
    gradients, against the float64 reference of tests/python/reference.py (relative error
    |x - ref| / |ref|).  FLA's retention backward is known to be miscompiled on Hopper by Triton
    3.4 - 3.7.0 (FLA issue #640): its timings are reported, and whether its results are right is
    reported beside them rather than assumed.
  * chunk forward and forward+backward: ours, FLA's chunk_retention (if importable: the fla-core
    wheel, or a checkout in third_party_bench/fla), causal SDPA (dk == dv only), and optionally
    the eager chunkwise form (--eager)
  * decode: recurrent_step and the fused msr_step, eager and replayed from a CUDA graph (the
    graph time is the kernel time the model predicts; eager adds the host's op overhead)
  * RetNet.generate (4 layers at FLA 1.3B's width) at B = 1 and 8, eager and with
    cuda_graph=True: tokens/s, same tokens, the kernels of one RetNet.step, host syncs

Times are CUDA-event medians after warm-up.  Rows are written to --out as JSON lines as soon as
each shape is done (a run cut short keeps what it measured); --time-budget stops starting new
shapes after that many seconds.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
sys.path.insert(0, HERE)

import gpu_model  # noqa: E402  (shapes and row keys)

# Small shapes for the correctness check: odd T (partial chunks), every dk bucket, dv != dk.
CHECK_SHAPES = [(2, 200, 4, 64, 64), (1, 300, 3, 128, 128), (1, 130, 2, 256, 512)]
CHECK_TOL = 2e-2  # bf16 inputs: operands rounded to bf16 inside the kernels (8 mantissa bits)
CHECK_SEED = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run, the same for every impl


def timeit(fn, warmup=3, reps=10):
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


def graph_time(fn, steps=20, reps=10):
    """Median ms per call of fn replayed from a CUDA graph of `steps` calls (None if capture fails)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(steps):
                fn()
        return timeit(g.replay, warmup=2, reps=reps) / steps
    except Exception as e:  # capture unsupported by some op: report eager only
        print(f"graph capture failed: {e!r}", file=sys.stderr)
        return None


def load_fla():
    """FLA's chunk_retention, or None.  The fla-core wheel (on PYTHONPATH) first, then a checkout."""
    path = os.path.join(ROOT, "third_party_bench", "fla")
    if os.path.isdir(path):
        sys.path.append(path)
    try:
        import fla
        from fla.ops.retention import chunk_retention as fla_chunk
        return fla_chunk, getattr(fla, "__version__", "?")
    except Exception as e:  # FLA missing, or its Triton does not match this torch
        print(f"FLA not usable: {e!r}", file=sys.stderr)
        return None, None


def run_info():
    p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    commit = os.environ.get("RETENTION_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "gpu": p.name if p else None, "sm": f"{p.major}.{p.minor}" if p else None,
        "sms": p.multi_processor_count if p else None, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton_version, "python": sys.version.split()[0], "commit": commit or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def rel_err(x, ref):
    x = x.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def check_rows(impl, fn_for, retention):
    """Correctness of one implementation against the float64 reference (forward and gradients).
    fn_for(log_decay) returns the function (q, k, v) -> o to check."""
    from reference import reference_grads, retention_quadratic
    rows = []
    for B, T, H, dk, dv in CHECK_SHAPES:
        g = torch.Generator(device="cpu").manual_seed(CHECK_SEED + T)
        mk = lambda *s: torch.randn(*s, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
        q, k, v = mk(B, T, H, dk), mk(B, T, H, dk), mk(B, T, H, dv)
        do = mk(B, T, H, dv)
        log_decay = retention.retnet_log_decay(H, device="cuda")
        o_ref, _ = retention_quadratic(q, k, v, log_decay)
        grads_ref = reference_grads(q, k, v, log_decay, grad_o=do)[:3]
        fn = fn_for(log_decay)
        row = {"op": "check", "impl": impl, "B": B, "T": T, "H": H, "dk": dk, "dv": dv, "tol": CHECK_TOL,
               "seed": CHECK_SEED + T}
        try:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            o = fn(*leaves)
            grads = torch.autograd.grad(o, leaves, do)
            row["rel_err"] = {"o": rel_err(o, o_ref)}
            row["rel_err"].update({n: rel_err(gr, r) for n, gr, r in zip(("dq", "dk", "dv"), grads, grads_ref)})
            bad = [n for n, e in row["rel_err"].items() if not e <= CHECK_TOL]  # NaN fails
            row["ok"] = not bad
            if bad:
                row["note"] = "above tolerance: " + ", ".join(bad)
        except Exception as e:
            row["ok"], row["note"] = False, f"error: {e!r}"[:300]
        rows.append(row)
    return rows


def chunk_rows(label, shape, impl, fla, retention, args, emit):
    """Timings of one implementation at one chunk shape, each row emitted as soon as it exists."""
    B, T, H, dk, dv = shape
    dev, dtype = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, dk, device=dev, dtype=dtype)
    k = torch.randn(B, T, H, dk, device=dev, dtype=dtype)
    v = torch.randn(B, T, H, dv, device=dev, dtype=dtype)
    do = torch.randn(B, T, H, dv, device=dev, dtype=dtype)
    log_decay = retention.retnet_log_decay(H, device=dev)
    rows = []

    def add(op, impl, fn):
        base = {"op": op, "key": gpu_model.shape_key(op, shape), "label": label, "impl": impl,
                "B": B, "T": T, "H": H, "dk": dk, "dv": dv, "dtype": "bfloat16"}
        try:
            row = {**base, "ms": timeit(fn, reps=args.reps)}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            row = {**base, "ms": None, "note": "OOM"}
        except Exception as e:
            row = {**base, "ms": None, "note": f"error: {e!r}"[:300]}
        if impl == "retention" and row["ms"] is not None:  # docs/gpu.md counts them from the code
            try:
                row["kernels_per_call"], row["copies_per_call"] = device_ops_per_call(fn)
            except Exception as e:
                row["note"] = f"launch count: {e!r}"[:300]
        rows.append(row)
        emit([row])

    def fwdbwd(f, grad, *inputs):
        def run():
            leaves = [t.detach().requires_grad_() for t in inputs]
            torch.autograd.grad(f(*leaves), leaves, grad)
        return run

    if impl == "retention":
        with torch.no_grad():
            add("chunk_fwd", impl, lambda: retention.chunk_retention(q, k, v, log_decay))
        add("chunk_fwdbwd", impl, fwdbwd(lambda a, b, c: retention.chunk_retention(a, b, c, log_decay), do, q, k, v))
    elif impl == "fla":
        with torch.no_grad():
            add("chunk_fwd", impl, lambda: fla(q, k, v))
        add("chunk_fwdbwd", impl, fwdbwd(lambda a, b, c: fla(a, b, c)[0], do, q, k, v))
    elif impl == "sdpa_causal" and dk == dv:  # SDPA's fast kernels need one head dim
        qh, kh, vh, do_h = (t.transpose(1, 2).contiguous() for t in (q, k, v, do))  # [B, H, T, d]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with torch.no_grad():
            add("chunk_fwd", impl, lambda: sdpa(qh, kh, vh, is_causal=True))
        add("chunk_fwdbwd", impl, fwdbwd(lambda a, b, c: sdpa(a, b, c, is_causal=True), do_h, qh, kh, vh))
    elif impl == "eager" and T <= 8192:
        from eager_reference import chunk_retention_eager, to_head_first
        qh, kh, vh = (to_head_first(t) for t in (q, k, v))
        with torch.no_grad():
            add("chunk_fwd", impl, lambda: chunk_retention_eager(qh, kh, vh, log_decay))
    return rows  # the inputs go with this frame; the caller empties the cache


def device_ops_per_call(fn):
    """(kernels, copies and memsets) one call of fn puts on the device, counted with
    torch.profiler after a warm-up call (the decode-step design says one kernel, no copy)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = sum(1 for n in names if n.lower().startswith(("memcpy", "memset")))
    return len(names) - copies, copies


def decode_rows(shape, retention, args, emit):
    B, H, dk, dv = shape
    dev, dtype = "cuda", torch.bfloat16
    q = torch.randn(B, H, dk, device=dev, dtype=dtype)
    k = torch.randn(B, H, dk, device=dev, dtype=dtype)
    v = torch.randn(B, H, dv, device=dev, dtype=dtype)
    gate = torch.randn(B, H, dv, device=dev, dtype=dtype)
    state = torch.randn(B, H, dk, dv, device=dev, dtype=torch.float32) * 0.01
    offsets = torch.full((B,), 100, device=dev, dtype=torch.int64)
    log_decay = retention.retnet_log_decay(H, device=dev)
    rows = []
    for op, fn in (("decode_step", lambda: retention.recurrent_step(q, k, v, log_decay, state)),
                   ("msr_step", lambda: retention.msr_step(q, k, v, gate, log_decay, state, offsets=offsets))):
        base = {"op": op, "key": gpu_model.shape_key(op, shape), "label": "decode", "B": B, "H": H, "dk": dk,
                "dv": dv, "dtype": "bfloat16"}
        try:
            kernels, copies = device_ops_per_call(fn)
            rows += emit([{**base, "impl": "retention", "ms": timeit(fn, reps=args.reps * 5),
                           "kernels_per_call": kernels, "copies_per_call": copies,
                           "note": f"{kernels} kernels + {copies} copies/memsets per call"}])
            rows += emit([{**base, "impl": "retention_graph", "ms": graph_time(fn)}])
        except Exception as e:
            rows += emit([{**base, "impl": "retention", "ms": None, "note": f"error: {e!r}"[:300]}])
    return rows


# RetNet decode loop: FLA 1.3B's head shape (hidden 2048, 8 heads: dk 256, dv 512), 4 layers.
GENERATE_CONFIG = dict(vocab_size=32000, embed_dim=2048, value_dim=4096, num_heads=8, num_layers=4,
                       ffn_dim=4096)
GENERATE_BATCHES = (1, 8)


def generate_rows(B, retention, args, emit):
    """Tokens/s of RetNet.generate (greedy, bf16) with and without the CUDA graph, whether both
    give the same tokens, the kernels of one RetNet.step, and whether a step synchronises with
    the host (torch.cuda.set_sync_debug_mode raises on a synchronising call)."""
    from retention.nn import RetNet
    torch.manual_seed(0)
    model = RetNet(**GENERATE_CONFIG).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, GENERATE_CONFIG["vocab_size"], (B, 16), device="cuda")
    n = 64 if args.quick else 256
    base = {"op": "generate", "key": f"generate_B{B}_L{GENERATE_CONFIG['num_layers']}_D2048_H8",
            "label": "decode", "B": B, "H": 8, "dk": 256, "dv": 512, "dtype": "bfloat16"}
    rows, tokens = [], {}
    for impl, graph in (("retention", False), ("retention_graph", True)):
        try:
            model.generate(prompt, 4, temperature=0.0, cuda_graph=graph)  # warm-up (and capture)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens[impl] = model.generate(prompt, n, temperature=0.0, cuda_graph=graph)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rows += emit([{**base, "impl": impl, "ms": 1e3 * dt / n, "tokens_per_s": B * n / dt,
                           "note": f"{B * n / dt:.0f} tokens/s over {n} steps (prefill included)"}])
        except Exception as e:
            rows += emit([{**base, "impl": impl, "ms": None, "note": f"error: {e!r}"[:300]}])
    if len(tokens) == 2:
        same = bool(torch.equal(tokens["retention"], tokens["retention_graph"]))
        rows += emit([{**base, "impl": "graph_vs_eager", "ms": None, "same_tokens": same,
                       "note": "graph tokens == eager tokens" if same else "GRAPH TOKENS DIFFER"}])
    _, state = model(prompt, form="chunk")
    tok = prompt[:, -1]
    try:
        kernels, copies = device_ops_per_call(lambda: model.step(tok, state))
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.step(tok, state)
            sync = "no host synchronisation"
        except RuntimeError as e:
            sync = f"synchronises: {e}"[:200]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        per_layer = kernels / GENERATE_CONFIG["num_layers"]
        rows += emit([{**base, "impl": "step_ops", "ms": None, "kernels_per_call": kernels,
                       "copies_per_call": copies, "note": f"RetNet.step: {kernels} kernels "
                       f"({per_layer:.1f} per layer incl. the FFN and norms) + {copies} copies; {sync}"}])
    except Exception as e:
        rows += emit([{**base, "impl": "step_ops", "ms": None, "note": f"error: {e!r}"[:300]}])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds; no new shape starts after")
    ap.add_argument("--eager", action="store_true", help="also time the eager chunkwise form")
    ap.add_argument("--quick", action="store_true", help="first two shapes of each list only")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: list the planned rows and check that FLA and the reference import")
    args = ap.parse_args()
    t_start = time.monotonic()

    import retention
    fla, fla_version = load_fla()
    info = {**run_info(), "fla": fla_version}
    chunk_shapes = gpu_model.CHUNK_SHAPES[:2] if args.quick else gpu_model.CHUNK_SHAPES
    decode_shapes = gpu_model.DECODE_SHAPES[:2] if args.quick else gpu_model.DECODE_SHAPES
    print(json.dumps(info), flush=True)
    if args.dry_run:
        import reference  # the correctness check needs it
        print("float64 reference:", reference.__file__)
        for label, *shape in chunk_shapes:
            print("planned", label, gpu_model.shape_key("chunk_fwd", tuple(shape)), "+ fwd+bwd")
        for shape in decode_shapes:
            print("planned", gpu_model.shape_key("decode_step", shape), "+ msr_step")
        for B in GENERATE_BATCHES:
            print("planned", f"generate_B{B}", "(eager, CUDA graph, kernels per RetNet.step)")
        print(f"dry run: {len(CHECK_SHAPES)} check shapes, {len(chunk_shapes)} chunk shapes, "
              f"{len(decode_shapes)} decode shapes; FLA {'importable' if fla else 'NOT importable'}")
        return
    assert torch.cuda.is_available(), "needs a GPU (use --dry-run without one)"
    torch.backends.cuda.matmul.allow_tf32 = False

    out = open(args.out, "w")
    out.write(json.dumps({"info": info}) + "\n")

    def emit(rows):
        for r in rows:
            out.write(json.dumps(r) + "\n")
        out.flush()
        return rows

    def over_budget(what):
        if time.monotonic() - t_start > args.time_budget:
            emit([{"op": "skipped", "note": f"time budget ({args.time_budget:.0f} s) spent before {what}"}])
            print(f"time budget spent: skipping {what} and the rest", flush=True)
            return True
        return False

    def report_checks(rows):
        for r in rows:
            errs = " ".join(f"{n} {e:.1e}" for n, e in r.get("rel_err", {}).items())
            print(f"check {r['impl']:10s} B{r['B']} T{r['T']} H{r['H']} {r['dk']}/{r['dv']}: "
                  f"{'ok' if r['ok'] else 'FAILED'} {errs} {r.get('note', '')}", flush=True)
        return rows

    def report(rows):
        for r in rows:
            print(f"{r['key']:42s} {r['impl']:16s} {fmt(r['ms'])} {r.get('note', '')}", flush=True)
        return rows

    # Ours first, FLA last: FLA's Triton kernels compile and autotune on first use, which can take
    # minutes on a fresh machine, and must not keep our own numbers from being measured.
    all_rows = report_checks(emit(check_rows(
        "retention", lambda ld: (lambda a, b, c: retention.chunk_retention(a, b, c, ld)), retention)))
    phases = [("retention", s) for s in chunk_shapes] + [("decode", s) for s in decode_shapes] + \
             [("generate", b) for b in GENERATE_BATCHES] + \
             [("sdpa_causal", s) for s in chunk_shapes] + ([("eager", s) for s in chunk_shapes] if args.eager else [])
    if fla is not None:
        phases += [("fla_check", None)] + [("fla", s) for s in chunk_shapes]
    for impl, shape in phases:
        if over_budget(f"{impl} {shape or ''}"):
            break
        if impl == "decode":
            all_rows += report(decode_rows(shape, retention, args, emit))
        elif impl == "generate":
            all_rows += report(generate_rows(shape, retention, args, emit))
        elif impl == "fla_check":
            all_rows += report_checks(emit(check_rows("fla", lambda ld: (lambda a, b, c: fla(a, b, c)[0]),
                                                      retention)))
        else:
            label, *dims = shape
            all_rows += report(chunk_rows(label, tuple(dims), impl, fla, retention, args, emit))
        torch.cuda.empty_cache()
    out.close()
    print(f"wrote {args.out} ({len(all_rows)} rows, {time.monotonic() - t_start:.0f} s)")


def fmt(ms):
    return "-" if ms is None else f"{ms:.4f} ms"


if __name__ == "__main__":
    main()
