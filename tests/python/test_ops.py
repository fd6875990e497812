"""Forward correctness of the retention ops against the independent float64 reference.

Reference: tests/python/reference.py (decay matrix + einsum, cross-checked against a token loop).
Tolerances: conftest.TOL (error ratio RMS(diff)/RMS(ref), per dtype, justified there).
"""

import math

import pytest
import torch

import retention
from conftest import (
    TOL,
    assert_close_rel,
    make_qkv,
    make_state,
    random_log_decay,
    state_dtype_for,
)
from reference import default_scale, retention_loop, retention_quadratic, retention_term_rms

# form name -> (callable(q, k, v, ld, **kw), extra kwargs)
FORMS = {
    "chunk16": (retention.chunk_retention, {"chunk_size": 16}),
    "chunk64": (retention.chunk_retention, {"chunk_size": 64}),
    "chunk100": (retention.chunk_retention, {"chunk_size": 100}),
    "parallel": (retention.parallel_retention, {}),
    "recurrent": (retention.recurrent_retention, {}),
}
FORM_NAMES = list(FORMS)


def run_form(form, q, k, v, ld, **kw):
    fn, extra = FORMS[form]
    return fn(q, k, v, ld, **extra, **kw)


# ----------------------------------------------------------------------------------------------
# The two references agree with each other (float64, independent formulations).


@pytest.mark.parametrize("B,T,H,dk,dv", [(2, 1, 3, 5, 4), (2, 37, 3, 7, 11), (1, 130, 2, 16, 9)])
@pytest.mark.parametrize("with_state", [False, True])
def test_reference_quadratic_matches_loop(B, T, H, dk, dv, with_state, seed):
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=torch.float64)
    ld = random_log_decay(H, dtype=torch.float64)
    S0 = make_state(B, H, dk, dv, dtype=torch.float64) if with_state else None
    o1, s1 = retention_quadratic(q, k, v, ld, scale=0.3, initial_state=S0)
    o2, s2 = retention_loop(q, k, v, ld, scale=0.3, initial_state=S0)
    # both exact float64: only summation order differs
    assert_close_rel(o1, o2, 1e-12, "o quadratic vs loop", seed=seed)
    assert_close_rel(s1, s2, 1e-12, "state quadratic vs loop", seed=seed)
    # the quadratic reference must also be right on a hand-computable case: T=1, S0
    if T == 1:
        g = torch.exp(ld)
        expect = 0.3 * torch.einsum("bhk,bhkv->bhv", q[:, 0],
                                    g[None, :, None, None] * (S0 if S0 is not None else 0.0)
                                    + k[:, 0, :, :, None] * v[:, 0, :, None, :])
        assert_close_rel(o1[:, 0], expect, 1e-14, "T=1 hand formula", seed=seed)


# ----------------------------------------------------------------------------------------------
# Every form vs the reference: o and final_state, odd sizes, with/without initial state.

SHAPES = [
    # B, T, H, dk, dv
    (1, 1, 1, 60, 432),
    (3, 63, 8, 60, 432),
    (1, 65, 16, 256, 432),
    (3, 65, 1, 256, 432),
    (3, 63, 8, 256, 432),
]


@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("B,T,H,dk,dv", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_f32_vs_reference(form, B, T, H, dk, dv, with_state, device, seed):
    q, k, v = make_qkv(B, T, H, dk, dv, device=device)
    ld = random_log_decay(H, device=device)
    S0 = make_state(B, H, dk, dv, device=device) if with_state else None
    o, S = run_form(form, q, k, v, ld, initial_state=S0, output_final_state=True)
    assert o.dtype == torch.float32 and o.shape == (B, T, H, dv) and o.device.type == device
    assert S.dtype == torch.float32 and S.shape == (B, H, dk, dv)
    o_ref, S_ref = retention_quadratic(q, k, v, ld, initial_state=S0)
    # (1,1,1,60,432) without a state: every output is (q.k) v_j, so one cancelling dot product
    # would make RMS(o) tiny while fp32 rounding stays proportional to the summed terms.
    o_terms = retention_term_rms(q, k, v, ld, initial_state=S0)
    assert_close_rel(o, o_ref, TOL[torch.float32], f"{form} o", seed=seed, term_rms=o_terms)
    assert_close_rel(S, S_ref, TOL[torch.float32], f"{form} final_state", seed=seed)


def test_term_rms_scale_is_exact_on_a_hand_case(seed):
    """retention_term_rms on T=1, no state: sqrt(sum_i (s q_i k_i v_j)^2), checked by hand."""
    q, k, v = make_qkv(1, 1, 1, 5, 3, dtype=torch.float64)
    ld = random_log_decay(1, dtype=torch.float64)
    got = retention_term_rms(q, k, v, ld, scale=0.7)
    expect = 0.7 * torch.sqrt(((q[0, 0, 0] * k[0, 0, 0]) ** 2).sum()) * v[0, 0, 0].abs()
    assert_close_rel(got[0, 0, 0], expect, 1e-14, "term rms", seed=seed)


def test_term_rms_does_not_loosen_random_cases(seed):
    """Without cancellation the term scale must equal RMS(o) to within the randomness of the
    draw (so it does not loosen the fp32 check on ordinary inputs): 0.3x..3x for these sizes."""
    q, k, v = make_qkv(2, 40, 4, 32, 16, dtype=torch.float64)
    ld = random_log_decay(4, dtype=torch.float64)
    o, _ = retention_quadratic(q, k, v, ld)
    ratio = float(retention_term_rms(q, k, v, ld).pow(2).mean().sqrt() / o.pow(2).mean().sqrt())
    assert 0.8 < ratio < 1.25, ratio


DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16",
             torch.bfloat16: "bf16"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_dtypes_vs_reference(dtype, form, with_state, device, seed):
    B, T, H, dk, dv = 2, 65, 4, 60, 432
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=dtype, device=device)
    ld = random_log_decay(H, device=device)
    sdt = state_dtype_for(dtype)
    S0 = make_state(B, H, dk, dv, dtype=sdt, device=device) if with_state else None
    o, S = run_form(form, q, k, v, ld, initial_state=S0, output_final_state=True)
    assert o.dtype == dtype, f"o must be in the input dtype {dtype}, got {o.dtype}"
    assert S.dtype == sdt, f"final_state must be {sdt}, got {S.dtype}"
    # reference from the *rounded* inputs (q, k, v are already in `dtype`), in float64
    o_ref, S_ref = retention_quadratic(q, k, v, ld, initial_state=S0)
    assert_close_rel(o, o_ref, TOL[dtype], f"{form} o", seed=seed)
    # the state is accumulated and returned in fp32 (fp64): no output rounding to the input
    # dtype, only fp32 accumulation -> fp32 tolerance (fp64 for fp64 inputs) unless intermediates
    # are kept in the input dtype; allow the input-dtype tolerance as the contract only promises
    # an fp32 *container* for the state.
    assert_close_rel(S, S_ref, TOL[dtype], f"{form} final_state", seed=seed)


# ----------------------------------------------------------------------------------------------
# Long sequences (chunk form only): gamma close to 1 (retnet_log_decay, H=16), T not a multiple of
# the chunk size.


@pytest.mark.parametrize("dtype,chunk_size,with_state,dv", [
    (torch.float32, 64, False, 432),
    # smaller dv below only to keep the O(T^2) float64 reference cheap (dv is a free dimension)
    (torch.float32, 100, True, 96),
    (torch.float16, 64, True, 96),
    (torch.bfloat16, 64, False, 96),
])
def test_chunk_long_gamma_near_one(dtype, chunk_size, with_state, dv, device, seed):
    B, T, H, dk = 1, 1000, 16, 256
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=dtype, device=device)
    ld = retention.retnet_log_decay(H, device=device)
    S0 = make_state(B, H, dk, dv, device=device) if with_state else None
    o, S = retention.chunk_retention(q, k, v, ld, chunk_size=chunk_size, initial_state=S0,
                                     output_final_state=True)
    assert o.dtype == dtype and torch.isfinite(o).all(), "non-finite output"
    assert torch.isfinite(S).all()
    o_ref, S_ref = retention_quadratic(q, k, v, ld, initial_state=S0)
    # per-head check as well: heads 7..15 have gamma == 1 in fp16 (and 4..15 in bf16), so a
    # kernel that materialises gamma in the input dtype fails on those heads specifically.
    for h in range(H):
        assert_close_rel(o[:, :, h], o_ref[:, :, h], TOL[dtype], f"o head {h}", seed=seed)
    assert_close_rel(S, S_ref, TOL[dtype], "final_state", seed=seed)


def test_chunk_long_small_dk(device, seed):
    B, T, H, dk, dv = 2, 1000, 4, 60, 432
    q, k, v = make_qkv(B, T, H, dk, dv, device=device)
    ld = retention.linspace_log_decay(H, device=device)
    o, S = retention.chunk_retention(q, k, v, ld, chunk_size=16, output_final_state=True)
    o_ref, S_ref = retention_quadratic(q, k, v, ld)
    assert_close_rel(o, o_ref, TOL[torch.float32], "o", seed=seed)
    assert_close_rel(S, S_ref, TOL[torch.float32], "final_state", seed=seed)


def test_fp16_large_magnitudes_finite(device, seed):
    """All-positive inputs make every score and state entry add up (no cancellation): with
    gamma ~ 1 and T=1000 the true outputs reach ~2e3 and state entries ~2.5e2, well inside fp16
    range (65504).  A kernel that factorises gamma^(n-m) = gamma^n * gamma^-m over a chunk, or
    accumulates unscaled scores in fp16, overflows here."""
    B, T, H, dk, dv = 1, 1000, 16, 256, 64
    q = torch.rand(B, T, H, dk, device=device).half()
    k = torch.rand(B, T, H, dk, device=device).half()
    v = torch.rand(B, T, H, dv, device=device).half()
    ld = retention.retnet_log_decay(H, device=device)
    o_ref, S_ref = retention_quadratic(q, k, v, ld)
    assert float(o_ref.abs().max()) < 6e4  # test premise: representable in fp16
    for chunk in (64, 100):
        o, S = retention.chunk_retention(q, k, v, ld, chunk_size=chunk, output_final_state=True)
        assert torch.isfinite(o).all(), f"fp16 overflow in o (chunk_size={chunk})"
        assert torch.isfinite(S).all()
        assert_close_rel(o, o_ref, TOL[torch.float16], f"o chunk={chunk}", seed=seed)
        assert_close_rel(S, S_ref, TOL[torch.float16], f"state chunk={chunk}", seed=seed)
    for form in ("parallel", "recurrent"):
        o = run_form(form, q, k, v, ld)
        assert torch.isfinite(o).all(), f"fp16 overflow in {form}"
        assert_close_rel(o, o_ref, TOL[torch.float16], f"{form} o", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("form", FORM_NAMES)
def test_extreme_decays(form, dtype, device, seed):
    """log_decay from 0 (gamma = 1, no decay) to -20 (gamma ~ 2e-9): gamma^(n-m) underflows to 0
    but must never be formed as gamma^n / gamma^m (overflow -> inf * 0 = NaN)."""
    B, T, H, dk, dv = 2, 130, 5, 16, 24
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=dtype, device=device)
    ld = torch.tensor([0.0, -20.0, -5.0, -0.5, -1e-6], device=device)
    S0 = make_state(B, H, dk, dv, dtype=state_dtype_for(dtype), device=device)
    o, S = run_form(form, q, k, v, ld, initial_state=S0, output_final_state=True)
    o_ref, S_ref = retention_quadratic(q, k, v, ld, initial_state=S0)
    assert_close_rel(o, o_ref, TOL[dtype], f"{form} o", seed=seed)
    assert_close_rel(S, S_ref, TOL[dtype], f"{form} final_state", seed=seed)


@pytest.mark.parametrize("form", FORM_NAMES)
def test_log_decay_minus_inf_is_gamma_zero(form, device, seed):
    """log_decay = -inf (gamma = 0, 'no memory') is the limit of the contract's log_decay <= 0:
    gamma^0 = 1 on the diagonal, so o_n = scale (q_n . k_n) v_n, S_T = k_{T-1}^T v_{T-1}, and the
    initial state is forgotten.  (exp(0 * -inf) = NaN must not leak in.)"""
    B, T, H, dk, dv = 2, 11, 2, 6, 4
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=torch.float64, device=device)
    ld = torch.tensor([float("-inf"), -0.3], device=device)
    S0 = make_state(B, H, dk, dv, dtype=torch.float64, device=device)
    o, S = run_form(form, q, k, v, ld, initial_state=S0, output_final_state=True)
    scale = default_scale(dk)
    o0 = scale * (q[:, :, 0] * k[:, :, 0]).sum(-1, keepdim=True) * v[:, :, 0]
    S_last = k[:, -1, 0, :, None] * v[:, -1, 0, None, :]
    assert_close_rel(o[:, :, 0], o0, TOL[torch.float64], f"{form} o (gamma=0 head)", seed=seed)
    assert_close_rel(S[:, 0], S_last, TOL[torch.float64], f"{form} S (gamma=0 head)", seed=seed)
    # the other head is unaffected
    o_ref, S_ref = retention_quadratic(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], ld[1:],
                                       initial_state=S0[:, 1:])
    assert_close_rel(o[:, :, 1:], o_ref, TOL[torch.float64], f"{form} o other head", seed=seed)
    assert_close_rel(S[:, 1:], S_ref, TOL[torch.float64], f"{form} S other head", seed=seed)


# ----------------------------------------------------------------------------------------------
# Non-contiguous inputs.


@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_strided_inputs(form, dtype, device, seed):
    B, T, H, dk, dv = 2, 65, 3, 60, 432
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=dtype, device=device, layout="strided")
    ld = random_log_decay(H, device=device)
    S0 = make_state(B, H, dk, dv, device=device)
    o, S = run_form(form, q, k, v, ld, initial_state=S0, output_final_state=True)
    o_ref, S_ref = retention_quadratic(q, k, v, ld, initial_state=S0)
    assert_close_rel(o, o_ref, TOL[dtype], f"{form} strided o", seed=seed)
    assert_close_rel(S, S_ref, TOL[dtype], f"{form} strided final_state", seed=seed)
    # same values, contiguous copies: identical semantics
    o2, S2 = run_form(form, q.contiguous(), k.contiguous(), v.contiguous(), ld,
                      initial_state=S0, output_final_state=True)
    assert_close_rel(o, o2, TOL[dtype], f"{form} strided vs contiguous", seed=seed)


def test_strided_log_decay_and_state(device, seed):
    """log_decay as a strided view and initial_state as a transposed view."""
    B, T, H, dk, dv = 2, 33, 4, 8, 12
    q, k, v = make_qkv(B, T, H, dk, dv, device=device)
    ld = random_log_decay(2 * H, device=device)[::2]
    S0 = torch.randn(B, H, dv, dk, device=device).transpose(-1, -2)
    assert not ld.is_contiguous() and not S0.is_contiguous()
    o_ref, S_ref = retention_quadratic(q, k, v, ld, initial_state=S0)
    for form in FORM_NAMES:
        o, S = run_form(form, q, k, v, ld, initial_state=S0, output_final_state=True)
        assert_close_rel(o, o_ref, TOL[torch.float32], f"{form} o", seed=seed)
        assert_close_rel(S, S_ref, TOL[torch.float32], f"{form} state", seed=seed)


# ----------------------------------------------------------------------------------------------
# Forms agree with each other; explicit scale.


@pytest.mark.parametrize("with_state", [False, True])
def test_forms_agree(with_state, device, seed):
    B, T, H, dk, dv = 2, 97, 4, 33, 50
    q, k, v = make_qkv(B, T, H, dk, dv, device=device)
    ld = random_log_decay(H, device=device)
    S0 = make_state(B, H, dk, dv, device=device) if with_state else None
    outs = {f: run_form(f, q, k, v, ld, initial_state=S0, output_final_state=True)
            for f in FORM_NAMES}
    # also some more chunk sizes: 1 (pure recurrence), T-1, T, > T
    for c in (1, T - 1, T, 4 * T):
        outs[f"chunk{c}"] = retention.chunk_retention(q, k, v, ld, chunk_size=c, initial_state=S0,
                                                      output_final_state=True)
    base_o, base_S = outs["parallel"]
    # two fp32 results each within 1e-5 of the exact answer differ by at most 2e-5
    for name, (o, S) in outs.items():
        assert_close_rel(o, base_o, 2 * TOL[torch.float32], f"{name} vs parallel o", seed=seed)
        assert_close_rel(S, base_S, 2 * TOL[torch.float32], f"{name} vs parallel state",
                         seed=seed)


def test_chunk_size_larger_than_sequence(device, seed):
    """A chunk larger than the sequence is just one (partial) chunk: the result is the same and
    the cost must not depend on chunk_size (no C x C buffers for C >> T)."""
    B, T, H, dk, dv = 2, 5, 3, 8, 6
    q, k, v = make_qkv(B, T, H, dk, dv, device=device)
    ld = random_log_decay(H, device=device)
    S0 = make_state(B, H, dk, dv, device=device)
    o_ref, S_ref = retention_quadratic(q, k, v, ld, initial_state=S0)
    for c in (T, T + 1, 1 << 40):
        o, S = retention.chunk_retention(q, k, v, ld, chunk_size=c, initial_state=S0,
                                         output_final_state=True)
        assert_close_rel(o, o_ref, TOL[torch.float32], f"o chunk_size={c}", seed=seed)
        assert_close_rel(S, S_ref, TOL[torch.float32], f"S chunk_size={c}", seed=seed)


def test_expanded_stride0_inputs(device, seed):
    """Broadcast (stride-0) views are valid strided inputs."""
    B, T, H, dk, dv = 2, 19, 3, 8, 6
    q = torch.randn(B, 1, H, dk, device=device).expand(B, T, H, dk)
    k = torch.randn(1, T, H, dk, device=device).expand(B, T, H, dk)
    v = torch.randn(B, T, 1, dv, device=device).expand(B, T, H, dv)
    ld = random_log_decay(H, device=device)
    o_ref, S_ref = retention_quadratic(q, k, v, ld)
    for form in FORM_NAMES:
        o, S = run_form(form, q, k, v, ld, output_final_state=True)
        assert_close_rel(o, o_ref, TOL[torch.float32], f"{form} o", seed=seed)
        assert_close_rel(S, S_ref, TOL[torch.float32], f"{form} S", seed=seed)


@pytest.mark.parametrize("form", FORM_NAMES)
def test_explicit_scale(form, device, seed):
    B, T, H, dk, dv = 2, 21, 3, 10, 7
    q, k, v = make_qkv(B, T, H, dk, dv, device=device)
    ld = random_log_decay(H, device=device)
    S0 = make_state(B, H, dk, dv, device=device)
    for scale in (0.37, 1.0, 2.5):
        o, S = run_form(form, q, k, v, ld, scale=scale, initial_state=S0, output_final_state=True)
        o_ref, S_ref = retention_quadratic(q, k, v, ld, scale=scale, initial_state=S0)
        assert_close_rel(o, o_ref, TOL[torch.float32], f"{form} o scale={scale}", seed=seed)
        # the state does not depend on scale
        assert_close_rel(S, S_ref, TOL[torch.float32], f"{form} S scale={scale}", seed=seed)
    # default scale is dk^-0.5
    o_def = run_form(form, q, k, v, ld)
    o_exp = run_form(form, q, k, v, ld, scale=default_scale(dk))
    assert_close_rel(o_def, o_exp, 1e-6, f"{form} default scale", seed=seed)


@pytest.mark.parametrize("form", FORM_NAMES)
def test_log_decay_float64_accepted(form, device, seed):
    B, T, H, dk, dv = 1, 40, 2, 8, 8
    q, k, v = make_qkv(B, T, H, dk, dv, device=device)
    ld64 = random_log_decay(H, dtype=torch.float64, device=device)
    o = run_form(form, q, k, v, ld64)
    o_ref, _ = retention_quadratic(q, k, v, ld64)
    assert_close_rel(o, o_ref, TOL[torch.float32], f"{form} o (float64 log_decay)", seed=seed)


def test_output_final_state_flag(device):
    q, k, v = make_qkv(1, 5, 2, 4, 3, device=device)
    ld = random_log_decay(2, device=device)
    for form in FORM_NAMES:
        out = run_form(form, q, k, v, ld)
        assert isinstance(out, torch.Tensor), f"{form}: output_final_state=False must return o only"
        out = run_form(form, q, k, v, ld, output_final_state=True)
        assert isinstance(out, tuple) and len(out) == 2


# ----------------------------------------------------------------------------------------------
# State hand-off: prefill then decode; split sequence.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("prefill_form", ["chunk16", "parallel", "recurrent"])
def test_prefill_then_decode(dtype, prefill_form, device, seed):
    B, T, H, dk, dv = 2, 45, 4, 60, 432
    T0 = 29
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=dtype, device=device)
    ld = random_log_decay(H, device=device)
    o_full, S_full = retention.chunk_retention(q, k, v, ld, chunk_size=16, output_final_state=True)
    o_pre, state = run_form(prefill_form, q[:, :T0], k[:, :T0], v[:, :T0], ld,
                            output_final_state=True)
    assert state.dtype == torch.float32
    outs = [o_pre]
    for t in range(T0, T):
        if t % 2:  # alternate both layouts
            o_t = retention.recurrent_step(q[:, t], k[:, t], v[:, t], ld, state)
            assert o_t.shape == (B, H, dv)
            outs.append(o_t.unsqueeze(1))
        else:
            o_t = retention.recurrent_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], ld, state)
            assert o_t.shape == (B, 1, H, dv)
            outs.append(o_t)
        assert o_t.dtype == dtype
    o_dec = torch.cat(outs, dim=1)
    o_ref, S_ref = retention_quadratic(q, k, v, ld)
    assert_close_rel(o_dec, o_ref, TOL[dtype], "prefill+decode o vs reference", seed=seed)
    assert_close_rel(state, S_ref, TOL[dtype], "decoded state vs reference", seed=seed)
    # and vs one long chunk pass (both within tol of the exact answer)
    assert_close_rel(o_dec, o_full, 2 * TOL[dtype], "prefill+decode vs one chunk pass", seed=seed)
    assert_close_rel(state, S_full, 2 * TOL[dtype], "decoded state vs chunk pass", seed=seed)


@pytest.mark.parametrize("form", FORM_NAMES)
def test_split_sequence_state_round_trip(form, device, seed):
    B, T, H, dk, dv = 2, 77, 3, 24, 40
    q, k, v = make_qkv(B, T, H, dk, dv, device=device)
    ld = random_log_decay(H, device=device)
    S0 = make_state(B, H, dk, dv, device=device)
    o_ref, S_ref = retention_quadratic(q, k, v, ld, initial_state=S0)
    for T1 in (1, 30, 64, 76):
        o1, S1 = run_form(form, q[:, :T1], k[:, :T1], v[:, :T1], ld, initial_state=S0,
                          output_final_state=True)
        o2, S2 = run_form(form, q[:, T1:], k[:, T1:], v[:, T1:], ld, initial_state=S1,
                          output_final_state=True)
        assert_close_rel(torch.cat([o1, o2], 1), o_ref, TOL[torch.float32], f"split@{T1} o",
                         seed=seed)
        assert_close_rel(S2, S_ref, TOL[torch.float32], f"split@{T1} state", seed=seed)
    # initial_state is an input: it must not be modified
    S0_copy = S0.clone()
    run_form(form, q, k, v, ld, initial_state=S0, output_final_state=True)
    assert torch.equal(S0, S0_copy), "initial_state was modified by a forward call"


# ----------------------------------------------------------------------------------------------
# recurrent_step


@pytest.mark.parametrize("layout", ["3d", "4d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: DTYPE_IDS[d])
def test_recurrent_step_in_place(layout, dtype, device, seed):
    B, H, dk, dv = 3, 8, 60, 432
    ld = random_log_decay(H, device=device)
    state = make_state(B, H, dk, dv, device=device)
    ptr = state.data_ptr()
    S_prev = state.clone()
    for step in range(3):
        shape_k = (B, H, dk) if layout == "3d" else (B, 1, H, dk)
        shape_v = (B, H, dv) if layout == "3d" else (B, 1, H, dv)
        q = torch.randn(shape_k, device=device).to(dtype)
        k = torch.randn(shape_k, device=device).to(dtype)
        v = torch.randn(shape_v, device=device).to(dtype)
        o = retention.recurrent_step(q, k, v, ld, state)
        assert o.shape == shape_v, f"o layout must follow q: {tuple(o.shape)} vs {shape_v}"
        assert o.dtype == dtype
        assert state.data_ptr() == ptr and state.shape == (B, H, dk, dv)
        assert state.dtype == torch.float32
        assert o.data_ptr() != ptr
        q4, k4, v4 = (x.reshape(B, 1, H, -1) for x in (q, k, v))
        o_ref, S_ref = retention_quadratic(q4, k4, v4, ld, initial_state=S_prev)
        assert_close_rel(o.reshape(B, 1, H, dv), o_ref, TOL[dtype], f"step {step} o", seed=seed)
        assert_close_rel(state, S_ref, TOL[dtype], f"step {step} state", seed=seed)
        S_prev = state.clone()


def test_recurrent_step_bumps_version_counter(device):
    """recurrent_step mutates `state` (schema Tensor(a!)): like any in-place op it must bump the
    version counter, so autograd detects a state that was saved for backward and then modified
    (otherwise gradients through the old state are silently wrong)."""
    B, H, dk, dv = 1, 2, 3, 4
    ld = random_log_decay(H, device=device)
    state = make_state(B, H, dk, dv, device=device)
    q, k = torch.randn(B, H, dk, device=device), torch.randn(B, H, dk, device=device)
    v = torch.randn(B, H, dv, device=device)
    v0 = state._version
    retention.recurrent_step(q, k, v, ld, state)
    assert state._version > v0, "in-place update of state did not bump its version counter"
    w = torch.randn(B, H, dk, dv, device=device, requires_grad=True)
    y = (state * w).sum()        # saves `state` for the backward of w
    retention.recurrent_step(q, k, v, ld, state)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_recurrent_step_inference_mode_and_no_grad(device, seed):
    B, H, dk, dv = 2, 2, 5, 3
    ld = random_log_decay(H, device=device)
    for ctx in (torch.inference_mode, torch.no_grad):
        with ctx():
            state = make_state(B, H, dk, dv, device=device)
            S0 = state.clone()
            q, k = torch.randn(B, H, dk, device=device), torch.randn(B, H, dk, device=device)
            v = torch.randn(B, H, dv, device=device)
            o = retention.recurrent_step(q, k, v, ld, state)
            o_ref, S_ref = retention_quadratic(q[:, None], k[:, None], v[:, None], ld,
                                               initial_state=S0)
        assert_close_rel(o, o_ref[:, 0], TOL[torch.float32], f"{ctx.__name__} o", seed=seed)
        assert_close_rel(state, S_ref, TOL[torch.float32], f"{ctx.__name__} S", seed=seed)


def test_recurrent_step_float64(device, seed):
    """float64 inputs decode with the float64 state that chunk/parallel/recurrent forms return."""
    B, T, H, dk, dv = 2, 12, 3, 9, 7
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=torch.float64, device=device)
    ld = random_log_decay(H, device=device)
    _, state = retention.chunk_retention(q[:, :5], k[:, :5], v[:, :5], ld, chunk_size=4,
                                         output_final_state=True)
    assert state.dtype == torch.float64
    outs = [retention.recurrent_step(q[:, t], k[:, t], v[:, t], ld, state) for t in range(5, T)]
    o_ref, S_ref = retention_quadratic(q, k, v, ld)
    assert_close_rel(torch.stack(outs, 1), o_ref[:, 5:], TOL[torch.float64], "o", seed=seed)
    assert_close_rel(state, S_ref, TOL[torch.float64], "state", seed=seed)


def test_recurrent_step_explicit_scale_and_strided(device, seed):
    B, H, dk, dv = 2, 3, 17, 9
    ld = random_log_decay(H, device=device)
    state = make_state(B, H, dk, dv, device=device)
    S0 = state.clone()
    q = torch.randn(B, dk, H, device=device).transpose(1, 2)   # non-contiguous [B, H, dk]
    k = torch.randn(B, H, 2 * dk, device=device)[..., ::2]
    v = torch.randn(B, H, dv, device=device)
    o = retention.recurrent_step(q, k, v, ld, state, scale=0.7)
    o_ref, S_ref = retention_quadratic(q[:, None], k[:, None], v[:, None], ld, scale=0.7,
                                       initial_state=S0)
    assert_close_rel(o, o_ref[:, 0], TOL[torch.float32], "o", seed=seed)
    assert_close_rel(state, S_ref, TOL[torch.float32], "state", seed=seed)


def test_recurrent_step_matches_recurrent_forward(device, seed):
    B, T, H, dk, dv = 2, 9, 3, 12, 20
    q, k, v = make_qkv(B, T, H, dk, dv, device=device)
    ld = random_log_decay(H, device=device)
    S0 = make_state(B, H, dk, dv, device=device)
    o_fwd, S_fwd = retention.recurrent_retention(q, k, v, ld, initial_state=S0,
                                                 output_final_state=True)
    state = S0.clone()
    o_steps = torch.stack([retention.recurrent_step(q[:, t], k[:, t], v[:, t], ld, state)
                           for t in range(T)], 1)
    assert_close_rel(o_steps, o_fwd, 2 * TOL[torch.float32], "steps vs recurrent_forward",
                     seed=seed)
    assert_close_rel(state, S_fwd, 2 * TOL[torch.float32], "state", seed=seed)


def test_recurrent_step_raw_op_in_place(device, seed):
    B, H, dk, dv = 2, 2, 4, 6
    ld = random_log_decay(H, device=device)
    state = make_state(B, H, dk, dv, device=device)
    S0 = state.clone()
    q, k = torch.randn(B, H, dk, device=device), torch.randn(B, H, dk, device=device)
    v = torch.randn(B, H, dv, device=device)
    o = torch.ops.retention.recurrent_step(q, k, v, ld, 0.5, state)
    assert o.shape == (B, H, dv) and o.dtype == torch.float32
    o_ref, S_ref = retention_quadratic(q[:, None], k[:, None], v[:, None], ld, scale=0.5,
                                       initial_state=S0)
    assert_close_rel(o, o_ref[:, 0], TOL[torch.float32], "raw op o", seed=seed)
    assert_close_rel(state, S_ref, TOL[torch.float32], "raw op state", seed=seed)


# ----------------------------------------------------------------------------------------------
# retention.retention(form=...) dispatch


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
def test_retention_dispatch(form, device, seed):
    B, T, H, dk, dv = 2, 19, 3, 8, 5
    q, k, v = make_qkv(B, T, H, dk, dv, device=device)
    ld = random_log_decay(H, device=device)
    S0 = make_state(B, H, dk, dv, device=device)
    direct = {"chunk": retention.chunk_retention, "parallel": retention.parallel_retention,
              "recurrent": retention.recurrent_retention}[form]
    kw = {"chunk_size": 8} if form == "chunk" else {}
    o, S = retention.retention(q, k, v, ld, form=form, scale=0.4, initial_state=S0,
                               output_final_state=True, **kw)
    o_d, S_d = direct(q, k, v, ld, scale=0.4, initial_state=S0, output_final_state=True, **kw)
    assert torch.equal(o, o_d) and torch.equal(S, S_d), "retention(form=...) must call that form"
    o_ref, S_ref = retention_quadratic(q, k, v, ld, scale=0.4, initial_state=S0)
    assert_close_rel(o, o_ref, TOL[torch.float32], "o", seed=seed)
    assert_close_rel(S, S_ref, TOL[torch.float32], "S", seed=seed)
    o_only = retention.retention(q, k, v, ld, form=form)
    assert isinstance(o_only, torch.Tensor) and o_only.shape == (B, T, H, dv)


def test_retention_default_form_is_chunk(seed):
    q, k, v = make_qkv(1, 70, 2, 8, 5)
    ld = random_log_decay(2)
    assert torch.equal(retention.retention(q, k, v, ld), retention.chunk_retention(q, k, v, ld))


def test_retention_unknown_form():
    q, k, v = make_qkv(1, 4, 2, 8, 5)
    ld = random_log_decay(2)
    with pytest.raises((ValueError, RuntimeError), match="form"):
        retention.retention(q, k, v, ld, form="fused")


# ----------------------------------------------------------------------------------------------
# Decay helpers (retnet-math.md sec. 1)


def test_retnet_log_decay_values(device):
    H = 16
    ld = retention.retnet_log_decay(H, device=device)
    assert ld.dtype == torch.float32 and ld.shape == (H,) and ld.device.type == device
    h = torch.arange(H, dtype=torch.float64)
    expect = torch.log1p(-torch.pow(2.0, -5.0 - h))
    # fp32 storage: relative error <= 2^-24 (one rounding); the values span 3e-2 .. 9.5e-7, so a
    # naive fp32 evaluation of log(1 - x) (cancellation: relative error ~ 2^-24 / x, up to 6% for
    # h = 15) fails this.
    torch.testing.assert_close(ld.double().cpu(), expect, rtol=2 ** -23, atol=0)
    # spot values from the table in retnet-math.md sec. 1
    g = torch.exp(ld.double().cpu())
    assert abs(float(g[0]) - 0.96875) < 1e-7
    assert abs(float(g[1]) - 0.984375) < 1e-7
    assert abs(float(ld[0]) - (-3.1749e-2)) < 1e-6
    assert abs(float(ld[15]) - (-9.5367e-7)) < 1e-11
    # gamma_h = 1 - 2^(-5-h)
    torch.testing.assert_close(1 - g, torch.pow(2.0, -5.0 - h), rtol=1e-6, atol=0)


def test_retnet_log_decay_many_heads():
    # 32 heads (retnet_65b): log gamma down to -1.46e-11; gamma itself must be right to fp32
    # resolution near 1 (2^-24 absolute), and log_decay must stay strictly negative-or-zero.
    ld = retention.retnet_log_decay(32)
    h = torch.arange(32, dtype=torch.float64)
    expect = torch.log1p(-torch.pow(2.0, -5.0 - h))
    assert (ld <= 0).all()
    torch.testing.assert_close(ld.double(), expect, rtol=2 ** -23, atol=2 ** -24)


@pytest.mark.parametrize("H", [1, 8, 12])
def test_linspace_log_decay_values(H, device):
    ld = retention.linspace_log_decay(H, device=device)
    assert ld.dtype == torch.float32 and ld.shape == (H,) and ld.device.type == device
    x = torch.linspace(math.log(1 / 32), math.log(1 / 512), H, dtype=torch.float64)
    expect = torch.log1p(-torch.exp(x))
    torch.testing.assert_close(ld.double().cpu(), expect, rtol=2 ** -23, atol=0)
    if H == 8:
        # values listed in retnet-math.md sec. 1 (5 significant digits there)
        table = [0.96875, 0.97897, 0.98585, 0.99048, 0.99359, 0.99569, 0.99710, 0.998047]
        g = torch.exp(ld.double().cpu())
        for h, gv in enumerate(table):
            assert abs(float(g[h]) - gv) < 6e-6, (h, float(g[h]), gv)
    # endpoints: windows 32 and 512
    assert abs(float(torch.exp(ld[0].double())) - (1 - 1 / 32)) < 1e-7
    if H > 1:
        assert abs(float(torch.exp(ld[-1].double())) - (1 - 1 / 512)) < 1e-7


# ----------------------------------------------------------------------------------------------
# T = 0


@pytest.mark.parametrize("form", FORM_NAMES)
def test_empty_sequence(form, device):
    B, H, dk, dv = 2, 3, 8, 5
    q, k, v = make_qkv(B, 0, H, dk, dv, device=device)
    ld = random_log_decay(H, device=device)
    o, S = run_form(form, q, k, v, ld, output_final_state=True)
    assert o.shape == (B, 0, H, dv) and o.dtype == torch.float32
    assert S.shape == (B, H, dk, dv) and torch.equal(S, torch.zeros_like(S))
    S0 = make_state(B, H, dk, dv, device=device)
    o, S = run_form(form, q, k, v, ld, initial_state=S0, output_final_state=True)
    assert o.shape == (B, 0, H, dv)
    # no tokens: S_T = gamma^0 S_0 = S_0
    torch.testing.assert_close(S, S0, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Raw ops: shapes and dtypes; meta tensors; torch.compile


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=lambda d: DTYPE_IDS[d])
def test_raw_ops_shapes_dtypes(dtype, device):
    B, T, H, dk, dv = 2, 11, 3, 6, 5
    ops = torch.ops.retention
    assert retention.ops is ops or retention.ops == ops
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=dtype, device=device)
    ld = random_log_decay(H, device=device)
    sdt = state_dtype_for(dtype)
    S0 = make_state(B, H, dk, dv, dtype=sdt, device=device)
    go = torch.randn(B, T, H, dv, device=device).to(dtype)
    gS = torch.randn(B, H, dk, dv, dtype=sdt, device=device)
    fwd = {
        "chunk": ops.chunk_forward(q, k, v, ld, 0.3, 4, S0),
        "chunk_nostate": ops.chunk_forward(q, k, v, ld, 0.3, 64, None),
        "parallel": ops.parallel_forward(q, k, v, ld, 0.3, S0),
        "parallel_nostate": ops.parallel_forward(q, k, v, ld, 0.3, None),
        "recurrent": ops.recurrent_forward(q, k, v, ld, 0.3, S0),
    }
    for name, (o, S) in fwd.items():
        assert o.shape == (B, T, H, dv) and o.dtype == dtype, name
        assert S.shape == (B, H, dk, dv) and S.dtype == sdt, name
    bwd = {
        "chunk": ops.chunk_backward(go, gS, q, k, v, ld, 0.3, 4, S0),
        "chunk_none": ops.chunk_backward(go, None, q, k, v, ld, 0.3, 4, None),
        "parallel": ops.parallel_backward(go, gS, q, k, v, ld, 0.3, S0),
        "parallel_none": ops.parallel_backward(go, None, q, k, v, ld, 0.3, None),
    }
    for name, (dq, dk_, dv_, dS) in bwd.items():
        assert dq.shape == q.shape and dq.dtype == dtype, name
        assert dk_.shape == k.shape and dk_.dtype == dtype, name
        assert dv_.shape == v.shape and dv_.dtype == dtype, name
        assert dS.shape == (B, H, dk, dv) and dS.dtype == sdt, name


def test_raw_backward_values(seed):
    """chunk_backward / parallel_backward called directly vs reference gradients (float64)."""
    from reference import reference_grads
    B, T, H, dk, dv = 2, 23, 3, 7, 6
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=torch.float64)
    ld = random_log_decay(H)
    S0 = make_state(B, H, dk, dv, dtype=torch.float64)
    go = torch.randn(B, T, H, dv, dtype=torch.float64)
    gS = torch.randn(B, H, dk, dv, dtype=torch.float64)
    ref = reference_grads(q, k, v, ld, scale=0.3, initial_state=S0, grad_o=go,
                          grad_final_state=gS)
    ref_nogs = reference_grads(q, k, v, ld, scale=0.3, initial_state=S0, grad_o=go)
    ops = torch.ops.retention
    for name, got, expect in [
        ("chunk", ops.chunk_backward(go, gS, q, k, v, ld, 0.3, 5, S0), ref),
        ("parallel", ops.parallel_backward(go, gS, q, k, v, ld, 0.3, S0), ref),
        ("chunk gS=None", ops.chunk_backward(go, None, q, k, v, ld, 0.3, 5, S0), ref_nogs),
        ("parallel gS=None", ops.parallel_backward(go, None, q, k, v, ld, 0.3, S0), ref_nogs),
    ]:
        for gname, a, e in zip(("dq", "dk", "dv", "dS0"), got, expect):
            assert_close_rel(a, e, TOL[torch.float64], f"{name} {gname}", seed=seed)


def test_meta_tensors():
    B, T, H, dk, dv = 2, 13, 3, 6, 5
    kw = {"device": "meta"}
    q = torch.empty(B, T, H, dk, **kw)
    k = torch.empty(B, T, H, dk, **kw)
    v = torch.empty(B, T, H, dv, **kw)
    ld = torch.empty(H, **kw)
    S0 = torch.empty(B, H, dk, dv, **kw)
    ops = torch.ops.retention
    for o, S in (ops.chunk_forward(q, k, v, ld, 0.5, 4, S0),
                 ops.chunk_forward(q, k, v, ld, 0.5, 4, None),
                 ops.parallel_forward(q, k, v, ld, 0.5, S0),
                 ops.recurrent_forward(q, k, v, ld, 0.5, None)):
        assert o.device.type == "meta" and S.device.type == "meta"
        assert o.shape == (B, T, H, dv) and o.dtype == torch.float32
        assert S.shape == (B, H, dk, dv) and S.dtype == torch.float32
    # half inputs: o half, state fp32
    qh, kh, vh = q.half(), k.half(), v.half()
    o, S = ops.chunk_forward(qh, kh, vh, ld, 0.5, 4, None)
    assert o.dtype == torch.float16 and S.dtype == torch.float32
    go = torch.empty(B, T, H, dv, **kw)
    for res in (ops.chunk_backward(go, S0, q, k, v, ld, 0.5, 4, S0),
                ops.parallel_backward(go, None, q, k, v, ld, 0.5, None)):
        dq, dk_, dv_, dS = res
        assert dq.shape == q.shape and dk_.shape == k.shape and dv_.shape == v.shape
        assert dS.shape == (B, H, dk, dv)
        assert all(t.device.type == "meta" for t in res)
    # recurrent_step on meta: o with the layout of q
    st = torch.empty(B, H, dk, dv, **kw)
    o = ops.recurrent_step(q[:, 0], k[:, 0], v[:, 0], ld, 0.5, st)
    assert o.shape == (B, H, dv) and o.device.type == "meta"
    o = ops.recurrent_step(q[:, :1], k[:, :1], v[:, :1], ld, 0.5, st)
    assert o.shape == (B, 1, H, dv)
    # through the Python API and autograd on meta tensors
    qg = q.clone().requires_grad_()
    o, S = retention.chunk_retention(qg, k, v, ld, output_final_state=True)
    assert o.shape == (B, T, H, dv) and o.device.type == "meta"
    # the meta kernel still validates its arguments
    with pytest.raises(RuntimeError, match="log_decay"):
        ops.chunk_forward(q, k, v, torch.empty(H + 1, **kw), 0.5, 4, None)


def test_torch_compile_fullgraph(seed):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile not available in this torch (Debian 1.13)")
    B, T, H, dk, dv = 2, 33, 2, 8, 5
    q, k, v = make_qkv(B, T, H, dk, dv)
    ld = random_log_decay(H)

    def f(q, k, v):
        o, S = retention.chunk_retention(q, k, v, ld, chunk_size=16, output_final_state=True)
        return o * 2, S

    cf = torch.compile(f, fullgraph=True)
    o, S = cf(q, k, v)
    o_ref, S_ref = retention_quadratic(q, k, v, ld)
    assert_close_rel(o, 2 * o_ref, TOL[torch.float32], "compiled o", seed=seed)
    assert_close_rel(S, S_ref, TOL[torch.float32], "compiled S", seed=seed)


# ----------------------------------------------------------------------------------------------
# Multi-threaded kernels: Debian's torch starts with 1 OpenMP thread here, which would leave the
# at::parallel_for paths untested; force several threads (oversubscription is harmless).


@pytest.fixture
def many_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        yield 4
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_multithreaded_forward_backward(many_threads, dtype, seed):
    from reference import reference_grads
    assert torch.get_num_threads() == many_threads
    B, T, H, dk, dv = 3, 150, 5, 32, 40
    q, k, v = make_qkv(B, T, H, dk, dv, dtype=dtype)
    ld = random_log_decay(H)
    S0 = make_state(B, H, dk, dv)
    go = torch.randn(B, T, H, dv).to(dtype)
    gS = torch.randn(B, H, dk, dv)
    o_ref, S_ref = retention_quadratic(q, k, v, ld, initial_state=S0)
    g_ref = reference_grads(q, k, v, ld, initial_state=S0, grad_o=go, grad_final_state=gS)
    for form in FORM_NAMES:
        leaves = [x.clone().requires_grad_() for x in (q, k, v, S0)]
        o, S = run_form(form, *leaves[:3], ld, initial_state=leaves[3], output_final_state=True)
        assert_close_rel(o, o_ref, TOL[dtype], f"{form} o", seed=seed)
        assert_close_rel(S, S_ref, TOL[dtype], f"{form} S", seed=seed)
        grads = torch.autograd.grad((o, S), leaves, (go, gS))
        for name, a, e in zip(("dq", "dk", "dv", "dS0"), grads, g_ref):
            assert_close_rel(a, e, TOL[dtype], f"{form} {name}", seed=seed)
    # decode with several threads
    state = S0.clone()
    outs = [retention.recurrent_step(q[:, t], k[:, t], v[:, t], ld, state) for t in range(T)]
    assert_close_rel(torch.stack(outs, 1), o_ref, TOL[dtype], "decode o", seed=seed)
    assert_close_rel(state, S_ref, TOL[dtype], "decode state", seed=seed)
