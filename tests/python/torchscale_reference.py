"""Eager, test-only re-statement of torchscale's MultiScaleRetention (current version), written
from ../shared/reference/retnet-math.md §2-§5 and §8 (no torchscale code is used or copied).

It reproduces, form by form, what torchscale computes:
  * parallel:  decay mask D̃_nm = γ^(n-m) / sqrt(Σ_m γ^(n-m)) (row sums of the mask), scores
    (q_n·k_m) D̃_nm divided by the detached row normaliser clamp(Σ_m |(q_n·k_m) D̃_nm|, 1, 5e4);
  * recurrent: the token-by-token "prev_key_value"/"scale" bookkeeping of the sqrt form,
    value-major kv (B, H, dv, dk) and a per-head scale (H,);
followed by the per-head RMSNorm without affine, the swish gate and out_proj.

Deliberate differences from torchscale (documented so tests can rely on them):
  * the relative-position buffers (`decay`, `angle`) live in this module as non-persistent
    buffers (torchscale keeps them in RetNetRelPos), so the state dict holds exactly
    q_proj/k_proj/v_proj/g_proj/out_proj weights, like torchscale's MultiScaleRetention;
  * RMSNorm statistics are computed in float64 for float64 inputs (torchscale always uses
    x.float()); this makes the module usable as a float64 reference.
  * the rotation frequencies θ_i = 10000^(-i/(dk/2-1)) are computed in float64 (torchscale
    evaluates the same formula in float32, which perturbs θ by ~6e-8 relative: angles at position
    p differ by < p·6e-8 rad).  The library computes θ and p·θ in float64 in every path (fused
    kernels and unfused layer), the documented contract; keeping torchscale's fp32 rounding here
    would only re-test that rounding.
The decay buffer is created in float32 with torchscale's formula, so `.double()` gives the same
fp32-rounded decays that a `.double()`-ed torchscale model would use (and the library uses).
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TorchscaleRMSNorm", "TorchscaleMSR", "torchscale_log_decay", "torchscale_angle"]


def torchscale_log_decay(num_heads):
    """log(1 - 2^(-5-h)), computed in float32 (as torchscale does)."""
    return torch.log(1 - 2 ** (-5 - torch.arange(num_heads, dtype=torch.float)))


def torchscale_angle(key_dim):
    """[θ0, θ0, θ1, θ1, ...], θ_i = 1 / 10000^(i/(dk/2-1)), torchscale's formula in float64."""
    angle = 1.0 / (10000 ** torch.linspace(0, 1, key_dim // 2, dtype=torch.float64))
    return angle.unsqueeze(-1).repeat(1, 2).flatten()


def _rotate_pairs(x):
    # (x0, x1) -> (-x1, x0) for every consecutive pair of the last dim
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def _theta_shift(x, sin, cos):
    return x * cos + _rotate_pairs(x) * sin


class TorchscaleRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x):
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(stat_dtype)
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return y * self.weight if self.weight is not None else y


class TorchscaleMSR(nn.Module):
    """torchscale-style MultiScaleRetention with its relative-position helper folded in.

    parallel(x)            -> [B, T, D]   torchscale's parallel form
    recurrent(x)           -> [B, T, D]   torchscale's recurrent form, fed one token at a time
    parallel_row_normaliser(x) -> [B, H, T]  Σ_m |(q_n·k_m) D̃_nm| before its clamp(1, 5e4)
    """

    def __init__(self, embed_dim, value_dim, num_heads, layernorm_eps=1e-6, log_decay=None):
        super().__init__()
        self.embed_dim = embed_dim
        self.value_dim = value_dim
        self.num_heads = num_heads
        self.key_dim = embed_dim // num_heads
        self.head_dim = value_dim // num_heads
        self.scaling = self.key_dim ** -0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, value_dim, bias=False)
        self.g_proj = nn.Linear(embed_dim, value_dim, bias=False)
        self.out_proj = nn.Linear(value_dim, embed_dim, bias=False)
        self.group_norm = TorchscaleRMSNorm(self.head_dim, eps=layernorm_eps, elementwise_affine=False)
        ld = torchscale_log_decay(num_heads) if log_decay is None else log_decay.detach().clone()
        self.register_buffer("decay", ld, persistent=False)
        self.angle64 = torchscale_angle(self.key_dim)  # float64, not a buffer (see module docstring)
        for lin, gain in ((self.q_proj, 2 ** -2.5), (self.k_proj, 2 ** -2.5), (self.v_proj, 2 ** -2.5),
                          (self.g_proj, 2 ** -2.5), (self.out_proj, 2 ** -1)):
            nn.init.xavier_uniform_(lin.weight, gain=gain)

    # --- relative position (RetNetRelPos) --------------------------------------------------------
    def _parallel_relpos(self, slen):
        index = torch.arange(slen).to(self.decay)
        ang = torch.arange(slen, dtype=torch.float64)[:, None] * self.angle64[None, :]
        sin, cos = torch.sin(ang).to(self.decay), torch.cos(ang).to(self.decay)
        lower = torch.tril(torch.ones(slen, slen)).to(self.decay).bool()
        dist = (index[:, None] - index[None, :]).masked_fill(~lower, float("inf"))
        mask = torch.nan_to_num(torch.exp(dist * self.decay[:, None, None]))  # (H, T, T), 0 above diag
        mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()
        return sin, cos, mask

    def _recurrent_relpos(self, slen):
        ang = self.angle64 * (slen - 1)
        return torch.sin(ang).to(self.decay), torch.cos(ang).to(self.decay), self.decay.exp()

    # --- shared projections ------------------------------------------------------------------------
    def _qkvg(self, x, sin, cos):
        B, T, _ = x.shape
        q = self.q_proj(x)
        k = self.k_proj(x) * self.scaling
        v = self.v_proj(x)
        g = self.g_proj(x)
        q = q.view(B, T, self.num_heads, self.key_dim).transpose(1, 2)
        k = k.view(B, T, self.num_heads, self.key_dim).transpose(1, 2)
        return _theta_shift(q, sin, cos), _theta_shift(k, sin, cos), v, g

    def _finish(self, out, g, B, T):
        out = self.group_norm(out).reshape(B, T, self.value_dim)
        return self.out_proj(F.silu(g) * out)

    # --- parallel ------------------------------------------------------------------------------------
    def _parallel_scores(self, x):
        B, T, _ = x.shape
        sin, cos, mask = self._parallel_relpos(T)
        qr, kr, v, g = self._qkvg(x, sin, cos)
        qk = (qr @ kr.transpose(-1, -2)) * mask
        return qk, v, g

    def parallel_row_normaliser(self, x):
        qk, _, _ = self._parallel_scores(x)
        return qk.detach().abs().sum(dim=-1)

    def parallel(self, x):
        B, T, _ = x.shape
        qk, v, g = self._parallel_scores(x)
        qk = qk / qk.detach().abs().sum(dim=-1, keepdim=True).clamp(min=1, max=5e4)
        vr = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        out = (qk @ vr).transpose(1, 2)  # (B, T, H, dv)
        return self._finish(out, g, B, T)

    # --- recurrent -----------------------------------------------------------------------------------
    def recurrent_token(self, x_t, slen, incremental_state):
        """One torchscale recurrent call for the token at position slen-1; x_t [B, 1, D]."""
        B = x_t.shape[0]
        sin, cos, gamma = self._recurrent_relpos(slen)
        qr, kr, v, g = self._qkvg(x_t, sin, cos)  # qr, kr (B, H, 1, dk)
        v = v.view(B, self.num_heads, self.head_dim, 1)
        kv = kr * v  # (B, H, dv, dk)
        if "prev_key_value" in incremental_state:
            prev_kv = incremental_state["prev_key_value"]
            prev_scale = incremental_state["scale"]
            scale = prev_scale * gamma + 1
            kv = (prev_kv * (prev_scale.sqrt() * gamma / scale.sqrt()).view(self.num_heads, 1, 1)
                  + kv / scale.sqrt().view(self.num_heads, 1, 1))
        else:
            scale = torch.ones_like(gamma)
        incremental_state["prev_key_value"] = kv
        incremental_state["scale"] = scale
        out = torch.sum(qr * kv, dim=3)  # (B, H, dv)
        return self._finish(out, g, B, 1)

    def recurrent(self, x, incremental_state=None):
        state = {} if incremental_state is None else incremental_state
        start = 0 if "scale" not in state else int(state.get("_tokens", 0))
        outs = []
        for t in range(x.shape[1]):
            outs.append(self.recurrent_token(x[:, t:t + 1], start + t + 1, state))
            state["_tokens"] = start + t + 1
        return torch.cat(outs, dim=1)
