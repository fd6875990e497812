"""Independent float64 reference of FLA's RetNet language model (flash-linear-attention 0.6.0:
fla/models/retnet/modeling_retnet.py, fla/layers/multiscale_retention.py, fla/modules/{mlp,
rotary, norm}), written from FLA's source and calling nothing of the library under test, plus
a writer of small random checkpoints in FLA's on-disk format (config.json + safetensors).

Per sequence of real tokens (FLA unpads padded batches, so each sequence starts at position 0
with a zero state):

    x = E[ids]
    per layer:  a = RMSNorm(x) * w_attn_norm
                q = a Wq^T [T, H, dk], k = a Wk^T [T, Hkv, dk], v = a Wv^T [T, Hkv, dv]
                q, k = feature_map(q), feature_map(k)                        (if set)
                rotary, GPT-NeoX half split: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos),
                    angle n * 10000^(-2i/dk), i < dk/2, n = position
                kv head j serves query heads j*g .. j*g+g-1 (g = H / Hkv)
                o[n, h] = dk^-1/2 sum_{m<=n} gamma_h^(n-m) (q_n . k_m) v_m,  gamma_h = 1 - 2^(-5-h)
                o = RMSNorm_dv(o) * w_gn (if elementwise_affine) * silu(a Wg^T) (if use_output_gate)
                x = x + o Wo^T
                m = RMSNorm(x) * w_mlp_norm;  x = x + (silu(m Wgate^T) * (m Wup^T)) Wdown^T
    logits = (RMSNorm(x) * w_norm) W_lm^T,   W_lm = E when tie_word_embeddings
"""
import json
import math
import os

import torch

_ACT = {"silu": torch.nn.functional.silu, "swish": torch.nn.functional.silu,
        "relu": torch.relu, "elu": torch.nn.functional.elu, "sigmoid": torch.sigmoid}


def fla_dims(cfg):
    """(H, Hkv, dk, dv, intermediate) from an FLA RetNetConfig dict, by FLA's formulas."""
    D, H = cfg["hidden_size"], cfg.get("num_heads", 8)
    Hkv = cfg.get("num_kv_heads") or H
    dk = round(D * cfg.get("expand_k", 1.0)) // H
    dv = round(D * cfg.get("expand_v", 2.0)) // H
    inter = cfg.get("intermediate_size")
    if inter is None:
        ratio = cfg.get("hidden_ratio", 2)
        ratio = 4 if ratio is None else ratio
        inter = int(D * ratio * 2 / 3)
        inter = 256 * ((inter + 256 - 1) // 256)
    return H, Hkv, dk, dv, inter


def fla_shapes(cfg):
    """FLA's RetNetForCausalLM parameter names and shapes for a config dict."""
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    H, Hkv, dk, dv, inter = fla_dims(cfg)
    gate = cfg.get("use_output_gate", True)
    gn = "g_norm_swish_gate" if cfg.get("fuse_norm", True) and gate else "g_norm"
    shapes = {"model.embeddings.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "attn_norm.weight"] = (D,)
        shapes[p + "attn.q_proj.weight"] = (H * dk, D)
        shapes[p + "attn.k_proj.weight"] = (Hkv * dk, D)
        shapes[p + "attn.v_proj.weight"] = (Hkv * dv, D)
        if gate:
            shapes[p + "attn.g_proj.weight"] = (H * dv, D)
        shapes[p + "attn.o_proj.weight"] = (D, H * dv)
        if cfg.get("elementwise_affine", True):
            shapes[p + f"attn.{gn}.weight"] = (dv,)
        shapes[p + "mlp_norm.weight"] = (D,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, D)
        shapes[p + "mlp.up_proj.weight"] = (inter, D)
        shapes[p + "mlp.down_proj.weight"] = (D, inter)
    shapes["model.norm.weight"] = (D,)
    shapes["lm_head.weight"] = (V, D)
    return shapes


def random_state_dict(cfg, generator=None, std=0.3):
    """Random weights of a size that keeps every layer's contribution visible: projections with
    rows of norm ~ std * sqrt(fan_in) / sqrt(fan_in), norm weights around 1."""
    sd = {}
    for name, shape in fla_shapes(cfg).items():
        if len(shape) == 1:
            sd[name] = 1.0 + 0.2 * torch.randn(shape, generator=generator, dtype=torch.float64)
        else:
            fan_in = shape[1]
            sd[name] = torch.randn(shape, generator=generator, dtype=torch.float64) * (
                std if "embeddings" in name else 1.0 / math.sqrt(fan_in))
    if cfg.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = sd["model.embeddings.weight"]
    return sd


def write_fla_checkpoint(path, cfg, sd, dtype=torch.float32, shards=1):
    """config.json + model.safetensors (or `shards` files and model.safetensors.index.json), as
    FLA's save_pretrained lays them out (tied lm_head omitted)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(cfg, model_type="retnet", architectures=["RetNetForCausalLM"]), f, indent=2)
    names = [n for n in sd if not (n == "lm_head.weight" and cfg.get("tie_word_embeddings", False))]
    tensors = {n: sd[n].to(dtype).contiguous() for n in names}
    meta = {"format": "pt"}
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata=meta)
        return
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, os.path.join(path, fname), metadata=meta)
        weight_map.update({n: fname for n in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _rms(x, w, eps):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _rotate_neox(x, positions):
    """x [T, h, dk]; GPT-NeoX rotary at the given positions (float64)."""
    dk = x.shape[-1]
    inv = 10000.0 ** (-torch.arange(0, dk, 2, dtype=torch.float64) / dk)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]           # [T, dk/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : dk // 2], x[..., dk // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def reference_logits(sd, cfg, ids):
    """Float64 logits [T, vocab] of FLA's RetNet for one unpadded sequence `ids` (1-D)."""
    W = {k: v.to(torch.float64) for k, v in sd.items()}
    eps = cfg.get("norm_eps", 1e-6)
    H, Hkv, dk, dv, _ = fla_dims(cfg)
    gate = cfg.get("use_output_gate", True)
    gn = "g_norm_swish_gate" if cfg.get("fuse_norm", True) and gate else "g_norm"
    fmap = _ACT[cfg["feature_map"]] if cfg.get("feature_map") else None
    T = ids.numel()
    pos = torch.arange(T)
    gamma = 1.0 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    n = torch.arange(T, dtype=torch.float64)
    diff = n[:, None] - n[None, :]
    decay = torch.where(diff >= 0, gamma[:, None, None] ** diff.clamp(min=0), torch.zeros(()))  # [H,T,T]
    x = W["model.embeddings.weight"][ids.cpu()]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _rms(x, W[p + "attn_norm.weight"], eps)
        q = (a @ W[p + "attn.q_proj.weight"].T).view(T, H, dk)
        k = (a @ W[p + "attn.k_proj.weight"].T).view(T, Hkv, dk)
        v = (a @ W[p + "attn.v_proj.weight"].T).view(T, Hkv, dv)
        if fmap is not None:
            q, k = fmap(q), fmap(k)
        q, k = _rotate_neox(q, pos), _rotate_neox(k, pos)
        kv_of = torch.arange(H) // (H // Hkv)
        k, v = k[:, kv_of], v[:, kv_of]
        scores = torch.einsum("nhd,mhd->hnm", q, k) * dk ** -0.5 * decay
        o = torch.einsum("hnm,mhd->nhd", scores, v)
        o = _rms(o, W.get(p + f"attn.{gn}.weight"), eps)
        if gate:
            o = o * torch.nn.functional.silu((a @ W[p + "attn.g_proj.weight"].T).view(T, H, dv))
        x = x + o.reshape(T, H * dv) @ W[p + "attn.o_proj.weight"].T
        m = _rms(x, W[p + "mlp_norm.weight"], eps)
        x = x + (torch.nn.functional.silu(m @ W[p + "mlp.gate_proj.weight"].T)
                 * (m @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    x = _rms(x, W["model.norm.weight"], eps)
    lm = W["model.embeddings.weight"] if cfg.get("tie_word_embeddings", False) else W["lm_head.weight"]
    return x @ lm.T
