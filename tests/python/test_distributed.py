"""torch.distributed: data parallel (DDP, FSDP) and context-parallel retention, on CPU with gloo
over the loopback interface.

One pool of 3 worker processes (one gloo group, plus a sub-group of ranks 0-1) serves every test
of this module (distributed_worker.py); the per-rank bodies are in distributed_tasks.py.  Each
test builds the whole problem here, compares what the ranks return with the single-process op /
model on the whole sequence or batch (fp32 rounding: conftest.TOL) and, for the raw ops and the
fused msr op, with the float64 references (reference.py, test_msr.msr_reference).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import retention
from conftest import TOL, assert_close_rel, make_state, random_log_decay, state_dtype_for
from reference import reference_grads, retention_quadratic, retention_term_rms
from retention import distributed as rd
from retention.nn import RetNet

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with gloo")

WORLD = 3
CHUNK = 16   # slice lengths below are not multiples of it


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from distributed_worker import WorkerPool

    p = WorkerPool(WORLD, tmp_path_factory.mktemp("dist"))
    yield p
    p.close()


def _cat(results, key):
    return torch.cat([r[key] for r in results], dim=1)


def _final_weights(ranks):
    w = [float(r + 1) for r in range(ranks)]
    return [x / sum(w) for x in w]


# ----------------------------------------------------------------------------------------------
# Context parallel: raw ops

RAW_CASES = [
    # ranks, slice lengths, form, dtype, initial_state
    (2, (45, 58), "chunk", torch.float32, True),
    (3, (37, 0, 50), "chunk", torch.float32, True),
    (3, (0, 29, 31), "chunk", torch.float32, False),
    (3, (21, 40, 0), "parallel", torch.float32, True),
    (2, (19, 30), "recurrent", torch.float32, False),
    (3, (23, 17, 35), "chunk", torch.float64, True),
]


@pytest.mark.parametrize("ranks,lengths,form,dtype,with_s0", RAW_CASES)
def test_raw_ops_match_single_process(pool, ranks, lengths, form, dtype, with_s0):
    B, H, dk, dv = 2, 3, 8, 6
    T = sum(lengths)
    q, k, v = (torch.randn(B, T, H, d, dtype=dtype) for d in (dk, dk, dv))
    ld = random_log_decay(H)
    sdt = state_dtype_for(dtype)
    s0 = make_state(B, H, dk, dv, dtype=sdt) if with_s0 else None
    grad_o = torch.randn(B, T, H, dv, dtype=dtype)
    grad_final = torch.randn(B, H, dk, dv, dtype=sdt)
    res = pool.run("raw_retention", ranks, q=q, k=k, v=v, log_decay=ld, lengths=list(lengths),
                   form=form, chunk_size=CHUNK, initial_state=s0, grad_o=grad_o,
                   grad_final=grad_final, final_weights=_final_weights(ranks))

    # single process, the op on the whole sequence
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    s0_leaf = None if s0 is None else s0.clone().requires_grad_()
    kw = dict(chunk_size=CHUNK) if form == "chunk" else {}
    o, final = retention.retention(*leaves, ld, form=form, initial_state=s0_leaf,
                                   output_final_state=True, **kw)
    ((o * grad_o).sum() + (final * grad_final).sum()).backward()
    tol = TOL[dtype]
    assert_close_rel(_cat(res, "o"), o, tol, "o vs single process")
    for name, leaf in zip(("dq", "dk", "dv"), leaves):
        assert_close_rel(_cat(res, name), leaf.grad, tol, f"{name} vs single process")
    for r in range(ranks):
        assert_close_rel(res[r]["final"], final, tol, f"final state on rank {r}")
        if s0 is not None:
            assert_close_rel(res[r]["ds0"], s0_leaf.grad, tol, f"d initial_state on rank {r}")

    # float64 reference from the math
    o_ref, final_ref = retention_quadratic(q, k, v, ld, initial_state=s0)
    assert_close_rel(_cat(res, "o"), o_ref, tol, "o vs float64 reference",
                     term_rms=retention_term_rms(q, k, v, ld, initial_state=s0))
    assert_close_rel(res[-1]["final"], final_ref, tol, "final state vs float64 reference")
    dq, dk_, dv_, ds0 = reference_grads(q, k, v, ld, initial_state=s0, grad_o=grad_o,
                                        grad_final_state=grad_final)
    for name, ref in (("dq", dq), ("dk", dk_), ("dv", dv_)):
        assert_close_rel(_cat(res, name), ref, tol, f"{name} vs float64 reference")
    if s0 is not None:
        assert_close_rel(res[0]["ds0"], ds0, tol, "d initial_state vs float64 reference")


# ----------------------------------------------------------------------------------------------
# Context parallel: the fused msr op (rotation at absolute positions)

MSR_CASES = [
    # ranks, slice lengths, form, rotary, decay_norm, base offset
    (2, (27, 36), "chunk", "torchscale", True, 0),
    (3, (30, 0, 19), "chunk", "neox", False, 5),
    (3, (14, 25, 22), "parallel", "torchscale", True, 3),
]


@pytest.mark.parametrize("ranks,lengths,form,rotary,decay_norm,base", MSR_CASES)
def test_msr_matches_single_process(pool, ranks, lengths, form, rotary, decay_norm, base):
    from test_msr import msr_reference

    B, H, dk, dv = 2, 2, 8, 10
    T = sum(lengths)
    q, k, v, g = (torch.randn(B, T, H, d) for d in (dk, dk, dv, dv))
    norm_weight = 1 + 0.1 * torch.randn(dv)
    ld = random_log_decay(H)
    s0 = make_state(B, H, dk, dv)
    grad_y, grad_final = torch.randn(B, T, H, dv), torch.randn(B, H, dk, dv)
    offsets = torch.full((B,), base, dtype=torch.int64)
    kwargs = dict(form=form, chunk_size=CHUNK, rotary=rotary, decay_norm=decay_norm,
                  offsets=offsets)
    res = pool.run("msr", ranks, q=q, k=k, v=v, g=g, norm_weight=norm_weight, log_decay=ld,
                   lengths=list(lengths), kwargs=kwargs, initial_state=s0, grad_y=grad_y,
                   grad_final=grad_final, final_weights=_final_weights(ranks))

    names = ("dq", "dk", "dv", "dg", "dnw", "ds0")
    tol = TOL[torch.float32]
    for impl in ("single process", "float64 reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g, norm_weight, s0)]
        if impl == "single process":
            y, final = retention.msr(*leaves[:4], ld, norm_weight=leaves[4], initial_state=leaves[5],
                                     output_final_state=True, **kwargs)
        else:
            y, final = msr_reference(*leaves[:4], ld, norm_weight=leaves[4], initial_state=leaves[5],
                                     rotary=rotary, decay_norm=decay_norm, offsets=offsets)
        ((y * grad_y).sum() + (final * grad_final).sum()).backward()
        assert_close_rel(_cat(res, "y"), y, tol, f"y vs {impl}")
        for name, leaf in zip(names[:4], leaves):
            assert_close_rel(_cat(res, name), leaf.grad, tol, f"{name} vs {impl}")
        # norm_weight is a shared parameter: each rank holds the part from its slice
        assert_close_rel(sum(r["dnw"] for r in res), leaves[4].grad, tol, f"d norm_weight vs {impl}")
        for r in range(ranks):
            assert_close_rel(res[r]["final"], final, tol, f"final state on rank {r} vs {impl}")
            assert_close_rel(res[r]["ds0"], leaves[5].grad, tol, f"d initial_state on rank {r} vs {impl}")


# ----------------------------------------------------------------------------------------------
# Context parallel: RetNet


def _small_retnet():
    config = dict(vocab_size=37, embed_dim=16, value_dim=24, num_heads=2, num_layers=2,
                  ffn_dim=32, chunk_size=CHUNK)
    return config, RetNet(**config)


@pytest.mark.parametrize("ranks,lengths,form", [(2, (19, 26), "chunk"), (3, (17, 0, 28), "chunk"),
                                                (3, (11, 20, 14), "parallel")])
def test_retnet_context_parallel_matches_single_process(pool, ranks, lengths, form):
    config, model = _small_retnet()
    B, T = 2, sum(lengths)
    seq = torch.randint(0, config["vocab_size"], (B, T + 1))
    tokens, targets = seq[:, :-1], seq[:, 1:]
    res = pool.run("retnet_context_parallel", ranks, config=config, state_dict=model.state_dict(),
                   tokens=tokens, targets=targets, lengths=list(lengths), form=form)

    logits, state = model(tokens, form=form)
    loss = F.cross_entropy(logits.reshape(-1, config["vocab_size"]), targets.reshape(-1))
    loss.backward()
    tol = TOL[torch.float32]
    assert_close_rel(_cat(res, "logits"), logits, tol, "logits")
    for r in range(ranks):
        assert abs(float(res[r]["loss"]) - loss.detach().item()) <= tol * loss.detach().item(), (res[r]["loss"], loss)
        for name, p in model.named_parameters():
            assert_close_rel(res[r]["grads"][name], p.grad, tol, f"grad {name} on rank {r}")
        assert res[r]["offset"] == T
        for i, st in enumerate(state.layers):
            assert_close_rel(res[r]["states"][i], st.state, tol, f"layer {i} final state on rank {r}")


# ----------------------------------------------------------------------------------------------
# Data parallel

def _fsdp_unavailable():
    """FSDP2 (fully_shard) is the FSDP that runs on CPU with gloo; FSDP1 raises "FSDP needs a
    non-CPU accelerator device".  Debian's torch 1.13 has neither: its torch.distributed.fsdp
    does not even import under Python 3.11 (a dataclass with a mutable default)."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except Exception as e:
        return (f"FSDP2 (torch.distributed.fsdp.fully_shard, CPU/gloo capable) is not usable in "
                f"torch {torch.__version__}: {e!r}")
    if not hasattr(DeviceMesh, "from_group"):
        return f"torch {torch.__version__} has no DeviceMesh.from_group"
    return None


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_data_parallel_matches_single_process(pool, wrapper):
    if wrapper == "fsdp" and _fsdp_unavailable():
        pytest.skip(_fsdp_unavailable())
    ranks, steps, lr = 2, 3, 0.3
    config, model = _small_retnet()
    B, T = 4, 24   # 2 rows per rank
    # the same batch every step, so the curve must go down (the updates are applied)
    seq = torch.randint(0, config["vocab_size"], (B, T + 1)).expand(steps, B, T + 1)
    tokens, targets = seq[..., :-1].contiguous(), seq[..., 1:].contiguous()
    res = pool.run("data_parallel", ranks, config=config, state_dict=model.state_dict(),
                   tokens=tokens, targets=targets, lr=lr, wrapper=wrapper)

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        logits, _ = model(tokens[step])
        loss = F.cross_entropy(logits.reshape(-1, config["vocab_size"]), targets[step].reshape(-1))
        loss.backward()
        if step == 0:
            for r in range(ranks):
                for name, p in model.named_parameters():
                    assert_close_rel(res[r]["grads"][name], p.grad, TOL[torch.float32],
                                     f"{wrapper} step-1 grad {name} on rank {r}")
        opt.step()
        losses.append(loss.item())
    for r in range(ranks):
        # fp32 training for 3 steps from the same weights: the curves agree to fp32 rounding
        # (amplified a little by the updates), far below the loss change between steps.
        assert res[r]["losses"] == pytest.approx(losses, rel=1e-5), (res[r]["losses"], losses)
    assert losses[2] < losses[1] < losses[0], losses


# ----------------------------------------------------------------------------------------------
# Errors


def test_packed_sequences_are_refused():
    q = torch.randn(1, 10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        rd.context_parallel_retention(q, q, q, retention.retnet_log_decay(2), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        rd.context_parallel_msr(q, q, q, None, retention.retnet_log_decay(2), cu_seqlens=cu)


def test_enable_context_parallel_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("this process already has a default process group")
    with pytest.raises(RuntimeError, match="init_process_group"):
        rd.enable_context_parallel(_small_retnet()[1])


def test_enable_context_parallel_swaps_the_layer_core():
    _, model = _small_retnet()
    layer = model.layers[0].retention
    x = torch.randn(1, 6, layer.embed_dim)
    group = object()  # held as given; these calls are refused before anything is communicated
    assert rd.enable_context_parallel(model, group) is model
    cores = [m.retention.core for m in model.layers]
    assert cores[0] is not retention.msr and all(c is cores[0] for c in cores)
    assert cores[0].group is group
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, cu_seqlens=torch.tensor([0, 6]))
    unfused = rd.enable_context_parallel(retention.nn.MultiScaleRetention(16, 16, 2, fused=False), group)
    with pytest.raises(ValueError, match="needs the fused layer"):
        unfused(x)
    rd.enable_context_parallel(model, False)
    assert all(m.retention.core is retention.msr for m in model.layers)
    assert model(torch.randint(0, 37, (1, 6)))[1].offset == 6


def test_mismatched_ranks_raise_on_every_rank(pool):
    res = pool.run("mismatched_shapes", 2)
    for r in res:
        assert "same batch, heads, head dims" in r, r


def test_slice_bounds_cover_the_sequence():
    for total, world in [(10, 3), (2, 3), (0, 2), (128, 4)]:
        bounds = [rd.slice_bounds(total, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(world - 1))
        assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


# ----------------------------------------------------------------------------------------------
# The README's torchrun example


@pytest.mark.parametrize("mode", ["cp", "ddp"])
def test_torchrun_example(mode, tmp_path):
    import os
    import subprocess
    import sys

    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    if os.environ.get("RETENTION_TEST_INSTALLED") != "1":  # else: the installed package
        env["PYTHONPATH"] = os.path.join(repo, "python")
    # --redirects/--tee 1: Debian's torch 1.13 launcher cannot parse its default "0" under
    # Python 3.11 (enum.Flag no longer iterates its zero member); harmless on torch 2.x.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--redirects", "1", "--tee", "1", "--log_dir", str(tmp_path),
           os.path.join(repo, "examples", "distributed_train.py"), "--mode", mode, "--steps", "2",
           "--seq-len", "100"] + (["--check"] if mode == "cp" else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"[{mode}, 2 ranks] step    1" in p.stdout, p.stdout[-3000:]
    if mode == "cp":
        assert "check: context-parallel loss" in p.stdout, p.stdout[-3000:]


# A process group must not outlive destroy_process_group: a group object that something still
# references keeps its backend (gloo's threads, its connections) alive until the interpreter shuts
# down, where tearing it down can abort the process ("terminate called without an active
# exception", which a torchrun test run hit). The layers used to hold the default group.
_GROUP_LIFETIME = r"""
import gc, os, sys
import torch, torch.distributed as dist
from retention import distributed as rd
from retention.nn import RetNet

torch.set_num_threads(1)
threads = lambda: len(os.listdir("/proc/self/task"))
model = RetNet(vocab_size=16, embed_dim=16, value_dim=32, num_heads=2, num_layers=1, ffn_dim=32)
tokens = torch.randint(0, 16, (1, 12))
model(tokens)[0].sum().backward()  # every thread pool exists before counting
before = threads()
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
with_group = threads()
rd.enable_context_parallel(model)
assert model.layers[0].retention.core.group is rd.WORLD
logits = model(rd.local_slice(tokens))[0]
logits.sum().backward()
del logits  # (its graph holds the group it ran on until a training step's locals go)
dist.destroy_process_group()
gc.collect()
print(before, with_group, threads())
"""


def test_layers_do_not_keep_the_process_group_alive(tmp_path):
    import os
    import subprocess
    import sys

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux's /proc to count threads")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    if os.environ.get("RETENTION_TEST_INSTALLED") != "1":
        env["PYTHONPATH"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                         "python")
    p = subprocess.run([sys.executable, "-c", _GROUP_LIFETIME, str(tmp_path / "store")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    before, with_group, after = map(int, p.stdout.split()[-3:])
    assert with_group > before, "gloo started no thread: the check would prove nothing"
    assert after == before, (f"{after - before} of the group's threads are still alive after "
                             "destroy_process_group: something still holds the group")
