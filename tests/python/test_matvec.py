"""retention::matvec (csrc/cpu/gemv.cpp), the one-row projection of a decode step at batch 1, and
retention.nn.Linear, which takes it for a single CPU row without gradients. Checked against a
float64 product of the same (widened) values."""
import pytest
import torch
import torch.nn.functional as F

import retention.nn as rnn
from retention.functional import matvec

# N, K: below, at and past the 64-wide vector step and the 16-lane tail; the C++ models' sizes.
SIZES = [(1, 1), (3, 15), (7, 16), (5, 63), (9, 64), (11, 65), (33, 200), (17, 1000), (64, 1536)]


def bound(w, x, out_dtype):
    """Any fp32 summation order of K products is within (K + 1) u sum |w x| of the exact sum
    (u = 2^-24); a bf16 result adds its own rounding, half an ulp of 2^-7 relative."""
    mag = (w.double().abs() @ x.double().abs())
    err = (w.shape[1] + 1) * 2.0 ** -24 * mag
    if out_dtype == torch.bfloat16:
        err = err + 2.0 ** -8 * (w.double() @ x.double()).abs() + 2.0 ** -8 * err
    return err + 1e-30


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", SIZES)
def test_matvec_matches_float64(N, K, w_dtype, x_dtype):
    g = torch.Generator().manual_seed(N * 7919 + K)
    w = torch.randn(N, K, generator=g).to(w_dtype)
    x = torch.randn(K, generator=g).to(x_dtype)
    y = matvec(w, x)
    assert y.dtype == x_dtype and y.shape == (N,)
    ref = w.double() @ x.double()
    err = (y.double() - ref).abs()
    assert bool((err <= bound(w, x, x_dtype)).all()), f"max error {err.max().item():.3g}"


def test_matvec_threads_give_the_same_bits():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(700, 513, generator=g)
    x = torch.randn(513, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matvec(w, x)
        torch.set_num_threads(2)
        two = matvec(w, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("w,x,match", [
    (torch.zeros(4, 8, dtype=torch.float16), torch.zeros(8), "weight must be a contiguous 2-D"),
    (torch.zeros(8, 4).t(), torch.zeros(8), "not contiguous"),
    (torch.zeros(4, 8, 1), torch.zeros(8), "weight must be"),
    (torch.zeros(4, 8), torch.zeros(7), r"x must be a float32 or bfloat16 vector \[K\] = \[8\]"),
    (torch.zeros(4, 8), torch.zeros(1, 8), "x must be"),
    (torch.zeros(4, 8), torch.zeros(8, dtype=torch.float64), "x must be"),
])
def test_matvec_rejects_bad_input(w, x, match):
    with pytest.raises(RuntimeError, match=match):
        matvec(w, x)


def test_matvec_has_no_backward():
    w = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="retention::matvec: an inference kernel with no backward"):
        matvec(w, torch.randn(8))
    with torch.no_grad():
        assert matvec(w, torch.randn(8)).shape == (4,)


def test_matvec_meta_shape():
    y = matvec(torch.empty(6, 5, device="meta", dtype=torch.bfloat16), torch.empty(5, device="meta"))
    assert y.device.type == "meta" and y.shape == (6,) and y.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 200), (200,), (1, 200)])
def test_linear_one_row_takes_matvec(shape, dtype):
    torch.manual_seed(0)
    lin = rnn.Linear(200, 37).to(dtype)
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        y = lin(x)
    assert y.shape == (*shape[:-1], 37) and y.dtype == dtype
    expect = matvec(lin.weight.detach(), x.reshape(-1)).view(*shape[:-1], 37)
    assert torch.equal(y, expect)  # the same kernel, not F.linear
    ref = x.double() @ lin.weight.double().t()
    err = (y.double() - ref).abs().reshape(-1)
    assert bool((err <= bound(lin.weight.detach(), x.reshape(-1), dtype)).all())


def test_linear_with_grad_stays_differentiable():
    """With gradients the one-row path is F.linear: d(sum y)/dW = ones x^T."""
    torch.manual_seed(1)
    assert torch.autograd.gradcheck(rnn.Linear(16, 5).double(),
                                    (torch.randn(1, 16, dtype=torch.float64, requires_grad=True),))
    lin = rnn.Linear(16, 5)
    x = torch.randn(16)
    lin(x).sum().backward()
    assert torch.equal(lin.weight.grad, x.expand(5, 16))
