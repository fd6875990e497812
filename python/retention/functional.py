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
_FORM_CODES = {"chunk": 0, "parallel": 1, "recurrent": 2}
_ROTARY_CODES = {None: 0, "none": 0, "torchscale": 1, "neox": 2}


def resolve_scale(q, scale=None):
    """The ops' ``scale``: ``scale``, or ``dk ** -0.5`` (dk = ``q.shape[-1]``) when None."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def form_code(form):
    """The op schemas' code of a form: "chunk" 0, "parallel" 1, "recurrent" 2."""
    if form not in _FORM_CODES:
        raise ValueError(f"form must be one of {sorted(_FORM_CODES)}, got {form!r}")
    return _FORM_CODES[form]


def rotary_code(rotary):
    """The op schemas' code of a rotation: None 0, "torchscale" 1, "neox" 2."""
    if rotary not in _ROTARY_CODES:
        raise ValueError(f"rotary must be 'torchscale', 'neox' or None, got {rotary!r}")
    return _ROTARY_CODES[rotary]


_CONVERT = {"form": form_code, "rotary": rotary_code, "chunk_size": int, "eps": float,
            "norm": bool, "decay_norm": bool}


def call_op(name, **args):
    """``torch.ops.retention.<name>`` called with its schema's argument names as keywords.

    Every Python call of the ops goes through here.  Every argument of the schema is given
    (None for an absent optional tensor), in Python terms: ``form`` and ``rotary`` by name,
    ``scale=None`` for ``dk ** -0.5``; they are converted to the schema's codes and types.
    """
    for key, convert in _CONVERT.items():
        if key in args:
            args[key] = convert(args[key])
    if "scale" in args:
        args["scale"] = resolve_scale(args["q"], args["scale"])
    return getattr(_ops, name)(**args)


def _raw(form, q, k, v, log_decay, scale, chunk_size, initial_state, output_final_state,
         cu_seqlens):
    if cu_seqlens is not None:  # packed sequences: the fused op with nothing around the retention
        o, state = msr(q, k, v, None, log_decay, form=form, scale=scale, chunk_size=chunk_size,
                       rotary=None, norm=False, eps=0.0, initial_state=initial_state,
                       cu_seqlens=cu_seqlens, output_final_state=True)
    else:
        extra = {"chunk_size": chunk_size} if form == "chunk" else {}
        o, state = call_op(form + "_forward", q=q, k=k, v=v, log_decay=log_decay, scale=scale,
                           initial_state=initial_state, **extra)
    return (o, state) if output_final_state else o


def chunk_retention(q, k, v, log_decay, *, scale=None, chunk_size=64, initial_state=None,
                    output_final_state=False, cu_seqlens=None):
    """Chunkwise-recurrent form: O(T) time and memory, for training and prefill.

    Returns ``o``, or ``(o, final_state)`` when ``output_final_state``.  ``cu_seqlens``
    (int32/int64 ``[N + 1]``, B == 1): packed sequences, states ``[N, H, dk, dv]``.
    """
    return _raw("chunk", q, k, v, log_decay, scale, chunk_size, initial_state, output_final_state,
                cu_seqlens)


def parallel_retention(q, k, v, log_decay, *, scale=None, initial_state=None,
                       output_final_state=False, cu_seqlens=None):
    """Parallel (quadratic) form: one T x T score matrix per head; best for short sequences."""
    return _raw("parallel", q, k, v, log_decay, scale, 64, initial_state, output_final_state,
                cu_seqlens)


def recurrent_retention(q, k, v, log_decay, *, scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None):
    """Token-by-token recurrent scan (reference and short prompts); differentiable."""
    return _raw("recurrent", q, k, v, log_decay, scale, 64, initial_state, output_final_state,
                cu_seqlens)


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
    y, state = call_op("msr_forward", q=q, k=k, v=v, g=g, log_decay=log_decay, scale=scale,
                       form=form, chunk_size=chunk_size, initial_state=initial_state,
                       offsets=offsets, cu_seqlens=cu_seqlens, rotary=rotary, norm=norm,
                       norm_weight=norm_weight, eps=eps, decay_norm=decay_norm)
    return (y, state) if output_final_state else y


def msr_step(q, k, v, g, log_decay, state, *, offsets=None, scale=None, rotary="torchscale",
             norm=True, norm_weight=None, eps=1e-6, decay_norm=False):
    """One fused decode step for B sequences at positions ``offsets`` (int64 [B], default 0).

    ``q, k``: ``[B, H, dk]`` or ``[B, 1, H, dk]``; ``v, g`` likewise with dv.  ``state``
    ``[B, H, dk, dv]`` is updated in place; the caller advances ``offsets``.  Inference only.
    """
    return call_op("msr_step", q=q, k=k, v=v, g=g, log_decay=log_decay, scale=scale, state=state,
                   offsets=offsets, rotary=rotary, norm=norm, norm_weight=norm_weight, eps=eps,
                   decay_norm=decay_norm)


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
    return call_op("recurrent_step", q=q, k=k, v=v, log_decay=log_decay, scale=scale, state=state)


def matvec(weight, x):
    """``weight @ x`` on the CPU for one row: ``weight`` [N, K] float32 or bfloat16 (contiguous),
    ``x`` [K] float32 or bfloat16 -> [N] in x's dtype, with fp32 products and sums and the same
    bits at any thread count. Inference only (no backward); decode at batch 1 uses it."""
    return call_op("matvec", weight=weight, x=x)


def retnet_log_decay(num_heads, device=None):
    """RetNet's per-head decay, ``log(1 - 2**(-5 - h))``, as float32 ``[num_heads]``."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(torch.float32).to(device)


def linspace_log_decay(num_heads, device=None):
    """The paper's experimental variant, ``log(1 - exp(linspace(log 1/32, log 1/512, H)))``."""
    x = torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads, dtype=torch.float64)
    return torch.log1p(-torch.exp(x)).to(torch.float32).to(device)
