"""The layer and the LM under torch.autocast (bf16 on CPU; fp16 on CUDA when a GPU exists): the
projections run in the low precision, so the retention op sees bf16/fp16 q, k, v, g; outputs
come out in that dtype, states stay fp32, gradients reach every (fp32) parameter, and the result
agrees with the fp32 module to the accuracy of that dtype.
"""
import pytest
import torch

from conftest import TOL, assert_close_rel, device  # noqa: F401  (device is a fixture)
from retention.nn import MultiScaleRetention, RetNet

H = 2
# The layer rounds to the low precision several times in sequence (input cast, the q/k/v/g
# projections, the fused op's output, out_proj), each a relative RMS error of ~u/sqrt(3) (u = unit
# roundoff), so the comparison against the fp32 module allows 4 such roundings on top of the
# per-op contract TOL[dtype] (itself a few roundings): 2x TOL[dtype].
FACTOR = 2.0


def _low(device):
    return torch.bfloat16 if device == "cpu" else torch.float16


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
def test_layer_under_autocast(form, device):
    low = _low(device)
    layer = MultiScaleRetention(64, 96, H, chunk_size=16).to(device)
    x = torch.randn(2, 33, 64, device=device)
    y_ref, st_ref = layer(x, form=form)
    with torch.autocast(device_type=device, dtype=low):
        y, st = layer(x, form=form)
    assert y.dtype == low, f"output dtype {y.dtype}, expected {low} under autocast"
    assert st.state.dtype == torch.float32, "the retention state must stay fp32 under autocast"
    assert_close_rel(y, y_ref, FACTOR * TOL[low], "y (autocast vs fp32)")
    assert_close_rel(st.state, st_ref.state, FACTOR * TOL[low], "state (autocast vs fp32)")
    y.float().square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, f"no fp32 grad for {name}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"bad grad for {name}"


def test_layer_step_under_autocast(device):
    low = _low(device)
    layer = MultiScaleRetention(64, 96, H).to(device).eval()
    prompt, x_t = torch.randn(2, 9, 64, device=device), torch.randn(2, 64, device=device)
    with torch.no_grad():
        _, st_ref = layer(prompt)
        y_ref, _ = layer.step(x_t, st_ref)
        with torch.autocast(device_type=device, dtype=low):
            _, st = layer(prompt)
            y, st = layer.step(x_t, st)
    assert y.dtype == low and st.state.dtype == torch.float32
    assert_close_rel(y, y_ref, FACTOR * TOL[low], "y_t (autocast vs fp32)")
    assert_close_rel(st.state, st_ref.state, FACTOR * TOL[low], "state after step")


def test_lm_training_step_under_autocast(device):
    low = _low(device)
    model = RetNet(vocab_size=50, embed_dim=64, value_dim=96, num_heads=H, num_layers=2,
                   ffn_dim=128, chunk_size=16).to(device)
    tokens = torch.randint(0, 50, (2, 40), device=device)
    with torch.autocast(device_type=device, dtype=low):
        logits, state = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 50),
                                                 tokens[:, 1:].reshape(-1))
    assert logits.dtype == low
    assert all(s.state.dtype == torch.float32 for s in state.layers)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, f"no fp32 grad for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite grad for {name}"
    with torch.no_grad():
        logits_ref, _ = model(tokens[:, :-1])
    assert_close_rel(logits, logits_ref, FACTOR * TOL[low], "logits (autocast vs fp32)")
