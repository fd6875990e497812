#!/usr/bin/env python3
"""Long-sequence stability: recurrent decoding over 1,000,000 tokens vs the chunk form and a
float64 scan (CPU, small dims).

The same inputs (q, k, v ~ N(0, 1), rounded once to the dtype under test; scale dk^-1/2) go
through
  * recurrent decoding: one ``recurrent_step`` per token on an fp32 state (the decode path),
  * the chunk form: ``chunk_retention`` over blocks of tokens, each continuing from the previous
    block's final state (a prefill in pieces), chunk size 64,
  * a float64 scan: tests/python/reference.py's quadratic form in float64 over the same blocks
    with the state carried in float64 (written from the math; it never calls the library).
Per block we record, per head, the relative RMS error of the outputs and the relative Frobenius
error of the state after the block, both against the float64 scan, and count non-finite values.
Heads: gamma = 1 - 2^-5, 1 - 2^-10, 1 - 2^-15, 1 - 2^-20 (RetNet's range and beyond), and
1 - 3e-6, a decay that is not a power of two away from 1 (as learned or linspace decays are).

Run from the repository root (extension built in place):
    PYTHONPATH=python python3 bench/long_decode.py                 # 1M tokens, one step call each
    PYTHONPATH=python python3 bench/long_decode.py --decode scan   # same recurrence, faster
    PYTHONPATH=python python3 bench/long_decode.py --quick --out DIR  # 20k tokens (smoke test)
Writes long_decode_<date>_<commit>{.json,.md,.png} (error vs tokens chart) to --out.
The script exits non-zero if a bound stated in BOUNDS is violated.
"""
import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "python"))
# The source tree's package, unless one is imported already or the tests run against the
# installed package: this module is imported by the test suite too, and a path inserted here
# reaches processes the suite spawns later.
if "retention" not in sys.modules and os.environ.get("RETENTION_TEST_INSTALLED") != "1":
    sys.path.insert(0, os.path.join(REPO, "python"))

import retention  # noqa: E402
from reference import retention_quadratic  # noqa: E402

GAMMAS = [1 - 2.0 ** -5, 1 - 2.0 ** -10, 1 - 2.0 ** -15, 1 - 2.0 ** -20, 1 - 3e-6]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Stated bounds: relative error vs the float64 scan, worst head, after n tokens: a + b * n.
# The state is fp32 for every input dtype (inputs are rounded once and the reference uses the
# rounded values), so the state bounds hold for every dtype. Token by token, the decay of a head
# with gamma = 1 - 2^-20 changes S by 2^-20 |S| per step, only 16x the fp32 rounding of the update
# (2^-24 |S|): the recurrent state drifts ~linearly with n (measured 6e-5 at 100k, 5e-4 at 1M
# tokens); the chunk form applies the decay once per 64-token chunk and stays at ~3e-6. Bounds
# are about twice what was measured. Outputs: the state's error plus the dtype's rounding.
BOUNDS = {
    "state": {"recurrent": (1e-5, 1e-9), "chunk": (2e-5, 0.0)},
    "output": {"float32": 2e-5, "bfloat16": 8e-3, "float16": 1e-3},
}


def bound(kind, form, name, n):
    a, b = BOUNDS["state"][form]
    state = a + b * n
    return state if kind == "state" else max(state, BOUNDS["output"][name])


def git_commit():
    try:
        import subprocess
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip() != ""
        return c, dirty
    except Exception:
        return "unknown", False


def block_inputs(b, block, H, dk, dv, seed):
    """q, k, v of block b (float32, [1, block, H, d]); deterministic per block."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + b)
    q = torch.randn(1, block, H, dk, generator=g)
    k = torch.randn(1, block, H, dk, generator=g)
    v = torch.randn(1, block, H, dv, generator=g)
    return q, k, v


def rel_rms(a, ref, dims):
    """RMS(a - ref) / RMS(ref) over `dims`, per remaining index (float64)."""
    d = (a.double() - ref).pow(2).mean(dims).sqrt()
    r = ref.pow(2).mean(dims).sqrt()
    return (d / r).tolist()


def run(tokens, block, dk, dv, dtype, seed, decode="step", progress=True):
    """Per-block curves for one dtype: dict with tokens, out_err/state_err per form and head.
    decode: "step" (one recurrent_step call per token, the decode path) or "scan" (the same
    recurrence over each block in one recurrent_retention call: faster, for tests)."""
    H = len(GAMMAS)
    ld = torch.tensor([math.log(g) for g in GAMMAS], dtype=torch.float32)
    S_ref = torch.zeros(1, H, dk, dv, dtype=torch.float64)
    S_chunk = torch.zeros(1, H, dk, dv)
    S_dec = torch.zeros(1, H, dk, dv)
    scale = dk ** -0.5
    res = {"tokens": [], "nonfinite": {"recurrent": 0, "chunk": 0},
           "out_err": {"recurrent": [], "chunk": []}, "state_err": {"recurrent": [], "chunk": []},
           "out_absmax": 0.0, "state_absmax": 0.0, "seconds": {"recurrent": 0.0, "chunk": 0.0}}
    n_blocks = tokens // block
    t_start = time.time()
    for b in range(n_blocks):
        q, k, v = (x.to(dtype) for x in block_inputs(b, block, H, dk, dv, seed))
        o_ref, S_ref = retention_quadratic(q, k, v, ld, scale=scale, initial_state=S_ref)
        t0 = time.perf_counter()
        o_chunk, S_chunk = retention.chunk_retention(q, k, v, ld, scale=scale, chunk_size=64,
                                                     initial_state=S_chunk,
                                                     output_final_state=True)
        res["seconds"]["chunk"] += time.perf_counter() - t0
        outs = {"chunk": (o_chunk, S_chunk)}
        t0 = time.perf_counter()
        if decode == "step":
            o_dec = torch.empty(1, block, H, dv, dtype=dtype)
            for t in range(block):
                o_dec[:, t] = retention.recurrent_step(q[:, t], k[:, t], v[:, t], ld, S_dec,
                                                       scale=scale)
        else:
            o_dec, S_dec = retention.recurrent_retention(q, k, v, ld, scale=scale,
                                                         initial_state=S_dec,
                                                         output_final_state=True)
        res["seconds"]["recurrent"] += time.perf_counter() - t0
        outs["recurrent"] = (o_dec, S_dec)
        res["tokens"].append((b + 1) * block)
        for form, (o, S) in outs.items():
            res["nonfinite"][form] += int((~torch.isfinite(o)).sum()) + int((~torch.isfinite(S)).sum())
            res["out_err"][form].append(rel_rms(o, o_ref, (0, 1, 3)))        # per head
            res["state_err"][form].append(rel_rms(S, S_ref, (0, 2, 3)))      # per head
        res["out_absmax"] = max(res["out_absmax"], float(o_ref.abs().max()))
        res["state_absmax"] = max(res["state_absmax"], float(S_ref.abs().max()))
        if progress and (b + 1) % max(1, n_blocks // 20) == 0:
            print(f"  {dtype}: {(b + 1) * block:>9} tokens, {time.time() - t_start:6.1f} s",
                  flush=True)
    return res


def check_bounds(name, res):
    """Violations of BOUNDS (list of strings), checked after every block."""
    bad = []
    for form in res["out_err"]:
        if not res["out_err"][form]:
            continue
        if res["nonfinite"][form]:
            bad.append(f"{name}/{form}: {res['nonfinite'][form]} non-finite values")
        for kind, key in (("output", "out_err"), ("state", "state_err")):
            for n, e in zip(res["tokens"], res[key][form]):
                if max(e) > bound(kind, form, name, n):
                    bad.append(f"{name}/{form}: {kind} error {max(e):.2e} after {n} tokens > "
                               f"{bound(kind, form, name, n):.1e}")
                    break
    return bad


def chart(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    colors = {"float32": "tab:blue", "bfloat16": "tab:orange", "float16": "tab:green"}
    for name, res in results.items():
        x = res["tokens"]
        for form, style in (("recurrent", "-"), ("chunk", "--")):
            if not res["out_err"][form]:
                continue
            for ax, key in ((axes[0], "out_err"), (axes[1], "state_err")):
                y = [max(e) for e in res[key][form]]
                ax.plot(x, y, style, color=colors[name], lw=1.2, label=f"{name} {form}")
    for ax, what in ((axes[0], "outputs: RMS error / RMS (per block)"),
                     (axes[1], "state after the block: relative error")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens decoded")
        ax.set_title(what + ", worst head", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    n = results[next(iter(results))]["tokens"]
    for form, style in (("recurrent", ":"), ("chunk", "-.")):
        axes[1].plot(n, [bound("state", form, None, t) for t in n], style, color="k", lw=0.8,
                     label=f"stated bound, {form}")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--block", type=int, default=1000, help="tokens per measured block")
    ap.add_argument("--dk", type=int, default=8)
    ap.add_argument("--dv", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode", choices=["step", "scan"], default="step",
                    help="step: one recurrent_step call per token (the decode path); scan: the "
                         "same recurrence over each block in one recurrent_retention call (the "
                         "same kernel, bit-identical to the steps: tests/python/"
                         "test_determinism.py), 1000x fewer Python calls")
    ap.add_argument("--quick", action="store_true", help="20,000 tokens (smoke test)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--from-json", default=None,
                    help="comma-separated .json files of earlier runs (e.g. one dtype each, run "
                         "in parallel): merge their results and write the report and chart")
    args = ap.parse_args()
    if args.quick:
        args.tokens = 20_000
    torch.set_num_threads(1)  # B * H = 5 (sequence, head) pairs: threads would only add overhead
    commit, dirty = git_commit()
    date = datetime.date.today().isoformat()
    results = {}
    if args.from_json:
        for path in args.from_json.split(","):
            with open(path) as f:
                saved = json.load(f)
            for key in ("tokens", "block", "dk", "dv", "seed", "decode"):
                setattr(args, key, saved["meta"][key])
            results.update(saved["results"])
    for name in ([] if args.from_json else args.dtypes.split(",")):
        print(f"== {name}: {args.tokens} tokens", flush=True)
        results[name] = run(args.tokens, args.block, args.dk, args.dv, DTYPES[name], args.seed,
                            decode=args.decode)
    violations = [v for name, res in results.items() for v in check_bounds(name, res)]

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"long_decode_{date}_{commit}" + ("_quick" if args.quick else ""))
    meta = dict(tokens=args.tokens, block=args.block, dk=args.dk, dv=args.dv, gammas=GAMMAS,
                decode=args.decode,
                seed=args.seed, commit=commit, dirty=dirty, date=date, bounds=BOUNDS,
                torch=torch.__version__, violations=violations)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f)
    title = (f"Recurrent decoding and chunk form vs float64 scan, B=1, H={len(GAMMAS)}, "
             f"dk={args.dk}, dv={args.dv}, commit {commit}")
    chart(results, stem + ".png", title)

    heads = ", ".join(f"1-2^{math.log2(1 - g):.0f}" if abs(math.log2(1 - g) - round(math.log2(1 - g))) < 1e-9
                      else f"1-{1 - g:.0e}" for g in GAMMAS)
    L = [f"# Long-sequence stability: {args.tokens:,} tokens — {date}, commit {commit}"
         f"{' (+ uncommitted changes)' if dirty else ''}", "",
         f"`bench/long_decode.py`: B = 1, H = {len(GAMMAS)} (gamma = {heads}), dk = {args.dk}, "
         f"dv = {args.dv}, q, k, v ~ N(0, 1) rounded to the dtype, scale dk^-1/2, fp32 state. "
         f"Errors are relative to a float64 scan of the same (rounded) inputs; worst head; "
         f"measured per block of {args.block} tokens. Recurrent decoding: "
         + ("one `recurrent_step` call per token." if args.decode == "step" else
            "`recurrent_retention` over each block continuing from the previous state (the "
            "same token-by-token kernel as `recurrent_step`, bit-identical to it: "
            "tests/python/test_determinism.py).")
         + f" Chart: `{os.path.basename(stem)}.png`.", "",
         "| dtype | form | non-finite | output error, max over run | at 1k / 10k / 100k / end | "
         "state error, max over run | at end (per head) | time (s) |",
         "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        x = res["tokens"]
        for form in ("recurrent", "chunk"):
            if not res["out_err"][form]:
                continue
            oe = [max(e) for e in res["out_err"][form]]
            se = [max(e) for e in res["state_err"][form]]
            at = [oe[min(len(x) - 1, max(0, n // args.block - 1))] for n in (1000, 10_000, 100_000)]
            at.append(oe[-1])
            L.append(f"| {name} | {form} | {res['nonfinite'][form]} | {max(oe):.2e} | "
                     + " / ".join(f"{a:.1e}" for a in at) + f" | {max(se):.2e} | "
                     + ", ".join(f"{e:.1e}" for e in res["state_err"][form][-1])
                     + f" | {res['seconds'][form]:.0f} |")
    L += ["", f"Largest |output| {max(r['out_absmax'] for r in results.values()):.1f}, largest "
          f"|state| {max(r['state_absmax'] for r in results.values()):.1f} (float64 scan).", "",
          "Stated bounds (checked after every block; relative, worst head, n tokens): state "
          f"error <= {BOUNDS['state']['recurrent'][0]:.0e} + {BOUNDS['state']['recurrent'][1]:.0e} n "
          f"(recurrent), <= {BOUNDS['state']['chunk'][0]:.0e} (chunk), for every dtype; output error "
          "<= max(state bound, " + ", ".join(f"{k} {v:.0e}" for k, v in BOUNDS["output"].items())
          + "); no inf/NaN. " + ("All hold." if not violations else "VIOLATED: " + "; ".join(violations))]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))
    if violations:
        sys.exit(1)


if __name__ == "__main__":
    main()
