"""A plain-PyTorch Transformer language model, the baseline of bench/cost_curves.py.

Same layout as the library's RetNet (python/retention/nn.py) with attention in place of
retention: token embedding, pre-norm decoder layers ``x + Attn(RMSNorm(x))`` and
``y + SwiGLU(RMSNorm(y))`` (no biases), final RMSNorm, untied LM head. Rotary position
embedding (rotate-half form) on q and k. Causal attention uses
``torch.nn.functional.scaled_dot_product_attention`` when the installed torch has it (2.0+);
otherwise the explicit ``softmax(Q K^T / sqrt(d) + causal mask) V``.

Decoding uses a pre-allocated KV cache (``KVCache``: per layer k and v buffers
``[B, H, capacity, dh]`` written in place, like a static cache), so a decode step reads the
``L`` cached keys and values of every layer and copies nothing else.

``matched_ffn_dim`` picks the FFN width that gives this model the same parameter count per layer
as a RetNet layer (8 d^2 for q/k/v/g/out with Dv = 2d, plus its FFN), so the comparison is
"same size".
"""

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RMSNorm", "TransformerLM", "KVCache", "matched_ffn_dim", "check_kv_cache"]

_HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(positions: Tensor, dh: int, dtype, base: float = 10000.0):
    """cos, sin [T, dh] for rotate-half RoPE at the given (absolute) positions."""
    inv = 1.0 / (base ** (torch.arange(0, dh, 2, device=positions.device, dtype=torch.float32) / dh))
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, dh]; cos/sin [T, dh]."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


def causal_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """q [B,H,Tq,dh], k/v [B,H,Tk,dh]. causal=True: query i attends to keys <= i + (Tk - Tq)."""
    if _HAS_SDPA:
        if causal and q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if not causal or q.shape[2] == 1:
            return F.scaled_dot_product_attention(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal and q.shape[2] > 1:
        Tq, Tk = q.shape[2], k.shape[2]
        i = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        j = torch.arange(Tk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class KVCache:
    """Per-layer pre-allocated key/value buffers [B, H, capacity, dh] and the filled length."""

    def __init__(self, num_layers, B, H, capacity, dh, device=None, dtype=torch.float32):
        self.k = [torch.zeros(B, H, capacity, dh, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(B, H, capacity, dh, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0
        self.capacity = capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, d: int, num_heads: int):
        super().__init__()
        self.h = num_heads
        self.dh = d // num_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, offset: int = 0, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        B, T, d = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.h, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.h, self.dh).transpose(1, 2)
        cos, sin = rope_cos_sin(torch.arange(offset, offset + T, device=x.device), self.dh, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            end = offset + T
            if end > cache.capacity:
                raise ValueError(f"KV cache capacity {cache.capacity} exceeded ({end})")
            cache.k[layer][:, :, offset:end] = k
            cache.v[layer][:, :, offset:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        o = causal_attention(q, k, v, causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, ffn_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(d, ffn_dim, bias=False)
        self.gate = nn.Linear(d, ffn_dim, bias=False)
        self.fc2 = nn.Linear(ffn_dim, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.gate(x))


class Block(nn.Module):
    def __init__(self, d, num_heads, ffn_dim, eps):
        super().__init__()
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(d, num_heads)
        self.ffn_norm = RMSNorm(d, eps)
        self.ffn = SwiGLU(d, ffn_dim)

    def forward(self, x, offset=0, cache=None, layer=0):
        y = x + self.attn(self.attn_norm(x), offset, cache, layer)
        return y + self.ffn(self.ffn_norm(y))


class TransformerLM(nn.Module):
    """forward(tokens [B, T]) -> logits [B, T, V] (training / full-sequence).
    prefill(tokens [B, T], cache) -> logits, filling the cache from cache.length.
    step(tokens [B], cache) -> logits [B, V], appending one position to the cache."""

    def __init__(self, vocab_size, embed_dim, num_heads, num_layers, ffn_dim, eps=1e-6):
        super().__init__()
        if embed_dim % num_heads or (embed_dim // num_heads) % 2:
            raise ValueError("embed_dim must be a multiple of num_heads with an even head dim")
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, embed_dim // num_heads
        self.embed_tokens = nn.Embedding(vocab_size, embed_dim)
        self.layers = nn.ModuleList([Block(embed_dim, num_heads, ffn_dim, eps) for _ in range(num_layers)])
        self.norm = RMSNorm(embed_dim, eps)
        self.output_projection = nn.Linear(embed_dim, vocab_size, bias=False)
        nn.init.normal_(self.embed_tokens.weight, std=embed_dim ** -0.5)
        nn.init.normal_(self.output_projection.weight, std=embed_dim ** -0.5)

    def init_cache(self, batch_size, capacity, device=None, dtype=torch.float32) -> KVCache:
        return KVCache(self.num_layers, batch_size, self.num_heads, capacity, self.head_dim, device, dtype)

    def _run(self, tokens, offset, cache):
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, offset, cache, i)
        return self.output_projection(self.norm(x))

    def forward(self, tokens: Tensor) -> Tensor:
        return self._run(tokens, 0, None)

    @torch.no_grad()
    def prefill(self, tokens: Tensor, cache: KVCache) -> Tensor:
        out = self._run(tokens, cache.length, cache)
        cache.length += tokens.shape[1]
        return out

    @torch.no_grad()
    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        out = self._run(tokens.reshape(-1, 1), cache.length, cache)
        cache.length += 1
        return out[:, 0]


def retnet_layer_params(d: int, value_dim: int, ffn_dim: int) -> int:
    """Weights of one library RetNet layer: q,k (d x d), v,g (d x Dv), out (Dv x d), GLU, 2 norms."""
    return 2 * d * d + 3 * d * value_dim + 3 * d * ffn_dim + 2 * d


def matched_ffn_dim(d: int, value_dim: int, retnet_ffn_dim: int, multiple: int = 8) -> int:
    """SwiGLU width giving a Transformer layer (4 d^2 + 3 d f + 2 d) the RetNet layer's parameter count."""
    f = (retnet_layer_params(d, value_dim, retnet_ffn_dim) - 4 * d * d - 2 * d) / (3 * d)
    return max(multiple, int(round(f / multiple)) * multiple)


def check_kv_cache(seed: int = 0) -> float:
    """Tiny self-check: prefill + step-by-step decoding with the KV cache reproduces the full
    causal forward. Returns the max |difference| of the logits (raises if it is not tiny)."""
    g = torch.Generator().manual_seed(seed)
    model = TransformerLM(97, 32, 4, 2, 48).eval()
    tokens = torch.randint(0, 97, (2, 11), generator=g)
    with torch.no_grad():
        full = model(tokens)
        cache = model.init_cache(2, 16)
        outs: List[Tensor] = [model.prefill(tokens[:, :5], cache)]
        for t in range(5, 11):
            outs.append(model.step(tokens[:, t], cache)[:, None])
        inc = torch.cat(outs, dim=1)
    err = (full - inc).abs().max().item()
    if not err < 1e-4:
        raise AssertionError(f"KV-cache decoding differs from the full forward by {err}")
    return err
