"""Independent float64 references for raw (FLA-semantics) retention.

Written from the math in ../shared/reference/retnet-math.md (sec. 0, 9) and the project contract;
nothing here calls the library under test.  Per batch b, head h, 0-based positions n, m:

    o_n = scale * sum_{m<=n} g^(n-m) (q_n . k_m) v_m  +  scale * g^(n+1) * q_n S_0
    S_T = g^T S_0 + sum_m g^(T-1-m) k_m^T v_m,        g = exp(log_decay[h])

Layouts: q, k [B, T, H, dk]; v [B, T, H, dv]; log_decay [H]; states [B, H, dk, dv].

Two independent formulations are provided and cross-checked by a test:
  * ``retention_quadratic``: the parallel form through an explicit decay matrix
    D[h, n, m] = g_h^(n-m) [n >= m] and einsum;
  * ``retention_loop``: the recurrence S <- g S + k^T v, o = scale * q S, one token at a time.

All computation is done in float64 on the values of the given tensors (so low-precision inputs
are compared against the exact result of their *rounded* values).  Both functions are written
with differentiable torch ops, so torch.autograd through them is the gradient oracle.
"""

import torch

__all__ = [
    "retention_quadratic",
    "retention_loop",
    "retention_reference",
    "reference_grads",
    "default_scale",
    "retention_term_rms",
]


def default_scale(dk):
    return float(dk) ** -0.5


def _f64(x):
    return None if x is None else x.to(dtype=torch.float64, device="cpu")


def gamma_pow(log_decay, n):
    """g^n = exp(n * log_decay) for integer n >= 0 (float64 tensors, broadcast), with g^0 = 1 also
    for g = 0 (log_decay = -inf), where n * log_decay would be 0 * -inf = NaN."""
    e = n * log_decay
    return torch.exp(torch.where(n == 0, torch.zeros_like(e), e))


def decay_matrix(log_decay, T):
    """D[h, n, m] = exp((n - m) * log_decay[h]) for n >= m, 0 otherwise. float64 [H, T, T]."""
    ld = _f64(log_decay)
    n = torch.arange(T, dtype=torch.float64)
    diff = n[:, None] - n[None, :]                        # [T, T]
    causal = diff >= 0
    # Clamp the exponent on the masked-out half so exp never overflows (log_decay <= 0, but keep
    # the reference well defined for any sign), then zero it exactly.
    expo = torch.where(causal, diff, torch.zeros_like(diff))
    D = gamma_pow(ld[:, None, None], expo[None, :, :])    # [H, T, T]
    return D * causal.to(torch.float64)


def retention_quadratic(q, k, v, log_decay, scale=None, initial_state=None):
    """Parallel/quadratic form. Returns (o [B,T,H,dv] f64, final_state [B,H,dk,dv] f64)."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    ld = _f64(log_decay)
    S0 = _f64(initial_state)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    if scale is None:
        scale = default_scale(dk)
    D = decay_matrix(ld, T)                                   # [H, T, T]
    scores = torch.einsum("bnhk,bmhk->bhnm", q, k) * D[None]  # [B, H, T, T]
    o = scale * torch.einsum("bhnm,bmhv->bnhv", scores, v)    # [B, T, H, dv]
    pos = torch.arange(T, dtype=torch.float64)
    # g^(T-1-m) weights for the final state, [H, T]
    w_last = gamma_pow(ld[:, None], (T - 1 - pos)[None, :])
    # (two-operand einsums only: a three-operand einsum may materialise an outer product)
    S = torch.einsum("bmhk,bmhv->bhkv", k, v * w_last.t()[None, :, :, None])
    if S0 is not None:
        g_np1 = gamma_pow(ld[:, None], (pos + 1)[None, :])   # [H, T]: g^(n+1)
        o = o + scale * torch.einsum("bnhk,bhkv->bnhv", q, S0) * g_np1.t()[None, :, :, None]
        S = S + gamma_pow(ld, torch.full_like(ld, T))[None, :, None, None] * S0
    elif T == 0:
        S = torch.zeros(B, H, dk, dv, dtype=torch.float64)
    return o, S


def retention_loop(q, k, v, log_decay, scale=None, initial_state=None):
    """Token-by-token recurrence. Returns (o [B,T,H,dv] f64, final_state [B,H,dk,dv] f64)."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    ld = _f64(log_decay)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    if scale is None:
        scale = default_scale(dk)
    g = torch.exp(ld)[None, :, None, None]                    # [1, H, 1, 1]
    if initial_state is None:
        S = torch.zeros(B, H, dk, dv, dtype=torch.float64)
    else:
        S = _f64(initial_state)
    outs = []
    for t in range(T):
        S = g * S + k[:, t, :, :, None] * v[:, t, :, None, :]  # k_t^T v_t, [B, H, dk, dv]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    if outs:
        o = torch.stack(outs, dim=1)
    else:
        o = torch.zeros(B, 0, H, dv, dtype=torch.float64)
    return o, S


retention_reference = retention_quadratic


def retention_term_rms(q, k, v, log_decay, scale=None, initial_state=None):
    """Natural magnitude of each output element: sqrt(sum of its squared product terms).

    o_n[j] is a sum of products  scale * g^(n-m) q_n[i] k_m[i] v_m[j]  (plus the S_0 terms).  A
    floating-point sum of such terms has an error proportional to sqrt(sum of squared terms), not
    to |o_n[j]|: when the terms cancel (e.g. T=1 and q.k ~ 0, one scalar shared by every output
    element) |o| is tiny but the rounding error is not.  Squaring every factor (and doubling the
    log decay) turns the reference into exactly that sum of squares, so this is the error scale a
    correct fp32 kernel is entitled to.  For random inputs without cancellation it equals RMS(o).
    """
    sq = lambda x: None if x is None else _f64(x) ** 2
    dk = q.shape[-1]
    if scale is None:
        scale = default_scale(dk)
    o2, _ = retention_quadratic(sq(q), sq(k), sq(v), 2.0 * _f64(log_decay), scale=scale ** 2,
                                initial_state=sq(initial_state))
    return o2.clamp_min(0.0).sqrt()


def reference_grads(q, k, v, log_decay, scale=None, initial_state=None, grad_o=None,
                    grad_final_state=None):
    """Gradients (dq, dk, dv, dS0) of <o, grad_o> + <S_T, grad_final_state> via torch autograd on
    the float64 quadratic reference.  dS0 is None when initial_state is None."""
    leaves = [_f64(q).detach().requires_grad_(), _f64(k).detach().requires_grad_(),
              _f64(v).detach().requires_grad_()]
    S0 = None if initial_state is None else _f64(initial_state).detach().requires_grad_()
    o, S = retention_quadratic(*leaves, log_decay, scale=scale, initial_state=S0)
    loss = torch.zeros((), dtype=torch.float64)
    if grad_o is not None:
        loss = loss + (o * _f64(grad_o)).sum()
    if grad_final_state is not None:
        loss = loss + (S * _f64(grad_final_state)).sum()
    inputs = leaves + ([S0] if S0 is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, inputs)]
    if S0 is None:
        grads.append(None)
    return tuple(grads)
