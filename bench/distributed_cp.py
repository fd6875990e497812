#!/usr/bin/env python3
"""Context-parallel retention (retention.distributed) vs one process: per-rank peak memory, time
and communication bytes for one forward+backward over a sequence of T tokens.

Ops: the raw chunk op (``chunk``: context_parallel_retention) and the fused layer core with gate,
rotation, norm and decay normaliser (``msr``: context_parallel_msr).  R = 1 is the plain op in one
process (no process group); R >= 2 runs R processes (gloo on 127.0.0.1), rank r holding an even
slice of the T tokens.  Every process uses ``--threads`` threads (default 1, so R = 2 fills a
2-core machine and R = 4 oversubscribes it 2x: its times measure contention, not scaling).

Per rank: median time of forward+backward (after a warm-up, ranks aligned by a barrier before
each repeat), time spent inside the state all-gathers (includes waiting for slower ranks), the
bytes this rank sends and receives in them (an all-gather of n bytes per rank receives (R-1)*n),
and, in a second launch with glibc's default heap, the peak resident memory of one
forward+backward above the process's RSS before it (bench/cpu_ops.PeakRSS).  Writes bench/results/distributed_cp_<cpu>_<date>_<commit>.{md,json}.

    PYTHONPATH=python /usr/bin/python3 bench/distributed_cp.py                 # T = 8K, 32K, 128K
    PYTHONPATH=python /usr/bin/python3 bench/distributed_cp.py --quick --out "$(mktemp -d)"
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import cpu_ops  # noqa: E402  (PeakRSS, allocator settings, machine description)


def worker(cfg):
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(REPO, "python"))
    import retention
    from retention import distributed as rd

    torch.set_num_threads(cfg["threads"])
    R, rank = cfg["R"], cfg["rank"]
    if R > 1:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank,
                                world_size=R)
    start, end = rd.slice_bounds(cfg["T"], R, rank)
    L, B, H, dk, dv = end - start, cfg["B"], cfg["H"], cfg["dk"], cfg["dv"]
    torch.manual_seed(rank)
    ld = retention.retnet_log_decay(H)
    dims = (dk, dk, dv, dv) if cfg["op"] == "msr" else (dk, dk, dv)
    inputs = [torch.randn(B, L, H, d, requires_grad=True) for d in dims]
    grad_out = torch.randn(B, L, H, dv)

    comm = {"bytes_sent": 0, "bytes_received": 0, "seconds": 0.0}
    if R > 1:
        gather = rd._all_gather

        def counted_gather(t, group):
            t0 = time.perf_counter()
            out = gather(t, group)
            comm["seconds"] += time.perf_counter() - t0
            n = t.numel() * t.element_size()
            comm["bytes_sent"] += n
            comm["bytes_received"] += n * (len(out) - 1)
            return out

        rd._all_gather = counted_gather

    def step():
        if cfg["op"] == "chunk":
            if R == 1:
                out = retention.chunk_retention(*inputs, ld, chunk_size=64)
            else:
                out = rd.context_parallel_retention(*inputs, ld, chunk_size=64)
        else:
            fn = retention.msr if R == 1 else rd.context_parallel_msr
            out = fn(*inputs, ld, chunk_size=64, decay_norm=True)
        out.backward(grad_out)
        for t in inputs:
            t.grad = None

    def barrier():
        if R > 1:
            dist.barrier()

    barrier()
    step()  # warm-up
    if cfg["phase"] == "memory":
        barrier()
        with cpu_ops.PeakRSS() as pk:
            step()
        barrier()
        print(json.dumps(dict(rank=rank, peak_mib=pk.peak_bytes / 2**20)), flush=True)
        if R > 1:
            dist.destroy_process_group()
        return
    times, comm_s = [], []
    for _ in range(cfg["reps"]):
        barrier()
        c0 = comm["seconds"]
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        comm_s.append(comm["seconds"] - c0)
    per_step = {k: comm[k] // (cfg["reps"] + 1) for k in ("bytes_sent", "bytes_received")}
    print(json.dumps(dict(rank=rank, L=L, ms=statistics.median(times) * 1e3,
                          comm_ms=statistics.median(comm_s) * 1e3,
                          input_mib=sum(t.numel() * 4 for t in inputs) / 2**20, **per_step)),
          flush=True)
    if R > 1:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg, timeout):
    """Two launches: timing with a heap that keeps freed memory (page faults are slow here, see
    bench/README.md), then memory with glibc's default heap (a retaining heap fragments and would
    overstate the peak)."""
    timing = _launch(dict(cfg, phase="time"), "retain", timeout)
    if "error" in timing:
        return timing
    memory = _launch(dict(cfg, phase="memory"), "default", timeout)
    if "error" in memory:
        return memory
    for row, mem in zip(timing["ranks"], memory["ranks"]):
        row["peak_mib"] = mem["peak_mib"]
    timing["peak_mib"] = max(r["peak_mib"] for r in timing["ranks"])
    return timing


def _launch(cfg, allocator, timeout):
    env = cpu_ops.allocator_env(allocator)
    env["OMP_NUM_THREADS"] = str(cfg["threads"])
    cfg = dict(cfg, port=_free_port())
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                               json.dumps(dict(cfg, rank=r))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
             for r in range(cfg["R"])]
    rows, errors = [], []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += "\ntimeout"
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if lines:
            rows.append(json.loads(lines[-1]))
        else:
            errors.append((err.strip().splitlines() or ["?"])[-1][:160])
    if errors:
        return {"error": "; ".join(errors)}
    rows.sort(key=lambda r: r["rank"])
    out = {"ranks": rows}
    if cfg["phase"] == "time":
        out["ms"] = max(r["ms"] for r in rows)
    return out


def _fmt_bytes(n):
    return f"{n / 2**10:.0f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="8192,32768,131072")
    ap.add_argument("--R", default="1,2,4", help="process counts (1 = the plain op)")
    ap.add_argument("--ops", default="chunk,msr")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))
    if a.quick:
        a.T, a.R, a.ops, a.H, a.dk, a.dv, a.reps = "300", "1,2", "msr", 2, 16, 16, 1

    load_start = cpu_ops.loadavg()
    commit, dirty = cpu_ops.git_commit()   # the code being measured: recorded before the run
    commit += "-dirty" if dirty else ""
    results = []
    for T in [int(t) for t in a.T.split(",")]:
        for op in a.ops.split(","):
            for R in [int(r) for r in a.R.split(",")]:
                cfg = dict(op=op, T=T, R=R, B=a.B, H=a.H, dk=a.dk, dv=a.dv, threads=a.threads,
                           reps=a.reps)
                r = run(cfg, a.timeout)
                r.update(op=op, T=T, R=R)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "ranks"}), flush=True)
                if "error" in r:
                    print(r["error"], file=sys.stderr)
    load_end = cpu_ops.loadavg()

    date = datetime.date.today().isoformat()
    cpu = cpu_ops.cpu_model()
    tag = "cpu-" + "-".join(cpu.lower().split()[:2]).replace("(", "").replace(")", "")
    stem = os.path.join(a.out, f"distributed_cp_{tag}_{date}_{commit}")
    os.makedirs(a.out, exist_ok=True)
    meta = dict(command=cpu_ops.command_line(), commit=commit, date=date, cpu=cpu,
                cores=os.cpu_count(), load_start=load_start, load_end=load_end, B=a.B, H=a.H,
                dk=a.dk, dv=a.dv, threads_per_process=a.threads, dtype="float32")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)

    state_bytes = a.B * a.H * a.dk * a.dv * 4
    lines = [
        "# Context-parallel retention vs one process (CPU, gloo on loopback)",
        "",
        f"`{meta['command']}` — commit {commit}, {date}, {cpu}, {os.cpu_count()} cores, "
        f"load average at start {load_start}, at end {load_end}.",
        "",
        f"B={a.B}, H={a.H}, dk={a.dk}, dv={a.dv}, fp32, chunk 64, one forward+backward; "
        f"{a.threads} thread(s) per process; R=1 is the plain op without a process group. "
        f"The state is B·H·dk·dv·4 = {_fmt_bytes(state_bytes)}.",
        "Time: slowest rank's median; comm: its time inside the all-gathers (waiting for slower "
        "ranks included). Peak: resident memory of one forward+backward above the RSS before it, "
        "largest rank. Bytes: per rank per forward+backward (state all-gathers + the slice layout).",
        "",
        "| op | T | R | tokens/rank | time ms | comm ms | peak MiB/rank | peak vs R=1 | sent/rank | received/rank |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['T']} | {r['R']} | | error: {r['error']} | | | | | |")
            continue
        if r["R"] == 1:
            base[(r["op"], r["T"])] = r["peak_mib"]
        b = base.get((r["op"], r["T"]))
        rel = f"{r['peak_mib'] / b:.2f}x" if b else ""
        worst = max(r["ranks"], key=lambda x: x["ms"])
        sent = max(x["bytes_sent"] for x in r["ranks"])
        recv = max(x["bytes_received"] for x in r["ranks"])
        lines.append(
            f"| {r['op']} | {r['T']} | {r['R']} | {max(x['L'] for x in r['ranks'])} | {r['ms']:.0f} | "
            f"{worst['comm_ms']:.1f} | {r['peak_mib']:.0f} | {rel} | "
            f"{_fmt_bytes(sent) if r['R'] > 1 else '-'} | {_fmt_bytes(recv) if r['R'] > 1 else '-'} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", stem + ".md")


if __name__ == "__main__":
    sys.exit(main())
