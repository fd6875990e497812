"""Bad-input matrix: every op and the layer against every kind of bad argument.

Each row of CASES breaks one argument of an otherwise valid call and names the message that must
come back; the matrix runs it against every op the argument exists for.  Every message starts
with the op's name ("retention::<op>: ") and names the argument and what was expected (wording from
csrc/checks.h).  Then: values that must pass (gamma == 1, gamma == 0), NaN/Inf propagation in the
fused op, element counts beyond int32, T beyond memory, and the layer's state handling.
"""
import re

import pytest
import torch

import retention
from conftest import make_qkv, make_state, random_log_decay
from retention.nn import MultiScaleRetention, RetentionState, RetNet

OPS = torch.ops.retention
B, T, H, DK, DV = 2, 5, 3, 4, 6
STEP_OPS = ("recurrent_step", "msr_step")
MSR_OPS = ("msr_forward", "msr_backward", "msr_step")
BACKWARD_OPS = ("chunk_backward", "parallel_backward", "msr_backward")
CHUNK_OPS = ("chunk_forward", "chunk_backward", "msr_forward", "msr_backward")


def valid(op, dtype=torch.float32):
    """Valid arguments of `op` (step ops: one token, [B, H, d])."""
    q, k, v = make_qkv(B, T, H, DK, DV, dtype=dtype)
    a = dict(q=q, k=k, v=v, g=torch.randn(B, T, H, DV, dtype=dtype), log_decay=random_log_decay(H),
             state=make_state(B, H, DK, DV), offsets=torch.tensor([3, 0]),
             norm_weight=torch.rand(DV) + 0.5, grad_o=torch.randn(B, T, H, DV, dtype=dtype),
             grad_state=make_state(B, H, DK, DV), chunk_size=2)
    if op in STEP_OPS:
        for n in ("q", "k", "v", "g"):
            a[n] = a[n][:, 0].contiguous()
    return a


def _msr_tail(a):
    return (a["offsets"], None, 1, True, a["norm_weight"], 1e-6, True)


CALLS = {
    "chunk_forward": lambda a: OPS.chunk_forward(a["q"], a["k"], a["v"], a["log_decay"], 0.5,
                                                 a["chunk_size"], a["state"]),
    "chunk_backward": lambda a: OPS.chunk_backward(a["grad_o"], a["grad_state"], a["q"], a["k"],
                                                   a["v"], a["log_decay"], 0.5, a["chunk_size"],
                                                   a["state"]),
    "parallel_forward": lambda a: OPS.parallel_forward(a["q"], a["k"], a["v"], a["log_decay"], 0.5,
                                                       a["state"]),
    "parallel_backward": lambda a: OPS.parallel_backward(a["grad_o"], a["grad_state"], a["q"],
                                                         a["k"], a["v"], a["log_decay"], 0.5,
                                                         a["state"]),
    "recurrent_forward": lambda a: OPS.recurrent_forward(a["q"], a["k"], a["v"], a["log_decay"],
                                                         0.5, a["state"]),
    "recurrent_step": lambda a: OPS.recurrent_step(a["q"], a["k"], a["v"], a["log_decay"], 0.5,
                                                   a["state"]),
    "msr_forward": lambda a: OPS.msr_forward(a["q"], a["k"], a["v"], a["g"], a["log_decay"], 0.5,
                                             0, a["chunk_size"], a["state"], *_msr_tail(a)),
    "msr_backward": lambda a: OPS.msr_backward(a["grad_o"], a["grad_state"], a["q"], a["k"],
                                               a["v"], a["g"], a["log_decay"], 0.5,
                                               a["chunk_size"], a["state"], *_msr_tail(a)),
    "msr_step": lambda a: OPS.msr_step(a["q"], a["k"], a["v"], a["g"], a["log_decay"], 0.5,
                                       a["state"], a["offsets"], 1, True, a["norm_weight"], 1e-6,
                                       True),
}
ALL_OPS = tuple(CALLS)


def resized(x, dim, by=1, dtype=None):
    shape = list(x.shape)
    shape[dim] += by
    return torch.randn(shape, dtype=dtype or x.dtype)


def meta(x):
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def alias_of_state(a, name):
    """`name` becomes a view into the state's memory (same shape and dtype as before)."""
    a[name] = a["state"].view(-1)[:a[name].numel()].view(a[name].shape)


def _set(name, fn):
    def mutate(a, op):
        a[name] = fn(a[name], op)
    return mutate


def _seq(op):  # time dim present
    return op not in STEP_OPS


# (id, ops it applies to, mutation(a, op), message regex; may be a function of op)
RANK = lambda name: (lambda op: rf"{name} must be \[B, H, d\] or \[B, 1, H, d\]" if op in STEP_OPS
                     else rf"{name} must be 4-D")
CASES = [
    ("q_rank", ALL_OPS, _set("q", lambda x, op: x[..., 0]), RANK("q")),
    ("k_rank", ALL_OPS, _set("k", lambda x, op: x[..., 0]), RANK("k")),
    ("v_rank", ALL_OPS, _set("v", lambda x, op: x[..., 0]), RANK("v")),
    ("q_5d", ALL_OPS, _set("q", lambda x, op: x[None]), RANK("q")),
    ("k_B", ALL_OPS, _set("k", lambda x, op: resized(x, 0)), "k must have the shape of q"),
    ("k_T", [o for o in ALL_OPS if _seq(o)], _set("k", lambda x, op: resized(x, 1)),
     "k must have the shape of q"),
    ("k_H", ALL_OPS, _set("k", lambda x, op: resized(x, -2)), "k must have the shape of q"),
    ("k_dk", ALL_OPS, _set("k", lambda x, op: resized(x, -1)), "k must have the shape of q"),
    ("v_B", ALL_OPS, _set("v", lambda x, op: resized(x, 0)), r"v must be \[B, T, H, dv\]"),
    ("v_T", [o for o in ALL_OPS if _seq(o)], _set("v", lambda x, op: resized(x, 1)),
     r"v must be \[B, T, H, dv\]"),
    ("v_H", ALL_OPS, _set("v", lambda x, op: resized(x, -2)), r"v must be \[B, T, H, dv\]"),
    ("g_dv", MSR_OPS, _set("g", lambda x, op: resized(x, -1)), "g must have the shape of v"),
    ("g_H", MSR_OPS, _set("g", lambda x, op: resized(x, -2)), "g must have the shape of v"),
    ("g_T", ("msr_forward", "msr_backward"), _set("g", lambda x, op: resized(x, 1)),
     "g must have the shape of v"),
    ("state_B", ALL_OPS, _set("state", lambda x, op: resized(x, 0)), "state must have shape"),
    ("state_H", ALL_OPS, _set("state", lambda x, op: resized(x, 1)), "state must have shape"),
    ("state_dk", ALL_OPS, _set("state", lambda x, op: resized(x, 2)), "state must have shape"),
    ("state_dv", ALL_OPS, _set("state", lambda x, op: resized(x, 3)), "state must have shape"),
    ("state_3d", ALL_OPS, _set("state", lambda x, op: x[0]), "state must have shape"),
    ("state_f16", ALL_OPS, _set("state", lambda x, op: x.half()), "state must be float32"),
    ("state_f64_for_f32", STEP_OPS, _set("state", lambda x, op: x.double()),
     "state must be Float for Float inputs"),
    ("state_not_contiguous", STEP_OPS,
     _set("state", lambda x, op: x.transpose(2, 3).contiguous().transpose(2, 3)),
     "state must be contiguous"),
    ("grad_o_shape", BACKWARD_OPS, _set("grad_o", lambda x, op: resized(x, -1)),
     r"grad_[oy] must have shape \[B, T, H, dv\]"),
    ("grad_o_int", BACKWARD_OPS, _set("grad_o", lambda x, op: x.long()),
     r"grad_[oy] must be a float tensor"),
    ("grad_state_shape", BACKWARD_OPS, _set("grad_state", lambda x, op: resized(x, 2)),
     "grad_final_state must have shape"),
    ("log_decay_len", ALL_OPS, _set("log_decay", lambda x, op: resized(x, 0)),
     r"log_decay must have shape \[H\] = \[3\]"),
    ("log_decay_2d", ALL_OPS, _set("log_decay", lambda x, op: x[None]), r"log_decay must have shape"),
    ("log_decay_f16", ALL_OPS, _set("log_decay", lambda x, op: x.half()),
     "log_decay must be float32"),
    ("gamma_gt_1", ALL_OPS, _set("log_decay", lambda x, op: x.index_fill(0, torch.tensor([1]), 1e-3)),
     r"log_decay must be <= 0 .*got log_decay\[1\] = 0.001"),
    ("gamma_nan", ALL_OPS, _set("log_decay", lambda x, op: x.index_fill(0, torch.tensor([2]), float("nan"))),
     r"log_decay must be <= 0 and not NaN .*got log_decay\[2\] = nan"),
    ("gamma_inf", ALL_OPS, _set("log_decay", lambda x, op: x.index_fill(0, torch.tensor([0]), float("inf"))),
     r"log_decay must be <= 0 .*= inf"),
    ("log_decay_f64_gamma_gt_1", ALL_OPS, _set("log_decay", lambda x, op: x.double().abs()),
     r"log_decay must be <= 0"),
    ("norm_weight_shape", MSR_OPS, _set("norm_weight", lambda x, op: resized(x, 0)),
     r"norm_weight must have shape \[dv\] = \[6\]"),
    ("norm_weight_int", MSR_OPS, _set("norm_weight", lambda x, op: x.long()),
     "norm_weight must be a float tensor"),
    ("offsets_negative", MSR_OPS, _set("offsets", lambda x, op: torch.tensor([4, -2])),
     "offsets must be non-negative positions, got a minimum of -2"),
    ("offsets_len", MSR_OPS, _set("offsets", lambda x, op: torch.tensor([1, 2, 3])),
     r"offsets must be 1-D \[N\] = \[2\]"),
    ("offsets_float", MSR_OPS, _set("offsets", lambda x, op: x.double()), "offsets must be int64"),
    ("k_f64", ALL_OPS, _set("k", lambda x, op: x.double()), "q, k and v must have the same dtype"),
    ("v_f16", ALL_OPS, _set("v", lambda x, op: x.half()), "q, k and v must have the same dtype"),
    ("g_f64", MSR_OPS, _set("g", lambda x, op: x.double()), "g must have the dtype of q"),
    ("q_int", ALL_OPS, _set("q", lambda x, op: x.long()),
     "q, k and v must be float16, bfloat16, float32 or float64"),
    ("all_int", ALL_OPS, lambda a, op: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()),
     "q, k and v must be float16, bfloat16, float32 or float64"),
    ("dk_257", ALL_OPS, lambda a, op: a.update(q=resized(a["q"], -1, 253), k=resized(a["k"], -1, 253)),
     r"dk \(last dim of q and k\) must be in \[1, 256\], got 257"),
    ("chunk_size_0", CHUNK_OPS, _set("chunk_size", lambda x, op: 0), "chunk_size must be positive"),
    ("chunk_size_negative", CHUNK_OPS, _set("chunk_size", lambda x, op: -64),
     "chunk_size must be positive"),
    # mixed devices: meta stands in for a second device (no GPU needed)
    ("k_device", ALL_OPS, _set("k", lambda x, op: meta(x)), "all tensors must be on the same device"),
    ("v_device", ALL_OPS, _set("v", lambda x, op: meta(x)), "all tensors must be on the same device"),
    ("log_decay_device", ALL_OPS, _set("log_decay", lambda x, op: meta(x)),
     "all tensors must be on the same device"),
    ("state_device", ALL_OPS, _set("state", lambda x, op: meta(x)),
     "all tensors must be on the same device"),
    ("offsets_device", ("msr_forward", "msr_backward"), _set("offsets", lambda x, op: meta(x)),
     "offsets must be on the device of q"),
    ("norm_weight_device", ("msr_forward", "msr_backward"), _set("norm_weight", lambda x, op: meta(x)),
     "norm_weight must be on the device of q"),
    ("g_device", ("msr_forward", "msr_backward"), _set("g", lambda x, op: meta(x)),
     "all tensors must be on the same device"),
    # the in-place ops refuse inputs that share memory with the state they write
    ("state_aliases_q", STEP_OPS, lambda a, op: alias_of_state(a, "q"),
     r"state \(updated in place\) must not share memory with q"),
    ("state_aliases_k", STEP_OPS, lambda a, op: alias_of_state(a, "k"),
     r"state \(updated in place\) must not share memory with k"),
    ("state_aliases_v", STEP_OPS, lambda a, op: alias_of_state(a, "v"),
     r"state \(updated in place\) must not share memory with v"),
    ("state_aliases_g", ("msr_step",), lambda a, op: alias_of_state(a, "g"),
     r"state \(updated in place\) must not share memory with g"),
    ("state_aliases_norm_weight", ("msr_step",), lambda a, op: alias_of_state(a, "norm_weight"),
     r"state \(updated in place\) must not share memory with norm_weight"),
    ("state_aliases_log_decay", STEP_OPS,
     lambda a, op: a.update(log_decay=a["state"].view(-1)[:H].fill_(-0.1)),
     r"state \(updated in place\) must not share memory with log_decay"),
]
MATRIX = [pytest.param(op, mutate, pattern, id=f"{cid}-{op}")
          for cid, ops, mutate, pattern in CASES for op in ops]


def test_valid_arguments_pass():
    for op in ALL_OPS:
        CALLS[op](valid(op))  # every row of the matrix breaks exactly one thing of these


@pytest.mark.parametrize("op,mutate,pattern", MATRIX)
def test_bad_input(op, mutate, pattern):
    a = valid(op)
    mutate(a, op)
    pattern = pattern(op) if callable(pattern) else pattern
    with pytest.raises(RuntimeError, match=rf"retention::{op}: .*{pattern}"):
        CALLS[op](a)


@pytest.mark.parametrize("op", STEP_OPS)
def test_refused_step_leaves_state_unchanged(op):
    for cid, ops, mutate, _ in CASES:
        if op not in ops or (cid.startswith("state_") and not cid.startswith("state_aliases")):
            continue  # (those replace the state itself)
        a = valid(op)
        mutate(a, op)
        before = a["state"].clone()
        with pytest.raises(RuntimeError):
            CALLS[op](a)
        assert torch.equal(a["state"], before), f"{cid}: a refused {op} modified the state"


# ----------------------------------------------------------------------------------------------
# Values that are valid: gamma == 1 (no decay) and gamma == 0 (only the current token)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("log_gamma", [0.0, float("-inf"), -0.0])
def test_decay_edges_are_valid_and_finite(op, log_gamma):
    a = valid(op)
    a["log_decay"] = torch.full((H,), log_gamma)
    out = CALLS[op](a)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for x in outs:
        if x is not None and x.numel():
            assert torch.isfinite(x).all(), f"{op}: non-finite output for log_decay = {log_gamma}"
    if op in STEP_OPS:
        assert torch.isfinite(a["state"]).all()


# ----------------------------------------------------------------------------------------------
# NaN / Inf in the fused op: propagate into exactly the rows that depend on them, never crash


@pytest.mark.parametrize("form", [0, 1, 2], ids=["chunk", "parallel", "recurrent"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_msr_non_finite_q_stays_in_its_row(form, bad):
    a = valid("msr_forward")
    b, n, h = 1, 3, 2
    a["q"][b, n, h, 1] = bad
    y, S = OPS.msr_forward(a["q"], a["k"], a["v"], a["g"], a["log_decay"], 0.5, form, 2, a["state"],
                           *_msr_tail(a))
    assert not torch.isfinite(y[b, n, h]).all()
    mask = torch.ones(B, T, H, dtype=torch.bool)
    mask[b, n, h] = False
    assert torch.isfinite(y[mask]).all() and torch.isfinite(S).all()


def test_msr_step_and_backward_nan_no_crash():
    a = valid("msr_step")
    a["v"][0, 1, 2] = float("nan")
    y = CALLS["msr_step"](a)
    assert torch.isnan(y[0, 1]).all() and torch.isfinite(y[1]).all()  # RMSNorm spreads it over dv
    assert torch.isnan(a["state"][0, 1, :, 2]).all() and torch.isfinite(a["state"][1]).all()
    a = valid("msr_backward")
    a["grad_o"][1, 2, 0, 0] = float("inf")
    dq = CALLS["msr_backward"](a)[0]
    assert torch.isfinite(dq[0]).all()  # batch row 0 does not see the bad cotangent


# ----------------------------------------------------------------------------------------------
# Sizes: element counts beyond int32 (64-bit indexing), T beyond memory (clear allocation error)


def _available_gib():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2 ** 20


def test_element_count_beyond_int32_uses_64bit_indexing():
    """The output [1, T, 1, 512] has 2^31 + 512 elements, so the offsets of its last rows do not
    fit in int32 (q, k, v are expanded: stride 0 over T, no memory).  The same token repeated has
    a closed form, o_n = (q.k) v (1 - g^(n+1)) / (1 - g), checked at rows below and above 2^31."""
    need = 2 ** 32 / 2 ** 30 + 1.0  # the bfloat16 output (4 GiB) and some slack
    if _available_gib() < need + 2.0:
        pytest.skip(f"needs {need:.0f} GiB of free memory for an output of 2^31 elements, "
                    f"{_available_gib():.1f} GiB available")
    Tn, dv = 2 ** 22 + 1, 512
    qk = torch.tensor([0.75], dtype=torch.bfloat16)
    vt = torch.randn(dv).to(torch.bfloat16)
    q = qk.view(1, 1, 1, 1).expand(1, Tn, 1, 1)
    v = vt.view(1, 1, 1, dv).expand(1, Tn, 1, dv)
    ld = torch.tensor([-1e-2])
    o, S = OPS.recurrent_forward(q, q, v, ld, 1.0, None)
    assert o.numel() > 2 ** 31
    g = float(torch.exp(ld.double()))
    for n in (0, 1, 2 ** 21, Tn - 2, Tn - 1):  # rows Tn - 2, Tn - 1 start beyond 2^31 elements
        want = 0.75 ** 2 * vt.double() * (1 - g ** (n + 1)) / (1 - g)
        # bfloat16 output rounding (2^-8 relative) and the fp32 scan (see below) bound the error
        torch.testing.assert_close(o[0, n, 0].double(), want, rtol=2 ** -8, atol=0.0)
    # The same input every step makes the fp32 rounding of S <- g S + k v systematic: an error of
    # ~u|S| per step (u = 2^-24) accumulates to ~u|S|/(1 - g) at the fixed point; 8x that.
    S_want = 0.75 * vt.double()[None] / (1 - g)
    torch.testing.assert_close(S[0, 0].double(), S_want, rtol=8 * 2.0 ** -24 / (1 - g), atol=0.0)
    del o


@pytest.mark.parametrize("op", ["chunk_forward", "parallel_forward", "recurrent_forward",
                                "msr_forward", "chunk_backward", "msr_backward"])
def test_T_beyond_memory_is_a_clear_allocation_error(op):
    Tn = 2 ** 42  # the output alone would need 2^42 * 6 * 4 bytes = 96 TiB
    a = valid(op)
    for n in ("q", "k", "v", "g", "grad_o"):
        x = a[n][:, :1]
        a[n] = x.expand(x.shape[0], Tn, *x.shape[2:])
    with pytest.raises(RuntimeError, match=r"(?i)(can't allocate memory|out of memory|allocat)"):
        CALLS[op](a)


# ----------------------------------------------------------------------------------------------
# The layer: bad shapes and states from another configuration


def _layer(**kw):
    cfg = dict(embed_dim=16, value_dim=24, num_heads=2)
    cfg.update(kw)
    return MultiScaleRetention(**cfg)


@pytest.mark.parametrize("other,pattern", [
    (dict(num_heads=4), r"state has shape \[2, 4, 4, 6\], expected \[N, H, dk, dv\] = \[2, 2, 8, 12\]"),
    (dict(value_dim=32), r"state has shape \[2, 2, 8, 16\], expected"),
    (dict(embed_dim=32, value_dim=24), r"state has shape \[2, 2, 16, 12\], expected"),
])
def test_layer_refuses_state_of_another_configuration(other, pattern):
    layer, foreign = _layer(), _layer(**other)
    x = torch.randn(2, 3, 16)
    x_other = torch.randn(2, 3, foreign.embed_dim)
    _, st = foreign(x_other)
    for call in (lambda s: layer(x, state=s), lambda s: layer.step(x[:, 0], s)):
        before = st.clone()
        with pytest.raises(ValueError, match=pattern):
            call(st)
        assert torch.equal(st.state, before.state) and st.offset == before.offset


def test_layer_refuses_wrong_batch_dtype_and_offsets():
    layer = _layer()
    x = torch.randn(2, 3, 16)
    _, st = layer(x)
    with pytest.raises(ValueError, match=r"state has shape \[2, 2, 8, 12\], expected .* = \[3, 2, 8, 12\]"):
        layer.step(torch.randn(3, 16), st)
    st64 = RetentionState(st.state.double(), st.offset)
    with pytest.raises(ValueError, match="state has dtype torch.float64, expected torch.float32"):
        layer.step(x[:, 0], st64)
    with pytest.raises(ValueError, match="x_t must have shape"):
        layer.step(torch.randn(2, 17), st)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 3, 17))
    with pytest.raises(ValueError, match="offset must be a non-negative position"):
        RetentionState(st.state, -1)
    with pytest.raises(ValueError, match="offsets must be integer positions"):
        RetentionState(st.state, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"state must be a float32/float64 tensor \[N, H, dk, dv\]"):
        RetentionState(st.state[0], 0)
    with pytest.raises(TypeError, match="state must be a RetentionState"):
        layer(x, state=st.state)
    # a negative per-sequence position is refused by the op, before the state is touched
    bad = RetentionState(st.state.clone(), torch.tensor([3, -1]))
    before = bad.state.clone()
    with pytest.raises(RuntimeError, match=r"retention::msr_step: offsets must be non-negative"):
        layer.step(x[:, 0], bad)
    assert torch.equal(bad.state, before) and bad.offset.tolist() == [3, -1]


def test_retnet_step_refused_midway_leaves_every_layer_unchanged():
    torch.manual_seed(0)
    lm = RetNet(vocab_size=11, embed_dim=16, value_dim=24, num_heads=2, num_layers=3, ffn_dim=32)
    _, state = lm(torch.randint(0, 11, (2, 5)))
    # the last layer's state comes from another configuration
    state.layers[2] = RetentionState(torch.zeros(2, 2, 8, 13), state.layers[2].offset)
    before = [(s.state.clone(), s.offset) for s in state.layers]
    with pytest.raises(ValueError, match="state has shape"):
        lm.step(torch.randint(0, 11, (2,)), state)
    for (S, off), s in zip(before, state.layers):
        assert torch.equal(S, s.state) and off == s.offset


def test_state_clone_and_reorder_keep_offsets_consistent():
    layer = _layer()
    x = torch.randn(3, 4, 16)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    _, st = layer(x, attention_mask=mask)
    assert st.offset.tolist() == [4, 2, 3]
    c = st.clone()
    c.advance(1)
    c.state.add_(1.0)
    assert st.offset.tolist() == [4, 2, 3] and c.offset.tolist() == [5, 3, 4]
    assert not torch.equal(c.state, st.state)
    idx = torch.tensor([2, 2, 0])
    r = st.clone().reorder(idx)
    assert r.offset.tolist() == [3, 3, 4]
    assert torch.equal(r.state, st.state.index_select(0, idx))
    # a reordered state decodes exactly like the selected sequences decoded on their own
    x_t = torch.randn(3, 16)
    y_r, _ = layer.step(x_t, r)
    y_0, _ = layer.step(x_t[2:3], RetentionState(st.state[0:1].clone(), st.offset[0:1].clone()))
    torch.testing.assert_close(y_r[2], y_0[0])  # (batch 3 vs 1: the projections may round differently)
    # a bad index is refused without touching the state
    r2 = st.clone()
    with pytest.raises((IndexError, RuntimeError)):
        r2.reorder(torch.tensor([5]))
    assert torch.equal(r2.state, st.state) and r2.offset.tolist() == [4, 2, 3]
    # an int offset stays an int through clone and reorder
    _, s_int = layer(x)
    assert s_int.clone().reorder(torch.tensor([1, 0])).offset == 4
