"""The fused layer core (retention.msr / msr_step) against an independent float64 reference.

Reference: rotation written with complex numbers (a pair (a, b) is a + ib, rotated by
e^{i p theta}), retention from reference.retention_quadratic, then the epilogue from its formula;
packed sequences are run one by one.  Tolerances: conftest.TOL (justified there).
"""
import math

import pytest
import torch

import retention
from conftest import TOL, assert_close_rel, make_qkv, make_state, random_log_decay
from reference import retention_quadratic, retention_term_rms

# ----------------------------------------------------------------------------------------------
# Reference


def rotate_ref(x, positions, kind):
    """x [T, H, dk] float64 rotated at absolute positions [T] (float64)."""
    if kind is None:
        return x
    dk = x.shape[-1]
    half = dk // 2
    i = torch.arange(half, dtype=torch.float64)
    if kind == "torchscale":
        theta = 10000.0 ** (-i / (half - 1)) if half > 1 else torch.ones(1, dtype=torch.float64)
        z = torch.complex(x[..., 0::2], x[..., 1::2])
    else:
        theta = 10000.0 ** (-2.0 * i / dk)
        z = torch.complex(x[..., :half], x[..., half:])
    angle = positions[:, None] * theta[None, :]                        # [T, half]
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    if kind == "torchscale":
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((z.real, z.imag), dim=-1)


def sequences(B, T, cu_seqlens):
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = [int(c) for c in cu_seqlens]
    return [(0, cu[s], cu[s + 1] - cu[s]) for s in range(len(cu) - 1)]


def msr_reference(q, k, v, g, log_decay, *, scale=None, rotary="torchscale", norm=True,
                  norm_weight=None, eps=1e-6, decay_norm=False, initial_state=None, offsets=None,
                  cu_seqlens=None, terms=False, norm_rms_fixed=False):
    """float64 (y [B, T, H, dv], final_state [N, H, dk, dv]); differentiable.

    terms=True returns instead the natural error scale of the raw retention per element
    (reference.retention_term_rms) for cancellation-aware checks of un-normalised outputs.
    norm_rms_fixed=True holds the norm's RMS constant under differentiation: gradients then
    have the size of the norm backward's first term, dy / rms, before the second term
    y <y, dy> / (dv rms) cancels it; where y is parallel to dy they cancel (to eps / (u^2 + eps)
    of their size over a single value, dv = 1), and fp rounding, the reference's too, is
    proportional to the terms, not to what is left: the natural error scale of the gradients
    (assert_close_rel(term_rms=...))."""
    f = lambda x: None if x is None else x.to(device="cpu", dtype=torch.float64)
    q, k, v, g, S0, w = f(q), f(k), f(v), f(g), f(initial_state), f(norm_weight)
    ld = f(log_decay)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    seqs = sequences(B, T, cu_seqlens)
    ys = {b: [] for b in range(B)}
    states = []
    for s, (b, t0, n) in enumerate(seqs):
        p0 = 0 if offsets is None else int(offsets[s])
        pos = torch.arange(p0, p0 + n, dtype=torch.float64)
        qs = rotate_ref(q[b, t0:t0 + n], pos, rotary)[None]
        ks = rotate_ref(k[b, t0:t0 + n], pos, rotary)[None]
        vs = v[b, t0:t0 + n][None]
        s0 = None if S0 is None else S0[s:s + 1]
        if terms:
            u = retention_term_rms(qs, ks, vs, ld, scale=scale, initial_state=s0)
            st = torch.zeros(1, H, dk, dv, dtype=torch.float64)
        else:
            u, st = retention_quadratic(qs, ks, vs, ld, scale=scale, initial_state=s0)
            if n == 0:
                st = s0 if s0 is not None else torch.zeros(1, H, dk, dv, dtype=torch.float64)
        o = u[0]                                                        # [n, H, dv]
        if decay_norm:
            j = (pos + 1)[:, None]
            # S_j = (1 - g^j) / (1 - g); = j for g = 1 (log_decay 0), where it would be 0 / 0
            Sj = torch.where(ld[None, :] == 0, j.expand(-1, ld.shape[0]),
                             torch.expm1(j * ld[None, :]) / torch.expm1(ld)[None, :])  # [n, H]
            o = o / torch.sqrt(Sj)[..., None]
        if norm and not terms:
            r = torch.sqrt(o.pow(2).mean(-1, keepdim=True) + eps)
            o = o / (r.detach() if norm_rms_fixed else r)
            if w is not None:
                o = o * w
        if g is not None and not terms:
            gs = g[b, t0:t0 + n]
            o = o * gs * torch.sigmoid(gs)
        ys[b].append(o)
        states.append(st)
    y = torch.stack([torch.cat(ys[b], 0) if ys[b] else torch.zeros(0, H, dv, dtype=torch.float64)
                     for b in range(B)])
    if cu_seqlens is not None and y.shape[1] != T:  # rows outside every sequence
        y = torch.cat([y, torch.zeros(1, T - y.shape[1], H, dv, dtype=torch.float64)], 1)
    return y, torch.cat(states, 0)


# Rows of random inputs whose terms do not cancel have a conditioning kappa (below) of about
# 0.6..3: it differs from 1 by the spread of a row's mean square over its dv elements and of the
# few decayed tokens that dominate a row, and stayed < 5 over 1.2e5 such rows (the inputs of
# test_varlen_forward with an initial state, 300 draws).  The
# plain tolerances already cover that with >= 10x head-room, so only conditioning beyond this is
# charged: ordinary rows keep exactly the plain check.
ORDINARY_NORM_CONDITIONING = 4.0


def msr_norm_amplification(q, k, v, log_decay, *, norm=True, eps=1e-6, **kw):
    """float64 [B, T, H, 1] factor (>= 1; assert_close_rel(amplification=...)) by which the
    per-head RMSNorm amplifies the rounding of the raw retention beyond an ordinary row, or None
    without a norm.

    The norm divides a row u (after the decay normaliser) by r = sqrt(mean(u^2) + eps), so an
    error d in u becomes d / r in the output, whose own scale is |u| / r ~ 1.  fp rounding of u
    is proportional to its term scale t (reference.retention_term_rms), not to |u|: a row whose
    terms cancel (the first token of a sequence without a state is the single term
    scale * (q.k) v, and q.k can be ~0) has a relative output error kappa = RMS(t_row) / r times
    that of a row that does not cancel.  The gate and the norm weight multiply the error and the
    value alike, so they do not change the ratio.  kw: msr_reference's keywords (initial_state,
    offsets, cu_seqlens, rotary, decay_norm, scale)."""
    if not norm:
        return None
    kw = {key: val for key, val in kw.items() if key != "norm_weight"}
    u, _ = msr_reference(q, k, v, None, log_decay, norm=False, **kw)
    t, _ = msr_reference(q, k, v, None, log_decay, terms=True, **kw)
    dv = max(u.shape[-1], 1)
    r = torch.sqrt(u.pow(2).sum(-1, keepdim=True) / dv + eps)
    kappa = torch.sqrt(t.pow(2).sum(-1, keepdim=True) / dv) / r
    return (kappa / ORDINARY_NORM_CONDITIONING).clamp_min(1.0)


# ----------------------------------------------------------------------------------------------
# Forward

FORMS = {"chunk16": dict(form="chunk", chunk_size=16), "chunk64": dict(form="chunk", chunk_size=64),
         "parallel": dict(form="parallel"), "recurrent": dict(form="recurrent")}

CONFIGS = {
    # norm, weight, gate, decay_norm
    "norm_gate": (True, False, True, False),
    "full": (True, True, True, True),
    "raw_rotated": (False, False, False, False),
    "decay_norm_only": (False, False, False, True),
}


def make_inputs(B, T, H, dk, dv, dtype=torch.float32, state=True, cu_seqlens=None, device="cpu"):
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=dtype, device=device)
    g = torch.randn(B, T, H, dv, dtype=dtype, device=device)
    ld = random_log_decay(H, device=device)
    S0 = make_state(N, H, dk, dv, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                    device=device) if state else None
    offsets = torch.randint(0, 3000, (N,), dtype=torch.int64, device=device)
    w = (1.0 + 0.5 * torch.randn(dv, dtype=dtype, device=device))
    return q, k, v, g, ld, S0, offsets, w


def run_both(form, config, rotary, q, k, v, g, ld, S0, offsets, w, cu_seqlens=None, eps=1e-6):
    norm, weight, gate, decay_norm = CONFIGS[config]
    kw = dict(rotary=rotary, norm=norm, norm_weight=w if weight else None, eps=eps,
              decay_norm=decay_norm, initial_state=S0, offsets=offsets, cu_seqlens=cu_seqlens)
    y, S = retention.msr(q, k, v, g if gate else None, ld, output_final_state=True,
                         **FORMS[form], **kw)
    y_ref, S_ref = msr_reference(q, k, v, g if gate else None, ld, **kw)
    terms = amp = None
    if norm:
        amp = msr_norm_amplification(q, k, v, ld, **kw)
    else:
        terms, _ = msr_reference(q, k, v, None, ld, terms=True, **kw)
    return y, S, y_ref, S_ref, terms, amp


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("rotary", ["torchscale", "neox", None])
def test_forward_f32(form, config, rotary, device, seed):
    B, T, H, dk, dv = 2, 37, 3, 60, 432
    q, k, v, g, ld, S0, offsets, w = make_inputs(B, T, H, dk, dv, device=device)
    y, S, y_ref, S_ref, terms, amp = run_both(form, config, rotary, q, k, v, g, ld, S0, offsets,
                                              w)
    assert y.dtype == q.dtype and y.shape == (B, T, H, dv)
    assert_close_rel(y, y_ref, TOL[torch.float32], f"{form}/{config}/{rotary} y", seed=seed,
                     term_rms=terms, amplification=amp)
    assert_close_rel(S, S_ref, TOL[torch.float32], f"{form}/{config}/{rotary} state", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16],
                         ids=["f64", "f16", "bf16"])
@pytest.mark.parametrize("form", ["chunk16", "recurrent"])
def test_forward_dtypes(dtype, form, device, seed):
    B, T, H, dk, dv = 2, 70, 2, 256, 48
    q, k, v, g, ld, S0, offsets, w = make_inputs(B, T, H, dk, dv, dtype=dtype, device=device)
    y, S, y_ref, S_ref, _, amp = run_both(form, "full", "torchscale", q, k, v, g, ld, S0, offsets,
                                          w)
    assert y.dtype == dtype
    assert_close_rel(y, y_ref, TOL[dtype], f"{form} y", seed=seed, amplification=amp)
    # states accumulate in fp32 (fp64) from the rounded inputs the reference also uses
    state_tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    assert_close_rel(S, S_ref, state_tol, f"{form} state", seed=seed)


def test_fp16_output_cannot_overflow(device, seed):
    """The raw retention of these inputs exceeds the fp16 range (the raw op returns inf); the
    fused output is normalised in fp32 first, so it is finite and correct."""
    B, T, H, dk, dv = 1, 256, 2, 32, 64
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=torch.float16, device=device)
    v = (v.float() * 300).half()
    k = (k.float().abs() * 3).half()
    q = (q.float().abs() * 3).half()
    ld = torch.full((H,), math.log1p(-2.0 ** -12), device=device)
    raw = retention.chunk_retention(q, k, v, ld, scale=1.0)
    assert not torch.isfinite(raw).all(), "test inputs must overflow the raw fp16 output"
    g = torch.randn(B, T, H, dv, dtype=torch.float16, device=device)
    y = retention.msr(q, k, v, g, ld, scale=1.0, rotary=None)
    y_ref, _ = msr_reference(q, k, v, g, ld, scale=1.0, rotary=None)
    assert_close_rel(y, y_ref, TOL[torch.float16], "fp16 fused y", seed=seed)


def test_rotation_is_relative(seed):
    """With the rotation, shifting every position by the same offset leaves y unchanged (up to
    the changed float64 angles): the scores only see n - m."""
    q, k, v, g, ld, _, _, _ = make_inputs(1, 40, 2, 16, 8, dtype=torch.float64, state=False)
    y0 = retention.msr(q, k, v, g, ld, offsets=torch.tensor([0]))
    y1 = retention.msr(q, k, v, g, ld, offsets=torch.tensor([1234]))
    assert_close_rel(y1, y0, 1e-9, "offset-shifted y", seed=seed)
    y2 = retention.msr(q, k, v, g, ld, rotary=None)
    assert float((y2 - y0).abs().max()) > 1e-3, "the rotation must change the result"


def test_norm_amplification_is_exact_on_a_hand_case(seed):
    """One token, no state, q orthogonal to k: u = s (q.k) v ~ 0, t_j = s |v_j| |q * k|, so
    kappa = s |q * k| RMS(v) / sqrt(s^2 (q.k)^2 MS(v) + eps), charged beyond the ordinary 4."""
    q, k, v = make_qkv(1, 1, 1, 6, 5, dtype=torch.float64)
    q = q - (q * k).sum(-1, keepdim=True) / (k * k).sum(-1, keepdim=True) * k
    ld = random_log_decay(1, dtype=torch.float64)
    s, eps = 0.7, 1e-10
    amp = msr_norm_amplification(q, k, v, ld, scale=s, rotary=None, eps=eps)
    qk, ms_v = float((q * k).sum()), float(v.pow(2).mean())
    kappa = s * float((q * k).pow(2).sum().sqrt()) * math.sqrt(ms_v) / math.sqrt(
        s * s * qk * qk * ms_v + eps)
    assert kappa > 10 * ORDINARY_NORM_CONDITIONING  # (a cancelling row is amplified)
    assert amp.shape == (1, 1, 1, 1)
    assert abs(float(amp) - kappa / ORDINARY_NORM_CONDITIONING) <= 1e-12 * kappa


def test_norm_amplification_does_not_loosen_random_cases(seed):
    """Rows that sum many random terms (here with an initial state, as in test_forward_f32) keep
    the plain check: the RMS of the per-element scale RMS(y) * amplification is within 5% of
    RMS(y) (nearly always every factor is exactly 1)."""
    cu = cu_from(LENGTHS)
    T, H, dk, dv = sum(LENGTHS), 3, 60, 40
    q, k, v, g, ld, S0, offsets, w = make_inputs(1, T, H, dk, dv, cu_seqlens=cu)
    amp = msr_norm_amplification(q, k, v, ld, decay_norm=True, initial_state=S0,
                                 offsets=offsets, cu_seqlens=cu)
    assert float(amp.pow(2).mean().sqrt()) <= 1.05, float(amp.max())


# ----------------------------------------------------------------------------------------------
# Packed variable-length sequences

LENGTHS = [0, 1, 37, 5, 70, 0, 16]


def cu_from(lengths, dtype=torch.int32, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=dtype, device=device)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_varlen_forward(form, with_state, cu_dtype, device, seed):
    cu = cu_from(LENGTHS, cu_dtype, device)
    T, H, dk, dv = sum(LENGTHS), 3, 60, 40
    q, k, v, g, ld, S0, offsets, w = make_inputs(1, T, H, dk, dv, state=with_state,
                                                 cu_seqlens=cu, device=device)
    y, S, y_ref, S_ref, _, amp = run_both(form, "full", "torchscale", q, k, v, g, ld, S0, offsets,
                                          w, cu_seqlens=cu)
    assert S.shape == (len(LENGTHS), H, dk, dv)
    # without a state, the first token of each sequence is one term (q.k) v, which may cancel
    assert_close_rel(y, y_ref, TOL[torch.float32], f"{form} varlen y", seed=seed,
                     amplification=amp)
    assert_close_rel(S, S_ref, TOL[torch.float32], f"{form} varlen states", seed=seed)
    # an empty sequence passes its state through unchanged
    for s, n in enumerate(LENGTHS):
        if n == 0:
            expect = S0[s] if with_state else torch.zeros_like(S[s])
            assert torch.equal(S[s], expect)


@pytest.mark.parametrize("form", ["chunk16", "parallel", "recurrent"])
def test_raw_varlen_matches_separate_calls(form, device, seed):
    """chunk/parallel/recurrent_retention(cu_seqlens=...) == one call per sequence."""
    cu = cu_from(LENGTHS, device=device)
    T, H, dk, dv = sum(LENGTHS), 2, 12, 20
    q, k, v = make_qkv(1, T, H, dk, dv, device=device)
    ld = random_log_decay(H, device=device)
    S0 = make_state(len(LENGTHS), H, dk, dv, device=device)
    fn = {"chunk16": lambda *a, **kw: retention.chunk_retention(*a, chunk_size=16, **kw),
          "parallel": retention.parallel_retention,
          "recurrent": retention.recurrent_retention}[form]
    o, S = fn(q, k, v, ld, initial_state=S0, output_final_state=True, cu_seqlens=cu)
    for s, n in enumerate(LENGTHS):
        t0 = int(cu[s])
        qs, ks, vs = (x[:, t0:t0 + n] for x in (q, k, v))
        o_ref, S_ref = retention_quadratic(qs, ks, vs, ld, initial_state=S0[s:s + 1])
        if n:
            assert_close_rel(o[:, t0:t0 + n], o_ref, TOL[torch.float32], f"seq {s} o", seed=seed,
                             term_rms=retention_term_rms(qs, ks, vs, ld, initial_state=S0[s:s + 1]))
        assert_close_rel(S[s:s + 1], S0[s:s + 1] if n == 0 else S_ref, TOL[torch.float32],
                         f"seq {s} state", seed=seed)


# ----------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("log_decay", [0.0, -0.03])
def test_grads_of_a_norm_over_one_value(log_decay):
    """dv = 1: the norm's output is u / sqrt(u^2 + eps), whose derivative eps / (u^2 + eps)^1.5 the
    backward computes as the difference of two terms ~(u^2 + eps) / eps = 1e6..1e8 times larger,
    so in float64 the op and the reference both carry ~1e-10 relative error there (it failed the
    fuzz's plain check). Checked against the exact derivative (written in that closed form, which
    does not cancel), on the scale of the terms (msr_reference(norm_rms_fixed=True))."""
    gen = torch.Generator().manual_seed(99)
    B, T, H, dk, dv = 1, 12, 1, 4, 1
    q, k, v = (torch.randn(B, T, H, d, generator=gen, dtype=torch.float64) for d in (dk, dk, dv))
    ld = torch.full((H,), log_decay, dtype=torch.float64)
    gy = torch.randn(B, T, H, dv, generator=gen, dtype=torch.float64)
    eps = 1e-6
    opts = dict(rotary=None, norm=True, eps=eps)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    u, _ = retention_quadratic(*leaves, ld, scale=dk ** -0.5)
    assert float((u.detach() ** 2 / eps).max()) > 1e6  # the inputs cancel strongly
    du = gy * eps / (u.detach() ** 2 + eps) ** 1.5
    exact = torch.autograd.grad((u * du).sum(), leaves)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    for form in ("chunk", "parallel", "recurrent"):
        y = retention.msr(*leaves, None, ld, form=form, chunk_size=4, **opts)
        got = torch.autograd.grad((y * gy).sum(), leaves)
        y_terms, _ = msr_reference(*leaves, None, ld, norm_rms_fixed=True, **opts)
        terms = torch.autograd.grad((y_terms * gy).sum(), leaves)
        for name, a, e, t in zip(("dq", "dk", "dv"), got, exact, terms):
            assert_close_rel(a, e, TOL[torch.float64], f"{form} {name}", term_rms=t)


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
@pytest.mark.parametrize("rotary", ["torchscale", "neox"])
def test_gradcheck_varlen_full(form, rotary):
    lengths = [3, 0, 6, 1]
    cu = cu_from(lengths)
    T, H, dk, dv = sum(lengths), 2, 4, 5
    q, k, v, g, ld, S0, offsets, w = make_inputs(1, T, H, dk, dv, dtype=torch.float64,
                                                 cu_seqlens=cu)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, S0, w)]

    def f(q, k, v, g, S0, w):
        return retention.msr(q, k, v, g, ld, form=form, chunk_size=4, rotary=rotary,
                             norm_weight=w, decay_norm=True, initial_state=S0, offsets=offsets,
                             cu_seqlens=cu, output_final_state=True)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("config", ["full", "norm_gate", "decay_norm_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_grads_vs_reference(config, dtype, device, seed):
    cu = cu_from([9, 0, 40, 1, 20], device=device)
    T, H, dk, dv = 70, 2, 60, 48
    q, k, v, g, ld, S0, offsets, w = make_inputs(1, T, H, dk, dv, dtype=dtype, cu_seqlens=cu,
                                                 device=device)
    norm, weight, gate, decay_norm = CONFIGS[config]
    kw = dict(norm=norm, decay_norm=decay_norm, offsets=offsets, cu_seqlens=cu)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, S0, w)]
    ql, kl, vl, gl, Sl, wl = leaves
    y, S = retention.msr(ql, kl, vl, gl if gate else None, ld, chunk_size=16,
                         norm_weight=wl if weight else None, initial_state=Sl,
                         output_final_state=True, **kw)
    dy, dS = torch.randn_like(y), torch.randn_like(S)
    torch.autograd.backward([y, S], [dy, dS])
    ref_leaves = [x.detach().to(torch.float64).requires_grad_() for x in (q, k, v, g, S0, w)]
    rq, rk, rv, rg, rS, rw = ref_leaves
    y_ref, S_ref = msr_reference(rq, rk, rv, rg if gate else None, ld,
                                 norm_weight=rw if weight else None, initial_state=rS, **kw)
    torch.autograd.backward([y_ref, S_ref], [dy.to(torch.float64), dS.to(torch.float64)])
    names = ["dq", "dk", "dv", "dg", "dS0", "dw"]
    for name, a, e in zip(names, leaves, ref_leaves):
        if e.grad is None:
            assert a.grad is None or float(a.grad.abs().max()) == 0.0, name
            continue
        assert_close_rel(a.grad, e.grad, TOL[dtype], f"{config} {name}", seed=seed)


# ----------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_step_sequences_at_different_positions(dtype, device, seed):
    """A batch of sequences at different positions decodes together and matches the forward
    pass of each whole sequence."""
    B, H, dk, dv, steps = 3, 2, 16, 24, 5
    prompt = [4, 0, 11]
    T = max(prompt) + steps
    q, k, v, g, ld, _, _, w = make_inputs(B, T, H, dk, dv, dtype=dtype, state=False,
                                          device=device)
    kw = dict(norm_weight=w, decay_norm=True)
    y_ref, _ = msr_reference(q, k, v, g, ld, **kw)
    amp = msr_norm_amplification(q, k, v, ld, **kw)  # (the empty prompt starts without a state)
    state = torch.zeros(B, H, dk, dv, device=device)
    for b, n in enumerate(prompt):  # prefill each sequence with its own prompt length
        if n:
            _, state[b:b + 1] = retention.msr(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n],
                                              g[b:b + 1, :n], ld, output_final_state=True, **kw)
    offsets = torch.tensor(prompt, dtype=torch.int64, device=device)
    for _ in range(steps):
        idx = offsets.tolist()
        pick = lambda x: torch.stack([x[b, idx[b]] for b in range(B)])
        y = retention.msr_step(pick(q), pick(k), pick(v), pick(g), ld, state, offsets=offsets,
                               **kw)
        assert_close_rel(y, pick(y_ref), TOL[dtype], f"step at {idx}", seed=seed,
                         amplification=pick(amp))
        offsets += 1


def test_step_equals_forward_with_offsets(seed):
    B, H, dk, dv = 2, 3, 8, 10
    q, k, v, g, ld, S0, offsets, w = make_inputs(B, 1, H, dk, dv)
    y_fwd, S_fwd = retention.msr(q, k, v, g, ld, initial_state=S0, offsets=offsets,
                                 norm_weight=w, output_final_state=True, form="recurrent")
    state = S0.clone()
    y = retention.msr_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], ld, state, offsets=offsets,
                           norm_weight=w)
    assert_close_rel(y, y_fwd[:, 0], 1e-6, "step vs forward", seed=seed)
    assert_close_rel(state, S_fwd, 1e-6, "state", seed=seed)


# ----------------------------------------------------------------------------------------------
# Errors and meta


def _args(**over):
    q, k, v, g, ld, S0, offsets, w = make_inputs(1, 10, 2, 8, 6)
    a = dict(q=q, k=k, v=v, g=g, log_decay=ld, initial_state=None, offsets=None,
             cu_seqlens=None, norm_weight=None)
    a.update(over)
    return a


def _call(a, **kw):
    return retention.msr(a["q"], a["k"], a["v"], a["g"], a["log_decay"],
                         initial_state=a["initial_state"], offsets=a["offsets"],
                         cu_seqlens=a["cu_seqlens"], norm_weight=a["norm_weight"], **kw)


@pytest.mark.parametrize("case,match", [
    (dict(cu_seqlens=torch.tensor([1, 10], dtype=torch.int32)), r"cu_seqlens\[0\] must be 0"),
    (dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 9], dtype=torch.int32)), "must equal the packed length"),
    (dict(cu_seqlens=torch.tensor([0, 10.0])), "int32 or int64"),
    (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), "N >= 1"),
    (dict(offsets=torch.tensor([1, 2])), r"offsets must be 1-D \[N\] = \[1\]"),
    (dict(offsets=torch.tensor([1.0])), "offsets must be int64"),
    (dict(offsets=torch.tensor([-1])), "non-negative"),
    (dict(norm_weight=torch.ones(5)), r"norm_weight must have shape \[dv\] = \[6\]"),
    (dict(g=torch.randn(1, 10, 2, 5)), "g must have the shape of v"),
    (dict(g=torch.randn(1, 10, 2, 6, dtype=torch.float64)), "g must have the dtype of q"),
    (dict(initial_state=torch.zeros(2, 2, 8, 6)), "initial_state must have shape"),
])
def test_errors(case, match):
    with pytest.raises(RuntimeError, match=match):
        _call(_args(**case))


def test_errors_packed_batch_and_rotary():
    a = _args()
    a.update(q=a["q"].expand(2, -1, -1, -1), k=a["k"].expand(2, -1, -1, -1),
             v=a["v"].expand(2, -1, -1, -1), g=a["g"].expand(2, -1, -1, -1),
             cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="need B == 1"):
        _call(a)
    q, k, v, g, ld, _, _, _ = make_inputs(1, 4, 1, 5, 3)
    with pytest.raises(RuntimeError, match="even dk"):
        retention.msr(q, k, v, g, ld)
    retention.msr(q, k, v, g, ld, rotary=None)  # odd dk is fine without a rotation
    with pytest.raises(ValueError, match="rotary must be"):
        retention.msr(q, k, v, g, ld, rotary="xpos")
    with pytest.raises(RuntimeError, match="eps must be finite"):
        retention.msr(q, k, v, g, ld, rotary=None, eps=-1.0)


def test_meta_shapes():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device="meta")
    q = torch.empty(1, 10, 2, 8, device="meta")
    v = torch.empty(1, 10, 2, 6, device="meta")
    y, S = retention.ops.msr_forward(q, q, v, v, torch.empty(2, device="meta"), 0.3, 0, 64, None,
                                     None, cu, 1, True, None, 1e-6, False)
    assert y.shape == (1, 10, 2, 6) and S.shape == (2, 2, 8, 6) and S.dtype == torch.float32
