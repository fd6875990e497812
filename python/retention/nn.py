"""torch.nn modules built on the retention ops: torchscale-compatible MultiScaleRetention and a
small RetNet decoder language model.

Math (see ../shared/reference/retnet-math.md §2-§8).  For head h with decay γ = exp(log_decay[h]),
after the projections, key scaling (k *= dk**-0.5) and the interleaved rotation at absolute
position n, the library ops return the raw retention

    u_n = Σ_{m<=n} γ^(n-m) (q_n·k_m) v_m  (+ γ^(n+1) q_n S_0 when continuing from a state S_0)

(called with scale=1.0 because the key is already scaled).  This layer then multiplies u_n by
1/sqrt(S_{n+1}(γ)), S_j = (1-γ^j)/(1-γ), which is exactly torchscale's *recurrent* normalisation,
so every form of this layer (parallel, chunk, recurrent, step-by-step decoding) reproduces
torchscale's recurrent output for any RMSNorm eps, and torchscale's parallel output wherever its
detached abs-sum row normaliser is 1 (or with eps=0).  The forms agree with each other to
floating-point rounding, for any eps, because they all apply the same per-position factor to the
same raw retention.

State / decoding semantics
--------------------------
* ``MultiScaleRetention.forward(x, form, state=None)`` returns ``(out, new_state)``.  It never
  modifies the ``state`` passed in; ``new_state`` is a fresh :class:`RetentionState` holding the
  raw fp32 (fp64 for fp64 modules) retention state ``[B, H, dk, dv]`` after the last token and the
  absolute offset (number of tokens seen).
* ``MultiScaleRetention.step(x_t, state)`` decodes one token and UPDATES ``state`` IN PLACE
  (its tensor via ``retention.recurrent_step`` and its offset), returning ``(out, state)`` with the
  same object.  To branch a decode (e.g. several continuations of one prompt) call
  ``state.clone()`` first.  ``step`` is inference only (it runs under ``torch.no_grad``).
* ``RetNet`` uses the same conventions with a :class:`RetNetState` (one RetentionState per layer).
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint
from . import functional as rf

__all__ = [
    "RetentionState",
    "RetNetState",
    "RMSNorm",
    "MultiScaleRetention",
    "GLU",
    "RetNetDecoderLayer",
    "RetNet",
    "StaticDecodeStep",
    "Linear",
]

_FORMS = {"parallel": "parallel", "chunk": "chunk", "chunkwise": "chunk", "recurrent": "recurrent"}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bfloat16/fp32 tensors, fp64 for fp64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _activation(name: str):
    name = str(name).lower()
    if name in ("swish", "silu"):
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported gate/activation function {name!r} (use 'swish', 'gelu' or 'relu')")


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose single CPU row (decode at batch 1), with fp32 or bf16
    weights and no gradient, goes to ``retention.functional.matvec`` (fp32 products and sums, the
    result in x's dtype): OpenBLAS's GEMM of one row costs several times its gemv on matrices of
    a few MiB, its gemv streamed at two thirds of matvec's rate on an AVX2 EPYC (equal on an
    AVX-512 one), and torch's bf16 CPU kernels are slower than fp32 (measured:
    docs/cpu-performance.md, "Decode at batch 1"). Same parameters
    and state-dict names."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.is_cpu and x.dim() >= 1 and x.numel() == x.shape[-1] and x.dtype in _MATVEC_DTYPES \
                and w.dtype in _MATVEC_DTYPES and w.is_contiguous() \
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return rf.matvec(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w)


_MATVEC_DTYPES = (torch.float32, torch.bfloat16)


def rotate_every_two(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) (torchscale's interleaved pairs)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotation_angles(head_dim: int) -> Tensor:
    """θ repeated per pair, length head_dim: θ_i = 10000^(-i/(dk/2-1)) (torchscale's formula), in
    float64 like the fused kernels (torchscale evaluates it in fp32)."""
    half = head_dim // 2
    i = torch.arange(half, dtype=torch.float64)
    theta = 10000.0 ** (-i / (half - 1)) if half > 1 else torch.ones(1, dtype=torch.float64)
    return theta.repeat_interleave(2)


def decay_normaliser(log_decay: Tensor, positions: Tensor) -> Tensor:
    """1/sqrt(S_{n+1}(γ_h)) for absolute positions n (shape [T]) and heads h: returns [T, H].

    S_j = (1-γ^j)/(1-γ) = expm1(j·logγ)/expm1(logγ), computed in the dtype of log_decay
    (fp32 or fp64) without cancellation, also for γ -> 1 (and S_j = j for γ == 1 exactly)."""
    lg = log_decay[None, :]
    j = (positions.to(log_decay.dtype) + 1)[:, None]
    num = torch.expm1(j * lg)
    den = torch.expm1(lg)
    s = torch.where(lg == 0, j.expand_as(num), num / torch.where(lg == 0, torch.ones_like(den), den))
    return torch.rsqrt(s)


def _clone_offset(offset):
    return offset.clone() if isinstance(offset, Tensor) else offset


class RetentionState:
    """Decoding state of one MultiScaleRetention layer.

    state:  raw retention state U [N, H, dk, dv], fp32 (fp64 for fp64 modules), FLA convention
            (U_n = γ U_{n-1} + k_n^T v_n with the rotated, dk^-0.5-scaled keys).
    offset: absolute position of the next token (= number of tokens consumed so far): an int
            shared by all N sequences, or an int64 tensor [N] when they are at different
            positions (packed prompts of different lengths, padded batches).
    """

    __slots__ = ("state", "offset")

    def __init__(self, state: Tensor, offset: Union[int, Tensor]):
        if not isinstance(state, Tensor) or state.dim() != 4 or state.dtype not in (torch.float32, torch.float64):
            raise ValueError("state must be a float32/float64 tensor [N, H, dk, dv], got "
                             + (f"{state.dtype} {list(state.shape)}" if isinstance(state, Tensor) else type(state).__name__))
        self.state = state
        if isinstance(offset, Tensor):
            if offset.dim() != 1 or offset.shape[0] != state.shape[0]:
                raise ValueError(f"per-sequence offsets must have shape [{state.shape[0]}], got {list(offset.shape)}")
            if offset.is_floating_point() or offset.is_complex():
                raise ValueError(f"offsets must be integer positions, got {offset.dtype}")
            self.offset = offset.to(device=state.device, dtype=torch.int64)
        else:
            self.offset = int(offset)
        if not isinstance(self.offset, Tensor) and self.offset < 0:  # (tensor offsets: the ops check them)
            raise ValueError(f"offset must be a non-negative position, got {offset}")

    def offsets(self) -> Tensor:
        """Start positions as an int64 tensor [N] on the state's device."""
        if isinstance(self.offset, Tensor):
            return self.offset
        return torch.full((self.state.shape[0],), self.offset, dtype=torch.int64, device=self.state.device)

    def advance(self, n: Union[int, Tensor]) -> None:
        """Move every sequence n tokens on (n: int or int64 tensor [N])."""
        if isinstance(n, Tensor) and not isinstance(self.offset, Tensor):
            self.offset = self.offsets()
        self.offset = self.offset + (n.to(self.state.device) if isinstance(n, Tensor) else int(n))

    def reorder(self, index: Tensor) -> "RetentionState":
        """Beam search: keep sequences `index` (int64 [N'], repeats allowed), in place."""
        index = index.to(device=self.state.device, dtype=torch.int64)
        self.state = self.state.index_select(0, index)
        if isinstance(self.offset, Tensor):
            self.offset = self.offset.index_select(0, index)
        return self

    def clone(self) -> "RetentionState":
        return RetentionState(self.state.detach().clone(), _clone_offset(self.offset))

    def detach(self) -> "RetentionState":
        return RetentionState(self.state.detach(), _clone_offset(self.offset))

    def __repr__(self):
        off = self.offset.tolist() if isinstance(self.offset, Tensor) else self.offset
        return f"RetentionState(shape={tuple(self.state.shape)}, dtype={self.state.dtype}, offset={off})"


class RetNetState:
    """Decoding state of a RetNet: one RetentionState per layer (all share the same offset)."""

    __slots__ = ("layers",)

    def __init__(self, layers: List[RetentionState]):
        self.layers = list(layers)

    @property
    def offset(self) -> Union[int, Tensor]:
        return self.layers[0].offset if self.layers else 0

    def reorder(self, index: Tensor) -> "RetNetState":
        """Beam search: keep sequences `index` in every layer, in place."""
        for s in self.layers:
            s.reorder(index)
        return self

    def clone(self) -> "RetNetState":
        return RetNetState([s.clone() for s in self.layers])

    def detach(self) -> "RetNetState":
        return RetNetState([s.detach() for s in self.layers])

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __repr__(self):
        return f"RetNetState(num_layers={len(self.layers)}, offset={self.offset})"


class RMSNorm(nn.Module):
    """torchscale RMSNorm: x * rsqrt(mean(x^2) + eps), statistics in fp32 (fp64 for fp64
    inputs), cast back to the input dtype, then times the optional affine weight."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(_compute_dtype(x.dtype))
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        if self.weight is not None:
            out = out * self.weight
        return out

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class MultiScaleRetention(nn.Module):
    """torchscale's MultiScaleRetention (current version, §3/§8 of retnet-math.md) on the
    retention ops.

    Parameters (exact torchscale names, no biases): q_proj.weight [D,D], k_proj.weight [D,D],
    v_proj.weight [Dv,D], g_proj.weight [Dv,D], out_proj.weight [D,Dv].  The per-head log decay
    is a non-persistent buffer ``log_decay`` [H] (not in the state dict, so torchscale state dicts
    load with strict=True); it stays fp32 (fp64 under ``.double()``) when the module is cast to
    half/bfloat16.

    decay: "retnet" (γ_h = 1-2^(-5-h)), "linspace" (paper's 1-exp(linspace(log 1/32, log 1/512, H)))
           or a tensor [H] of natural-log decays log γ_h <= 0.

    core: what the fused layer runs between its projections: ``retention.msr`` or a callable with its
          signature (``retention.distributed.enable_context_parallel`` sets the context-parallel
          one).  Called with ``output_final_state=True``, it returns ``(y, final_state)``, or
          ``(y, final_state, length)`` when it covers ``length`` positions of each sequence, not
          the input's (context parallel: the whole sequence the input is a slice of).
    """

    def __init__(
        self,
        embed_dim: int,
        value_dim: int,
        num_heads: int,
        gate_fn: str = "swish",
        layernorm_eps: float = 1e-6,
        chunk_size: int = 64,
        decay: Union[str, Tensor] = "retnet",
        fused: bool = True,
    ):
        super().__init__()
        if embed_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) and value_dim ({value_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.value_dim = value_dim
        self.num_heads = num_heads
        self.key_dim = embed_dim // num_heads  # dk
        self.head_dim = value_dim // num_heads  # dv (torchscale's name)
        if self.key_dim % 2:
            raise ValueError(f"key head dim embed_dim/num_heads must be even for the rotation, got {self.key_dim}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.scaling = self.key_dim ** -0.5
        self.gate_fn = gate_fn
        self.gate = _activation(gate_fn)
        self.layernorm_eps = layernorm_eps
        self.chunk_size = chunk_size
        # The fused op has the swish gate built in; other gates run the unfused composition.
        self.fused = bool(fused) and str(gate_fn).lower() in ("swish", "silu")

        self.q_proj = Linear(embed_dim, embed_dim)
        self.k_proj = Linear(embed_dim, embed_dim)
        self.v_proj = Linear(embed_dim, value_dim)
        self.g_proj = Linear(embed_dim, value_dim)
        self.out_proj = Linear(value_dim, embed_dim)

        if isinstance(decay, str):
            if decay == "retnet":
                ld = rf.retnet_log_decay(num_heads)
            elif decay == "linspace":
                ld = rf.linspace_log_decay(num_heads)
            else:
                raise ValueError(f"decay must be 'retnet', 'linspace' or a tensor, got {decay!r}")
        else:
            ld = torch.as_tensor(decay).detach().clone()
            if ld.shape != (num_heads,):
                raise ValueError(f"decay tensor must have shape [num_heads] = [{num_heads}], got {list(ld.shape)}")
            if not ld.is_floating_point():
                raise ValueError("decay tensor must hold natural-log decays (floating point)")
            if not bool((ld <= 0).all()) or not bool(torch.isfinite(ld).all()):
                raise ValueError("decay tensor must hold finite natural-log decays log(gamma) <= 0")
            ld = ld.to(torch.float64 if ld.dtype == torch.float64 else torch.float32)
        self.register_buffer("log_decay", ld.to(torch.float32) if ld.dtype != torch.float64 else ld, persistent=False)
        self._angle_cache = {}
        self.core = rf.msr
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.q_proj.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.k_proj.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.v_proj.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.g_proj.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.out_proj.weight, gain=2 ** -1)

    def _apply(self, fn, *args, **kwargs):
        # Keep the decay in fp32 (or fp64) whatever the module is cast to: log γ of the slow heads
        # (e.g. -9.5e-7) must never be rounded to half/bfloat16.  Only the device follows `fn`.
        ld = self._buffers["log_decay"]
        out = super()._apply(fn, *args, **kwargs)
        new = self._buffers["log_decay"]
        dt = torch.float64 if new.dtype == torch.float64 else torch.float32
        self._buffers["log_decay"] = ld.to(device=new.device, dtype=dt)
        return out

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, value_dim={self.value_dim}, num_heads={self.num_heads}, "
                f"gate_fn={self.gate_fn!r}, layernorm_eps={self.layernorm_eps}, chunk_size={self.chunk_size}, "
                f"fused={self.fused}")

    # ------------------------------------------------------------------------------------------
    def _rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """Interleaved rotation of x [B, T, H, dk] at absolute positions [T] or [B, T].

        Angles p·θ in float64 like the fused kernels (torchscale's fp32 product is off by
        ~p·6e-8 rad), then applied in fp32 (fp64 for fp64 inputs)."""
        cd = _compute_dtype(x.dtype)
        key = x.device
        angle = self._angle_cache.get(key)
        if angle is None:  # small per-device cache; not a buffer, not in the state dict
            angle = self._angle_cache[key] = rotation_angles(self.key_dim).to(x.device)
        ang = positions.to(device=x.device, dtype=torch.float64)[..., None] * angle  # [(B,) T, dk]
        sin, cos = torch.sin(ang).to(cd).unsqueeze(-2), torch.cos(ang).to(cd).unsqueeze(-2)
        xf = x.to(cd)
        return (xf * cos + rotate_every_two(xf) * sin).to(x.dtype)

    def _project(self, x: Tensor):
        """x [B, T, D] -> un-rotated q, scaled k [B,T,H,dk], v, g [B,T,H,dv]."""
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, self.key_dim)
        k = (self.k_proj(x) * self.scaling).view(B, T, H, self.key_dim)  # torchscale scales k before the rotation
        v = self.v_proj(x).view(B, T, H, self.head_dim)
        g = self.g_proj(x).view(B, T, H, self.head_dim)
        return q, k, v, g

    def _fused_options(self):
        return dict(scale=1.0, rotary="torchscale", norm=True, eps=self.layernorm_eps, decay_norm=True)

    def _finish(self, raw: Tensor, g: Tensor, positions: Tensor, x_dtype: torch.dtype) -> Tensor:
        """Unfused epilogue: raw [B,T,H,dv] -> ×1/sqrt(S_{p+1}), per-head RMSNorm, gate [B,T,Dv]."""
        B, T = raw.shape[:2]
        cd = _compute_dtype(raw.dtype)
        ld = self.log_decay.to(torch.float64 if cd == torch.float64 else torch.float32)
        pos = positions.to(device=raw.device)
        factor = decay_normaliser(ld, pos.reshape(-1)).to(cd).view(*pos.shape, -1)  # [(B,) T, H]
        o = raw.to(cd) * factor[..., None]
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.layernorm_eps)
        o = o.to(x_dtype).reshape(B, T, self.value_dim)
        return self.gate(g.reshape(B, T, self.value_dim)) * o

    def _check_state(self, state: Optional[RetentionState], N: int, dtype: Optional[torch.dtype] = None):
        """Refuses a state of another layer configuration before anything is computed or updated
        (dtype: the state dtype the in-place step needs; forward converts fp32 <-> fp64)."""
        if state is None:
            return None, 0
        if not isinstance(state, RetentionState):
            raise TypeError(f"state must be a RetentionState or None, got {type(state).__name__}")
        want = (N, self.num_heads, self.key_dim, self.head_dim)
        if tuple(state.state.shape) != want:
            raise ValueError(f"state has shape {list(state.state.shape)}, expected [N, H, dk, dv] = {list(want)} "
                             "(a state from another layer configuration or batch?)")
        if dtype is not None and state.state.dtype != dtype:
            raise ValueError(f"state has dtype {state.state.dtype}, expected {dtype} for this layer's inputs")
        off = state.offset
        if isinstance(off, Tensor) and tuple(off.shape) != (N,):
            raise ValueError(f"state.offset must have shape [N] = [{N}], got {list(off.shape)}")
        return state.state, state.offset

    def forward(self, x: Tensor, form: str = "chunk", state: Optional[RetentionState] = None,
                chunk_size: Optional[int] = None, cu_seqlens: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None) -> Tuple[Tensor, RetentionState]:
        """x [B, T, D] -> (out [B, T, D], new RetentionState).

        form: "parallel" | "chunk" (alias "chunkwise") | "recurrent"; all give the same result up
        to rounding.  ``state`` (optional) continues from an earlier call (absolute positions
        resume at state.offset); it is not modified.
        cu_seqlens: int32/int64 [N + 1] with B == 1: N packed sequences (states [N, H, dk, dv]).
        attention_mask: [B, T] (1/True = token, 0 = padding; left or right padding, or any
        pattern): only the tokens of each row form its sequence; padded outputs are 0."""
        if form not in _FORMS:
            raise ValueError(f"form must be 'parallel', 'chunk' or 'recurrent', got {form!r}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape [B, T, {self.embed_dim}], got {list(x.shape)}")
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("pass either cu_seqlens or attention_mask, not both")
            return self._forward_masked(x, attention_mask, form, state, chunk_size)
        B, T, _ = x.shape
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        init, offset = self._check_state(state, N)
        q, k, v, g = self._project(x)
        chunk = int(chunk_size if chunk_size is not None else self.chunk_size)
        length = T if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        if self.fused:
            offsets = state.offsets() if isinstance(offset, Tensor) or offset != 0 else None
            res = self.core(q, k, v, g, self.log_decay, form=_FORMS[form], chunk_size=chunk,
                            initial_state=init, offsets=offsets, cu_seqlens=cu_seqlens,
                            output_final_state=True, **self._fused_options())
            y, final_state = res[:2]
            length = res[2] if len(res) > 2 else length
            out = self.out_proj(y.reshape(B, T, self.value_dim))
        else:
            if self.core is not rf.msr:
                raise ValueError(f"the retention core {self.core!r} needs the fused layer (fused=True and "
                                 f"gate_fn 'swish'), this one has fused=False or gate_fn={self.gate_fn!r}")
            if cu_seqlens is not None:
                raise ValueError(f"cu_seqlens needs the fused layer (gate_fn 'swish'), this one has gate_fn={self.gate_fn!r}")
            positions = torch.arange(T, device=x.device, dtype=torch.float64)
            positions = positions + (offset.to(x.device, torch.float64)[:, None] if isinstance(offset, Tensor) else offset)
            raw, final_state = rf.retention(self._rotate(q, positions), self._rotate(k, positions), v,
                                            self.log_decay, form=_FORMS[form], scale=1.0, chunk_size=chunk,
                                            initial_state=init, output_final_state=True)
            out = self.out_proj(self._finish(raw, g, positions, x.dtype))
        new_state = RetentionState(final_state, _clone_offset(offset))
        new_state.advance(length)
        return out, new_state

    def _forward_masked(self, x, attention_mask, form, state, chunk_size):
        B, T, D = x.shape
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have shape [B, T] = [{B}, {T}], got {list(attention_mask.shape)}")
        keep = attention_mask.to(device=x.device).reshape(-1) != 0
        idx = keep.nonzero().squeeze(1)
        lengths = keep.view(B, T).sum(1)
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        packed = x.reshape(B * T, D).index_select(0, idx)[None]
        out_p, new_state = self.forward(packed, form=form, state=state, chunk_size=chunk_size, cu_seqlens=cu)
        out = x.new_zeros(B * T, D).index_copy(0, idx, out_p[0].to(x.dtype))
        return out.view(B, T, D), new_state

    def init_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> RetentionState:
        """Zero state at offset 0 (dtype fp32, or fp64 for fp64 modules)."""
        return RetentionState(torch.zeros(batch_size, self.num_heads, self.key_dim, self.head_dim,
                                          device=device, dtype=dtype), 0)

    @torch.no_grad()
    def step(self, x_t: Tensor, state: Optional[RetentionState] = None) -> Tuple[Tensor, RetentionState]:
        """Decode one token: x_t [B, D] or [B, 1, D] -> (out with the same layout, state).

        UPDATES ``state`` IN PLACE (its tensor and offset) and returns the same object (a new zero
        state is created when ``state`` is None).  Sequences may be at different positions
        (``state.offset`` a tensor [B]).  Inference only (runs under no_grad)."""
        squeeze = x_t.dim() == 2
        x = x_t[:, None] if squeeze else x_t
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x_t must have shape [B, {self.embed_dim}] or [B, 1, {self.embed_dim}], got {list(x_t.shape)}")
        B = x.shape[0]
        sdt = _compute_dtype(x.dtype)
        if state is None:
            state = self.init_state(B, device=x.device, dtype=sdt)
        self._check_state(state, B, sdt)  # before any update: a refused step leaves state unchanged
        S = state.state
        if S.requires_grad or not S.is_contiguous() or S.device != x.device:
            # never write into a tensor that may belong to an autograd graph or to a view
            S = S.detach().to(x.device).contiguous().clone()
        state.state = S
        q, k, v, g = self._project(x)
        if self.fused:
            y = rf.msr_step(q, k, v, g, self.log_decay, S, offsets=state.offsets(), **self._fused_options())
            out = self.out_proj(y.reshape(B, 1, self.value_dim))
        else:
            off = state.offset
            positions = (off.to(x.device, torch.float64)[:, None] if isinstance(off, Tensor)
                         else torch.full((1,), float(off), dtype=torch.float64, device=x.device))
            raw = rf.recurrent_step(self._rotate(q, positions), self._rotate(k, positions), v,
                                    self.log_decay, S, scale=1.0)  # [B,1,H,dv]; S updated
            out = self.out_proj(self._finish(raw, g, positions, x.dtype))
        state.advance(1)
        return (out[:, 0] if squeeze else out), state


# ----------------------------------------------------------------------------------------------
class GLU(nn.Module):
    """torchscale GLU feed-forward: fc2(act(fc1(x)) * gate(x)), no biases (SwiGLU for swish)."""

    def __init__(self, embed_dim: int, ffn_dim: int, activation_fn: str = "swish"):
        super().__init__()
        self.activation_fn = activation_fn
        self.act = _activation(activation_fn)
        self.fc1 = Linear(embed_dim, ffn_dim)
        self.gate = Linear(embed_dim, ffn_dim)
        self.fc2 = Linear(ffn_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)) * self.gate(x))


class RetNetDecoderLayer(nn.Module):
    """Pre-norm block: y = x + MSR(RMSNorm(x)); x' = y + FFN(RMSNorm(y))."""

    def __init__(self, embed_dim, value_dim, num_heads, ffn_dim, layernorm_eps=1e-6, chunk_size=64,
                 decay="retnet", gate_fn="swish", activation_fn="swish"):
        super().__init__()
        self.retention_layer_norm = RMSNorm(embed_dim, eps=layernorm_eps)
        self.retention = MultiScaleRetention(embed_dim, value_dim, num_heads, gate_fn=gate_fn,
                                             layernorm_eps=layernorm_eps, chunk_size=chunk_size, decay=decay)
        self.final_layer_norm = RMSNorm(embed_dim, eps=layernorm_eps)
        self.ffn = GLU(embed_dim, ffn_dim, activation_fn)

    def forward(self, x, form="chunk", state=None, chunk_size=None, cu_seqlens=None, attention_mask=None):
        h, new_state = self.retention(self.retention_layer_norm(x), form=form, state=state, chunk_size=chunk_size,
                                      cu_seqlens=cu_seqlens, attention_mask=attention_mask)
        y = x + h
        return y + self.ffn(self.final_layer_norm(y)), new_state

    @torch.no_grad()
    def step(self, x_t, state):
        h, state = self.retention.step(self.retention_layer_norm(x_t), state)
        y = x_t + h
        return y + self.ffn(self.final_layer_norm(y)), state


class RetNet(nn.Module):
    """Decoder-only RetNet language model following torchscale's current RetNet decoder
    (retnet-math.md §8): token embedding (no embedding scale), pre-norm blocks with RMSNorm
    (eps 1e-6, affine weight) and a SwiGLU FFN without biases, final RMSNorm, untied LM head
    ``output_projection`` (``tie_embeddings=True`` ties it to the embedding).

    forward(tokens [B, T] long, form="chunk"|"parallel"|"recurrent", state=None)
        -> (logits [B, T, vocab], RetNetState).   Always returns the state (cheap); the input
        state is not modified.
    step(tokens [B] or [B, 1], state) -> (logits [B, vocab] (or [B, 1, vocab]), state)
        updates ``state`` in place (see module docstring).
    generate(prompt_tokens, max_new_tokens, ...) prefills with the chunk form and decodes with
        step (recurrent form)."""

    def __init__(self, vocab_size: int, embed_dim: int, value_dim: int, num_heads: int, num_layers: int,
                 ffn_dim: int, layernorm_eps: float = 1e-6, chunk_size: int = 64,
                 decay: Union[str, Tensor] = "retnet", gate_fn: str = "swish", activation_fn: str = "swish",
                 tie_embeddings: bool = False):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.embed_tokens = nn.Embedding(vocab_size, embed_dim)
        self.layers = nn.ModuleList([
            RetNetDecoderLayer(embed_dim, value_dim, num_heads, ffn_dim, layernorm_eps=layernorm_eps,
                               chunk_size=chunk_size, decay=decay, gate_fn=gate_fn, activation_fn=activation_fn)
            for _ in range(num_layers)])
        self.layer_norm = RMSNorm(embed_dim, eps=layernorm_eps)
        self.output_projection = Linear(embed_dim, vocab_size)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=embed_dim ** -0.5)
        nn.init.normal_(self.output_projection.weight, mean=0.0, std=embed_dim ** -0.5)
        if tie_embeddings:
            self.output_projection.weight = self.embed_tokens.weight

    def _states(self, state: Optional[RetNetState]):
        if state is None:
            return [None] * self.num_layers
        if not isinstance(state, RetNetState) or len(state) != self.num_layers:
            raise ValueError(f"state must be a RetNetState with {self.num_layers} layers")
        return state.layers

    def forward(self, tokens: Tensor, form: str = "chunk", state: Optional[RetNetState] = None,
                chunk_size: Optional[int] = None, cu_seqlens: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None) -> Tuple[Tensor, RetNetState]:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [B, T], got {list(tokens.shape)}")
        x = self.embed_tokens(tokens)
        new_states = []
        for layer, st in zip(self.layers, self._states(state)):
            x, ns = layer(x, form=form, state=st, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                          attention_mask=attention_mask)
            new_states.append(ns)
        return self.output_projection(self.layer_norm(x)), RetNetState(new_states)

    @torch.no_grad()
    def step(self, tokens: Tensor, state: Optional[RetNetState] = None) -> Tuple[Tensor, RetNetState]:
        x = self.embed_tokens(tokens)  # [B, D] or [B, 1, D]
        states = self._states(state)
        # Every layer's state is checked before the first one is updated in place: a refused step
        # must not leave the model state half-advanced.
        sdt = _compute_dtype(x.dtype)
        for layer, st in zip(self.layers, states):
            layer.retention._check_state(st, x.shape[0], sdt)
        new = []
        for layer, st in zip(self.layers, states):
            x, st = layer.step(x, st)  # st is updated in place (or created when None)
            new.append(st)
        if state is None:
            state = RetNetState(new)
        else:
            state.layers = new
        return self.output_projection(self.layer_norm(x)), state

    def save_pretrained(self, path, vocab=None, metadata=None) -> str:
        """Safetensors checkpoint (weights + config, optional vocab) that ``from_pretrained`` and
        the C++ ``retention::RetNet::load`` read; see retention.checkpoint."""
        return checkpoint.save_pretrained(self, path, vocab=vocab, metadata=metadata)

    @classmethod
    def from_pretrained(cls, path, map_location="cpu", dtype=None) -> "RetNet":
        """Rebuild a model saved by ``save_pretrained`` (eval mode; ``model.vocab`` if saved)."""
        return checkpoint.from_pretrained(cls, path, map_location=map_location, dtype=dtype)

    @staticmethod
    def _sample(logits: Tensor, temperature: float, top_k: Optional[int], generator) -> Tensor:
        logits = logits.float()
        if temperature is None or temperature <= 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None and 0 < top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[..., 0]

    @torch.no_grad()
    def generate(self, prompt_tokens: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 chunk_size: Optional[int] = None, cuda_graph: bool = False) -> Tensor:
        """Sample max_new_tokens after prompt_tokens ([T] or [B, T], T >= 1).

        Prefill: one chunk-form forward over the prompt; then one token at a time with
        ``step`` (recurrent form).  temperature <= 0 means greedy.  Returns prompt + new tokens
        with the prompt's layout ([T + n] or [B, T + n]).  ``cuda_graph=True`` (CUDA only)
        captures one decode step in a CUDA graph and replays it for every token
        (:class:`StaticDecodeStep`); the tokens are the same as without it."""
        squeeze = prompt_tokens.dim() == 1
        prompt = prompt_tokens[None] if squeeze else prompt_tokens
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError("prompt_tokens must be [T] or [B, T] with T >= 1")
        if cuda_graph and prompt.device.type != "cuda":
            raise RuntimeError("generate(cuda_graph=True) replays the decode step from a CUDA graph and needs "
                               f"the model and prompt_tokens on a CUDA device, got {prompt.device}")
        was_training = self.training
        self.eval()
        try:
            logits, state = self.forward(prompt, form="chunk", chunk_size=chunk_size)
            next_logits = logits[:, -1]
            decode = StaticDecodeStep(self, state, cuda_graph=True) if cuda_graph and max_new_tokens > 1 else None
            out = [prompt]
            for i in range(max_new_tokens):
                tok = self._sample(next_logits, temperature, top_k, generator).to(prompt.dtype)
                out.append(tok[:, None])
                if i + 1 < max_new_tokens:
                    if decode is not None:
                        next_logits = decode(tok)
                    else:
                        next_logits, state = self.step(tok, state)
        finally:
            self.train(was_training)
        res = torch.cat(out, dim=1)
        return res[0] if squeeze else res


class StaticDecodeStep:
    """``RetNet.step`` on fixed buffers, so that one step can be captured in a CUDA graph and
    replayed for every token.

    The token buffer, every layer's state tensor and its offsets keep their storage from call to
    call: the state is updated in place by the step kernels, and the offsets (made an int64 [B]
    tensor per layer) are written back into the same tensor after each step, because
    ``RetentionState.advance`` rebinds them to a new one.  ``decode(tokens [B])`` runs one step
    and returns the logits [B, vocab]; with ``cuda_graph=True`` these logits live in the graph's
    output buffer, overwritten by the next call.  ``state`` is advanced in place like ``step``'s.
    """

    def __init__(self, model: "RetNet", state: RetNetState, cuda_graph: bool = False):
        if not isinstance(state, RetNetState) or len(state) != model.num_layers:
            raise ValueError(f"state must be a RetNetState with {model.num_layers} layers")
        N = state.layers[0].state.shape[0]
        device = state.layers[0].state.device
        if cuda_graph and device.type != "cuda":
            raise RuntimeError(f"StaticDecodeStep(cuda_graph=True) needs a state on a CUDA device, got {device}")
        for st in state.layers:
            st.state = st.state.detach().contiguous()
            st.offset = st.offsets().clone()
        self.model, self.state = model, state
        self.offsets = [st.offset for st in state.layers]
        self.tokens = torch.zeros(N, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None
        if cuda_graph:
            self._capture()

    @torch.no_grad()
    def _step(self) -> Tensor:
        logits, _ = self.model.step(self.tokens, self.state)
        for st, off in zip(self.state.layers, self.offsets):
            off.copy_(st.offset)
            st.offset = off
        return logits

    def _capture(self):
        # Capture records kernels without running them, so the state is untouched; the warm-up
        # (lazy library initialisation, which a capture must not see) runs on a copy.
        warm = StaticDecodeStep(self.model, self.state.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                warm._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def __call__(self, tokens: Tensor) -> Tensor:
        self.tokens.copy_(tokens.reshape(-1))
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits
