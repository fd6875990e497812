#!/usr/bin/env python3
"""Train a small character-level RetNet language model with the `retention` ops.

Corpus: every regular file in /usr/share/common-licenses (shipped by Debian's essential package
base-files, so it exists on every Debian system), concatenated in sorted order; symlinks (GPL ->
GPL-3, ...) are skipped so no text appears twice.  The last 10% of the characters are held out.

What it does
  1. trains with the chunkwise form (T=128, chunk 32) for --steps steps (default 300), showing a
     progress bar with the loss and tokens/s;
  2. reports the held-out loss (and the unigram entropy of the training text, for scale);
  3. generates ~200 characters from a prompt: chunk-form prefill, then recurrent decoding one token
     at a time (RetNet.generate -> MultiScaleRetention.step -> retention.recurrent_step);
  4. checks that the parallel, chunkwise and recurrent forms (and chunk prefill + step decoding)
     give the same logits on a held-out sequence: prints the max abs differences and PASS/FAIL;
     exits with status 1 on FAIL.

Usage (from the repository root, after building the extension in place):
    /usr/bin/python3 examples/train_lm.py                 # ~2-3 minutes on a 2-core CPU
    /usr/bin/python3 examples/train_lm.py --quick         # CI smoke run (a few seconds)
    /usr/bin/python3 examples/train_lm.py --device cuda --steps 1000
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

try:
    import retention  # noqa: F401
except ImportError:  # running from a source checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import retention  # noqa: F401
from retention.nn import RetNet

CORPUS_DIR = "/usr/share/common-licenses"


# ----------------------------------------------------------------------------------------------
def load_corpus(directory=CORPUS_DIR):
    parts = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    if not parts:
        raise SystemExit(f"no corpus files found in {directory}")
    return "\n".join(parts), len(parts)


class Progress:
    """tqdm if importable, else a minimal one-line progress bar on stderr."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.t0 = time.time()
        self._last = 0.0
        try:
            from tqdm import tqdm  # type: ignore
            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self._tty = sys.stderr.isatty()

    def update(self, postfix):
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(1)
            return
        self.postfix = postfix
        now = time.time()
        # redraw in place on a terminal; otherwise (logs, CI) print ~10 lines in total
        if self._tty or self.n == self.total or self.n % max(1, self.total // 10) == 0:
            if self._tty and now - self._last < 0.1 and self.n != self.total:
                return
            self._last = now
            width = 30
            filled = int(width * self.n / self.total)
            bar = "#" * filled + "-" * (width - filled)
            elapsed = now - self.t0
            eta = elapsed / self.n * (self.total - self.n)
            line = f"{self.desc} [{bar}] {self.n}/{self.total} {elapsed:5.1f}s<{eta:5.1f}s {postfix}"
            sys.stderr.write(("\r" + line) if self._tty else (line + "\n"))
            sys.stderr.flush()

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def get_batch(data, batch_size, seq_len, generator, device):
    idx = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    rows = torch.stack([data[i:i + seq_len + 1] for i in idx.tolist()])
    rows = rows.to(device)
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def heldout_loss(model, data, seq_len, chunk_size, device, max_windows):
    """Mean next-char loss over consecutive non-overlapping windows of the held-out text."""
    model.eval()
    n_win = min(max_windows, (data.numel() - 1) // seq_len)
    starts = torch.arange(n_win) * seq_len
    total, count = 0.0, 0
    for i in range(0, n_win, 32):
        rows = torch.stack([data[s:s + seq_len + 1] for s in starts[i:i + 32].tolist()]).to(device)
        logits, _ = model(rows[:, :-1], form="chunk", chunk_size=chunk_size)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += rows[:, 1:].numel()
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def check_forms(model, tokens, chunk_size, tol):
    """Logits of parallel / chunk / recurrent forms and chunk-prefill + step decoding."""
    model.eval()
    ref, _ = model(tokens, form="parallel")
    res = {}
    res["chunk"] = (model(tokens, form="chunk", chunk_size=chunk_size)[0] - ref).abs().max().item()
    res["recurrent"] = (model(tokens, form="recurrent")[0] - ref).abs().max().item()
    split = tokens.shape[1] // 2
    pre, state = model(tokens[:, :split], form="chunk", chunk_size=chunk_size)
    outs = [pre]
    for t in range(split, tokens.shape[1]):
        lg, state = model.step(tokens[:, t], state)
        outs.append(lg[:, None])
    res["chunk prefill + step decode"] = (torch.cat(outs, 1) - ref).abs().max().item()
    model.train()
    scale = max(1.0, ref.abs().max().item())
    return res, scale, all(v <= tol * scale for v in res.values())


# ----------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--value-dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--ffn-dim", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto (cuda if available)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt", default="This License ")
    p.add_argument("--gen-chars", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--form-tol", type=float, default=1e-4,
                   help="max abs logit difference allowed between forms, relative to max(1, max |logit|)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: few steps, short generation")
    p.add_argument("--save", metavar="PATH", help="save the trained model (safetensors: weights, config and "
                   "character vocabulary) for RetNet.from_pretrained and the C++ retention-generate app")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 12)
        args.gen_chars = min(args.gen_chars, 40)
        args.warmup = min(args.warmup, 3)

    torch.set_num_threads(max(1, args.threads))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    device = torch.device(device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    # ---- data
    text, n_files = load_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_train = int(0.9 * data.numel())
    train, held = data[:n_train], data[n_train:]
    counts = torch.bincount(train, minlength=len(chars)).double()
    probs = counts[counts > 0] / counts.sum()
    unigram = -(probs * probs.log()).sum().item()
    print(f"corpus: {n_files} files from {CORPUS_DIR}, {data.numel():,} chars, vocab {len(chars)}; "
          f"train {train.numel():,} / held-out {held.numel():,}")
    print(f"unigram entropy of the training text: {unigram:.3f} nats/char (uniform: {math.log(len(chars)):.3f})")

    # ---- model
    model = RetNet(len(chars), args.embed_dim, args.value_dim, args.heads, args.layers, args.ffn_dim,
                   chunk_size=args.chunk_size).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: RetNet D={args.embed_dim} Dv={args.value_dim} H={args.heads} L={args.layers} "
          f"FFN={args.ffn_dim}, {n_params:,} parameters; device {device}, {torch.get_num_threads()} threads; "
          f"T={args.seq_len}, chunk={args.chunk_size}, batch={args.batch_size}, steps={args.steps}, seed={args.seed}")

    decay, no_decay = [], []
    for n, prm in model.named_parameters():
        (no_decay if prm.dim() < 2 or "embed" in n else decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    # ---- train
    bar = Progress(args.steps, "train")
    t_start = time.time()
    tokens_seen = 0
    ema = None
    first_loss = None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = get_batch(train, args.batch_size, args.seq_len, gen, device)
        logits, _ = model(x, form="chunk", chunk_size=args.chunk_size)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = loss.item()
        if not math.isfinite(lv):
            bar.close()
            raise SystemExit(f"non-finite loss at step {step}")
        first_loss = lv if first_loss is None else first_loss
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        tokens_seen += x.numel()
        tps = tokens_seen / (time.time() - t_start)
        bar.update(f"loss {lv:.3f} (avg {ema:.3f}) lr {lr_at(step):.1e} {tps:,.0f} tok/s")
    bar.close()
    train_time = time.time() - t_start
    print(f"trained {args.steps} steps in {train_time:.1f}s: {tokens_seen / train_time:,.0f} tokens/s; "
          f"loss {first_loss:.3f} -> {lv:.3f} (running avg {ema:.3f})")

    if args.save:
        saved = model.save_pretrained(args.save, vocab=chars)
        print(f"saved {saved} (serve it from C++: retention-generate --checkpoint {saved} --prompt 'This License ')")

    # ---- held-out loss
    max_windows = 64 if args.quick else 512
    hl = heldout_loss(model, held, args.seq_len, args.chunk_size, device, max_windows)
    print(f"held-out loss: {hl:.3f} nats/char ({hl / math.log(2):.3f} bits/char); unigram entropy {unigram:.3f}")

    # ---- generation: chunk prefill + recurrent decoding
    prompt = "".join(c for c in args.prompt if c in stoi) or text[:16]
    ptoks = torch.tensor([stoi[c] for c in prompt], dtype=torch.long, device=device)
    t0 = time.time()
    out = model.generate(ptoks, args.gen_chars, temperature=args.temperature, top_k=args.top_k,
                         generator=torch.Generator(device=device).manual_seed(args.seed),
                         chunk_size=args.chunk_size)
    gen_time = time.time() - t0
    sample = "".join(chars[i] for i in out.tolist())
    print(f"--- sample ({args.gen_chars} chars, chunk prefill of {len(prompt)} + recurrent decode, "
          f"temperature {args.temperature}, top-k {args.top_k}, {args.gen_chars / gen_time:,.0f} chars/s) ---")
    print(sample)
    print("--- end of sample ---")

    # ---- form agreement on held-out text
    L = 96 if args.quick else 300
    seq = held[:L][None].to(device)
    res, scale, ok = check_forms(model, seq, args.chunk_size, args.form_tol)
    print(f"form agreement on a held-out sequence of {L} chars (logits vs parallel form, max |logit| {scale:.2f}, "
          f"tolerance {args.form_tol:g} x max(1, max |logit|)):")
    for k, v in res.items():
        print(f"  {k:30s} max abs diff {v:.3e}")
    print("FORMS AGREE: PASS" if ok else "FORMS AGREE: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
