"""Property-based fuzzing (hypothesis) of every op and the fused op.

Each example draws shapes (B, T including 0 and 1, H, dk up to 256, dv up to 512), a memory
layout per tensor (contiguous, transposed, sliced, strided in time, expanded with stride 0), a
dtype, a form (chunk with any chunk size, parallel, recurrent, token-by-token step), decays
(including gamma = 1 and gamma = 0), an optional initial state (contiguous, transposed or
expanded), packed sequences (cu_seqlens with empty sequences, and invalid ones), offsets, and for
the fused op the rotation, norm, weight, gate and decay normaliser.  The property: the call
either raises a RuntimeError whose message is the one predicted for that input (the oracle
`expected_error` below, written from the contract in csrc/checks.h) or it matches the float64
reference (reference.py, test_msr.msr_reference: written from the math, never calling the ops)
within the dtype's tolerance (conftest.TOL) -- never a crash, a hang or a silent wrong answer.

Profiles (RETENTION_FUZZ_PROFILE): "ci" (default) is derandomized with a fixed number of
examples, so CI runs the same inputs every time; "long" draws fresh random examples, many more
(RETENTION_FUZZ_EXAMPLES overrides either count):

    RETENTION_FUZZ_PROFILE=long PYTHONPATH=python python3 -m pytest tests/python/test_fuzz.py
"""
import os

import pytest
import torch

hypothesis = pytest.importorskip(
    "hypothesis", reason="hypothesis is not installed (Debian: python3-hypothesis, installed by "
                         "scripts/install-deps.sh; PyPI: hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import retention  # noqa: E402
from conftest import TOL, assert_close_rel  # noqa: E402
from reference import reference_grads, retention_term_rms  # noqa: E402
from test_msr import msr_norm_amplification, msr_reference  # noqa: E402

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_EXAMPLES = os.environ.get("RETENTION_FUZZ_EXAMPLES")  # overrides the profile's count
settings.register_profile("ci", derandomize=True, max_examples=int(_EXAMPLES or 40), **_COMMON)
settings.register_profile("long", derandomize=False, max_examples=int(_EXAMPLES or 2000), **_COMMON)
PROFILE = settings.get_profile(os.environ.get("RETENTION_FUZZ_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "sliced", "time_strided", "expanded"]


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_tensor(shape, dtype, layout, gen):
    """A [B, T, H, d] tensor with the given values' distribution (N(0, 1)) and memory layout."""
    B, T, H, d = shape
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "transposed":              # time-minor: [B, H, T, d] transposed
        return r(B, H, T, d).transpose(1, 2)
    if layout == "sliced":                  # a window of a wider last dim
        return r(B, T, H, d + 5)[..., 2:2 + d]
    if layout == "time_strided":            # every other time step
        return r(B, 2 * T, H, d)[:, ::2]
    if layout == "expanded":                # one batch row broadcast (stride 0)
        return r(1, T, H, d).expand(B, T, H, d)
    return r(B, T, H, d)


def make_state_tensor(shape, dtype, layout, gen):
    N, H, dk, dv = shape
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "transposed":
        return r(N, H, dv, dk).transpose(2, 3)
    if layout == "expanded":
        return r(1, H, dk, dv).expand(N, H, dk, dv)
    return r(N, H, dk, dv)


@st.composite
def dims(draw):
    """Shapes; the big head dims come with small B, H, T so an example stays cheap."""
    dk = draw(st.one_of(st.integers(1, 12), st.sampled_from([16, 31, 64, 128, 255, 256])))
    dv = draw(st.one_of(st.integers(1, 12), st.sampled_from([17, 64, 100, 257, 512])))
    big = dk >= 64 or dv >= 64
    B = draw(st.integers(1, 1 if big else 3))
    H = draw(st.integers(1, 2 if big else 3))
    T = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, 24 if big else 70)))
    return B, T, H, dk, dv


@st.composite
def log_decays(draw, H):
    vals = draw(st.lists(st.one_of(st.sampled_from([0.0, -1e-6, float("-inf"), -0.5]),
                                   st.floats(-4.0, 0.0)), min_size=H, max_size=H))
    return torch.tensor(vals, dtype=draw(st.sampled_from([torch.float32, torch.float64])))


@st.composite
def packed(draw, T):
    """(cu_seqlens or None, kind): None, "valid" (empty sequences allowed) or how it is invalid;
    invalid ones keep N + 1 entries where they can, so only the broken property is refused."""
    kind = draw(st.sampled_from([None, None, "valid", "valid", "start", "order", "end", "empty",
                                 "float"]))
    if kind is None:
        return None, None
    cut = sorted(draw(st.lists(st.integers(0, T), min_size=0, max_size=4)))
    cu = [0] + cut + [T]
    if kind == "order" and len(cu) < 3:
        kind = "end"
    if kind == "start":
        cu[0] = 1
    elif kind == "order":
        cu[1] = T + 1                      # > cu[2] <= T
    elif kind == "end":
        cu[-1] = T + 1
    elif kind == "empty":
        cu = [0]
    dt = torch.float32 if kind == "float" else draw(st.sampled_from([torch.int32, torch.int64]))
    return torch.tensor(cu, dtype=dt), kind


def cu_shape_error(kind, B):
    """Refusal of cu_seqlens by its shape, dtype or the batch (checked before offsets)."""
    if kind == "empty":
        return r"cu_seqlens must be 1-D \[N \+ 1\] with N >= 1"
    if kind == "float":
        return "cu_seqlens must be int32 or int64"
    if kind is not None and B != 1:
        return r"packed sequences \(cu_seqlens\) need B == 1"
    return None


CU_VALUE_ERRORS = {"start": r"cu_seqlens\[0\] must be 0", "order": "cu_seqlens must be non-decreasing",
                   "end": r"cu_seqlens\[-1\] must equal the packed length"}


def num_sequences(B, cu):
    return B if cu is None else len(cu) - 1


def draw_inputs(data, names):
    """Shapes, dtype, a torch generator and the named [B, T, H, d] tensors (d = dk for q and k,
    dv otherwise), each in its own drawn memory layout."""
    B, T, H, dk, dv = data.draw(dims(), "dims")
    dtype = data.draw(st.sampled_from(DTYPES), "dtype")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31), "seed"))
    tensors = tuple(make_tensor((B, T, H, dk if n in ("q", "k") else dv), dtype,
                                data.draw(st.sampled_from(LAYOUTS), n), gen) for n in names)
    return (B, T, H, dk, dv), dtype, gen, tensors


def grads_of(call, tensors, cotangents):
    """Autograd gradients of <outputs, cotangents> w.r.t. the tensors (None where unused)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    outs = call(*leaves)
    loss = sum((o.double() * c.double()).sum() for o, c in zip(outs, cotangents) if c is not None)
    used = [x for x in leaves if x is not None]
    got = torch.autograd.grad(loss, used, allow_unused=True)
    it = iter(got)
    return [None if x is None else next(it) for x in leaves]


def check_outcome(run, expected):
    """run() must raise the predicted error, or (expected None) return normally."""
    if expected is not None:
        with pytest.raises(RuntimeError, match=expected):
            run()
        return None
    return run()


# ----------------------------------------------------------------------------------------------
# Raw ops: chunk / parallel / recurrent (forward and backward) and recurrent_step


@PROFILE
@given(data=st.data())
def test_fuzz_raw_ops(data):
    (B, T, H, dk, dv), dtype, gen, (q, k, v) = draw_inputs(data, ("q", "k", "v"))
    ld = data.draw(log_decays(H), "log_decay")
    form = data.draw(st.sampled_from(["chunk", "parallel", "recurrent", "step"]), "form")
    chunk = data.draw(st.one_of(st.sampled_from([1, 2, 3, 16, 64]), st.integers(-1, 100)), "chunk")
    scale = data.draw(st.one_of(st.none(), st.floats(0.01, 2.0)), "scale")
    cu, cu_kind = data.draw(packed(T), "cu_seqlens") if form != "step" else (None, None)
    N = num_sequences(B, cu)
    S0 = None
    if data.draw(st.booleans(), "with_state"):
        S0 = make_state_tensor((N, H, dk, dv), state_dtype(dtype),
                               data.draw(st.sampled_from(["contiguous", "transposed", "expanded"]),
                                         "state_layout"), gen)

    # The oracle: what the contract refuses, with which message, in the order the checks run.
    expected = None
    if form == "chunk" and chunk <= 0:
        expected = "chunk_size must be positive"
    expected = expected or cu_shape_error(cu_kind, B) or CU_VALUE_ERRORS.get(cu_kind)
    if form == "step" and T > 0 and S0 is not None and not S0.is_contiguous():
        expected = "state must be contiguous"

    kw = dict(scale=scale, initial_state=S0, output_final_state=True)
    if form == "step":
        def run():
            S = torch.zeros(B, H, dk, dv, dtype=state_dtype(dtype)) if S0 is None else (
                S0.clone() if S0.is_contiguous() else S0)  # (a non-contiguous one must be refused)
            outs = [retention.recurrent_step(q[:, t], k[:, t], v[:, t], ld, S, scale=scale)
                    for t in range(T)]
            o = torch.stack(outs, 1) if outs else torch.zeros(B, 0, H, dv, dtype=dtype)
            return o, S
    else:
        fn = {"chunk": retention.chunk_retention, "parallel": retention.parallel_retention,
              "recurrent": retention.recurrent_retention}[form]
        extra = dict(chunk_size=chunk) if form == "chunk" else {}

        def run():
            return fn(q, k, v, ld, cu_seqlens=cu, **kw, **extra)
    got = check_outcome(run, expected)
    if got is None:
        return
    o, S = got
    assert o.dtype == dtype and o.shape == (B, T, H, dv) and S.shape == (N, H, dk, dv)
    assert S.dtype == state_dtype(dtype)
    tol = TOL[dtype]
    state_tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    if cu is None:
        ref = msr_reference(q, k, v, None, ld, scale=scale, rotary=None, norm=False,
                            initial_state=S0)
        terms = retention_term_rms(q, k, v, ld, scale=scale, initial_state=S0)
    else:
        kwr = dict(scale=scale, rotary=None, norm=False, initial_state=S0, cu_seqlens=cu)
        ref = msr_reference(q, k, v, None, ld, **kwr)
        terms = msr_reference(q, k, v, None, ld, terms=True, **kwr)[0]
    assert_close_rel(o, ref[0], tol, f"{form} o", term_rms=terms)
    assert_close_rel(S, ref[1], state_tol, f"{form} final state")

    # Backward (the differentiable forms): gradients of <o, go> + <S, gS> vs float64 autograd.
    if form != "step" and cu is None and T > 0 and data.draw(st.booleans(), "backward"):
        go = torch.randn(B, T, H, dv, generator=gen, dtype=torch.float64).to(dtype)
        gS = torch.randn(B, H, dk, dv, generator=gen, dtype=torch.float64).to(S.dtype)
        got_g = grads_of(lambda q_, k_, v_, s_: fn(q_, k_, v_, ld, scale=scale, initial_state=s_,
                                                   output_final_state=True, **extra),
                         [q, k, v, S0], [go, gS])
        ref_g = reference_grads(q, k, v, ld, scale=scale, initial_state=S0, grad_o=go,
                                grad_final_state=gS)
        # Natural error scale of each gradient element (cf. reference.retention_term_rms): the
        # gradients are multilinear in (q, k, v, S0, go, gS) with weights scale * g^e, so the
        # same formulas on squared factors (scale^2, log g doubled) give the sum of squared terms.
        sq = lambda x: None if x is None else x.double() ** 2
        s2 = (dk ** -0.5 if scale is None else scale) ** 2
        terms_g = reference_grads(sq(q), sq(k), sq(v), 2.0 * ld.double(), scale=s2,
                                  initial_state=sq(S0), grad_o=sq(go), grad_final_state=sq(gS))
        for name, a, e, t in zip(("dq", "dk", "dv", "dS0"), got_g, ref_g, terms_g):
            if e is not None:
                assert_close_rel(a, e, tol, f"{form} {name}", term_rms=t.clamp_min(0).sqrt())


# ----------------------------------------------------------------------------------------------
# The fused op: msr (every form, forward and backward) and msr_step


@PROFILE
@given(data=st.data())
def test_fuzz_fused_op(data):
    (B, T, H, dk, dv), dtype, gen, (q, k, v, g) = draw_inputs(data, ("q", "k", "v", "g"))
    ld = data.draw(log_decays(H), "log_decay")
    form = data.draw(st.sampled_from(["chunk", "parallel", "recurrent", "step"]), "form")
    chunk = data.draw(st.sampled_from([1, 3, 16, 64]), "chunk")
    rotary = data.draw(st.sampled_from(["torchscale", "neox", None]), "rotary")
    norm = data.draw(st.booleans(), "norm")
    w = (torch.rand(dv, generator=gen, dtype=torch.float64).to(
        data.draw(st.sampled_from(DTYPES), "w_dtype")) + 0.5) \
        if data.draw(st.booleans(), "norm_weight") else None
    gate = data.draw(st.booleans(), "gate")
    decay_norm = data.draw(st.booleans(), "decay_norm")
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.1]), "eps")
    cu, cu_kind = data.draw(packed(T), "cu_seqlens") if form != "step" else (None, None)
    N = num_sequences(B, cu)
    offsets = None
    if data.draw(st.booleans(), "with_offsets"):
        offsets = torch.tensor(data.draw(st.lists(st.integers(-2, 5000), min_size=N, max_size=N),
                                         "offsets"), dtype=torch.int64)
    S0 = (make_state_tensor((N, H, dk, dv), state_dtype(dtype), "contiguous", gen)
          if data.draw(st.booleans(), "with_state") else None)

    # The oracle, in the order the checks run (csrc/checks.h, then the values of cu_seqlens).
    negative_offsets = offsets is not None and N > 0 and int(offsets.min()) < 0
    expected = ("a rotary embedding needs an even dk" if rotary is not None and dk % 2 else None)
    expected = (expected or cu_shape_error(cu_kind, B)
                or ("offsets must be non-negative" if negative_offsets else None)
                or CU_VALUE_ERRORS.get(cu_kind))
    if form == "step" and T == 0:
        expected = None  # no step runs, so nothing is validated

    opts = dict(rotary=rotary, norm=norm, norm_weight=w, eps=eps, decay_norm=decay_norm)
    gg = g if gate else None
    if form == "step":
        def run():
            S = (S0.clone() if S0 is not None
                 else torch.zeros(B, H, dk, dv, dtype=state_dtype(dtype)))
            pos = offsets.clone() if offsets is not None else torch.zeros(B, dtype=torch.int64)
            ys = []
            for t in range(T):
                ys.append(retention.msr_step(q[:, t], k[:, t], v[:, t],
                                             None if gg is None else gg[:, t], ld, S, offsets=pos,
                                             **opts))
                pos = pos + 1
            return (torch.stack(ys, 1) if ys else torch.zeros(B, 0, H, dv, dtype=dtype)), S
    else:
        def run():
            return retention.msr(q, k, v, gg, ld, form=form, chunk_size=chunk, initial_state=S0,
                                 offsets=offsets, cu_seqlens=cu, output_final_state=True, **opts)
    got = check_outcome(run, expected)
    if got is None:
        return
    y, S = got
    assert y.dtype == dtype and y.shape == (B, T, H, dv) and S.shape == (N, H, dk, dv)
    kwr = dict(initial_state=S0, offsets=offsets, cu_seqlens=cu, **opts)
    if rotary is not None and dk % 2:
        kwr["rotary"] = None  # (only reached with no token at all: nothing to rotate)
    y_ref, S_ref = msr_reference(q, k, v, gg, ld, **kwr)
    terms = None
    # (a normalised row whose terms cancel amplifies their rounding: judged on that scale)
    amp = msr_norm_amplification(q, k, v, ld, **kwr)
    if not norm:
        # natural error scale of the un-normalised output: the raw terms (decay-normalised by the
        # reference), times the gate factor |silu(g)| that multiplies them
        terms = msr_reference(q, k, v, None, ld, terms=True, **kwr)[0]
        if gg is not None:
            g64 = gg.double()
            terms = terms * (g64 * torch.sigmoid(g64)).abs()
    tol = TOL[dtype]
    state_tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    assert_close_rel(y, y_ref, tol, f"{form} y", term_rms=terms, amplification=amp)
    assert_close_rel(S, S_ref, state_tol, f"{form} final state")

    # Gradients of the fused op, in float64: the epilogue (norm, gate) is not multilinear, so there
    # is no cheap natural error scale for its gradients under cancellation (e.g. a norm over dv = 1
    # has a Jacobian that cancels to ~0), but in float64 rounding stays far below the tolerance
    # even then, so this checks the gradient formulas for every drawn configuration; their
    # accuracy in fp32/bf16/fp16 is checked on non-degenerate inputs in test_msr.py.
    if form != "step" and T > 0 and dtype == torch.float64 and data.draw(st.booleans(), "backward"):
        gy = torch.randn(B, T, H, dv, generator=gen, dtype=torch.float64).to(dtype)
        gS = torch.randn(N, H, dk, dv, generator=gen, dtype=torch.float64).to(S.dtype)
        wl = w if (w is not None and norm) else None

        def f(q_, k_, v_, g_, s_, w_):
            return retention.msr(q_, k_, v_, g_, ld, form=form, chunk_size=chunk, initial_state=s_,
                                 offsets=offsets, cu_seqlens=cu, output_final_state=True,
                                 **dict(opts, norm_weight=w_ if wl is not None else w))

        def f_ref(q_, k_, v_, g_, s_, w_, rms_fixed=False):
            return msr_reference(q_, k_, v_, g_, ld, norm_rms_fixed=rms_fixed,
                                 **dict(kwr, initial_state=s_,
                                        norm_weight=w_ if wl is not None else w))
        tensors = [q, k, v, gg, S0, wl]
        got_g = grads_of(f, tensors, [gy, gS])
        doubled = [None if t is None else t.double() for t in tensors]
        ref_g = grads_of(f_ref, doubled, [gy, gS])
        # the norm backward's two terms cancel (completely at dv = 1), and rounding is
        # proportional to them: judged on their scale, the gradients with the RMS held constant
        terms_g = (grads_of(lambda *a: f_ref(*a, rms_fixed=True), doubled, [gy, gS]) if norm
                   else [None] * len(tensors))
        for name, a, e, t in zip(("dq", "dk", "dv", "dg", "dS0", "dw"), got_g, ref_g, terms_g):
            if e is not None:
                assert a is not None, name
                # (a gradient has its leaf's dtype: dw is rounded to the norm weight's)
                gtol = max(tol, TOL[a.dtype])
                assert_close_rel(a, e, gtol, f"{form} {name}", term_rms=t)
