"""Tests of retention.nn (MultiScaleRetention, RetNet) against an eager torchscale-style reference
(tests/python/torchscale_reference.py, written from ../shared/reference/retnet-math.md).

Run: cd <repo> && PYTHONPATH=python /usr/bin/python3 -m pytest tests/python/test_nn.py -q
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import retention  # noqa: E402,F401
from retention.nn import MultiScaleRetention, RetentionState, RetNet, RetNetState, StaticDecodeStep  # noqa: E402
from torchscale_reference import TorchscaleMSR  # noqa: E402

FORMS = ("parallel", "chunk", "recurrent")
SCALES = (0.03, 0.1, 1.0, 10.0, 100.0)

# small shapes: D=64, Dv=96, H=4 -> dk=16, dv=24 (dv not a power of two)
D, DV, H = 64, 96, 4


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def make_pair(dtype=torch.float64, eps=1e-6, chunk_size=16, decay="retnet", seed=0, device="cpu"):
    """Our layer and a torchscale-style layer sharing weights and decay."""
    torch.manual_seed(seed)
    ours = MultiScaleRetention(D, DV, H, layernorm_eps=eps, chunk_size=chunk_size, decay=decay)
    ref = TorchscaleMSR(D, DV, H, layernorm_eps=eps, log_decay=ours.log_decay.float())
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device=device, dtype=dtype), ref.to(device=device, dtype=dtype)


def head_outputs(module, fn):
    """Run fn() and capture the per-head normalised, gated input of module.out_proj -> [B,T,H,dv]."""
    captured = []
    h = module.out_proj.register_forward_pre_hook(lambda mod, inp: captured.append(inp[0].detach()))
    try:
        out = fn()
    finally:
        h.remove()
    x = torch.cat(captured, dim=1)
    return out, x.view(x.shape[0], x.shape[1], H, DV // H)


# ------------------------------------------------------------------------------------------------
# (a) parameters / state dicts
# ------------------------------------------------------------------------------------------------
def test_parameter_names_and_state_dict_roundtrip():
    torch.manual_seed(1)
    ours = MultiScaleRetention(D, DV, H)
    names = sorted(n for n, _ in ours.named_parameters())
    assert names == sorted(["q_proj.weight", "k_proj.weight", "v_proj.weight", "g_proj.weight", "out_proj.weight"])
    assert sorted(ours.state_dict().keys()) == names  # decay buffer is not persistent
    assert all(m.bias is None for m in (ours.q_proj, ours.k_proj, ours.v_proj, ours.g_proj, ours.out_proj))
    assert ours.q_proj.weight.shape == (D, D) and ours.v_proj.weight.shape == (DV, D)
    assert ours.out_proj.weight.shape == (D, DV)

    ref = TorchscaleMSR(D, DV, H)
    assert sorted(ref.state_dict().keys()) == names
    ours.load_state_dict(ref.state_dict(), strict=True)  # torchscale -> ours
    for n in names:
        assert torch.equal(ours.state_dict()[n], ref.state_dict()[n])
    ours2 = MultiScaleRetention(D, DV, H)
    ref.load_state_dict(ours2.state_dict(), strict=True)  # ours -> torchscale
    for n in names:
        assert torch.equal(ours2.state_dict()[n], ref.state_dict()[n])
    x = torch.randn(2, 9, D)
    assert rel_err(ours2(x, form="parallel")[0], ref.recurrent(x)) < 1e-5


def test_init_and_decay_buffer():
    torch.manual_seed(2)
    m = MultiScaleRetention(D, DV, H)
    for lin, gain in ((m.q_proj, 2 ** -2.5), (m.k_proj, 2 ** -2.5), (m.v_proj, 2 ** -2.5),
                      (m.g_proj, 2 ** -2.5), (m.out_proj, 2 ** -1)):
        fan_out, fan_in = lin.weight.shape
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        w = lin.weight.detach()
        assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.8 * bound
    expected = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64)))
    assert m.log_decay.dtype == torch.float32
    assert torch.allclose(m.log_decay.double(), expected, rtol=1e-6, atol=0)
    lin = MultiScaleRetention(D, DV, H, decay="linspace").log_decay.double()
    assert torch.allclose(lin.exp(), 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), H,
                                                                   dtype=torch.float64)), rtol=1e-6)
    # casting the module never rounds the decay to half precision
    assert m.to(torch.bfloat16).log_decay.dtype == torch.float32
    assert m.double().log_decay.dtype == torch.float64
    with pytest.raises(ValueError):
        MultiScaleRetention(D, DV, H, decay=torch.zeros(H + 1))
    with pytest.raises(ValueError):
        MultiScaleRetention(D, DV, H, decay=torch.full((H,), 0.5))  # log-decays must be <= 0
    with pytest.raises(ValueError):
        MultiScaleRetention(D, DV, H, decay="cosine")
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, D, dtype=torch.float64), form="fused")


# ------------------------------------------------------------------------------------------------
# (b) against the torchscale-style reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", SCALES)
def test_matches_torchscale_recurrent_float64(scale):
    ours, ref = make_pair(torch.float64, eps=1e-6)
    torch.manual_seed(10)
    x = torch.randn(2, 37, D, dtype=torch.float64) * scale
    expected = ref.recurrent(x)
    for form in FORMS:
        got, st = ours(x, form=form)
        assert rel_err(got, expected) < 1e-10, (form, scale, rel_err(got, expected))
        assert st.offset == 37


def test_matches_torchscale_longer_sequence_default_chunk():
    """T = 150 with the default chunk size 64 (two full chunks and a remainder), B = 3."""
    ours, ref = make_pair(torch.float64, eps=1e-6, chunk_size=64, decay="linspace")
    torch.manual_seed(14)
    x = torch.randn(3, 150, D, dtype=torch.float64) * 0.5
    expected = ref.recurrent(x)
    for form in FORMS:
        assert rel_err(ours(x, form=form)[0], expected) < 1e-10, form


@pytest.mark.parametrize("scale", (0.03, 1.0, 100.0))
def test_matches_torchscale_recurrent_float32(scale):
    ours, ref = make_pair(torch.float32, eps=1e-6)
    torch.manual_seed(11)
    x = torch.randn(2, 37, D) * scale
    expected = ref.recurrent(x)
    for form in FORMS:
        got, _ = ours(x, form=form)
        assert rel_err(got, expected) < 1e-5, (form, scale, rel_err(got, expected))


@pytest.mark.parametrize("scale", SCALES)
def test_matches_torchscale_parallel_where_normaliser_is_one(scale):
    """torchscale's parallel form divides row n of head h by c = clamp(Σ_m |q_n·k_m| D̃_nm, 1, 5e4)
    (detached).  Where the raw abs-sum is <= 1 the clamp pins c to exactly 1 and the parallel form
    uses the same normalisation 1/sqrt(S_{n+1}) as the recurrent form and this layer, so the
    per-head outputs must agree to rounding for any eps.  (retnet-math.md §7 words this as the
    clamp being "inactive"; the precise condition is c == 1, i.e. abs-sum <= 1.)  Elsewhere they
    differ through eps only, so with eps = 0 they agree on every row."""
    ours, ref = make_pair(torch.float64, eps=1e-6)
    torch.manual_seed(12)
    x = torch.randn(2, 37, D, dtype=torch.float64) * scale
    abs_sum = ref.parallel_row_normaliser(x)  # [B, H, T]
    pinned = (abs_sum <= 1).transpose(1, 2)  # [B, T, H]: rows where torchscale's normaliser is 1
    if scale <= 1.0:
        assert bool(pinned.all()), "small inputs: every row must have the normaliser pinned to 1"
    elif scale >= 100.0:
        assert not bool(pinned.any())
    _, ref_heads = head_outputs(ref, lambda: ref.parallel(x))
    for form in FORMS:
        _, our_heads = head_outputs(ours, lambda: ours(x, form=form))
        if pinned.any():
            diff = (our_heads - ref_heads).abs()[pinned]
            assert diff.max().item() < 1e-10 * ref_heads.abs().max().item(), form
    if scale <= 1.0:
        assert rel_err(ours(x, form="chunk")[0], ref.parallel(x)) < 1e-10

    # eps = 0: the positive per-row factor cancels in the RMSNorm everywhere (clamps included)
    ours.layernorm_eps = 0.0
    ref.group_norm.eps = 0.0
    expected = ref.parallel(x)
    for form in FORMS:
        assert rel_err(ours(x, form=form)[0], expected) < 1e-10, form


def test_torchscale_parallel_differs_through_eps_only():
    """Sanity check of the test set-up: at scale 10 with eps = 1e-2 the torchscale parallel form
    really differs from the recurrent one (so the tests above are not vacuous)."""
    ours, ref = make_pair(torch.float64, eps=1e-2)
    torch.manual_seed(13)
    x = torch.randn(2, 37, D, dtype=torch.float64) * 10
    assert rel_err(ref.parallel(x), ref.recurrent(x)) > 1e-4
    assert rel_err(ours(x, form="parallel")[0], ref.recurrent(x)) < 1e-10


# ------------------------------------------------------------------------------------------------
# (c) forms agree with each other, any eps
# ------------------------------------------------------------------------------------------------
NEAR_ONE = torch.log(1 - torch.tensor([2.0 ** -5, 2.0 ** -12, 2.0 ** -20, 0.0], dtype=torch.float64)).float()


@pytest.mark.parametrize("eps", (1e-6, 1e-2))
@pytest.mark.parametrize("decay", ("retnet", "linspace", "near_one"))
def test_forms_agree_float32(eps, decay, device):
    ours, _ = make_pair(torch.float32, eps=eps, chunk_size=16, decay=NEAR_ONE if decay == "near_one" else decay,
                        device=device)
    torch.manual_seed(20)
    for scale in (0.03, 1.0, 30.0):
        x = (torch.randn(2, 50, D) * scale).to(device)  # T not a multiple of the chunk size
        outs = {f: ours(x, form=f) for f in FORMS}
        ref_o, ref_s = outs["recurrent"]
        for f in FORMS:
            o, s = outs[f]
            assert o.dtype == torch.float32 and s.state.dtype == torch.float32
            assert rel_err(o, ref_o) < 2e-5, (f, scale, rel_err(o, ref_o))
            assert rel_err(s.state, ref_s.state) < 2e-5, (f, scale)
        o2, _ = ours(x, form="chunk", chunk_size=7)
        assert rel_err(o2, ref_o) < 2e-5


def test_decay_exactly_one_and_t1():
    """γ = 1 (log decay 0) uses S_j = j; T = 1 works in every form."""
    ours, _ = make_pair(torch.float64, decay=torch.zeros(H, dtype=torch.float64))
    assert ours.log_decay.dtype == torch.float64
    torch.manual_seed(21)
    x = torch.randn(1, 12, D, dtype=torch.float64)
    outs = [ours(x, form=f)[0] for f in FORMS]
    assert torch.isfinite(outs[0]).all()
    for o in outs:
        assert rel_err(o, outs[0]) < 1e-10
    for f in FORMS:
        o, s = ours(x[:, :1], form=f)
        assert o.shape == (1, 1, D) and s.offset == 1
        assert rel_err(o, outs[0][:, :1]) < 1e-10


def test_normaliser_helper_stable():
    """1/sqrt(S_{n+1}(γ)) against a 50-digit decimal evaluation, γ = 1 - 2^-k down to 1 - 2^-24."""
    from decimal import Decimal, getcontext
    from retention.nn import decay_normaliser
    getcontext().prec = 50
    ks = (5, 12, 20, 24)
    pos = (0, 1, 99, 4095, 10 ** 6)
    exact = torch.tensor([[float(((1 - (1 - Decimal(2) ** -k) ** (p + 1)) * Decimal(2) ** k) ** Decimal(-0.5))
                           for k in ks] for p in pos], dtype=torch.float64)
    ld = torch.log1p(-torch.tensor([2.0 ** -k for k in ks], dtype=torch.float64))
    posf = torch.tensor(pos, dtype=torch.float64)
    got64 = decay_normaliser(ld, posf)
    got32 = decay_normaliser(ld.float(), posf.float()).double()
    assert ((got64 - exact).abs() / exact).max() < 1e-12
    assert ((got32 - exact).abs() / exact).max() < 2e-6


# ------------------------------------------------------------------------------------------------
# (d) prefill + decode == full sequence
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_prefill_then_decode_matches_full(dtype, device):
    ours, ref = make_pair(dtype, eps=1e-6, chunk_size=8, device=device)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.manual_seed(30)
    x = torch.randn(2, 29, D, dtype=dtype).to(device)
    full, full_state = ours(x, form="parallel")
    prefill, st = ours(x[:, :13], form="chunk")
    assert isinstance(st, RetentionState) and st.offset == 13
    saved = st.state.clone()
    # forward() never modifies the state passed in; continuing with chunk/parallel/recurrent works
    for f in FORMS:
        cont, st2 = ours(x[:, 13:], form=f, state=st)
        assert torch.equal(st.state, saved) and st.offset == 13
        assert rel_err(torch.cat([prefill, cont], 1), full) < tol, f
        assert st2.offset == 29 and rel_err(st2.state, full_state.state) < tol
    # every form can be the prefill
    for f in FORMS:
        pre_f, st_f = ours(x[:, :13], form=f)
        assert rel_err(st_f.state, st.state) < tol and st_f.offset == 13
        o_f, _ = ours.step(x[:, 13], st_f)
        assert rel_err(o_f, full[:, 13]) < tol, f
    # step() decodes one token at a time and updates the state object in place
    branch = st.clone()
    outs = [prefill]
    for t in range(13, 29):
        xt = x[:, t] if t % 2 else x[:, t:t + 1]  # both [B, D] and [B, 1, D]
        o, st_ret = ours.step(xt, st)
        assert st_ret is st and st.offset == t + 1
        outs.append(o[:, None] if o.dim() == 2 else o)
    assert rel_err(torch.cat(outs, 1), full) < tol
    assert rel_err(st.state, full_state.state) < tol
    assert rel_err(ref.recurrent(x), full) < tol
    # the clone taken before decoding is untouched
    assert torch.equal(branch.state, saved) and branch.offset == 13
    # decoding from scratch with step (state=None creates one)
    o0, s0 = ours.step(x[:, 0], None)
    assert s0.offset == 1 and rel_err(o0, full[:, 0]) < tol


def test_step_with_grad_state_does_not_corrupt_graph():
    ours, _ = make_pair(torch.float32)
    x = torch.randn(1, 6, D, requires_grad=True)
    out, st = ours(x, form="chunk")
    assert st.state.requires_grad
    held = st.state
    ours.step(torch.randn(1, D), st)  # must not write into a tensor of the autograd graph
    assert st.state is not held
    (out.sum() + held.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gradients_agree_across_forms():
    ours, _ = make_pair(torch.float64, eps=1e-2, chunk_size=8)
    torch.manual_seed(31)
    x = torch.randn(2, 21, D, dtype=torch.float64)
    w = torch.randn(2, 21, D, dtype=torch.float64)
    grads = {}
    for f in FORMS:
        ours.zero_grad()
        xi = x.clone().requires_grad_(True)
        out, st = ours(xi, form=f)
        ((out * w).sum() + st.state.sum() * 1e-3).backward()
        grads[f] = [xi.grad.clone()] + [p.grad.clone() for p in ours.parameters()]
        assert all(g.abs().sum() > 0 for g in grads[f])
    for f in FORMS:
        for a, b in zip(grads[f], grads["recurrent"]):
            assert rel_err(a, b) < 1e-9, f
    # two segments chained through the (differentiable) state == one pass, for every form
    for f in FORMS:
        ours.zero_grad()
        xi = x.clone().requires_grad_(True)
        o1, s1 = ours(xi[:, :8], form=f)
        o2, s2 = ours(xi[:, 8:], form=f, state=s1)
        ((torch.cat([o1, o2], 1) * w).sum() + s2.state.sum() * 1e-3).backward()
        seg = [xi.grad] + [p.grad for p in ours.parameters()]
        for a, b in zip(seg, grads["recurrent"]):
            assert rel_err(a, b) < 1e-9, f


# ------------------------------------------------------------------------------------------------
# (e) RetNet
# ------------------------------------------------------------------------------------------------
def small_lm(dtype=torch.float32, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return RetNet(vocab_size=37, embed_dim=32, value_dim=48, num_heads=2, num_layers=2, ffn_dim=64,
                  chunk_size=8).to(device=device, dtype=dtype)


def test_retnet_forms_prefill_decode_generate(device):
    lm = small_lm(torch.float64, device=device)
    names = {n for n, _ in lm.named_parameters()}
    assert "layers.0.retention.q_proj.weight" in names and "layers.1.ffn.gate.weight" in names
    assert "output_projection.weight" in names and "layer_norm.weight" in names
    torch.manual_seed(40)
    tokens = torch.randint(0, 37, (2, 27)).to(device)
    logits = {f: lm(tokens, form=f)[0] for f in FORMS}
    for f in FORMS:
        assert logits[f].shape == (2, 27, 37)
        assert rel_err(logits[f], logits["parallel"]) < 1e-10, f
    full = logits["parallel"]
    # prefill (chunk) + step decode == full sequence
    pre, st = lm(tokens[:, :10], form="chunk")
    assert isinstance(st, RetNetState) and st.offset == 10
    outs = [pre]
    for t in range(10, 27):
        lg, st = lm.step(tokens[:, t], st)
        outs.append(lg[:, None])
    assert st.offset == 27
    assert rel_err(torch.cat(outs, 1), full) < 1e-10
    # generate: greedy equals re-scoring the greedy continuation with one full forward
    gen = lm.generate(tokens[:, :5], max_new_tokens=12, temperature=0.0)
    assert gen.shape == (2, 17) and torch.equal(gen[:, :5], tokens[:, :5])
    rescored = lm(gen, form="parallel")[0]
    assert torch.equal(rescored[:, 4:-1].argmax(-1), gen[:, 5:])
    # sampling with a generator is reproducible; 1-D prompts keep their layout
    g1, g2 = torch.Generator(device=device).manual_seed(5), torch.Generator(device=device).manual_seed(5)
    s1 = lm.generate(tokens[0, :4], 20, temperature=0.8, top_k=5, generator=g1)
    s2 = lm.generate(tokens[0, :4], 20, temperature=0.8, top_k=5, generator=g2)
    assert s1.shape == (24,) and torch.equal(s1, s2)
    assert lm.training  # generate restores the training mode


def test_static_decode_step_keeps_buffers_and_matches_step(device):
    """The buffers a CUDA graph of one step would replay on (token buffer, every layer's state
    and offsets) keep their storage, and the tokens and logits equal the ordinary step's.
    Sequences start at different positions (per-sequence offsets)."""
    lm = small_lm(torch.float32, device=device).eval()
    torch.manual_seed(41)
    prompt = torch.randint(0, 37, (3, 6), device=device)
    _, st = lm(prompt, form="chunk")
    for layer in st.layers:
        layer.offset = torch.tensor([6, 11, 3], device=device)
    ref_state = st.clone()
    decode = StaticDecodeStep(lm, st)
    ptrs = [(x.state.data_ptr(), x.offset.data_ptr()) for x in st.layers] + [decode.tokens.data_ptr()]
    tok_a = tok_b = prompt[:, -1]
    for i in range(9):
        la = decode(tok_a)
        lb, ref_state = lm.step(tok_b, ref_state)
        assert torch.equal(la, lb), i
        tok_a, tok_b = la.argmax(-1), lb.argmax(-1)
    assert [(x.state.data_ptr(), x.offset.data_ptr()) for x in st.layers] + [decode.tokens.data_ptr()] == ptrs
    for x, y in zip(st.layers, ref_state.layers):
        assert torch.equal(x.offset, torch.tensor([15, 20, 12], device=device))
        assert torch.equal(x.state, y.state)


def test_generate_cuda_graph(device):
    lm = small_lm(torch.float32, device=device)
    prompt = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(42)).to(device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"cuda_graph=True\) .*CUDA device, got cpu"):
            lm.generate(prompt, 4, cuda_graph=True)
        return
    eager = lm.generate(prompt, 24, temperature=0.0)
    graph = lm.generate(prompt, 24, temperature=0.0, cuda_graph=True)
    assert torch.equal(graph, eager)


def test_retnet_step_reads_no_tensor_values():
    """A decode step that never reads a tensor's values on the host (no .item(), no
    value-dependent shape or branch) is one a CUDA graph can capture, and one that does not
    wait for the device: on the meta device, which has no values, any such read raises."""
    lm = small_lm(torch.float32).to("meta").eval()
    for offset in (7, torch.tensor([3, 9], device="meta")):
        st = RetNetState([RetentionState(torch.zeros(2, 2, 16, 24, device="meta"), offset)
                          for _ in range(lm.num_layers)])
        logits, st = lm.step(torch.zeros(2, dtype=torch.long, device="meta"), st)
        assert logits.shape == (2, 37) and logits.device.type == "meta"


def test_retnet_gradients_reach_every_parameter(device):
    lm = small_lm(torch.float32, device=device)
    torch.manual_seed(41)
    tokens = torch.randint(0, 37, (2, 20)).to(device)
    for form in ("chunk", "parallel", "recurrent"):
        lm.zero_grad(set_to_none=True)
        logits, _ = lm(tokens[:, :-1], form=form)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 37), tokens[:, 1:].reshape(-1))
        loss.backward()
        for n, p in lm.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (form, n)


# ------------------------------------------------------------------------------------------------
# (f) low precision
# ------------------------------------------------------------------------------------------------
def _half_dtypes(device):
    # CPU torch 1.13 has no float16 Linear; float16 runs on CUDA only
    return (torch.bfloat16, torch.float16) if device == "cuda" else (torch.bfloat16,)


def test_low_precision_module_runs_without_nan(device):
    for dt in _half_dtypes(device):
        torch.manual_seed(50)
        m32 = MultiScaleRetention(D, DV, H, chunk_size=16).to(device)
        m16 = MultiScaleRetention(D, DV, H, chunk_size=16).to(device)
        m16.load_state_dict(m32.state_dict())
        m16 = m16.to(dt)
        assert m16.log_decay.dtype == torch.float32
        x = torch.randn(2, 40, D).to(device)
        ref, _ = m32(x, form="parallel")
        for f in FORMS:
            o, st = m16(x.to(dt), form=f)
            assert o.dtype == dt and torch.isfinite(o).all(), (dt, f)
            assert st.state.dtype == torch.float32
            assert rel_err(o.float(), ref) < 5e-2, (dt, f, rel_err(o.float(), ref))
        o, st = m16(x[:, :30].to(dt), form="chunk")
        for t in range(30, 40):
            ot, st = m16.step(x[:, t].to(dt), st)
            assert ot.dtype == dt and torch.isfinite(ot).all()
        assert rel_err(ot.float(), ref[:, -1]) < 5e-2

        # large activations, long sequence, slowly decaying heads (γ up to 1 - 2^-12)
        mbig = MultiScaleRetention(D, DV, 8, chunk_size=64).to(device=device, dtype=dt)
        xb = (torch.randn(1, 300, D) * 100).to(device=device, dtype=dt)
        outs = [mbig(xb, form=f)[0] for f in FORMS]
        for o in outs:
            assert torch.isfinite(o).all()
            assert rel_err(o.float(), outs[0].float()) < 5e-2

        lm = small_lm(dt, device=device)
        tokens = torch.randint(0, 37, (2, 19)).to(device)
        for f in FORMS:
            logits, _ = lm(tokens, form=f)
            assert torch.isfinite(logits).all(), (dt, f)
        logits, _ = lm(tokens, form="chunk")
        logits.float().logsumexp(-1).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in lm.parameters())
        gen = lm.generate(tokens[:, :3], 8, temperature=1.0, generator=torch.Generator(device=device).manual_seed(0))
        assert gen.shape == (2, 11)
