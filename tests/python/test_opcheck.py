"""torch.library.opcheck on every op of the library: schema (declared mutations and aliasing match
what the kernels do), autograd registration, FakeTensor (the Meta kernels agree with the real
ones in shape, dtype and strides-independent metadata) and AOT dispatch with dynamic shapes
(what torch.compile relies on).  Representative inputs: initial states, packed sequences
(cu_seqlens), per-sequence offsets, fp16/bf16 and the in-place decode ops.

Correctness of the values is tested elsewhere (against float64 references); these tests check
the contract torch.compile and functionalization depend on.
"""
import pytest
import torch

import retention  # noqa: F401  (registers torch.ops.retention)
from conftest import make_qkv, random_log_decay

pytestmark = pytest.mark.skipif(
    not hasattr(torch.library, "opcheck"),
    reason=f"torch.library.opcheck needs torch >= 2.4 (this is torch {torch.__version__})")

ops = torch.ops.retention
B, T, H, DK, DV = 2, 37, 3, 16, 24
FORMS = {"chunk": 0, "parallel": 1, "recurrent": 2}
ROTARY = {"none": 0, "torchscale": 1, "neox": 2}
HALF = [torch.float16, torch.bfloat16]


def _opcheck(op, args, **kwargs):
    # Raises with the failing sub-test (test_schema, test_faketensor, ...) and its reason.
    torch.library.opcheck(op, args, kwargs)


def _qkv(dtype=torch.float32, grad=False, b=B, t=T):
    q, k, v = make_qkv(b, t, H, DK, DV, dtype=dtype)
    return [x.requires_grad_(grad) for x in (q, k, v)]


def _state(n=B, grad=False):
    return (0.1 * torch.randn(n, H, DK, DV)).requires_grad_(grad)


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
def test_raw_forward(form, with_state, dtype):
    q, k, v = _qkv(dtype, grad=True)
    ld = random_log_decay(H)
    s0 = _state(grad=True) if with_state else None
    if form == "chunk":
        _opcheck(ops.chunk_forward, (q, k, v, ld, 0.25, 16, s0))
    elif form == "parallel":
        _opcheck(ops.parallel_forward, (q, k, v, ld, 0.25, s0))
    else:
        _opcheck(ops.recurrent_forward, (q, k, v, ld, 0.25, s0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["chunk", "parallel"])
def test_raw_backward(form, dtype):
    q, k, v = _qkv(dtype)
    ld = random_log_decay(H)
    grad_o = torch.randn(B, T, H, DV, dtype=dtype)
    grad_s = torch.randn(B, H, DK, DV)
    if form == "chunk":
        _opcheck(ops.chunk_backward, (grad_o, grad_s, q, k, v, ld, 0.25, 16, _state()))
        _opcheck(ops.chunk_backward, (grad_o, None, q, k, v, ld, 0.25, 16, None))
    else:
        _opcheck(ops.parallel_backward, (grad_o, grad_s, q, k, v, ld, 0.25, _state()))
        _opcheck(ops.parallel_backward, (grad_o, None, q, k, v, ld, 0.25, None))


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("layout", ["[B,H,d]", "[B,1,H,d]"])
def test_recurrent_step_in_place(layout, dtype):
    q, k, v = _qkv(dtype, t=1)
    if layout == "[B,H,d]":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    _opcheck(ops.recurrent_step, (q, k, v, random_log_decay(H), 0.25, _state()))


def _msr_args(form, dtype, *, grad, with_state, packed, offsets, rotary, norm_weight, gate):
    """Arguments of msr_forward in schema order."""
    b, t = (1, T) if packed else (B, T)
    q, k, v = _qkv(dtype, grad=grad, b=b, t=t)
    g = torch.randn(b, t, H, DV, dtype=dtype).requires_grad_(grad) if gate else None
    cu = torch.tensor([0, 5, 5, 20, T], dtype=torch.int32) if packed else None
    n = 4 if packed else B
    off = torch.randint(0, 100, (n,), dtype=torch.int64) if offsets else None
    s0 = _state(n, grad=grad) if with_state else None
    w = (1.0 + 0.1 * torch.randn(DV, dtype=dtype)).requires_grad_(grad) if norm_weight else None
    return [q, k, v, g, random_log_decay(H), 0.25, FORMS[form], 16, s0, off, cu, ROTARY[rotary],
            True, w, 1e-6, True]


MSR_CASES = [
    # form, dtype, with_state, packed, offsets, rotary, norm_weight, gate
    ("chunk", torch.float32, False, False, False, "torchscale", False, True),
    ("chunk", torch.float32, True, True, True, "torchscale", True, True),
    ("chunk", torch.float16, True, False, True, "neox", True, True),
    ("chunk", torch.bfloat16, False, True, False, "none", False, False),
    ("parallel", torch.float32, True, False, True, "torchscale", True, True),
    ("parallel", torch.bfloat16, True, True, False, "neox", False, True),
    ("recurrent", torch.float32, True, True, True, "torchscale", False, True),
    ("recurrent", torch.float16, False, False, False, "none", True, False),
]


@pytest.mark.parametrize("form,dtype,with_state,packed,offsets,rotary,norm_weight,gate", MSR_CASES)
def test_msr_forward(form, dtype, with_state, packed, offsets, rotary, norm_weight, gate):
    args = _msr_args(form, dtype, grad=True, with_state=with_state, packed=packed,
                     offsets=offsets, rotary=rotary, norm_weight=norm_weight, gate=gate)
    _opcheck(ops.msr_forward, tuple(args))


@pytest.mark.parametrize("form,dtype,with_state,packed,offsets,rotary,norm_weight,gate",
                         [c for c in MSR_CASES if c[0] == "chunk"])
def test_msr_backward(form, dtype, with_state, packed, offsets, rotary, norm_weight, gate):
    a = _msr_args(form, dtype, grad=False, with_state=with_state, packed=packed,
                  offsets=offsets, rotary=rotary, norm_weight=norm_weight, gate=gate)
    q, k, v, g, ld, scale, _, chunk, s0, off, cu, rot, norm, w, eps, dn = a
    grad_y = torch.randn(q.shape[0], T, H, DV, dtype=dtype)
    grad_s = torch.randn(4 if packed else B, H, DK, DV)
    _opcheck(ops.msr_backward, (grad_y, grad_s, q, k, v, g, ld, scale, chunk, s0, off, cu, rot,
                                norm, w, eps, dn))


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("offsets,gate,norm_weight", [(True, True, True), (False, False, False)])
def test_msr_step_in_place(offsets, gate, norm_weight, dtype):
    q, k, v = _qkv(dtype, t=1)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    g = torch.randn(B, H, DV, dtype=dtype) if gate else None
    off = torch.randint(0, 100, (B,), dtype=torch.int64) if offsets else None
    w = 1.0 + 0.1 * torch.randn(DV, dtype=dtype) if norm_weight else None
    _opcheck(ops.msr_step, (q, k, v, g, random_log_decay(H), 0.25, _state(), off, 1, True, w,
                            1e-6, True))


def test_every_op_is_covered():
    """A new op must get an opcheck case here."""
    covered = {"chunk_forward", "chunk_backward", "parallel_forward", "parallel_backward",
               "recurrent_forward", "recurrent_step", "msr_forward", "msr_backward", "msr_step",
               "matvec"}
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("retention::")}
    assert registered == covered, f"ops without an opcheck case: {registered - covered}"


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_matvec(w_dtype, x_dtype):
    _opcheck(ops.matvec, (torch.randn(33, 70).to(w_dtype), torch.randn(70).to(x_dtype)))
