"""A pool of gloo worker processes for the torch.distributed tests (test_distributed.py).

Spawning a process that imports torch costs seconds on a small CI machine, so one pool serves a
whole test module: ``world`` processes join one gloo process group (rendezvous through a file,
data over the loopback interface only) and create the sub-groups of the first n ranks once; each
test then sends a task (the name of a function below and its arguments) to every rank and gets
each rank's return value back.  A task that fails or hangs (collective timeout) tears the pool
down; the next test starts a fresh one.
"""
import datetime
import io
import os
import queue
import time
import traceback

import torch
import torch.multiprocessing as mp

_TASK_TIMEOUT_S = 240      # generous: a healthy task takes seconds; the gloo timeout fires first
_COLLECTIVE_TIMEOUT_S = 90


def _dumps(obj):
    """Serialise in the caller's thread.  A multiprocessing queue pickles in a feeder thread, and
    torch's reducer moves a tensor's storage into shared memory in place while it does: the
    sender's own later reads of that tensor would race with the move."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data):
    return torch.load(io.BytesIO(data), weights_only=False)


def _serve(rank, world, init_file, task_q, result_q, package):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"   # loopback only
    torch.set_num_threads(1)                   # the ranks share the machine's cores
    import importlib.util

    import torch.distributed as dist

    # A spawned process rebuilds its import path from the parent's sys.path; if anything put
    # another copy of the package first (e.g. a source tree whose extension was built for a
    # different torch), importing it may abort the process: refuse with a message instead.
    found = importlib.util.find_spec("retention").origin
    if found != package:
        result_q.put((rank, "error", f"worker would import retention from {found}, the tests "
                                     f"use {package} (sys.path differs)"))
        return
    import retention  # noqa: F401
    import distributed_tasks

    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT_S))
    groups = {world: dist.group.WORLD}
    for n in range(2, world):               # new_group is collective: every rank creates each
        groups[n] = dist.new_group(list(range(n)))
    result_q.put((rank, "ready", None))
    while True:
        task = task_q.get()
        if task is None:
            break
        name, ranks, kwargs = task
        try:
            res = None
            if rank < ranks:
                res = getattr(distributed_tasks, name)(rank, groups[ranks], **_loads(kwargs))
            result_q.put((rank, "ok", _dumps(res)))
        except BaseException:  # report, keep serving (a broken group times out the next task)
            result_q.put((rank, "error", traceback.format_exc()))
    dist.barrier()  # tear down together, as examples/distributed_train.py does
    groups.clear()  # hold no group past destroy_process_group (see retention.distributed.WORLD)
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world, tmpdir):
        self.world = world
        self.tmpdir = str(tmpdir)
        self.procs = None
        self._generation = 0

    def _start(self):
        self._generation += 1
        init_file = os.path.join(self.tmpdir, f"pg_init_{self._generation}")
        # Imported here, not at module level: a spawned worker imports this module before it
        # can check which retention it would get (_serve).
        import retention

        ctx = mp.get_context("spawn")
        self.result_q = ctx.Queue()
        self.task_qs = [ctx.Queue() for _ in range(self.world)]
        self.procs = [ctx.Process(target=_serve, args=(r, self.world, init_file, self.task_qs[r],
                                                       self.result_q, retention.__file__),
                                 daemon=True)
                      for r in range(self.world)]
        for p in self.procs:
            p.start()
        self._collect("ready")

    def _collect(self, what):
        out, errors = {}, []
        deadline = time.monotonic() + _TASK_TIMEOUT_S
        while len(out) + len(errors) < self.world:
            try:
                # short waits, so that a worker that died (it never answers) is noticed at once
                rank, status, payload = self.result_q.get(timeout=1)
            except queue.Empty:
                dead = [f"rank {r} exited with code {p.exitcode}" for r, p in enumerate(self.procs)
                        if not p.is_alive() and r not in out]
                if dead or errors:
                    # after a failure the other ranks may wait in a collective: don't wait for them
                    errors.extend(dead)
                    break
                if time.monotonic() > deadline:
                    errors.append(f"timed out after {_TASK_TIMEOUT_S} s waiting for {what} "
                                  f"(answered: {sorted(out)})")
                    break
                continue
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
            else:
                out[rank] = payload if status == "ready" else _loads(payload)
        if errors:
            self.close(kill=True)
            raise RuntimeError(f"distributed task {what!r} failed:\n" + "\n".join(errors))
        return [out[r] for r in range(self.world)]

    def run(self, name, ranks, **kwargs):
        """Run distributed_tasks.<name>(rank, group, **kwargs) on ranks 0..ranks-1 (a group of
        that size); returns their results in rank order."""
        assert 2 <= ranks <= self.world
        if self.procs is None:
            self._start()
        payload = _dumps(kwargs)
        for q in self.task_qs:
            q.put((name, ranks, payload))
        return self._collect(name)[:ranks]

    def close(self, kill=False):
        if self.procs is None:
            return
        if not kill:
            for q in self.task_qs:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        self.procs = None
