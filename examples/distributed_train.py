#!/usr/bin/env python3
"""Train a small RetNet on torch.distributed: data parallel (DDP) or context parallel.

    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --mode ddp
    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --mode cp --seq-len 4096

Backend: NCCL when CUDA is available (one GPU per rank), else gloo on CPU.  Data: synthetic
sequences t_n = (a n + b) mod V with random a, b per sequence (learnable, so the loss goes down).

* ``--mode ddp``: every rank trains on its own rows of the batch; DistributedDataParallel averages
  the gradients.
* ``--mode cp``: every rank holds the same batch but only its contiguous slice of the sequence
  (``retention.distributed.local_slice``); ``enable_context_parallel`` makes each retention layer
  pass its [B, H, dk, dv] state between the ranks, and ``all_reduce_gradients`` sums the weight
  gradients.  ``--check`` also computes the first step's loss in one process on the whole
  sequence (rank 0) and prints the difference.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    import retention  # noqa: F401
except ImportError:  # running from a source checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import retention  # noqa: F401
from retention import distributed as rd
from retention.nn import RetNet


def batch(step, rows, seq_len, vocab, device):
    g = torch.Generator().manual_seed(1000 + step)   # the same on every rank
    a = torch.randint(1, vocab, (rows, 1), generator=g)
    b = torch.randint(0, vocab, (rows, 1), generator=g)
    seq = (a * torch.arange(seq_len + 1) + b) % vocab
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["ddp", "cp"], default="ddp")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4, help="rows per step (ddp: split across ranks)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--check", action="store_true", help="cp: compare step 1 with one process")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    train(args, use_cuda)
    # Tear down once train() has returned, so nothing holds the process group any more (a group
    # object still referenced, by a DDP wrapper say, outlives destroy_process_group and is torn
    # down during interpreter shutdown, where gloo's threads can abort the process), and together,
    # so that no rank closes its connections while a peer may still be in a collective.
    dist.barrier()
    dist.destroy_process_group()
    if args.mode == "ddp":
        # DistributedDataParallel keeps a reference to the gloo group that outlives
        # destroy_process_group (torch 2.x), so the group's worker threads run on into interpreter
        # shutdown. One of them may still drop the last reference to a gradient all-reduce that
        # DDP launched inside backward; that work's captured thread-local state holds a Python
        # object, and releasing it takes the GIL, which aborts the process once the interpreter is
        # finalizing ("terminate called without an active exception"). Every rank has passed the
        # barrier and the group is destroyed, so nothing is left to do: leave without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def train(args, use_cuda):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    torch.manual_seed(0)  # the same initial weights on every rank
    model = RetNet(vocab_size=args.vocab, embed_dim=64, value_dim=128, num_heads=4, num_layers=2,
                   ffn_dim=128, chunk_size=64).to(device)
    reference = None
    if args.mode == "ddp":
        if args.batch % world:
            raise SystemExit(f"--batch {args.batch} must be divisible by the {world} ranks")
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if use_cuda else None)
    else:
        if args.check and rank == 0:
            reference = RetNet(vocab_size=args.vocab, embed_dim=64, value_dim=128, num_heads=4,
                               num_layers=2, ffn_dim=128, chunk_size=64).to(device)
            reference.load_state_dict(model.state_dict())
        trained = rd.enable_context_parallel(model)
    opt = torch.optim.AdamW(trained.parameters(), lr=args.lr)

    for step in range(args.steps):
        tokens, targets = batch(step, args.batch, args.seq_len, args.vocab, device)
        opt.zero_grad()
        if args.mode == "ddp":
            rows = args.batch // world
            tokens, targets = tokens[rank * rows:(rank + 1) * rows], targets[rank * rows:(rank + 1) * rows]
            logits, _ = trained(tokens)
            loss = F.cross_entropy(logits.reshape(-1, args.vocab), targets.reshape(-1))
            loss.backward()                                  # DDP averages the gradients
            report = loss.detach().clone()
            dist.all_reduce(report)
            report /= world
        else:
            logits, _ = trained(rd.local_slice(tokens))      # this rank's part of the sequence
            # sum of this slice's token losses / all tokens: the ranks' losses add up to the mean
            loss = F.cross_entropy(logits.reshape(-1, args.vocab), rd.local_slice(targets).reshape(-1),
                                   reduction="sum") / targets.numel()
            loss.backward()
            rd.all_reduce_gradients(trained)                 # sum of the slices' contributions
            report = loss.detach().clone()
            dist.all_reduce(report)
            if reference is not None and step == 0:
                with torch.no_grad():
                    ref_logits, _ = reference(tokens)
                    ref = F.cross_entropy(ref_logits.reshape(-1, args.vocab), targets.reshape(-1))
                print(f"check: context-parallel loss {float(report):.6f}, one process "
                      f"{float(ref):.6f}, difference {abs(float(report) - float(ref)):.2e}", flush=True)
                if abs(float(report) - float(ref)) > 1e-4 * float(ref):
                    raise SystemExit("context-parallel loss differs from the single-process loss")
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"[{args.mode}, {world} ranks] step {step:4d}  loss {float(report):.4f}", flush=True)


if __name__ == "__main__":
    main()
