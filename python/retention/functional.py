"""Functional retention ops.

All forms compute raw multi-scale retention (per batch b, head h, position n)::

    o_n = scale * sum_{m<=n} gamma_h^(n-m) (q_n . k_m) v_m + scale * gamma_h^(n+1) q_n S_0
    S_T = gamma_h^T S_0 + sum_m gamma_h^(T-1-m) k_m^T v_m

with ``gamma_h = exp(log_decay[h])``. Layout is time-first: ``q, k`` are ``[B, T, H, dk]`` and
``v`` is ``[B, T, H, dv]``; states are ``[B, H, dk, dv]`` in float32 (float64 for float64
inputs). ``scale`` defaults to ``dk ** -0.5``.
"""
import math

import torch

_ops = torch.ops.retention


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def chunk_retention(q, k, v, log_decay, *, scale=None, chunk_size=64, initial_state=None,
                    output_final_state=False):
    """Chunkwise-recurrent form: O(T) time and memory, for training and prefill.

    Returns ``o``, or ``(o, final_state)`` when ``output_final_state``.
    """
    o, state = _ops.chunk_forward(q, k, v, log_decay, _scale(q, scale), int(chunk_size),
                                  initial_state)
    return (o, state) if output_final_state else o


def parallel_retention(q, k, v, log_decay, *, scale=None, initial_state=None,
                       output_final_state=False):
    """Parallel (quadratic) form: one T x T score matrix per head; best for short sequences."""
    o, state = _ops.parallel_forward(q, k, v, log_decay, _scale(q, scale), initial_state)
    return (o, state) if output_final_state else o


def recurrent_retention(q, k, v, log_decay, *, scale=None, initial_state=None,
                        output_final_state=False):
    """Token-by-token recurrent scan (reference and short prompts); differentiable."""
    o, state = _ops.recurrent_forward(q, k, v, log_decay, _scale(q, scale), initial_state)
    return (o, state) if output_final_state else o


_FORMS = {
    "chunk": chunk_retention,
    "parallel": parallel_retention,
    "recurrent": recurrent_retention,
}


def retention(q, k, v, log_decay, *, form="chunk", **kwargs):
    """Retention in the given ``form`` ("chunk", "parallel" or "recurrent")."""
    if form not in _FORMS:
        raise ValueError(f"form must be one of {sorted(_FORMS)}, got {form!r}")
    if form != "chunk" and "chunk_size" in kwargs:
        kwargs.pop("chunk_size")
    return _FORMS[form](q, k, v, log_decay, **kwargs)


def recurrent_step(q, k, v, log_decay, state, *, scale=None):
    """One decode step; ``state`` ([B, H, dk, dv], float32, contiguous) is updated in place.

    ``q, k``: ``[B, H, dk]`` or ``[B, 1, H, dk]``; ``v`` likewise with dv. Returns ``o`` in the
    layout of ``q``. Inference only.
    """
    return _ops.recurrent_step(q, k, v, log_decay, _scale(q, scale), state)


def retnet_log_decay(num_heads, device=None):
    """RetNet's per-head decay, ``log(1 - 2**(-5 - h))``, as float32 ``[num_heads]``."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(torch.float32).to(device)


def linspace_log_decay(num_heads, device=None):
    """The paper's experimental variant, ``log(1 - exp(linspace(log 1/32, log 1/512, H)))``."""
    x = torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads, dtype=torch.float64)
    return torch.log1p(-torch.exp(x)).to(torch.float32).to(device)
