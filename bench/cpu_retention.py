#!/usr/bin/env python3
"""CPU retention against the BLAS rate and against torchscale, in one process.

Three parts, all fp32, B = 1, timed in this process (so the sgemm rate, the library and torchscale
see the same machine state); best of `--reps` calls after a warm-up:

  core   raw ``chunk_retention`` and fused ``msr`` (torchscale rotation, RMSNorm, gate), forward and
         forward+backward, at dk/dv = 128/128, 256/432 (torchscale's retnet_base) and 256/512
         (FLA's 1.3B head); % of the sgemm rate measured in the same run (FLOPs: cpu_ops.flops,
         chunk 64), the fused extras over the raw op, and 1 vs all threads.
  layer  the whole ``retention.nn.MultiScaleRetention`` against torchscale 0.3.0's (same weights,
         its chunkwise form with its default recurrent_chunk_size 512, its parallel form where
         T ≤ --parallel-max, its recurrent form per token), forward and forward+backward.
  prefill  tokens/s of one layer's forward at FLA's 1.3B head shape (D = 2048, H = 8).

torchscale comes from PyPI into the git-ignored third_party_bench/ (it is only a yardstick):

    python3 -m pip install --no-deps --target third_party_bench/torchscale-site torchscale==0.3.0
    PYTHONPATH=python python3 bench/cpu_retention.py             # ~10 min on an idle 2-core VM
    PYTHONPATH=python python3 bench/cpu_retention.py --quick --out "$(mktemp -d)"   # smoke test

Only torchscale.component.multiscale_retention (torch-only) is imported; its relative-position
inputs are built here from the math (retnet-math.md §2-§3) and checked by comparing torchscale's
chunkwise output with its parallel one and with ours. Writes
bench/results/cpu_retention_<machine>_<date>_<commit>.md. Without torchscale the layer part is
skipped with a note.
"""
import argparse
import datetime
import math
import os
import platform
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
TORCHSCALE_SITE = os.path.join(REPO, "third_party_bench", "torchscale-site")

import cpu_ops  # noqa: E402  (FLOP model, machine description, allocator settings)

SHAPES = ((128, 128), (256, 432), (256, 512))


QUIET = {"bg_limit": 0.15, "disturbed": 0}


def best_ms(fn, reps):
    """Best of `reps` undisturbed calls after a warm-up. A call during which other processes used
    more than bg_limit cores (machine busy time from /proc/stat minus this process's CPU time)
    is repeated, up to 3 * reps calls; if too few were quiet, the best of all is kept and
    counted in QUIET["disturbed"] (the report says so)."""
    fn()
    quiet, noisy = [], []
    while len(quiet) < reps and len(quiet) + len(noisy) < 3 * reps:
        busy0, own0, t0 = cpu_ops._cpu_busy_s(), time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        busy1, own1 = cpu_ops._cpu_busy_s(), time.process_time()
        bg = ((busy1 - busy0) - (own1 - own0)) / wall if busy0 is not None else 0.0
        (quiet if bg <= QUIET["bg_limit"] else noisy).append(wall)
    if len(quiet) < reps:
        QUIET["disturbed"] += 1
    return min(quiet or noisy) * 1e3


# ---- core -------------------------------------------------------------------------------------
def core_rows(torch, retention, shapes, Ts, bhs, threads, reps):
    rows = []
    for dk, dv in shapes:
        for T in Ts:
            for BH in bhs:
                torch.manual_seed(0)
                q, k = (torch.randn(1, T, BH, dk, requires_grad=True) for _ in range(2))
                v, g = (torch.randn(1, T, BH, dv, requires_grad=True) for _ in range(2))
                ld = retention.retnet_log_decay(BH)

                def raw_f():
                    with torch.no_grad():
                        retention.chunk_retention(q, k, v, ld)

                def raw_fb():
                    o = retention.chunk_retention(q, k, v, ld)
                    o.backward(torch.ones_like(o))

                def msr_f():
                    with torch.no_grad():
                        retention.msr(q, k, v, g, ld)

                def msr_fb():
                    o = retention.msr(q, k, v, g, ld)
                    o.backward(torch.ones_like(o))

                r = dict(dk=dk, dv=dv, T=T, BH=BH)
                torch.set_num_threads(threads)
                for name, fn in (("raw_f", raw_f), ("raw_fb", raw_fb), ("msr_f", msr_f),
                                 ("msr_fb", msr_fb)):
                    r[name] = best_ms(fn, reps)
                if threads > 1:
                    torch.set_num_threads(1)
                    r["raw_fb_1t"] = best_ms(raw_fb, max(1, reps - 1))
                    torch.set_num_threads(threads)
                ff, fb = cpu_ops.flops("chunk64", T, dk, dv)
                r["gflop_f"], r["gflop_fb"] = ff * BH / 1e9, (ff + fb) * BH / 1e9
                rows.append(r)
                print(f"[cpu_retention] core {r}", file=sys.stderr)
    return rows


# ---- torchscale -------------------------------------------------------------------------------
def import_torchscale():
    if os.path.isdir(TORCHSCALE_SITE) and TORCHSCALE_SITE not in sys.path:
        sys.path.insert(0, TORCHSCALE_SITE)
    try:
        from torchscale.component.multiscale_retention import MultiScaleRetention
    except ImportError:
        return None
    return MultiScaleRetention


def torchscale_rel_pos(torch, T, H, dk, form, chunk=512):
    """torchscale's relative-position inputs of one layer (sin/cos of the interleaved rotation,
    then the decay terms of the form), from the math: gamma_h = 1 - 2^(-5-h), theta_i =
    10000^(-i/(dk/2-1)), row-normalised decay masks."""
    log_gamma = torch.log(1 - 2 ** (-5 - torch.arange(H, dtype=torch.float)))
    theta = 1.0 / (10000 ** torch.linspace(0, 1, dk // 2))
    theta = theta.repeat_interleave(2)
    if form == "recurrent":
        return log_gamma.exp(), theta
    index = torch.arange(T, dtype=torch.float)
    sin, cos = torch.sin(index[:, None] * theta), torch.cos(index[:, None] * theta)

    def mask_of(n):
        i = torch.arange(n, dtype=torch.float)
        dist = (i[:, None] - i[None, :]).masked_fill(i[:, None] < i[None, :], float("inf"))
        return torch.nan_to_num(torch.exp(dist * log_gamma[:, None, None]))  # [H, n, n]

    if form == "parallel":
        m = mask_of(T)
        return (sin, cos), m / m.sum(-1, keepdim=True).sqrt()
    m = mask_of(chunk)
    row_sum = m.sum(-1, keepdim=True)
    last = m[:, -1]  # decay of every key row to the chunk's end
    value_inner_decay = (last / last.sum(-1, keepdim=True)).unsqueeze(-1)
    query_inner_decay = torch.exp(log_gamma[:, None] * (torch.arange(chunk) + 1))
    query_inner_decay = query_inner_decay[:, :, None] / (row_sum.sqrt() / last.sum(-1)[:, None, None])
    cross_decay = torch.exp(log_gamma * chunk)[:, None, None]
    return (sin, cos), (m / row_sum.sqrt(), cross_decay, query_inner_decay, value_inner_decay)


def layer_rows(torch, retention, TS_MSR, D, Dv, H, Ts, threads, reps, parallel_max):
    from retention.nn import MultiScaleRetention

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    args = types.SimpleNamespace(multiway=False, layernorm_eps=1e-6)
    ts_layer = TS_MSR(args, D, Dv, H)
    ours = MultiScaleRetention(D, Dv, H, chunk_size=64)
    ours.load_state_dict(ts_layer.state_dict())
    dk = D // H
    rows = []
    for T in Ts:
        chunk = min(512, T)
        x = torch.randn(1, T, D, requires_grad=True)
        rp_chunk = torchscale_rel_pos(torch, T, H, dk, "chunk", chunk)
        r = dict(D=D, Dv=Dv, H=H, T=T)
        # Both compute the same layer: ours against torchscale's parallel form (torchscale's
        # chunkwise form departs from it after the first chunk, retnet-math.md §6-§7, so past
        # one chunk that difference is reported, not checked).
        with torch.no_grad():
            y_ours = ours(x)[0]
            y_chunk = ts_layer(x, rp_chunk, chunkwise_recurrent=True)
            r["ts_chunk_vs_ours"] = ((y_chunk - y_ours).abs().max() / y_chunk.abs().max()).item()
            if T <= parallel_max:
                y_par = ts_layer(x, torchscale_rel_pos(torch, T, H, dk, "parallel"))
                r["ts_parallel_vs_ours"] = ((y_par - y_ours).abs().max() / y_par.abs().max()).item()

        def run(fn, backward):
            def f():
                if backward:
                    fn().float().pow(2).mean().backward()
                else:
                    with torch.no_grad():
                        fn()
            return f

        variants = {"ours_chunk": lambda: ours(x)[0],
                    "ts_chunk": lambda: ts_layer(x, rp_chunk, chunkwise_recurrent=True)}
        if T <= parallel_max:
            rp_par = torchscale_rel_pos(torch, T, H, dk, "parallel")
            variants["ours_parallel"] = lambda: ours(x, form="parallel")[0]
            variants["ts_parallel"] = lambda: ts_layer(x, rp_par)
        # The five projections alone (identical work in both layers): what no core can beat.
        projs = [ours.q_proj, ours.k_proj, ours.v_proj, ours.g_proj]
        variants["projections"] = lambda: ours.out_proj(
            sum(p(x).sum() for p in projs) * torch.ones(1, T, Dv))
        for name, fn in variants.items():
            r[name + "_f"] = best_ms(run(fn, False), reps)
            r[name + "_fb"] = best_ms(run(fn, True), reps)
        rows.append(r)
        print(f"[cpu_retention] layer {r}", file=sys.stderr)
    # recurrent form: ms per token over 64 decode steps from an empty state
    steps = 64
    xs = torch.randn(1, steps, D)
    decay, theta = torchscale_rel_pos(torch, steps, H, dk, "recurrent")

    def ts_decode():
        state = {}
        with torch.no_grad():
            for n in range(steps):
                rp = ((torch.sin(theta * n), torch.cos(theta * n)), decay)
                ts_layer(xs[:, n:n + 1], rp, incremental_state=state)

    def ours_decode():
        st = None
        for n in range(steps):
            _, st = ours.step(xs[:, n], st)
    rec = dict(D=D, Dv=Dv, H=H, steps=steps, ts_ms_per_token=best_ms(ts_decode, reps) / steps,
               ours_ms_per_token=best_ms(ours_decode, reps) / steps)
    print(f"[cpu_retention] recurrent {rec}", file=sys.stderr)
    return rows, rec


def prefill_row(torch, T, threads, reps):
    from retention.nn import MultiScaleRetention

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = MultiScaleRetention(2048, 4096, 8, chunk_size=64)
    x = torch.randn(1, T, 2048)

    def f():
        with torch.no_grad():
            m(x)
    ms = best_ms(f, reps)
    return dict(D=2048, Dv=4096, H=8, T=T, ms=ms, tokens_per_s=T / ms * 1e3)


# ---- report -----------------------------------------------------------------------------------
def pct(x):
    return f"{x:.0f} %"


def report(meta, core, layers, rec, prefill, ts_note):
    sg = meta["sgemm"]
    L = [f"# CPU retention vs the sgemm rate and torchscale ({meta['date']}, {meta['commit']})", "",
         f"- machine: {meta['cpu']}, {meta['threads']} threads, {meta['blas']}, torch {meta['torch']}",
         f"- load average at start / end: {meta['load_start']} / {meta['load_end']} "
         "(the end value includes this benchmark's own threads)",
         f"- sgemm {meta['sgemm_n']}³ in this process: {meta['sgemm_start']:.0f} GFLOP/s at start, "
         f"{meta['sgemm_end']:.0f} at end; % columns use the larger, {sg:.0f} GFLOP/s",
         f"- command: `{meta['command']}`",
         f"- quiet check: a call during which other processes used > {QUIET['bg_limit']} cores is "
         f"repeated; {QUIET['disturbed']} measurements found too few quiet calls and keep the best "
         "disturbed one", "",
         "## Chunk core (fp32, chunk 64, B = 1, BH heads)", "",
         "Times are best of the repeats, ms. % sgemm = useful FLOPs (cpu_ops.flops, chunk 64) / time "
         "/ the sgemm rate. Fused = `retention.msr` with torchscale rotation, RMSNorm and swish gate; "
         "extras = fused / raw − 1. 1→N threads = raw fwd+bwd speed-up from one thread.", "",
         "| dk | dv | T | BH | raw fwd | % sgemm | raw fwd+bwd | % sgemm | fused fwd | extras | "
         "fused fwd+bwd | extras | 1→N threads |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in core:
        pf = 100 * r["gflop_f"] / (r["raw_f"] / 1e3) / sg
        pfb = 100 * r["gflop_fb"] / (r["raw_fb"] / 1e3) / sg
        scal = f"{r['raw_fb_1t'] / r['raw_fb']:.2f}×" if "raw_fb_1t" in r else "–"
        L.append(f"| {r['dk']} | {r['dv']} | {r['T']} | {r['BH']} | {r['raw_f']:.1f} | {pct(pf)} | "
                 f"{r['raw_fb']:.1f} | {pct(pfb)} | {r['msr_f']:.1f} | "
                 f"{pct(100 * (r['msr_f'] / r['raw_f'] - 1))} | {r['msr_fb']:.1f} | "
                 f"{pct(100 * (r['msr_fb'] / r['raw_fb'] - 1))} | {scal} |")
    L += ["", "## MultiScaleRetention layer vs torchscale 0.3.0 (fp32, B = 1, same weights)", ""]
    if ts_note:
        L.append(ts_note)
    else:
        L += ["ours: `retention.nn.MultiScaleRetention` (fused core, chunk 64; parallel form where "
              "listed). torchscale: its `MultiScaleRetention`, chunkwise with chunk min(512, T), "
              "parallel where listed. ×: torchscale time / ours. Output difference (max, relative "
              "to the largest output) of ours against torchscale's form in that row: the parallel "
              "form's is the check that both compute the same layer (≤ 1e-3 or the run fails); "
              "torchscale's chunkwise form departs from its own parallel form after the first "
              "chunk (its per-chunk normalisers, retnet-math.md §6-§7).", "",
              "bound: torchscale's time / the five projections' time alone (measured in the same "
              "run; both layers run the same projections), the ratio an infinitely fast retention "
              "core would reach.", "",
              "| D | Dv | H | T | form | ours fwd | torchscale fwd | × | bound | ours fwd+bwd | "
              "torchscale fwd+bwd | × | bound | output difference |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in layers:
            for form in ("chunk", "parallel"):
                if f"ours_{form}_f" not in r:
                    continue
                o_f, t_f = r[f"ours_{form}_f"], r[f"ts_{form}_f"]
                o_fb, t_fb = r[f"ours_{form}_fb"], r[f"ts_{form}_fb"]
                p_f, p_fb = r["projections_f"], r["projections_fb"]
                L.append(f"| {r['D']} | {r['Dv']} | {r['H']} | {r['T']} | {form} | {o_f:.1f} | "
                         f"{t_f:.1f} | {t_f / o_f:.2f}× | {t_f / p_f:.2f}× | {o_fb:.1f} | "
                         f"{t_fb:.1f} | {t_fb / o_fb:.2f}× | {t_fb / p_fb:.2f}× | "
                         f"{r[f'ts_{form}_vs_ours']:.1e} |")
        L += ["", f"Recurrent form, {rec['steps']} decode steps from an empty state: ours "
              f"{rec['ours_ms_per_token']:.3f} ms/token, torchscale {rec['ts_ms_per_token']:.3f} "
              f"ms/token ({rec['ts_ms_per_token'] / rec['ours_ms_per_token']:.2f}×)."]
    L += ["", "## Prefill, one layer at FLA's 1.3B head shape (D = 2048, H = 8, dk = 256, dv = 512)",
          "", f"{prefill['T']} tokens: {prefill['ms']:.1f} ms, {prefill['tokens_per_s']:.0f} "
          "tokens/s per layer (projections included)."]
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", default="2048,8192,32768", help="core sequence lengths")
    ap.add_argument("--bh", default="2", help="core heads (B·H), comma-separated")
    ap.add_argument("--wide", default="8192:16,2048:64", help="extra core rows T:BH (256/432 only)")
    ap.add_argument("--layer-T", default="512,2048,8192")
    ap.add_argument("--parallel-max", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
    args = ap.parse_args(argv)

    # A heap that keeps freed memory, like a caching allocator (bench/README.md: page faults).
    if os.environ.get("MALLOC_MMAP_MAX_") is None:
        env = cpu_ops.allocator_env("retain")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)

    import torch
    sys.path.insert(0, os.path.join(REPO, "python"))
    import retention

    if args.quick:
        shapes, Ts, bhs, wide, layer_T, reps = ((16, 24), (48, 40)), (100,), (2,), [], (64,), 1
        args.parallel_max = 64
    else:
        shapes, Ts, bhs, reps = SHAPES, [int(t) for t in args.T.split(",")], \
            [int(b) for b in args.bh.split(",")], args.reps
        wide = [tuple(int(x) for x in w.split(":")) for w in args.wide.split(",") if w]
        layer_T = [int(t) for t in args.layer_T.split(",")]
    commit, dirty = cpu_ops.git_commit()
    meta = dict(date=datetime.date.today().isoformat(), commit=commit + ("+dirty" if dirty else ""),
                cpu=cpu_ops.cpu_model(), threads=args.threads, blas=cpu_ops.blas_info(torch),
                torch=torch.__version__, load_start=cpu_ops.loadavg(), sgemm_n=256 if args.quick else 2048,
                command=cpu_ops.command_line())
    meta["sgemm_start"] = cpu_ops.measure_sgemm(torch, meta["sgemm_n"], args.threads)
    core = core_rows(torch, retention, shapes, Ts, bhs, args.threads, reps)
    for T, BH in wide:
        core += core_rows(torch, retention, ((256, 432),), (T,), (BH,), args.threads, reps)
    TS = import_torchscale()
    layers, rec, ts_note = [], None, None
    if TS is None:
        ts_note = ("torchscale is not importable: install it with `python3 -m pip install --no-deps "
                   "--target third_party_bench/torchscale-site torchscale==0.3.0`.")
    else:
        D, Dv, H = (32, 48, 2) if args.quick else (512, 864, 2)  # torchscale's retnet_base layer
        layers, rec = layer_rows(torch, retention, TS, D, Dv, H, layer_T, args.threads, reps,
                                 args.parallel_max)
        bad = [r for r in layers if r.get("ts_parallel_vs_ours", 0) > 1e-3
               or (r["T"] <= 512 and r["ts_chunk_vs_ours"] > 1e-3)]
        if bad:
            sys.exit(f"cpu_retention: torchscale and the library disagree: {bad}")
    prefill = prefill_row(torch, 64 if args.quick else 2048, args.threads, reps)
    meta["sgemm_end"] = cpu_ops.measure_sgemm(torch, meta["sgemm_n"], args.threads)
    meta["sgemm"] = max(meta["sgemm_start"], meta["sgemm_end"])
    meta["load_end"] = cpu_ops.loadavg()
    text = report(meta, core, layers, rec, prefill, ts_note)
    os.makedirs(args.out, exist_ok=True)
    machine = "cpu-" + "-".join(platform.processor().split()[:2]).lower() if platform.processor() else "cpu"
    path = os.path.join(args.out, f"cpu_retention_{machine}_{meta['date']}_{commit}.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"[cpu_retention] wrote {os.path.relpath(path, REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
