#!/usr/bin/env python3
"""The Python side of bench/fla_decode.py: one FLA-format directory loaded by
retention.models.RetNetForCausalLM (transformers), timed as a user runs it, printed as JSON.

Needs an interpreter with torch 2.x, transformers, safetensors and the installed retention
package (not the source tree: its extension is built for the Debian torch). fla_decode.py
starts it once per weight dtype with --python.

Method (the same as the C++ rows):
- decode: greedy generate() of steps + 2 new tokens minus 2 new tokens (best of 3 each), from a
  1-token prompt, after one untimed call, so the first steps and the prefill are not counted;
  then the same for 8 copies of the prompt as one batch.
- prefill: one forward with use_cache of a prompt of --prefill-len random tokens (chunk form),
  best of 3 after the same forward once untimed (the app's --warmup).

Usage: python bench/fla_decode_py.py MODEL_DIR --dtype bf16|fp32 --threads N --steps S --prefill-len P
"""
import argparse
import json
import os
import resource
import time

import torch


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=32)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import retention
    from retention.models import RetNetForCausalLM

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model, load_s, _ = timed(lambda: RetNetForCausalLM.from_pretrained(a.model, dtype=dtype).eval())
    vocab = model.config.vocab_size

    def generate(batch, new_tokens):
        ids = torch.full((batch, 1), 7, dtype=torch.long)
        with torch.no_grad():
            return model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)

    r = dict(retention=os.path.dirname(retention.__file__), torch=torch.__version__, load_s=load_s)
    for batch, key in ((1, ""), (8, "_b8")):
        generate(batch, 2)  # warm: faults the weights in, first-call allocations
        runs = {n: [timed(lambda: generate(batch, n)) for _ in range(3)] for n in (a.steps + 2, 2)}
        assert runs[a.steps + 2][0][0].shape == (batch, a.steps + 3)
        best = {n: min(t[1] for t in v) for n, v in runs.items()}  # best of 3: the least disturbed
        cpu = {n: min(t[2] for t in v) for n, v in runs.items()}
        r["step_s" + key] = (best[a.steps + 2] - best[2]) / a.steps
        r["cpu_step_s" + key] = (cpu[a.steps + 2] - cpu[2]) / a.steps
    ids = torch.randint(0, vocab, (1, a.prefill_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, use_cache=True)  # warm, as the app's --warmup
        pre = [timed(lambda: model(ids, use_cache=True)) for _ in range(3)]
    r["prefill_s"], r["prefill_cpu_s"] = min(t[1] for t in pre), min(t[2] for t in pre)
    r["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(r))


if __name__ == "__main__":
    main()
