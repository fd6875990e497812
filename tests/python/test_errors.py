"""Argument validation: bad inputs raise RuntimeError whose message names the op and the argument
(wording from csrc/checks.h); non-finite inputs propagate without crashing."""

import pytest
import torch

import retention
from conftest import make_qkv, make_state, random_log_decay

OPS = torch.ops.retention

B, T, H, DK, DV = 2, 5, 3, 4, 6


def good(dtype=torch.float32):
    q, k, v = make_qkv(B, T, H, DK, DV, dtype=dtype)
    return q, k, v, random_log_decay(H), make_state(B, H, DK, DV)


# Each entry calls one op with (q, k, v, ld, S0); the message must start with the op's name.
FORWARDS = {
    "chunk_forward": lambda q, k, v, ld, S0: OPS.chunk_forward(q, k, v, ld, 0.5, 4, S0),
    "parallel_forward": lambda q, k, v, ld, S0: OPS.parallel_forward(q, k, v, ld, 0.5, S0),
    "recurrent_forward": lambda q, k, v, ld, S0: OPS.recurrent_forward(q, k, v, ld, 0.5, S0),
    "chunk_backward": lambda q, k, v, ld, S0: OPS.chunk_backward(
        torch.zeros(B, T, H, DV, dtype=q.dtype), None, q, k, v, ld, 0.5, 4, S0),
    "parallel_backward": lambda q, k, v, ld, S0: OPS.parallel_backward(
        torch.zeros(B, T, H, DV, dtype=q.dtype), None, q, k, v, ld, 0.5, S0),
}
OP_NAMES = list(FORWARDS)


def expect_error(op, args, pattern):
    with pytest.raises(RuntimeError, match=rf"retention::{op}: .*{pattern}"):
        FORWARDS[op](*args)


def test_good_inputs_pass():
    for op in OP_NAMES:
        FORWARDS[op](*good())  # sanity: the fixtures used below are valid


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("which,pattern", [
    ("q", r"q must be 4-D \[B, T, H, dk\], got 3-D"),
    ("k", r"k must be 4-D"),
    ("v", r"v must be 4-D"),
])
def test_wrong_rank(op, which, pattern):
    q, k, v, ld, S0 = good()
    args = {"q": q, "k": k, "v": v}
    args[which] = args[which][:, :, 0]  # drop a dim -> 3-D
    expect_error(op, (args["q"], args["k"], args["v"], ld, S0), pattern)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("what", ["B", "T", "H", "dk_k"])
def test_k_shape_mismatch(op, what):
    q, k, v, ld, S0 = good()
    shape = {"B": (B + 1, T, H, DK), "T": (B, T + 1, H, DK), "H": (B, T, H + 1, DK),
             "dk_k": (B, T, H, DK + 1)}[what]
    expect_error(op, (q, torch.randn(shape), v, ld, S0), r"k must have the shape of q")


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("what", ["B", "T", "H"])
def test_v_shape_mismatch(op, what):
    q, k, v, ld, S0 = good()
    shape = {"B": (B + 1, T, H, DV), "T": (B, T - 1, H, DV), "H": (B, T, H + 1, DV)}[what]
    expect_error(op, (q, k, torch.randn(shape), ld, S0), r"v must be \[B, T, H, dv\]")


@pytest.mark.parametrize("op", OP_NAMES)
def test_dv_mismatch_with_state(op):
    q, k, v, ld, _ = good()
    S0 = make_state(B, H, DK, DV + 1)
    expect_error(op, (q, k, v, ld, S0), r"initial_state must have shape \[B, H, dk, dv\]")


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("shape", [(B, H, DK), (B, H, DV, DK), (B, H + 1, DK, DV),
                                   (B + 1, H, DK, DV), (1, H, DK, DV)])
def test_initial_state_wrong_shape(op, shape):
    q, k, v, ld, _ = good()
    assert DV != DK  # so that the transposed state shape is really wrong
    expect_error(op, (q, k, v, ld, torch.randn(shape)), r"initial_state must have shape")


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16, torch.int32])
def test_initial_state_wrong_dtype(op, sdtype):
    q, k, v, ld, S0 = good()
    expect_error(op, (q, k, v, ld, S0.to(sdtype)), r"initial_state must be float32")


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("which", ["k", "v"])
def test_mismatched_dtypes(op, which):
    q, k, v, ld, S0 = good()
    args = {"q": q, "k": k, "v": v}
    args[which] = args[which].half()
    expect_error(op, (args["q"], args["k"], args["v"], ld, S0),
                 r"q, k and v must have the same dtype")


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_float_dtype(op, dtype):
    q, k, v, ld, S0 = good()
    q, k, v = (x.to(dtype) for x in (q, k, v))
    expect_error(op, (q, k, v, ld, S0), r"q, k and v must be float16, bfloat16, float32 or float64")


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("shape,pattern", [
    ((H + 1,), rf"log_decay must have shape \[H\] = \[{H}\], got \[{H + 1}\]"),
    ((1,), rf"log_decay must have shape \[H\] = \[{H}\], got \[1\]"),
    ((H, 1), r"log_decay must have shape \[H\]"),
    ((), r"log_decay must have shape \[H\]"),
])
def test_log_decay_wrong_shape(op, shape, pattern):
    q, k, v, _, S0 = good()
    expect_error(op, (q, k, v, torch.full(shape, -0.1), S0), pattern)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("ldtype", [torch.float16, torch.int64])
def test_log_decay_wrong_dtype(op, ldtype):
    q, k, v, ld, S0 = good()
    expect_error(op, (q, k, v, ld.to(ldtype), S0), r"log_decay must be float32")


@pytest.mark.parametrize("op", OP_NAMES)
def test_dk_too_large(op):
    q, k, v = make_qkv(1, 3, 2, 257, 4)
    expect_error(op, (q, k, v, random_log_decay(2), None), r"dk .*must be in \[1, 256\], got 257")


@pytest.mark.parametrize("op", OP_NAMES)
def test_dk_zero(op):
    q, k, v = make_qkv(1, 3, 2, 0, 4)
    expect_error(op, (q, k, v, random_log_decay(2), None), r"dk .*must be in \[1, 256\], got 0")


def test_dk_256_allowed():
    q, k, v = make_qkv(1, 3, 2, 256, 4)
    OPS.chunk_forward(q, k, v, random_log_decay(2), 0.5, 2, None)


@pytest.mark.parametrize("chunk_size", [0, -1, -64])
def test_chunk_size_not_positive(chunk_size):
    q, k, v, ld, S0 = good()
    with pytest.raises(RuntimeError, match=rf"retention::chunk_forward: chunk_size must be positive, "
                                           rf"got {chunk_size}"):
        OPS.chunk_forward(q, k, v, ld, 0.5, chunk_size, S0)
    with pytest.raises(RuntimeError, match=r"retention::chunk_backward: chunk_size must be positive"):
        OPS.chunk_backward(torch.zeros(B, T, H, DV), None, q, k, v, ld, 0.5, chunk_size, S0)
    with pytest.raises(RuntimeError, match=r"chunk_size must be positive"):
        retention.chunk_retention(q, k, v, ld, chunk_size=chunk_size)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("which", ["k", "v", "log_decay", "initial_state"])
def test_mixed_devices_meta(op, which):
    """meta vs cpu exercises the device check without a GPU."""
    q, k, v, ld, S0 = good()
    args = {"q": q, "k": k, "v": v, "log_decay": ld, "initial_state": S0}
    args[which] = torch.empty(args[which].shape, dtype=args[which].dtype, device="meta")
    expect_error(op, tuple(args.values()), r"all tensors must be on the same device")


@pytest.mark.parametrize("op", OP_NAMES)
def test_mixed_devices_q_meta(op):
    q, k, v, ld, S0 = good()
    q = torch.empty(q.shape, device="meta")
    expect_error(op, (q, k, v, ld, S0), r"all tensors must be on the same device")


def test_python_api_errors_name_argument():
    q, k, v, ld, S0 = good()
    with pytest.raises(RuntimeError, match=r"retention::parallel_forward: q must be 4-D"):
        retention.parallel_retention(q[0], k, v, ld)
    with pytest.raises(RuntimeError, match=r"retention::recurrent_forward: log_decay must have"):
        retention.recurrent_retention(q, k, v, ld[:1])
    with pytest.raises(RuntimeError, match=r"retention::chunk_forward: initial_state must have"):
        retention.chunk_retention(q, k, v, ld, initial_state=S0[:1])
    # through autograd (requires_grad inputs) the same checks fire
    with pytest.raises(RuntimeError, match=r"retention::chunk_forward: k must have the shape of q"):
        retention.chunk_retention(q.requires_grad_(), k[:, :-1], v, ld)


# ----------------------------------------------------------------------------------------------
# backward-op specific arguments


@pytest.mark.parametrize("op", ["chunk_backward", "parallel_backward"])
def test_backward_grad_o_and_grad_final_state(op):
    q, k, v, ld, S0 = good()

    def call(go, gS):
        if op == "chunk_backward":
            return OPS.chunk_backward(go, gS, q, k, v, ld, 0.5, 4, S0)
        return OPS.parallel_backward(go, gS, q, k, v, ld, 0.5, S0)

    call(torch.zeros(B, T, H, DV), torch.zeros(B, H, DK, DV))  # valid
    with pytest.raises(RuntimeError, match=rf"retention::{op}: grad_o must have shape"):
        call(torch.zeros(B, T, H, DV + 1), None)
    with pytest.raises(RuntimeError, match=rf"retention::{op}: grad_o must have shape"):
        call(torch.zeros(B, T - 1, H, DV), None)
    with pytest.raises(RuntimeError, match=rf"retention::{op}: grad_o must be a float tensor"):
        call(torch.zeros(B, T, H, DV, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match=rf"retention::{op}: grad_final_state must have shape"):
        call(torch.zeros(B, T, H, DV), torch.zeros(B, H, DV, DK))
    with pytest.raises(RuntimeError, match=rf"retention::{op}: all tensors must be on the same"):
        call(torch.empty(B, T, H, DV, device="meta"), None)


# ----------------------------------------------------------------------------------------------
# recurrent_step


def step_args():
    q = torch.randn(B, H, DK)
    k = torch.randn(B, H, DK)
    v = torch.randn(B, H, DV)
    return q, k, v, random_log_decay(H), torch.zeros(B, H, DK, DV)


def test_recurrent_step_state_not_contiguous():
    q, k, v, ld, _ = step_args()
    state = torch.zeros(B, H, DV, DK).transpose(-1, -2)
    assert state.shape == (B, H, DK, DV)
    with pytest.raises(RuntimeError, match=r"retention::recurrent_step: state must be contiguous"):
        retention.recurrent_step(q, k, v, ld, state)


@pytest.mark.parametrize("shape", [(B, H, DK, DV + 1), (B, H, DV, DK), (B, H + 1, DK, DV),
                                   (B, H, DK)])
def test_recurrent_step_state_wrong_shape(shape):
    q, k, v, ld, _ = step_args()
    # the argument is called `state` in recurrent_step: the message must say so
    with pytest.raises(RuntimeError, match=r"retention::recurrent_step: state must have shape"):
        retention.recurrent_step(q, k, v, ld, torch.zeros(shape))


@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16, torch.float64])
def test_recurrent_step_state_wrong_dtype(sdtype):
    q, k, v, ld, state = step_args()
    with pytest.raises(RuntimeError, match=r"retention::recurrent_step: state must be"):
        retention.recurrent_step(q, k, v, ld, state.to(sdtype))


def test_recurrent_step_multi_token_rejected():
    q, k, v, ld, state = step_args()
    q2 = torch.randn(B, 2, H, DK)
    with pytest.raises(RuntimeError,
                       match=r"retention::recurrent_step: q must be \[B, H, d\] or \[B, 1, H, d\]"):
        retention.recurrent_step(q2, k, v, ld, state)
    with pytest.raises(RuntimeError, match=r"retention::recurrent_step: v must be"):
        retention.recurrent_step(q, k, torch.randn(B, 3, H, DV), ld, state)
    with pytest.raises(RuntimeError, match=r"retention::recurrent_step: k must be"):
        retention.recurrent_step(q, torch.randn(B, DK), v, ld, state)


def test_recurrent_step_other_checks():
    q, k, v, ld, state = step_args()
    with pytest.raises(RuntimeError, match=r"retention::recurrent_step: log_decay must have shape"):
        retention.recurrent_step(q, k, v, ld[:2], state)
    with pytest.raises(RuntimeError, match=r"retention::recurrent_step: q, k and v must have the "
                                           r"same dtype"):
        retention.recurrent_step(q, k.double(), v, ld, state)
    with pytest.raises(RuntimeError, match=r"retention::recurrent_step: all tensors must be on the "
                                           r"same device"):
        retention.recurrent_step(q, k, v, ld, torch.empty(state.shape, device="meta"))
    with pytest.raises(RuntimeError, match=r"retention::recurrent_step: k must have the shape"):
        retention.recurrent_step(q, torch.randn(B, H, DK + 1), v, ld, state)
    # nothing was written to the state by the failed calls
    assert torch.equal(state, torch.zeros_like(state))


# ----------------------------------------------------------------------------------------------
# Non-finite inputs propagate, never crash


FORM_FNS = {
    "chunk": lambda q, k, v, ld, **kw: retention.chunk_retention(q, k, v, ld, chunk_size=4, **kw),
    "chunk_big": lambda q, k, v, ld, **kw: retention.chunk_retention(q, k, v, ld, chunk_size=64,
                                                                     **kw),
    "parallel": retention.parallel_retention,
    "recurrent": retention.recurrent_retention,
}


@pytest.mark.parametrize("form", list(FORM_FNS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_non_finite_q(form, bad, dtype):
    Bn, Tn, Hn, dk, dv = 2, 11, 3, 8, 5
    q, k, v = make_qkv(Bn, Tn, Hn, dk, dv, dtype=dtype)
    ld = random_log_decay(Hn)
    S0 = make_state(Bn, Hn, dk, dv)
    b, n, h = 1, 6, 2
    q[b, n, h, 3] = bad
    o, S = FORM_FNS[form](q, k, v, ld, initial_state=S0, output_final_state=True)
    row = o[b, n, h].float()
    # q_n . k_m is +-inf (or nan) for every m, so the whole output row is non-finite; with NaN in q
    # it must be NaN
    assert not torch.isfinite(row).any(), f"affected row should be non-finite, got {row}"
    if bad != bad:
        assert torch.isnan(row).all(), f"NaN in q must give NaN in its output row, got {row}"
    # o_n for every other (b, n, h) and the final state do not depend on q[b, n, h]
    mask = torch.ones(o.shape[:3], dtype=torch.bool)
    mask[b, n, h] = False
    assert torch.isfinite(o[mask].float()).all(), "non-finite value leaked into unaffected outputs"
    assert torch.isfinite(S).all(), "final state does not depend on q"


@pytest.mark.parametrize("form", list(FORM_FNS))
def test_nan_in_k_and_v(form):
    Bn, Tn, Hn, dk, dv = 2, 11, 3, 8, 5
    q, k, v = make_qkv(Bn, Tn, Hn, dk, dv)
    ld = random_log_decay(Hn)
    b, m, h = 0, 5, 1
    k[b, m, h, 0] = float("nan")
    v[1, 3, 2, 4] = float("nan")
    o, S = FORM_FNS[form](q, k, v, ld, output_final_state=True)
    # every output at or after the bad token in that (b, h) depends on it
    assert torch.isnan(o[b, m:, h]).all()
    # S = sum_m g^(T-1-m) k_m^T v_m: NaN in k_m[0] poisons row 0, NaN in v_m[4] column 4
    assert torch.isnan(S[b, h, 0]).all() and torch.isfinite(S[b, h, 1:]).all()
    assert torch.isnan(o[1, 3:, 2, 4]).all() and torch.isnan(S[1, 2, :, 4]).all()
    assert torch.isfinite(S[1, 2, :, :4]).all()
    # independent (b, h) pairs stay finite
    assert torch.isfinite(o[0, :, 0]).all() and torch.isfinite(o[1, :, 0]).all()
    assert torch.isfinite(o[0, :, 2]).all() and torch.isfinite(o[1, :, 1]).all()
    assert torch.isfinite(S[0, 0]).all() and torch.isfinite(S[1, 1]).all()
    # v column 4 only: other value columns of that (b, h) are untouched
    assert torch.isfinite(o[1, :, 2, :4]).all()


def test_nan_recurrent_step():
    q, k, v, ld, state = step_args()
    q[0, 1, 2] = float("nan")
    o = retention.recurrent_step(q, k, v, ld, state)
    assert torch.isnan(o[0, 1]).all()
    mask = torch.ones(B, H, dtype=torch.bool)
    mask[0, 1] = False
    assert torch.isfinite(o[mask]).all() and torch.isfinite(state).all()
    v[1, 0, 0] = float("nan")
    retention.recurrent_step(torch.randn(B, H, DK), k, v, ld, state)
    assert torch.isnan(state[1, 0, :, 0]).all() and torch.isfinite(state[0]).all()


def test_nan_backward_no_crash():
    q, k, v = make_qkv(1, 9, 2, 4, 3)
    q[0, 4, 1, 0] = float("nan")
    ql = q.clone().requires_grad_()
    o = retention.chunk_retention(ql, k, v, random_log_decay(2), chunk_size=4)
    o.sum().backward()
    # dq_n = scale * sum_m g^(n-m) (do_n . v_m) k_m does not involve q: it stays finite
    assert torch.isfinite(ql.grad).all()
