"""Eager PyTorch references of raw retention, used as the baselines of the CPU benchmarks.

Both functions compute the same math as the library ops (raw retention, FLA semantics, no
normalisers), per batch b, head h, 0-based positions n, m:

    o_n = scale * sum_{m<=n} g_h^(n-m) (q_n . k_m) v_m,        g_h = exp(log_decay[h])

but the way torchscale's MultiScaleRetention evaluates it: plain torch ops, autograd for the
backward, head-first layout ``[B, H, T, d]`` (torchscale transposes to head-first right after the
projections, so that is the layout its kernels see).

* ``parallel_retention_eager``: the parallel form. Builds the decay mask D [H, T, T] on every call
  (torchscale's RetNetRelPos rebuilds it in every forward) and materialises the T x T scores
  ``(q k^T) * D``, then multiplies by v: O(T^2) time and memory per head.
* ``chunk_retention_eager``: the chunkwise-recurrent form as torchscale writes it: the intra-chunk
  part and the per-chunk key-value summaries as batched matmuls over all chunks, the inter-chunk
  state carried by a Python loop over chunks, then one batched matmul for the inter-chunk part.
  O(T*C) time and memory per head.

Neither applies torchscale's normalisers (sqrt row sums of D, detached abs-sum clamp, the
per-chunk value scaling): those are O(T^2) or O(T*C) elementwise passes that only add cost to
the eager side, so leaving them out keeps the comparison with the raw op conservative.

``to_head_first`` / ``to_time_first`` convert between this layout and the library's
``[B, T, H, d]``.
"""

import torch

__all__ = [
    "decay_mask",
    "parallel_retention_eager",
    "chunk_retention_eager",
    "to_head_first",
    "to_time_first",
]


def to_head_first(x):
    """[B, T, H, d] -> contiguous [B, H, T, d]."""
    return x.transpose(1, 2).contiguous()


def to_time_first(x):
    """[B, H, T, d] -> contiguous [B, T, H, d]."""
    return x.transpose(1, 2).contiguous()


def decay_mask(log_decay, T, dtype=torch.float32, device=None):
    """D[h, n, m] = g_h^(n-m) for n >= m and 0 above the diagonal, shape [H, T, T].

    Built like torchscale's RetNetRelPos parallel branch: a relative-distance matrix, the
    exponential of distance * log(gamma) per head, and the upper triangle zeroed."""
    device = log_decay.device if device is None else device
    idx = torch.arange(T, device=device, dtype=dtype)
    dist = idx[:, None] - idx[None, :]                         # [T, T], n - m
    upper = dist < 0
    dist = dist.masked_fill(upper, 0.0)                        # keep exp() finite above the diagonal
    mask = torch.exp(dist[None] * log_decay.to(device=device, dtype=dtype)[:, None, None])
    return mask.masked_fill_(upper[None], 0.0)


def parallel_retention_eager(q, k, v, log_decay, scale=None):
    """q, k [B, H, T, dk], v [B, H, T, dv] -> o [B, H, T, dv] (parallel form, autograd-able)."""
    T, dk = q.shape[-2], q.shape[-1]
    if scale is None:
        scale = dk ** -0.5
    D = decay_mask(log_decay, T, dtype=q.dtype, device=q.device)   # [H, T, T]
    scores = torch.matmul(q * scale, k.transpose(-1, -2))          # [B, H, T, T]
    return torch.matmul(scores * D, v)


def chunk_retention_eager(q, k, v, log_decay, scale=None, chunk_size=64):
    """Chunkwise-recurrent form in Python (torchscale style). Same inputs/outputs as
    ``parallel_retention_eager``; T is zero-padded up to a multiple of ``chunk_size``."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    C = int(chunk_size)
    if scale is None:
        scale = dk ** -0.5
    pad = (-T) % C
    if pad:
        zq = q.new_zeros(B, H, pad, dk)
        q, k = torch.cat([q, zq], 2), torch.cat([k, zq], 2)
        v = torch.cat([v, v.new_zeros(B, H, pad, dv)], 2)
    N = (T + pad) // C
    qc = q.reshape(B, H, N, C, dk)
    kc = k.reshape(B, H, N, C, dk)
    vc = v.reshape(B, H, N, C, dv)

    ld = log_decay.to(device=q.device, dtype=q.dtype)
    D = decay_mask(ld, C, dtype=q.dtype, device=q.device)[None, :, None]          # [1, H, 1, C, C]
    pos = torch.arange(C, device=q.device, dtype=q.dtype)
    q_decay = torch.exp((pos + 1)[None, :] * ld[:, None])[None, :, None, :, None]  # g^(i+1)
    k_decay = torch.exp((C - 1 - pos)[None, :] * ld[:, None])[None, :, None, :, None]  # g^(C-1-j)
    chunk_decay = torch.exp(C * ld)[None, :, None, None]                           # g^C, [1,H,1,1]

    # intra-chunk part and per-chunk key-value summaries, batched over all chunks
    inner = torch.matmul(torch.matmul(qc, kc.transpose(-1, -2)) * D, vc)           # [B,H,N,C,dv]
    kv = torch.matmul((kc * k_decay).transpose(-1, -2), vc)                        # [B,H,N,dk,dv]

    # inter-chunk state: a Python loop over chunks (state entering each chunk). unbind() rather
    # than kv[:, :, c] in the loop: the backward of N separate index ops would write N full-size
    # zero gradients of kv (O(N^2) memory traffic); unbind's backward is one stack.
    S = q.new_zeros(B, H, dk, dv)
    entering = []
    for kv_c in kv.unbind(2):
        entering.append(S)
        S = S * chunk_decay + kv_c
    entering = torch.stack(entering, dim=2)                                        # [B,H,N,dk,dv]

    cross = torch.matmul(qc * q_decay, entering)                                   # [B,H,N,C,dv]
    o = ((inner + cross) * scale).reshape(B, H, N * C, dv)
    return o[:, :, :T] if pad else o
