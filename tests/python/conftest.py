"""Shared pytest fixtures and helpers for the retention test-suite.

* Every test gets a fresh random seed (drawn from os.urandom) applied to torch's global RNG; the
  seed is printed (pytest shows captured stdout of failing tests) and attached to the failure
  report, so any failure can be replayed with  RETENTION_TEST_SEED=<seed> pytest ...
* ``device`` fixture: parametrised over 'cpu' and 'cuda'; the CUDA cases skip cleanly when no GPU
  is present (they run on the GPU machines).  CPU cases are never skipped.
* Tolerances are error ratios  RMS(actual - ref) / RMS(ref)  against a float64 reference computed
  from the *same* (already rounded) inputs, see TOL below for the per-dtype justification.
"""

import math
import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_PYDIR = os.path.normpath(os.path.join(_HERE, "..", "..", "python"))
# RETENTION_TEST_INSTALLED=1: test the installed package (pip install), not the source tree.
if _PYDIR not in sys.path and os.environ.get("RETENTION_TEST_INSTALLED") != "1":
    sys.path.insert(0, _PYDIR)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


# --------------------------------------------------------------------------------------------
# Seeds


def _draw_seed():
    env = os.environ.get("RETENTION_TEST_SEED")
    if env:
        return int(env)
    return int.from_bytes(os.urandom(4), "little")


@pytest.fixture(autouse=True)
def seed(request):
    """Fresh random seed per test, recorded for reproduction."""
    s = _draw_seed()
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    print(f"[retention-test] seed={s} (replay: RETENTION_TEST_SEED={s})")
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for key, val in item.user_properties:
            if key == "seed":
                rep.sections.append(("retention seed", f"RETENTION_TEST_SEED={val}"))


# --------------------------------------------------------------------------------------------
# Devices

DEVICES = ["cpu", "cuda"]


def _skip_if_unavailable(dev):
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available (these cases run on the GPU machines)")


@pytest.fixture(params=DEVICES)
def device(request):
    _skip_if_unavailable(request.param)
    return request.param


# --------------------------------------------------------------------------------------------
# Tolerances
#
# Error ratio  RMS(actual - ref) / RMS(ref), with ref computed in float64 from the rounded inputs:
#  * float64: the library computes in double, so differences come from summation order and
#    exp/pow implementations only: ~1e-15 per op, growing like sqrt(#terms) -> 1e-10 leaves
#    orders of magnitude of head-room while still catching any fp32 shortcut (~1e-7).
#  * float32: fp32 accumulation (eps 6e-8) over dk <= 256 products and up to ~1000 decayed
#    tokens gives ~1e-6 relative RMS error; 1e-5 is the contract tolerance.
#  * float16: inputs are already rounded (the reference uses the rounded values), states and
#    scores accumulate in fp32, output is rounded once to fp16 (unit roundoff 2^-11 = 4.9e-4,
#    RMS rounding error ~ 2^-11/sqrt(3) = 2.8e-4 relative); kernels that keep per-chunk
#    intermediates in fp16 (as FLA does) add a few such roundings -> 5e-3 (FLA's own test bound).
#  * bfloat16: same reasoning with unit roundoff 2^-8 = 3.9e-3 (RMS ~2.3e-3 for one rounding)
#    -> 2e-2.
# MAX_FACTOR: in addition, the worst element must satisfy |diff| <= MAX_FACTOR * tol * RMS(ref):
# a single rounding of an element of magnitude ~5 RMS (tail of a Gaussian over 1e5..1e6
# elements) is 5x the RMS-level error, plus accumulation; 20 leaves head-room while a single
# wrong row/token among thousands (which barely moves the RMS) is still caught.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}
MAX_FACTOR = 20.0

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def tol_for(dtype):
    return TOL[dtype]


def rms(x):
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if x.numel() == 0:
        return 0.0
    return math.sqrt(float((x * x).mean()))


def assert_close_rel(actual, expected, tol, name="tensor", max_factor=MAX_FACTOR, seed=None,
                     term_rms=None, amplification=None):
    """RMS(actual-expected)/RMS(expected) <= tol and max|diff| <= max_factor*tol*RMS(expected).

    term_rms (optional, same shape): the natural error scale of each element, sqrt(sum of its
    squared summands) (reference.retention_term_rms).  The scale used is then
    max(RMS(expected), RMS(term_rms)): identical for random inputs, but a result that cancels to
    nearly zero (a single q.k ~ 0 at T=1 scales every element) is judged against the magnitude
    of what was summed, which is what fp rounding is proportional to.

    amplification (optional, broadcastable to the shape, >= 1): how much more than an ordinary
    element the computation amplifies the rounding of each element (a normalised row whose terms
    cancel, see test_msr.msr_norm_amplification).  Each difference is divided by it before both
    checks, i.e. that element alone is judged against RMS(expected) * amplification; where it is
    1 the check is unchanged.
    """
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    if e.numel() == 0:
        return
    assert torch.isfinite(e).all(), f"{name}: reference is not finite (test bug)"
    n_bad = int((~torch.isfinite(a)).sum())
    assert n_bad == 0, f"{name}: {n_bad} non-finite values out of {a.numel()} (seed={seed})"
    ref_rms = rms(e)
    if term_rms is not None:
        assert tuple(term_rms.shape) == tuple(expected.shape), f"{name}: term_rms shape"
        ref_rms = max(ref_rms, rms(term_rms))
    diff = a - e
    if amplification is not None:
        amp = amplification.detach().to(device="cpu", dtype=torch.float64)
        assert bool((amp >= 1.0).all()), f"{name}: amplification must be >= 1"
        diff = diff / amp
    if ref_rms == 0.0:
        assert float(diff.abs().max()) == 0.0, f"{name}: expected exact zeros, got {diff.abs().max()}"
        return
    err = rms(diff) / ref_rms
    max_err = float(diff.abs().max()) / ref_rms
    where = tuple(int(i) for i in torch.nonzero(diff.abs() == diff.abs().max())[0])
    assert err <= tol, (
        f"{name}: RMS error ratio {err:.3e} > tol {tol:.1e} (max |diff|/RMS = {max_err:.3e} at "
        f"{where}, RMS(ref) = {ref_rms:.3e}, seed={seed})")
    assert max_err <= max_factor * tol, (
        f"{name}: max |diff|/RMS(ref) = {max_err:.3e} at {where} > {max_factor}*tol = "
        f"{max_factor * tol:.1e} (RMS error ratio {err:.3e}, seed={seed})")


# --------------------------------------------------------------------------------------------
# Inputs


def random_log_decay(H, device="cpu", dtype=torch.float32):
    """Random per-head decays gamma in [0.8, 0.999]: log_decay <= 0, fp32 by default."""
    g = 0.8 + 0.199 * torch.rand(H, dtype=torch.float64)
    return torch.log(g).to(device=device, dtype=dtype)


def make_qkv(B, T, H, dk, dv, dtype=torch.float32, device="cpu", layout="contiguous"):
    """Random q, k, v in [B, T, H, d] layout.

    layout='contiguous': plain tensors.
    layout='strided':   q is the transpose of a contiguous [B, H, T, dk] tensor, k is a slice of
                         the last dim of a wider tensor, v takes every other time step.
    """
    if layout == "contiguous":
        q = torch.randn(B, T, H, dk, dtype=dtype, device=device)
        k = torch.randn(B, T, H, dk, dtype=dtype, device=device)
        v = torch.randn(B, T, H, dv, dtype=dtype, device=device)
    elif layout == "strided":
        q = torch.randn(B, H, T, dk, dtype=dtype, device=device).transpose(1, 2)
        k = torch.randn(B, T, H, dk + 7, dtype=dtype, device=device)[..., 3:3 + dk]
        v = torch.randn(B, 2 * T, H, dv, dtype=dtype, device=device)[:, ::2]
        if T > 1 and H > 1:
            assert not q.is_contiguous() and not v.is_contiguous()
        if dk > 0:
            assert not k.is_contiguous()
    else:
        raise ValueError(layout)
    return q, k, v


def make_state(B, H, dk, dv, dtype=torch.float32, device="cpu"):
    return torch.randn(B, H, dk, dv, dtype=dtype, device=device)


def state_dtype_for(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32
