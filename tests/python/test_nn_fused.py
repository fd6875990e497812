"""retention.nn on the fused op: equal to the unfused composition, packed / padded batches that
never mix sequences, decoding sequences at different positions, beam reordering."""
import pytest
import torch

from conftest import TOL, assert_close_rel
from retention.nn import MultiScaleRetention, RetentionState, RetNet

D, DV, H = 32, 48, 4
FORMS = ["chunk", "parallel", "recurrent"]


def make_pair(dtype, chunk_size=16, **kw):
    torch.manual_seed(0)
    fused = MultiScaleRetention(D, DV, H, chunk_size=chunk_size, **kw)
    unfused = MultiScaleRetention(D, DV, H, chunk_size=chunk_size, fused=False, **kw)
    unfused.load_state_dict(fused.state_dict(), strict=True)
    assert fused.fused and not unfused.fused
    return fused.to(dtype), unfused.to(dtype)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
def test_fused_equals_unfused(form, dtype, seed):
    fused, unfused = make_pair(dtype)
    x = torch.randn(2, 37, D, dtype=dtype)
    y1, s1 = fused(x, form=form)
    y2, s2 = unfused(x, form=form)
    # the unfused path rounds the rotated q/k and the normalised output to the input dtype
    # once each; the fused one keeps them in fp32: a few roundings of the input dtype apart.
    tol = TOL[torch.float64] if dtype == torch.float64 else 2 * TOL[dtype]
    assert_close_rel(y1, y2, tol, f"{form} out", seed=seed)
    assert_close_rel(s1.state, s2.state, tol if dtype != torch.bfloat16 else TOL[torch.bfloat16],
                     f"{form} state", seed=seed)
    # continuing from a state (absolute positions resume at the offset)
    x2 = torch.randn(2, 9, D, dtype=dtype)
    assert_close_rel(fused(x2, form=form, state=s1)[0], unfused(x2, form=form, state=s2)[0], tol,
                     f"{form} continued", seed=seed)


def test_fused_grads_equal_unfused(seed):
    fused, unfused = make_pair(torch.float64)
    x = torch.randn(2, 21, D, dtype=torch.float64)
    for m in (fused, unfused):
        y, st = m(x, form="chunk")
        (y.pow(2).sum() + st.state.sum()).backward()
    for (name, p1), (_, p2) in zip(fused.named_parameters(), unfused.named_parameters()):
        assert_close_rel(p1.grad, p2.grad, 1e-9, f"d{name}", seed=seed)


def _per_sequence(m, x, lengths, form, left=False):
    """Each sequence alone: its tokens only, no padding."""
    outs, states = [], []
    for b, n in enumerate(lengths):
        xb = x[b:b + 1, x.shape[1] - n:] if left else x[b:b + 1, :n]
        y, st = m(xb, form=form)
        outs.append(y)
        states.append(st.state)
    return outs, torch.cat(states)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_attention_mask_never_mixes_sequences(form, side, seed):
    m, _ = make_pair(torch.float64)
    lengths = [13, 1, 30, 0]
    T = 30
    x = torch.randn(len(lengths), T, D, dtype=torch.float64)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = True
        elif n:
            mask[b, -n:] = True
    y, st = m(x, form=form, attention_mask=mask)
    ref, ref_states = _per_sequence(m, x, lengths, form, left=side == "left")
    for b, n in enumerate(lengths):
        got = y[b, :n] if side == "right" else y[b, T - n:]
        if n:
            assert_close_rel(got, ref[b][0], 1e-10, f"seq {b}", seed=seed)
        assert float(y.detach()[b][~mask[b]].abs().max() if (~mask[b]).any() else 0) == 0.0
    assert_close_rel(st.state, ref_states, 1e-10, "states", seed=seed)
    assert torch.equal(st.offset, torch.tensor(lengths))


def test_cu_seqlens_matches_mask(seed):
    m, _ = make_pair(torch.float64)
    lengths = [5, 0, 17, 1]
    packed = torch.randn(1, sum(lengths), D, dtype=torch.float64)
    cu = torch.tensor([0, 5, 5, 22, 23], dtype=torch.int32)
    y, st = m(packed, cu_seqlens=cu)
    for s, n in enumerate(lengths):
        t0 = int(cu[s])
        if n:
            ref, rst = m(packed[:, t0:t0 + n])
            assert_close_rel(y[:, t0:t0 + n], ref, 1e-10, f"seq {s}", seed=seed)
            assert_close_rel(st.state[s:s + 1], rst.state, 1e-10, f"state {s}", seed=seed)
    assert st.offset.tolist() == lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_padded_prefill_then_decode_at_different_positions(dtype, seed):
    """Left-padded prompts of different lengths, then a batched decode where every sequence is
    at its own position: equals running each sequence alone."""
    torch.manual_seed(1)
    model = RetNet(vocab_size=50, embed_dim=D, value_dim=DV, num_heads=H, num_layers=2,
                   ffn_dim=64, chunk_size=8).to(dtype).eval()
    lengths, T, steps = [3, 9, 6], 9, 4
    prompts = torch.randint(0, 50, (3, T))
    mask = torch.zeros(3, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = True
    with torch.no_grad():
        logits, state = model(prompts, attention_mask=mask)
        new_tokens = torch.randint(0, 50, (3, steps))
        batched = []
        for t in range(steps):
            out, state = model.step(new_tokens[:, t], state)
            batched.append(out)
        for b, n in enumerate(lengths):
            full = torch.cat([prompts[b:b + 1, T - n:], new_tokens[b:b + 1]], 1)
            ref, _ = model(full, form="recurrent")
            assert_close_rel(logits[b, -1], ref[0, n - 1], TOL[dtype], f"prefill {b}", seed=seed)
            for t in range(steps):
                assert_close_rel(batched[t][b], ref[0, n + t], TOL[dtype], f"step {t} seq {b}",
                                 seed=seed)


def test_beam_reorder(seed):
    m, _ = make_pair(torch.float64)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    _, st = m(x)
    st.offset = torch.tensor([7, 7, 7])
    index = torch.tensor([2, 0, 0])
    beams = st.clone().reorder(index)
    x_t = torch.randn(3, D, dtype=torch.float64)
    y, _ = m.step(x_t, beams)
    for i, src in enumerate(index.tolist()):
        ref, _ = m(torch.cat([x[src:src + 1], x_t[i:i + 1, None]], 1))
        assert_close_rel(y[i], ref[0, -1], 1e-10, f"beam {i}", seed=seed)
    with pytest.raises(ValueError, match="per-sequence offsets"):
        RetentionState(torch.zeros(2, H, 8, 12), torch.tensor([1, 2, 3]))


def test_non_swish_gate_uses_unfused_path():
    m = MultiScaleRetention(D, DV, H, gate_fn="gelu")
    assert not m.fused
    y, _ = m(torch.randn(1, 5, D))
    assert y.shape == (1, 5, D)
    with pytest.raises(ValueError, match="cu_seqlens needs the fused layer"):
        m(torch.randn(1, 5, D), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def test_layer_core_is_replaceable(seed):
    import retention

    m, unfused = make_pair(torch.float64)
    assert m.core is retention.msr
    x = torch.randn(2, 21, D, dtype=torch.float64)
    y0, s0 = m(x, form="parallel")
    calls = []

    def core(*args, **kwargs):  # retention.msr's signature; covers 100 positions per sequence
        calls.append(kwargs)
        y, final = retention.msr(*args, **kwargs)
        return y, final, 100

    m.core = core
    y1, s1 = m(x, form="parallel")
    assert torch.equal(y0, y1) and torch.equal(s0.state, s1.state)
    assert (s0.offset, s1.offset) == (21, 100)
    assert calls[0]["form"] == "parallel" and calls[0]["output_final_state"] is True
    unfused.core = core
    with pytest.raises(ValueError, match="needs the fused layer"):
        unfused(x)
