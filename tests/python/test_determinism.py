"""Determinism of the CPU ops: forward and backward are bit-identical across runs and for every
intra-op thread count, and decoding with the step ops is bit-identical to the recurrent form.

Why this holds (so the tests can demand equality, not closeness): the CPU kernels split work over
(sequence, head) pairs only, each pair is computed by one thread in a fixed order, BLAS runs
single-threaded inside them (csrc/cpu/blas_threads.h), and the only cross-pair reduction (the
norm weight's gradient) sums per-pair partials in a fixed order after the parallel region.
"""
import pytest
import torch

import retention
from conftest import TOL, assert_close_rel, make_qkv, make_state, random_log_decay
from retention.nn import MultiScaleRetention

THREADS = [1, 2, 3, 4]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def raw_inputs(dtype):
    B, T, H, dk, dv = 2, 45, 3, 24, 20
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=dtype, layout="strided")
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    return q, k, v, random_log_decay(H), make_state(B, H, dk, dv, dtype=sdt)


def run_raw(form, q, k, v, ld, S0):
    """Outputs and gradients (dq, dk, dv, dS0) of one forward + backward."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, S0)]
    fn = {"chunk": lambda *a, **kw: retention.chunk_retention(*a, chunk_size=16, **kw),
          "parallel": retention.parallel_retention,
          "recurrent": retention.recurrent_retention}[form]
    o, S = fn(*leaves[:3], ld, initial_state=leaves[3], output_final_state=True)
    go = torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape).to(o.dtype)
    (o.double() * go.double()).sum().add((S * 0.5).sum()).backward()
    return [o.detach(), S.detach()] + [x.grad for x in leaves]


def run_msr(form, q, k, v, ld, S0):
    B, T, H, dv = v.shape
    g = torch.linspace(-2, 2, v.numel(), dtype=torch.float64).view(v.shape).to(v.dtype)
    w = torch.linspace(0.5, 1.5, dv, dtype=torch.float64).to(v.dtype)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, S0, w)]
    y, S = retention.msr(*leaves[:4], ld, form=form, chunk_size=16, initial_state=leaves[4],
                         norm_weight=leaves[5], decay_norm=True,
                         offsets=torch.arange(B, dtype=torch.int64) * 7, output_final_state=True)
    go = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape).to(y.dtype)
    (y.double() * go.double()).sum().add((S * 0.5).sum()).backward()
    return [y.detach(), S.detach()] + [x.grad for x in leaves]


_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def assert_bitwise(a, b, what):
    """Same bits (not just equal values: -0.0 vs 0.0 or a different NaN would count)."""
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}[{i}]"
        same = torch.equal(x.contiguous().view(_BITS[x.dtype]), y.contiguous().view(_BITS[y.dtype]))
        assert same, (f"{what}: output {i} differs "
                      f"(max |diff| {(x.double() - y.double()).abs().max():.3e})")


@pytest.mark.parametrize("op", ["raw", "msr"])
@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["f32", "bf16", "f64"])
def test_bit_identical_across_runs_and_thread_counts(op, form, dtype, restore_threads):
    inputs = raw_inputs(dtype)
    run = run_raw if op == "raw" else run_msr
    torch.set_num_threads(1)
    first = run(form, *inputs)
    assert_bitwise(first, run(form, *inputs), f"{op}/{form} rerun, 1 thread")
    for n in THREADS[1:]:
        torch.set_num_threads(n)
        assert torch.get_num_threads() == n
        assert_bitwise(first, run(form, *inputs), f"{op}/{form} with {n} threads vs 1")


def test_recurrent_step_bit_identical_to_recurrent_form(restore_threads):
    q, k, v, ld, S0 = raw_inputs(torch.float32)
    o, S = retention.recurrent_retention(q, k, v, ld, initial_state=S0, output_final_state=True)
    for n in (1, 3):
        torch.set_num_threads(n)
        state = S0.clone()
        steps = torch.stack([retention.recurrent_step(q[:, t], k[:, t], v[:, t], ld, state)
                             for t in range(q.shape[1])], 1)
        assert torch.equal(steps, o) and torch.equal(state, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_msr_step_bit_identical_to_recurrent_form(dtype, restore_threads):
    """The fused core as a layer decodes it: msr_step token by token == msr(form="recurrent")
    over the sequence, bit for bit (outputs and state), from a state at per-sequence offsets
    with rotation, decay normaliser, RMSNorm and gate on. No projection (GEMM) is involved, so
    this holds whatever the BLAS."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, dk, dv = 2, 9, 4, 8, 12
    q, k, v, g = (torch.randn(B, T, H, d, generator=gen, dtype=dtype) for d in (dk, dk, dv, dv))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    S0 = torch.randn(B, H, dk, dv, generator=gen, dtype=sdt)
    ld, offsets = retention.retnet_log_decay(H), torch.tensor([7, 5])
    opts = dict(scale=1.0, rotary="torchscale", norm=True, eps=1e-6, decay_norm=True)
    y_rec, S_rec = retention.msr(q, k, v, g, ld, form="recurrent", initial_state=S0,
                                 offsets=offsets, output_final_state=True, **opts)
    for n in (1, 3):
        torch.set_num_threads(n)
        with torch.no_grad():
            S, pos = S0.clone(), offsets.clone()
            ys = []
            for t in range(T):
                ys.append(retention.msr_step(q[:, t], k[:, t], v[:, t], g[:, t], ld, S,
                                             offsets=pos, **opts))
                pos = pos + 1
        assert_bitwise([torch.stack(ys, 1), S], [y_rec, S_rec], f"msr_step, {n} threads")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_layer_step_matches_recurrent_form(dtype):
    """MultiScaleRetention.step token by token == forward(form="recurrent") over the sequence,
    continuing from a prefilled state at per-sequence offsets. The core is bit-identical (test
    above), but the projections are one GEMM per token in `step` and one per sequence in the
    recurrent form, and a BLAS may round a [B, D] and a [B*T, D] product differently (PyPI torch's
    does on some CPUs), so the layer is held to its dtype's rounding."""
    torch.manual_seed(0)
    layer = MultiScaleRetention(embed_dim=32, value_dim=48, num_heads=4).to(dtype)
    prompt = torch.randn(2, 7, 32, dtype=dtype)
    _, st = layer(prompt, form="chunk", attention_mask=torch.tensor([[1] * 7, [0, 0] + [1] * 5]))
    x = torch.randn(2, 9, 32, dtype=dtype)
    y_rec, st_rec = layer(x, form="recurrent", state=st)
    state = st.clone()
    ys = [layer.step(x[:, t], state)[0] for t in range(x.shape[1])]
    y_step = torch.stack(ys, 1)
    assert_close_rel(y_step, y_rec, TOL[dtype], "layer step output")
    assert_close_rel(state.state, st_rec.state, TOL[dtype], "layer step state")
    assert state.offset.tolist() == st_rec.offset.tolist() == [16, 14]
