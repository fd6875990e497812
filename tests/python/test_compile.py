"""torch.compile(fullgraph=True) over the library: the functional ops, MultiScaleRetention in each
form and its decode step, and a RetNet training step.  fullgraph=True turns any graph break into
an error; results must equal eager (same kernels, so only the compiled glue around them can
differ: fp32 tolerance); a dynamic T (mark_dynamic) must compile once for several lengths.

Most cases use the aot_eager backend (AOTAutograd + functionalization, no code generation:
what the custom ops have to support) to keep CPU compile times bounded; one case runs inductor.
"""
import pytest
import torch

import retention
from conftest import assert_close_rel, make_qkv, random_log_decay
from retention.nn import MultiScaleRetention, RetNet

pytestmark = pytest.mark.skipif(
    not hasattr(torch, "compile") or not hasattr(torch, "_dynamo"),
    reason=f"torch.compile needs torch >= 2.0 (this is torch {torch.__version__})")

TOL = 1e-5  # fp32: the same kernels run; compiled projections/reductions may reorder sums
H, DK, DV = 2, 16, 24


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CompileCounter:
    """aot_eager backend that counts how many graphs it was given."""

    def __init__(self):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func
        self.frames = 0

        def compiler(gm, example_inputs):
            return make_boxed_func(gm.forward)

        self._aot = aot_autograd(fw_compiler=compiler, bw_compiler=compiler)

    def __call__(self, gm, example_inputs):
        self.frames += 1
        return self._aot(gm, example_inputs)


def _compile(fn, backend=None, **kw):
    return torch.compile(fn, backend=backend or "aot_eager", fullgraph=True, **kw)


def _grads(params):
    return [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
def test_functional_forward_backward(form):
    q, k, v = make_qkv(2, 29, H, DK, DV)
    s0 = 0.1 * torch.randn(2, H, DK, DV)
    ld = random_log_decay(H)

    def f(q, k, v, s0):
        o, s = retention.retention(q, k, v, ld, form=form, chunk_size=8, initial_state=s0,
                                   output_final_state=True)
        return (o * o).sum() + s.sum(), o, s

    leaves = [x.requires_grad_() for x in (q, k, v, s0)]
    loss, o, s = f(*leaves)
    loss.backward()
    want = _grads(leaves)
    for x in leaves:
        x.grad = None
    loss_c, o_c, s_c = _compile(f)(*leaves)
    loss_c.backward()
    assert_close_rel(o_c, o, TOL, "o")
    assert_close_rel(s_c, s, TOL, "state")
    for name, g, w in zip("q k v s0".split(), _grads(leaves), want):
        assert_close_rel(g, w, TOL, f"d{name}")


def test_fused_msr_packed_with_offsets():
    q, k, v = make_qkv(1, 31, H, DK, DV)
    g = torch.randn(1, 31, H, DV)
    cu = torch.tensor([0, 7, 7, 31], dtype=torch.int32)
    offsets = torch.tensor([3, 0, 11])
    ld = random_log_decay(H)

    def f(q, k, v, g):
        return retention.msr(q, k, v, g, ld, form="chunk", chunk_size=8, offsets=offsets,
                             cu_seqlens=cu, output_final_state=True)

    y, s = f(q, k, v, g)
    y_c, s_c = _compile(f)(q, k, v, g)
    assert_close_rel(y_c, y, TOL, "y")
    assert_close_rel(s_c, s, TOL, "states")


def test_in_place_decode_ops_functionalize():
    """recurrent_step / msr_step mutate their state: compiled, the caller's state must be
    updated exactly as in eager (functionalization writes the result back)."""
    q, k, v = make_qkv(2, 1, H, DK, DV)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    g = torch.randn(2, H, DV)
    ld = random_log_decay(H)
    s_init = torch.randn(2, H, DK, DV)
    offsets = torch.tensor([5, 9])

    def f(q, k, v, g, s_raw, s_msr):
        o = retention.recurrent_step(q, k, v, ld, s_raw)
        y = retention.msr_step(q, k, v, g, ld, s_msr, offsets=offsets)
        return o, y

    s1, s2 = s_init.clone(), s_init.clone()
    o, y = f(q, k, v, g, s1, s2)
    c1, c2 = s_init.clone(), s_init.clone()
    o_c, y_c = _compile(f)(q, k, v, g, c1, c2)
    assert_close_rel(o_c, o, TOL, "o")
    assert_close_rel(y_c, y, TOL, "y")
    assert_close_rel(c1, s1, TOL, "recurrent_step state")
    assert_close_rel(c2, s2, TOL, "msr_step state")
    assert not torch.equal(c1, s_init), "the compiled step did not update the state"


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
def test_msr_layer_each_form(form):
    layer = MultiScaleRetention(32, 48, H, chunk_size=8)
    x = torch.randn(2, 19, 32)

    def f(x):
        y, state = layer(x, form=form)
        return y, state.state

    y, s = f(x)
    y.square().sum().backward()
    want = _grads(layer.parameters())
    layer.zero_grad(set_to_none=True)
    y_c, s_c = _compile(f)(x)
    y_c.square().sum().backward()
    assert_close_rel(y_c, y, TOL, "y")
    assert_close_rel(s_c, s, TOL, "state")
    for (name, _), g, w in zip(layer.named_parameters(), _grads(layer.parameters()), want):
        assert_close_rel(g, w, TOL, f"grad {name}")


def test_msr_layer_step():
    layer = MultiScaleRetention(32, 48, H).eval()
    prompt, x_t = torch.randn(2, 9, 32), torch.randn(2, 32)
    with torch.no_grad():
        _, st = layer(prompt, form="chunk")

    def step(x_t, s):
        state = retention.nn.RetentionState(s, 9)
        y, state = layer.step(x_t, state)
        return y, state.state

    s_eager = st.state.clone()
    y, s1 = step(x_t, s_eager)
    y_c, s1_c = _compile(step)(x_t, st.state.clone())
    assert_close_rel(y_c, y, TOL, "y_t")
    assert_close_rel(s1_c, s1, TOL, "state after step")


def _lm():
    return RetNet(vocab_size=61, embed_dim=32, value_dim=48, num_heads=H, num_layers=2,
                  ffn_dim=64, chunk_size=8)


def _lm_loss(model, tokens):
    logits, _ = model(tokens[:, :-1], form="chunk")
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))


# torch 2.11's dynamo warns this from inside torch while it traces torch.optim's step: not ours.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_retnet_training_step(backend):
    """A RetNet training step: forward + loss compiled as one full graph (its backward is the
    graph AOTAutograd derives, run by loss.backward(); Dynamo cannot trace backward() inside a
    graph) and the optimizer step compiled too (not fullgraph: torch.optim inserts its own graph
    break).  inductor: generated C++ around the custom ops (the production path).  Losses and
    parameters must match eager after 2 steps."""
    torch.manual_seed(0)
    eager, compiled = _lm(), _lm()
    compiled.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, 61, (2, 21))
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    loss_c_fn = _compile(_lm_loss, backend=backend)
    step_c = torch.compile(opt_c.step, backend=backend)
    for _ in range(2):
        loss_e = _lm_loss(eager, tokens)
        loss_e.backward()
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
        loss_c = loss_c_fn(compiled, tokens)
        loss_c.backward()
        step_c()
        opt_c.zero_grad(set_to_none=True)
        assert_close_rel(loss_c, loss_e, TOL, "loss")
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters()):
        assert_close_rel(p_c, p_e, TOL, f"parameter {name} after 2 steps")


def test_dynamic_length_compiles_once():
    layer = MultiScaleRetention(32, 48, H, chunk_size=8)
    counter = CompileCounter()
    f = _compile(lambda x: layer(x, form="chunk")[0], backend=counter)
    for T in (11, 24, 37, 64):
        x = torch.randn(2, T, 32)
        torch._dynamo.mark_dynamic(x, 1)
        y_c = f(x)
        y = layer(x, form="chunk")[0]
        assert_close_rel(y_c, y, TOL, f"y at T={T}")
    assert counter.frames == 1, f"compiled {counter.frames} graphs for 4 lengths, expected 1"
