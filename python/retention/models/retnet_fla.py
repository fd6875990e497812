"""FLA's RetNet on the fused retention ops, as a ``transformers`` model.

The architecture, the parameter names and the config are those of flash-linear-attention 0.6.0
(``fla/models/retnet``, ``fla/layers/multiscale_retention.py``, ``fla/modules``), so a directory
written by FLA's ``RetNetForCausalLM.save_pretrained`` (or found on the Hugging Face hub in that
format) loads here, and one written here loads into FLA's model.  Per block::

    h = x + o_proj(retention(attn_norm(x)))            attn_norm, mlp_norm, norm: RMSNorm
    y = h + down_proj(silu(gate_proj(n)) * up_proj(n)),  n = mlp_norm(h)

Retention layer (per head h, ``head_k_dim`` dk, ``head_v_dim`` dv): q, k, v, g projections
without bias; k and v have ``num_kv_heads`` heads, each repeated for ``num_heads //
num_kv_heads`` consecutive query heads; optional ``feature_map`` on q and k; GPT-NeoX
(half-split) rotary, inverse frequencies 10000^(-2i/dk), at each sequence's own positions; raw
retention with scale dk^-1/2 on q·k and gamma_h = 1 - 2^(-5-h); per-head RMSNorm over dv with one
affine weight [dv] shared by the heads; then silu(g) (unless ``use_output_gate`` is False).
All of rotation, retention, norm and gate run in one fused op (``retention.msr``, ``msr_step``).

The chunk form serves training and prefill, the recurrent step serves decoding; the per-layer
states ([B, H, dk, dv], fp32) are the generation cache.  Left-padded batches are packed into
variable-length sequences (as FLA unpads them), so padding never enters a state or a position.
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
    from transformers import (AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin,
                              PretrainedConfig, PreTrainedModel)
    from transformers.activations import ACT2FN
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
except ImportError as e:  # optional dependency: say how to get it
    raise ImportError(
        "retention.models needs the optional packages 'transformers' and 'safetensors': "
        "pip install 'retention[hf]' (or: pip install transformers safetensors)") from e

from .. import functional as _rf
from ..nn import Linear as _Linear

__all__ = ["RetNetConfig", "RetNetModel", "RetNetForCausalLM", "RetNetCache",
           "check_checkpoint_dir", "CheckpointError"]

_ATTN_MODES = ("chunk", "fused_chunk", "parallel", "fused_recurrent")  # FLA's kernels; same math


class CheckpointError(ValueError):
    """A checkpoint directory or config that cannot be loaded; the message names file and field."""


# ------------------------------------------------------------------------------------------------
# Config

# FLA's RetNetConfig fields and defaults (fla/models/retnet/configuration_retnet.py, 0.6.0).
_DEFAULTS = dict(
    attn_mode="chunk", hidden_size=2048, expand_k=1.0, expand_v=2.0, hidden_ratio=2,
    intermediate_size=None, num_hidden_layers=24, num_heads=8, num_kv_heads=None,
    feature_map=None, hidden_act="swish", use_short_conv=False, conv_size=4,
    use_output_gate=True, max_position_embeddings=2048, elementwise_affine=True, norm_eps=1e-6,
    attn=None, use_cache=True, initializer_range=0.02, fuse_norm=True, fuse_swiglu=True,
    fuse_cross_entropy=True, fuse_linear_cross_entropy=False, use_l2warp=False, vocab_size=32000,
    attnres_block_size=None,
)
_INT, _NUM, _BOOL, _STR, _NONE = "an integer", "a number", "true or false", "a string", "null"
# Allowed JSON types per field (bool is not accepted where a number is meant).
_FIELD_TYPES = dict(
    attn_mode=(_STR,), hidden_size=(_INT,), expand_k=(_NUM,), expand_v=(_NUM,),
    hidden_ratio=(_NUM, _NONE), intermediate_size=(_INT, _NONE), num_hidden_layers=(_INT,),
    num_heads=(_INT,), num_kv_heads=(_INT, _NONE), feature_map=(_STR, _NONE), hidden_act=(_STR,),
    use_short_conv=(_BOOL,), conv_size=(_INT,), use_output_gate=(_BOOL,),
    max_position_embeddings=(_INT,), elementwise_affine=(_BOOL, _NONE), norm_eps=(_NUM,),
    use_cache=(_BOOL,), initializer_range=(_NUM,), fuse_norm=(_BOOL,), fuse_swiglu=(_BOOL,),
    fuse_cross_entropy=(_BOOL,), fuse_linear_cross_entropy=(_BOOL,), use_l2warp=(_BOOL,),
    vocab_size=(_INT,), attnres_block_size=(_INT, _NONE), tie_word_embeddings=(_BOOL,),
)


def _is(value, kind):
    if kind == _NONE:
        return value is None
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def _check_field_types(values):
    for name, kinds in _FIELD_TYPES.items():
        if name in values and not any(_is(values[name], k) for k in kinds):
            raise CheckpointError(
                f"config field {name!r} must be {' or '.join(kinds)}, got {values[name]!r} "
                f"({type(values[name]).__name__})")


class RetNetConfig(PretrainedConfig):
    """FLA's RetNetConfig: same ``model_type`` ("retnet"), fields and defaults.

    Field types are checked (a wrong type raises :class:`CheckpointError` naming the field);
    values this implementation cannot run (short convolutions, hybrid attention layers, ...) are
    accepted here and refused when a model is built, naming the field.
    """

    model_type = "retnet"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                 **kwargs):
        values = {k: kwargs.pop(k, v) for k, v in _DEFAULTS.items()}
        _check_field_types(dict(values, tie_word_embeddings=tie_word_embeddings))
        for k, v in values.items():
            setattr(self, k, v)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)


def _dims(config):
    """(head_k_dim, head_v_dim, num_kv_heads, intermediate_size) as FLA derives them, after
    refusing what this implementation does not run; errors name the config field."""
    def bad(field, why):
        return CheckpointError(f"config field {field!r} = {getattr(config, field, None)!r}: {why}")

    if config.attn_mode not in _ATTN_MODES:
        raise bad("attn_mode", f"must be one of {list(_ATTN_MODES)}")
    if config.use_short_conv:
        raise bad("use_short_conv", "short convolutions are not supported by this implementation")
    if config.attn is not None:
        raise bad("attn", "hybrid standard-attention layers are not supported by this implementation")
    if config.attnres_block_size is not None:
        raise bad("attnres_block_size", "attention residuals are not supported by this implementation")
    if config.hidden_act != "swish":
        raise bad("hidden_act", "only 'swish' (SwiGLU MLP, swish output gate) is supported")
    if config.feature_map is not None and config.feature_map not in ACT2FN:
        raise bad("feature_map", "not an activation transformers knows (ACT2FN)")
    for f in ("hidden_size", "num_heads", "vocab_size"):
        if getattr(config, f) <= 0:
            raise bad(f, "must be positive")
    if config.num_hidden_layers < 0:
        raise bad("num_hidden_layers", "must be >= 0")
    H = config.num_heads
    Hkv = config.num_kv_heads if config.num_kv_heads is not None else H
    if Hkv <= 0 or H % Hkv:
        raise bad("num_kv_heads", f"must divide num_heads = {H}")
    key_dim, value_dim = config.hidden_size * config.expand_k, config.hidden_size * config.expand_v
    for f, d in (("expand_k", key_dim), ("expand_v", value_dim)):
        if d <= 0 or not math.isclose(d, round(d)):
            raise bad(f, f"hidden_size * {f} = {d} must be a positive integer")
    key_dim, value_dim = round(key_dim), round(value_dim)
    if key_dim % H or value_dim % H:
        raise bad("num_heads", f"must divide the key dim {key_dim} and the value dim {value_dim}")
    dk, dv = key_dim // H, value_dim // H
    if dk > 256 or dk % 2:
        raise bad("expand_k", f"head_k_dim = {dk} must be even and <= 256 (rotary)")
    # GatedMLP: a multiple of 256 closest above 2/3 * hidden_size * hidden_ratio (ratio 4 if None).
    inter = config.intermediate_size
    if inter is None:
        ratio = 4 if config.hidden_ratio is None else config.hidden_ratio
        inter = int(config.hidden_size * ratio * 2 / 3)
        inter = 256 * ((inter + 256 - 1) // 256)
    if inter <= 0:
        raise bad("intermediate_size", "must be positive")
    return dk, dv, Hkv, inter


# ------------------------------------------------------------------------------------------------
# Cache

class RetNetCache:
    """Generation cache: one retention state per layer plus each sequence's position.

    ``states[i]``: layer i's state [B, H, dk, dv] (fp32; updated in place by decode steps);
    ``offsets``: int64 [B], the real (unpadded) tokens each sequence has seen, i.e. its next
    rotary position; ``seen_tokens``: input columns consumed, padding included (what
    ``transformers`` slices new input by).  Not a ``transformers.Cache``: a recurrent state has no
    keys or values, and this keeps it independent of that class's changing interface.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers):
        self.states = [None] * num_layers
        self.offsets = None
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx=0):
        return self.seen_tokens

    def get_max_length(self):
        return None

    def __len__(self):
        return sum(s is not None for s in self.states)

    def _map(self, fn):
        self.states = [None if s is None else fn(s) for s in self.states]
        if self.offsets is not None:
            self.offsets = fn(self.offsets)

    def reorder_cache(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices):
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length):
        raise NotImplementedError("a recurrent retention state cannot be rolled back (RetNetCache.crop)")

    def __repr__(self):
        return f"RetNetCache(layers={len(self.states)}, seen_tokens={self.seen_tokens})"


# ------------------------------------------------------------------------------------------------
# Modules (names as in FLA so that state_dict keys agree)

class RetNetRMSNorm(nn.Module):
    """RMSNorm over the last dim with fp32 statistics and an affine weight, as fla.modules.RMSNorm."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class HeadRMSNorm(nn.Module):
    """Holds the per-head RMSNorm's weight [head_v_dim] (shared by the heads, or None without
    ``elementwise_affine``); the norm itself runs inside the fused retention op."""

    def __init__(self, dim, affine):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None


class GatedMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = _Linear(hidden_size, intermediate_size)
        self.up_proj = _Linear(hidden_size, intermediate_size)
        self.down_proj = _Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _pack(mask):
    """Padding mask [B, T] (0 = pad, left or right) -> (flat indices of the real tokens, int32
    cu_seqlens [B + 1]), computed once per forward and shared by the layers."""
    keep = mask.reshape(-1) != 0
    lengths = (mask != 0).sum(1)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return keep.nonzero().squeeze(1), cu


class MultiScaleRetention(nn.Module):
    """FLA's MultiScaleRetention (see the module docstring) on ``retention.msr``."""

    def __init__(self, config, layer_idx):
        super().__init__()
        dk, dv, Hkv, _ = _dims(config)
        D, H = config.hidden_size, config.num_heads
        self.layer_idx, self.num_heads, self.num_kv_heads = layer_idx, H, Hkv
        self.head_k_dim, self.head_v_dim, self.eps = dk, dv, config.norm_eps
        self.use_output_gate = config.use_output_gate
        self.feature_map_fn = ACT2FN[config.feature_map] if config.feature_map is not None else None
        self.q_proj = _Linear(D, H * dk)
        self.k_proj = _Linear(D, Hkv * dk)
        self.v_proj = _Linear(D, Hkv * dv)
        if self.use_output_gate:
            self.g_proj = _Linear(D, H * dv)
        self.o_proj = _Linear(H * dv, D)
        # FLA names the norm after whether it is fused with the swish gate (hidden_act is swish).
        norm = HeadRMSNorm(dv, bool(config.elementwise_affine))
        self.norm_name = "g_norm_swish_gate" if config.fuse_norm and self.use_output_gate else "g_norm"
        self.add_module(self.norm_name, norm)
        self._log_decay = {}

    def log_decay(self, device):
        # Recomputed per device, not a buffer: from_pretrained builds models on the meta device and
        # would leave a non-persistent buffer there.
        if device not in self._log_decay:
            self._log_decay[device] = _rf.retnet_log_decay(self.num_heads, device=device)
        return self._log_decay[device]

    def forward(self, x, pack=None, cache=None, use_cache=False):
        """pack: None (no padding among these T tokens) or _pack's (indices, cu_seqlens)."""
        B, T, _ = x.shape
        H, Hkv, dk, dv = self.num_heads, self.num_kv_heads, self.head_k_dim, self.head_v_dim
        q = self.q_proj(x).view(B, T, H, dk)
        k = self.k_proj(x).view(B, T, Hkv, dk)
        v = self.v_proj(x).view(B, T, Hkv, dv)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        if Hkv != H:  # FLA: repeat(k, '... h d -> ... (h g) d'): kv head j serves q heads j*g..j*g+g-1
            k = k.repeat_interleave(H // Hkv, dim=2)
            v = v.repeat_interleave(H // Hkv, dim=2)
        g = self.g_proj(x).view(B, T, H, dv) if self.use_output_gate else None
        opts = dict(rotary="neox", norm=True, norm_weight=getattr(self, self.norm_name).weight,
                    eps=self.eps)
        log_decay = self.log_decay(x.device)

        state = cache.states[self.layer_idx] if cache is not None else None
        offsets = cache.offsets if state is not None else None
        if state is not None and T == 1 and pack is None:
            # decode: the recurrent form, one fused step; the state is updated in place
            y = _rf.msr_step(q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0], log_decay,
                             state, offsets=offsets, **opts)
            return self.o_proj(y.reshape(B, 1, H * dv))
        want_state = use_cache and cache is not None
        opts.update(form="chunk", initial_state=state, offsets=offsets, output_final_state=True)
        if pack is None:
            y, new_state = _rf.msr(q, k, v, g, log_decay, **opts)
            y = y.reshape(B, T, H * dv)
        else:
            # padded batch: pack the real tokens into B variable-length sequences (FLA unpads the
            # same way), so pads update no state and take no position; pads' outputs are zero
            idx, cu = pack

            def packed(t):
                return None if t is None else t.reshape(B * T, *t.shape[2:]).index_select(0, idx)[None]
            y_p, new_state = _rf.msr(packed(q), packed(k), packed(v), packed(g), log_decay,
                                     cu_seqlens=cu, **opts)
            y = x.new_zeros(B * T, H * dv).index_copy(0, idx, y_p[0].reshape(-1, H * dv).to(x.dtype))
            y = y.view(B, T, H * dv)
        if want_state:
            cache.states[self.layer_idx] = new_state
        return self.o_proj(y)


class RetNetBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        _, _, _, inter = _dims(config)
        self.attn_norm = RetNetRMSNorm(config.hidden_size, config.norm_eps)
        self.attn = MultiScaleRetention(config, layer_idx)
        self.mlp_norm = RetNetRMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, inter)

    def forward(self, x, pack=None, cache=None, use_cache=False):
        h = x + self.attn(self.attn_norm(x), pack, cache, use_cache)
        return h + self.mlp(self.mlp_norm(h))


def _output(cls, **fields):
    # transformers renamed the outputs' cache field (past_key_values -> cache) after 5.21
    if "past_key_values" not in getattr(cls, "__dataclass_fields__", {"past_key_values": 0}):
        fields["cache"] = fields.pop("past_key_values")
    return cls(**fields)


class RetNetPreTrainedModel(PreTrainedModel):
    config_class = RetNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["RetNetBlock"]
    _is_stateful = True  # no assisted decoding / cache cropping: the state cannot roll back
    _input_embed_layer = "embeddings"

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the model makes its own RetNetCache

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``transformers``' loader, after :func:`check_checkpoint_dir` on a local directory (clear
        errors naming the file and field instead of warnings and randomly initialised weights)."""
        local = isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isdir(
            pretrained_model_name_or_path)
        if local:
            check_checkpoint_dir(pretrained_model_name_or_path, tensors=cls is RetNetForCausalLM)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        gen_file = os.path.join(os.fspath(pretrained_model_name_or_path), "generation_config.json")
        model_obj = model[0] if isinstance(model, tuple) else model
        if local and not os.path.exists(gen_file) and getattr(model_obj, "generation_config", None) is not None:
            # transformers 5 leaves generation settings empty without this file; FLA's checkpoints
            # keep bos/eos in config.json, so generate() stops at their eos as it would have in 4.x
            model_obj.generation_config = GenerationConfig.from_model_config(model_obj.config)
        return model


class RetNetModel(RetNetPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        _dims(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(RetNetBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RetNetRMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None,
                use_cache=None, output_hidden_states=None, return_dict=None, **kwargs):
        past_key_values = kwargs.pop("cache", past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be a 0/1 padding mask [B, >= T] = [{B}, >= {T}], "
                                 f"got {list(attention_mask.shape)}")
            attention_mask = attention_mask[:, -T:].to(x.device)  # the columns of these tokens
        # one host sync per forward (not per layer): is there any padding among these tokens?
        pack = None if attention_mask is None or bool(attention_mask.all()) else _pack(attention_mask)
        cache = past_key_values
        if cache is not None and not isinstance(cache, RetNetCache):
            raise TypeError(f"past_key_values must be a RetNetCache, got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = RetNetCache(len(self.layers))
        if cache is not None and cache.offsets is None:
            cache.offsets = torch.zeros(B, dtype=torch.int64, device=x.device)
        hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                hidden += (x,)
            x = layer(x, pack, cache, use_cache)
        x = self.norm(x)
        if output_hidden_states:
            hidden += (x,)
        if cache is not None and use_cache:
            real = (attention_mask != 0).sum(1) if attention_mask is not None else T
            cache.offsets = cache.offsets + real
            cache.seen_tokens += T
        if not use_cache:
            cache = None
        if not return_dict:
            return tuple(t for t in (x, cache, hidden) if t is not None)
        return _output(BaseModelOutputWithPast, last_hidden_state=x, past_key_values=cache,
                       hidden_states=hidden)


class RetNetForCausalLM(RetNetPreTrainedModel, GenerationMixin):
    """FLA's RetNetForCausalLM: ``model`` (embeddings, layers, norm) and ``lm_head`` (tied to the
    embeddings when ``tie_word_embeddings``).  ``labels`` give FLA's loss: next-token cross
    entropy, -100 ignored, mean over the counted tokens (or sum / ``num_items_in_batch``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = RetNetModel(config)
        self.lm_head = _Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None,
                labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, num_items_in_batch=None, **kwargs):
        past_key_values = kwargs.pop("cache", past_key_values)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         inputs_embeds=inputs_embeds, past_key_values=past_key_values,
                         use_cache=use_cache, output_hidden_states=output_hidden_states,
                         return_dict=True)
        h = out.last_hidden_state
        if labels is None and logits_to_keep:
            h = h[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if self.config.use_l2warp:
                raise NotImplementedError("config field 'use_l2warp' = True: the L2-warp loss is not supported")
            labels = labels.to(logits.device)
            shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
            loss = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100,
                                   reduction="mean" if num_items_in_batch is None else "sum")
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        cache = getattr(out, "past_key_values", getattr(out, "cache", None))
        if not return_dict:
            rest = tuple(t for t in (logits, cache, out.hidden_states) if t is not None)
            return (loss,) + rest if loss is not None else rest
        return _output(CausalLMOutputWithPast, loss=loss, logits=logits, past_key_values=cache,
                       hidden_states=out.hidden_states)


# ------------------------------------------------------------------------------------------------
# Checking a checkpoint directory before loading it

_SAFETENSORS_DTYPES = {"F32", "F16", "BF16"}


def _tensor_fields(name):
    """The config fields that decide the shape of a tensor (for error messages)."""
    if "embeddings" in name or "lm_head" in name:
        return "vocab_size, hidden_size"
    if name.endswith(("attn_norm.weight", "mlp_norm.weight")) or name == "model.norm.weight":
        return "hidden_size"
    if ".mlp." in name:
        return "hidden_size, hidden_ratio, intermediate_size"
    if ".q_proj." in name:
        return "hidden_size, expand_k"
    if ".k_proj." in name:
        return "hidden_size, expand_k, num_heads, num_kv_heads"
    if ".v_proj." in name:
        return "hidden_size, expand_v, num_heads, num_kv_heads"
    if ".g_norm" in name:
        return "hidden_size, expand_v, num_heads"
    return "hidden_size, expand_v"  # g_proj, o_proj


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {what}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from None


def check_checkpoint_dir(path, tensors=True):
    """Check a local checkpoint directory in FLA's RetNet format before loading it.

    Reads ``config.json`` (field types, what this implementation supports) and the safetensors
    headers (``model.safetensors``, or the shards listed by ``model.safetensors.index.json``):
    every shard present, every tensor expected, none unknown, each of the shape the config
    implies and a float dtype (``tensors=False``: the config only).  Raises :class:`CheckpointError` naming the file, the tensor and
    the config fields; returns the config.
    """
    from safetensors import safe_open  # optional dependency, installed with transformers

    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    values = _read_json(cfg_path, "config.json")
    if not isinstance(values, dict):
        raise CheckpointError(f"{cfg_path}: must hold a JSON object")
    if values.get("model_type") != "retnet":
        raise CheckpointError(f"{cfg_path}: config field 'model_type' must be 'retnet', "
                              f"got {values.get('model_type')!r}")
    try:
        config = RetNetConfig(**{k: v for k, v in values.items() if k != "model_type"})
        _dims(config)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None

    if not tensors:
        return config
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        index = _read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: field 'weight_map' must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.isfile(os.path.join(path, f)):
                raise CheckpointError(f"{index_path}: shard {f!r} (listed in 'weight_map') is missing "
                                      f"from {path}")
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        weight_map, files = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RetNetForCausalLM(config).state_dict().items()}
    found = {}
    for f in files:
        fp = os.path.join(path, f)
        try:
            with safe_open(fp, framework="pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    found[name] = (f, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{fp}: not a readable safetensors file: {e}") from None
    for name, (f, shape, dtype) in sorted(found.items()):
        fp = os.path.join(path, f)
        if weight_map is not None and weight_map.get(name) != f:
            raise CheckpointError(f"{fp}: tensor {name!r} is not listed for this file in {index_path}")
        if name not in expected:
            raise CheckpointError(f"{fp}: unexpected tensor {name!r} (not a parameter of FLA's RetNet "
                                  f"with this config.json)")
        if shape != expected[name]:
            raise CheckpointError(
                f"{fp}: tensor {name!r} has shape {list(shape)}, but config.json ({_tensor_fields(name)}) "
                f"implies {list(expected[name])}")
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{fp}: tensor {name!r} has dtype {dtype}; expected one of "
                                  f"{sorted(_SAFETENSORS_DTYPES)}")
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(found) - optional)
    if missing:
        where = index_path if weight_map is not None else os.path.join(path, files[0])
        raise CheckpointError(f"{where}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                              f"({len(missing)} in all)")
    return config


# ------------------------------------------------------------------------------------------------
# Auto classes: FLA registers the same model_type; whichever is imported first keeps it.

if RetNetConfig.model_type not in CONFIG_MAPPING:
    AutoConfig.register(RetNetConfig.model_type, RetNetConfig)
    AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM)
    transformers.AutoModel.register(RetNetConfig, RetNetModel)
