#!/usr/bin/env python3
"""Round trip Python -> C++: the retention-generate app decodes a checkpoint saved by
RetNet.save_pretrained and must reproduce Python's RetNet exactly.

Checks (exit status 1 on any failure):
  1. greedy tokens of the C++ app (batched: prompts of different lengths packed in one prefill,
     then decoded together) == Python's chunk prefill + RetNet.step, every token, per prompt,
     up to a near tie (the two best logits within the logits' tolerance, where rounding may
     legitimately pick either; the continuations are compared up to that step);
  2. the logits each token was chosen from agree with Python's to fp32 rounding:
     max |diff| <= TOL * max(1, max |logit|), TOL = 1e-5 (both run the same fp32 ops; only
     summation order differs between a batched and a single-sequence matmul, ~1e-7 relative
     per op through a few layers);
  3. batched decoding == decoding each prompt on its own (--one-by-one): same tokens, logits
     within TOL;
  4. temperature/top-k sampling with a seed draws the same tokens as Python's RetNet.generate
     with torch.Generator().manual_seed(seed) (same sampling steps, same generator).

A checkpoint trained for a few steps mostly predicts spaces, so --random-too repeats every
check on a random model of the same config (weights drawn with a larger spread, saved next to
the checkpoint), whose greedy continuations vary from token to token.

Usage: roundtrip.py --app PATH --checkpoint FILE [--steps 80] [--random-too]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
from retention.nn import RetNet  # noqa: E402

TOL = 1e-5
TEXT_PROMPTS = ["This License ", "GNU", "Permission is hereby granted, free of charge, to any person"]


def run_app(app, checkpoint, steps, extra, ids):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [app, "--checkpoint", checkpoint, "--max-new-tokens", str(steps), "--json", out, "--save-logits", "--threads", "1",
           "--prompt", TEXT_PROMPTS[0]]
    for p in ids[1:]:
        cmd += ["--ids", ",".join(map(str, p))]
    cmd += extra
    res = subprocess.run(cmd, capture_output=True, text=True)
    print("$ " + " ".join(repr(c) if " " in c else c for c in cmd))
    print(res.stdout.strip().splitlines()[0] if res.stdout else "", "\n" + (res.stdout.strip().splitlines()[-1] if res.stdout else ""))
    if res.returncode != 0:
        print(res.stdout, res.stderr)
        raise SystemExit(f"retention-generate failed with status {res.returncode}")
    with open(out) as f:
        data = json.load(f)
    os.unlink(out)
    return data


def agreeing_steps(tokens, ref_tokens, ref_logits, scale):
    """How many greedy steps to compare, or None when the tokens part where the reference's choice
    was clear. Greedy decoding follows the argmax, so two correct decoders whose logits differ by
    rounding (GEMMs of other shapes sum in another order) may part at a near tie, after which
    their continuations differ legitimately; the logits of that step must still agree."""
    for j, (a, b) in enumerate(zip(tokens, ref_tokens)):
        if a != b:
            gap = float(ref_logits[j][b] - ref_logits[j][a])
            return j + 1 if gap <= 2 * TOL * scale else None
    return len(ref_tokens)


@torch.no_grad()
def python_greedy(model, prompt, steps):
    logits, state = model(torch.tensor([prompt]), form="chunk")
    lg = logits[:, -1]
    toks, all_logits = [], []
    for i in range(steps):
        all_logits.append(lg[0].float())
        t = lg.float().argmax(-1)
        toks.append(int(t))
        if i + 1 < steps:
            lg, state = model.step(t, state)
    return toks, torch.stack(all_logits)


def random_checkpoint(trained_path):
    """A random model with the trained one's config and vocabulary (seeded)."""
    base = RetNet.from_pretrained(trained_path)
    torch.manual_seed(0)
    model = RetNet.from_pretrained(trained_path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.15)
    path = os.path.splitext(trained_path)[0] + "-random.safetensors"
    model.save_pretrained(path, vocab=base.vocab)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--app", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--random-too", action="store_true")
    args = ap.parse_args()
    # One thread on both sides: the models are tiny, and on a busy machine the threads of one op
    # waiting for each other cost more than they gain.
    torch.set_num_threads(1)
    failures = []
    paths = [args.checkpoint] + ([random_checkpoint(args.checkpoint)] if args.random_too else [])
    for path in paths:
        print(f"== {path}")
        failures += check(args.app, path, args.steps)
    for f in failures:
        print("FAIL:", f)
    print("ROUND TRIP: " + ("FAIL" if failures else "PASS"))
    return 1 if failures else 0


def check(app, checkpoint, steps):
    model = RetNet.from_pretrained(checkpoint)
    stoi = {c: i for i, c in enumerate(model.vocab)}
    ids = [[stoi[c] for c in p if c in stoi] for p in TEXT_PROMPTS]
    failures = []

    batched = run_app(app, checkpoint, steps, [], ids)
    single = run_app(app, checkpoint, steps, ["--one-by-one"], ids)
    worst = 0.0
    for i, prompt in enumerate(ids):
        toks, logits = python_greedy(model, prompt, steps)
        scale = max(1.0, logits.abs().max().item())
        for name, run in (("batched", batched), ("one-by-one", single)):
            n = agreeing_steps(run["tokens"][i], toks, logits, scale)
            if n is None:
                first = next(j for j, (a, b) in enumerate(zip(run["tokens"][i], toks)) if a != b)
                failures.append(f"prompt {i} ({name}): C++ greedy tokens differ from Python's at step {first}")
                continue
            if n < steps:
                print(f"prompt {i} ({name}): near tie at step {n - 1}, compared up to there")
            d = (torch.tensor(run["logits"][i][:n]) - logits[:n]).abs().max().item() / scale
            worst = max(worst, d)
            if d > TOL:
                failures.append(f"prompt {i} ({name}): logits differ by {d:.3g} x max(1,|logit|) > {TOL:g}")
        one = torch.tensor(single["logits"][i])
        n = agreeing_steps(batched["tokens"][i], single["tokens"][i], one, scale)
        d = (torch.tensor(batched["logits"][i][:n or 1]) - one[:n or 1]).abs().max().item() / scale
        if n is None or d > TOL:
            failures.append(f"prompt {i}: batched decode != one-by-one decode (logit diff {d:.3g})")
        print(f"prompt {i} ({len(prompt)} tokens): {steps} greedy tokens ({len(set(toks))} distinct), "
              f"C++ == Python: {batched['tokens'][i] == toks}; text: {''.join(model.vocab[t] for t in toks)[:50]!r}")
    print(f"max logit difference C++ vs Python RetNet.step: {worst:.3g} x max(1, max |logit|) (tolerance {TOL:g})")

    # sampling with a seed: one prompt, same draws as Python's generate
    seed, temp, top_k = 7, 0.8, 10
    sampled = run_app(app, checkpoint, steps,
                      ["--temperature", str(temp), "--top-k", str(top_k), "--seed", str(seed)], ids[:1])
    ref = model.generate(torch.tensor(ids[0]), steps, temperature=temp, top_k=top_k,
                         generator=torch.Generator().manual_seed(seed))[len(ids[0]):].tolist()
    same = sampled["tokens"][0] == ref
    print(f"sampling (temperature {temp}, top-k {top_k}, seed {seed}): C++ tokens == Python generate: {same}")
    if not same:
        failures.append("seeded sampling: C++ tokens differ from Python's RetNet.generate")
    return failures


if __name__ == "__main__":
    sys.exit(main())
