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


_FORM_CODES = {"chunk": 0, "parallel": 1, "recurrent": 2}
_ROTARY_CODES = {None: 0, "none": 0, "torchscale": 1, "neox": 2}


def _raw_varlen(form, q, k, v, log_decay, scale, chunk_size, initial_state, cu_seqlens,
                output_final_state):
    """Raw retention of packed sequences: the fused op with nothing around the retention."""
    o, state = _ops.msr_forward(q, k, v, None, log_decay, _scale(q, scale), _FORM_CODES[form],
                                int(chunk_size), initial_state, None, cu_seqlens, 0, False, None,
                                0.0, False)
    return (o, state) if output_final_state else o


def chunk_retention(q, k, v, log_decay, *, scale=None, chunk_size=64, initial_state=None,
                    output_final_state=False, cu_seqlens=None):
    """Chunkwise-recurrent form: O(T) time and memory, for training and prefill.

    Returns ``o``, or ``(o, final_state)`` when ``output_final_state``.  ``cu_seqlens``
    (int32/int64 ``[N + 1]``, B == 1): packed sequences, states ``[N, H, dk, dv]``.
    """
    if cu_seqlens is not None:
        return _raw_varlen("chunk", q, k, v, log_decay, scale, chunk_size, initial_state,
                           cu_seqlens, output_final_state)
    o, state = _ops.chunk_forward(q, k, v, log_decay, _scale(q, scale), int(chunk_size),
                                  initial_state)
    return (o, state) if output_final_state else o


def parallel_retention(q, k, v, log_decay, *, scale=None, initial_state=None,
                       output_final_state=False, cu_seqlens=None):
    """Parallel (quadratic) form: one T x T score matrix per head; best for short sequences."""
    if cu_seqlens is not None:
        return _raw_varlen("parallel", q, k, v, log_decay, scale, 64, initial_state, cu_seqlens,
                           output_final_state)
    o, state = _ops.parallel_forward(q, k, v, log_decay, _scale(q, scale), initial_state)
    return (o, state) if output_final_state else o


def recurrent_retention(q, k, v, log_decay, *, scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None):
    """Token-by-token recurrent scan (reference and short prompts); differentiable."""
    if cu_seqlens is not None:
        return _raw_varlen("recurrent", q, k, v, log_decay, scale, 64, initial_state, cu_seqlens,
                           output_final_state)
    o, state = _ops.recurrent_forward(q, k, v, log_decay, _scale(q, scale), initial_state)
    return (o, state) if output_final_state else o


def _rotary_code(rotary):
    if rotary not in _ROTARY_CODES:
        raise ValueError(f"rotary must be 'torchscale', 'neox' or None, got {rotary!r}")
    return _ROTARY_CODES[rotary]


def msr(q, k, v, g, log_decay, *, form="chunk", scale=None, chunk_size=64, rotary="torchscale",
        norm=True, norm_weight=None, eps=1e-6, decay_norm=False, initial_state=None,
        offsets=None, cu_seqlens=None, output_final_state=False):
    """Fused multi-scale retention layer core: rotate -> retain -> RMSNorm -> swish gate.

    For sequence s, head h and absolute position p = offsets[s] + n (offsets default 0)::

        u_n = retention of (R(p) q, R(p) k, v)               (continuing from initial_state[s])
        o_n = u_n / sqrt(S_{p+1})  if decay_norm  (torchscale's normaliser, S_j = sum_{i<j} gamma^i)
        z_n = o_n / sqrt(mean(o_n^2) + eps) * norm_weight    if norm (fp32 statistics)
        y_n = silu(g_n) * z_n                                if g is not None

    q, k ``[B, T, H, dk]`` (un-rotated); v, g ``[B, T, H, dv]``; ``rotary``: "torchscale"
    (interleaved pairs, theta_i = 10000^(-i/(dk/2-1))), "neox" (half split, 10000^(-2i/dk)) or
    None; ``cu_seqlens`` (B == 1): packed sequences; ``offsets`` int64 ``[N]``.  Returns y
    (dtype of q), or ``(y, final_state [N, H, dk, dv])`` when ``output_final_state``.
    Differentiable in q, k, v, g, initial_state and norm_weight.
    """
    if form not in _FORM_CODES:
        raise ValueError(f"form must be one of {sorted(_FORM_CODES)}, got {form!r}")
    y, state = _ops.msr_forward(q, k, v, g, log_decay, _scale(q, scale), _FORM_CODES[form],
                                int(chunk_size), initial_state, offsets, cu_seqlens,
                                _rotary_code(rotary), bool(norm), norm_weight, float(eps),
                                bool(decay_norm))
    return (y, state) if output_final_state else y


def msr_step(q, k, v, g, log_decay, state, *, offsets=None, scale=None, rotary="torchscale",
             norm=True, norm_weight=None, eps=1e-6, decay_norm=False):
    """One fused decode step for B sequences at positions ``offsets`` (int64 [B], default 0).

    ``q, k``: ``[B, H, dk]`` or ``[B, 1, H, dk]``; ``v, g`` likewise with dv.  ``state``
    ``[B, H, dk, dv]`` is updated in place; the caller advances ``offsets``.  Inference only.
    """
    return _ops.msr_step(q, k, v, g, log_decay, _scale(q, scale), state, offsets,
                         _rotary_code(rotary), bool(norm), norm_weight, float(eps),
                         bool(decay_norm))


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
