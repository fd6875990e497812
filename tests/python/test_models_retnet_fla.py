"""retention.models.retnet_fla: FLA-format RetNet checkpoints, transformers integration.

Checkpoints are small random ones that the tests write themselves in FLA's on-disk format
(fla_retnet_reference.write_fla_checkpoint); nothing is downloaded.  Logits are compared with
an independent float64 reference of FLA's forward (fla_retnet_reference.reference_logits).

Tolerances (error ratio RMS(diff) / RMS(ref), conftest.assert_close_rel, and the worst element
within MAX_FACTOR times that): fp32 models against the float64 reference of the same (fp32)
weights: 1e-5 (conftest's fp32 contract: a few layers of fp32 GEMMs, norms and retention over
<= 64 terms each give ~1e-6).  bf16 / fp16 models: every activation is rounded to 2^-8 / 2^-11
at each of ~10 ops per layer, errors add in quadrature over 2 layers: 5e-2 / 1e-2.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="optional extra retention[hf] (transformers) not installed")
pytest.importorskip("safetensors", reason="optional extra retention[hf] (safetensors) not installed")

from conftest import assert_close_rel  # noqa: E402
from fla_retnet_reference import (fla_shapes, random_state_dict, reference_logits,  # noqa: E402
                                  write_fla_checkpoint)

from retention.models import CheckpointError, RetNetConfig, RetNetForCausalLM  # noqa: E402

BASE = dict(hidden_size=32, num_hidden_layers=2, num_heads=4, vocab_size=61, hidden_ratio=2)
CONFIGS = {
    "base": BASE,
    # GQA (3 query heads per kv head), tied embeddings, odd head dims (dk 6, dv 9), explicit MLP width
    "gqa_tied_odd": dict(hidden_size=36, num_hidden_layers=2, num_heads=6, num_kv_heads=2,
                         expand_v=1.5, vocab_size=53, tie_word_embeddings=True, intermediate_size=70),
    # unfused norm (param name g_norm), no affine head norm, relu feature map, hidden_ratio 3
    "unfused_featuremap": dict(BASE, fuse_norm=False, elementwise_affine=False, feature_map="relu",
                               hidden_ratio=3, norm_eps=1e-5),
    # no output gate (g_proj absent, g_norm only), MQA
    "no_gate_mqa": dict(BASE, use_output_gate=False, num_kv_heads=1),
}


def _checkpoint(tmp_path, name, dtype=torch.float32, shards=1, seed=0):
    cfg = CONFIGS[name]
    sd = random_state_dict(cfg, torch.Generator().manual_seed(seed))
    path = str(tmp_path / f"{name}-{str(dtype).split('.')[-1]}-{shards}")
    write_fla_checkpoint(path, cfg, sd, dtype=dtype, shards=shards)
    # the reference sees the weights as stored (rounded to dtype)
    return path, cfg, {k: v.to(dtype).to(torch.float64) for k, v in sd.items()}


def _ids(vocab, B, T, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# Parameter names and shapes: FLA's own model object

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_keys_and_shapes_match_fla(name):
    fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention not installed")
    cfg = CONFIGS[name]
    fla_sd = fla_models.RetNetForCausalLM(fla_models.RetNetConfig(**cfg)).state_dict()
    ours = RetNetForCausalLM(RetNetConfig(**cfg)).state_dict()
    want = {k: tuple(v.shape) for k, v in fla_sd.items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == want
    assert {k: tuple(v) for k, v in fla_shapes(cfg).items()} == want  # the test's own writer agrees


def test_config_fields_and_defaults_match_fla():
    fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention not installed")
    ours, theirs = RetNetConfig().to_dict(), fla_models.RetNetConfig().to_dict()
    for key in ("transformers_version",):
        ours.pop(key, None), theirs.pop(key, None)
    assert ours == theirs


# ------------------------------------------------------------------------------------------------
# Logits against the float64 reference

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_reference(tmp_path, name, device):
    path, cfg, sd = _checkpoint(tmp_path, name)
    model = RetNetForCausalLM.from_pretrained(path).to(device).eval()
    ids = _ids(cfg["vocab_size"], 2, 37)   # T = 37: not a multiple of the chunk size
    with torch.no_grad():
        logits = model(ids.to(device)).logits
    for b in range(2):
        assert_close_rel(logits[b].cpu(), reference_logits(sd, cfg, ids[b]), 1e-5, name=f"logits[{b}]")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_low_precision_checkpoints(tmp_path, dtype, tol):
    # the base config: in a random model a head whose raw retention nearly cancels (rms 100x below
    # the others) makes its RMSNorm amplify the rounding of its inputs several-fold (seen in
    # gqa_tied_odd: bf16 error 0.1 with the op itself at 2e-3), which is conditioning, not rounding
    path, cfg, sd = _checkpoint(tmp_path, "base", dtype=dtype)
    model = RetNetForCausalLM.from_pretrained(path, dtype=dtype).eval()
    assert model.lm_head.weight.dtype == dtype
    ids = _ids(cfg["vocab_size"], 1, 20)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == dtype
    assert_close_rel(logits[0].double(), reference_logits(sd, cfg, ids[0]), tol, max_factor=40)
    # decoding in this dtype: fp32 states, the fused step takes the low-precision q, k, v, g
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert out.shape == (1, 24)


def test_sharded_checkpoint_and_tied_weights(tmp_path):
    path, cfg, sd = _checkpoint(tmp_path, "gqa_tied_odd", shards=3)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    model = RetNetForCausalLM.from_pretrained(path).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
    ids = _ids(cfg["vocab_size"], 1, 16)
    with torch.no_grad():
        assert_close_rel(model(ids).logits[0], reference_logits(sd, cfg, ids[0]), 1e-5)


def test_left_padded_batch_matches_unpadded_sequences(tmp_path, device):
    path, cfg, sd = _checkpoint(tmp_path, "gqa_tied_odd")
    model = RetNetForCausalLM.from_pretrained(path).to(device).eval()
    lengths, T = [13, 5, 9], 13
    ids = _ids(cfg["vocab_size"], 3, T)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, L in enumerate(lengths):
        mask[b, T - L:] = 1
    with torch.no_grad():
        logits = model(ids.to(device), attention_mask=mask.to(device)).logits.cpu()
    for b, L in enumerate(lengths):
        assert_close_rel(logits[b, T - L:], reference_logits(sd, cfg, ids[b, T - L:]), 1e-5)


# ------------------------------------------------------------------------------------------------
# Cache: chunk prefill + recurrent decode, generate()

def test_decode_with_cache_matches_full_forward(tmp_path, device):
    path, cfg, sd = _checkpoint(tmp_path, "base")
    model = RetNetForCausalLM.from_pretrained(path).to(device).eval()
    ids = _ids(cfg["vocab_size"], 2, 30).to(device)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :12], use_cache=True)
        steps = [out.logits]
        # a second prefill chunk continues from the state at position 12 (chunk form, offsets)
        out = model(ids[:, 12:20], past_key_values=out.past_key_values, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
        for t in range(20, 30):   # one fused recurrent step per token
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert cache.get_seq_length() == 30 and cache.offsets.tolist() == [30, 30]
    assert_close_rel(torch.cat(steps, 1), full, 1e-5)


def test_generate_greedy_left_padded_batch(tmp_path, device):
    path, cfg, sd = _checkpoint(tmp_path, "gqa_tied_odd")
    model = RetNetForCausalLM.from_pretrained(path).to(device).eval()
    prompts = [_ids(cfg["vocab_size"], 1, L, seed=L)[0] for L in (7, 3, 5)]
    T, pad, n = 7, 0, 8
    ids = torch.full((3, T), pad)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - p.numel():], mask[b, T - p.numel():] = p, 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                         do_sample=False, pad_token_id=pad, eos_token_id=None).cpu()
    assert out.shape == (3, T + n)
    for b, p in enumerate(prompts):
        seq = torch.cat([p, out[b, T:]])
        ref = reference_logits(sd, cfg, seq)[p.numel() - 1:-1]      # [n, vocab]
        chosen = ref.gather(1, out[b, T:, None])[:, 0]
        # each generated token is the reference's argmax on the sequence generated so far; random
        # weights can make two logits nearly tie, so "argmax" is up to fp32 rounding of the logits
        slack = 1e-5 * ref.abs().max(1).values
        assert bool((chosen >= ref.max(1).values - slack).all()), (b, out[b, T:], ref.argmax(1))


def test_generate_sampling_left_padded(tmp_path):
    path, cfg, _ = _checkpoint(tmp_path, "base")
    model = RetNetForCausalLM.from_pretrained(path).eval()
    ids = _ids(cfg["vocab_size"], 2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    sample = dict(kw, do_sample=True, top_k=20, temperature=0.8, num_return_sequences=2)
    torch.manual_seed(5)
    a = model.generate(**sample)
    torch.manual_seed(5)
    b = model.generate(**sample)
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert torch.equal(a[:, :6], ids.repeat_interleave(2, 0))
    assert int(a.max()) < cfg["vocab_size"]
    # top_k = 1 sampling is greedy decoding
    assert torch.equal(model.generate(**kw, do_sample=True, top_k=1), model.generate(**kw, do_sample=False))


def test_padded_training_loss_and_gradients(tmp_path):
    path, cfg, sd = _checkpoint(tmp_path, "gqa_tied_odd")
    model = RetNetForCausalLM.from_pretrained(path).train()
    T, lengths = 10, [10, 6]
    ids = _ids(cfg["vocab_size"], 2, T)
    mask = torch.ones_like(ids)
    mask[1, lengths[1]:] = 0              # right padding, as in training batches
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    terms = []
    for b, L in enumerate(lengths):
        ref = reference_logits(sd, cfg, ids[b, :L])
        terms.append(torch.nn.functional.cross_entropy(ref[:-1], ids[b, 1:L], reduction="none"))
    want = torch.cat(terms).mean()
    assert abs(loss.item() - want.item()) < 1e-5 * want.item()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


# ------------------------------------------------------------------------------------------------
# Training, save_pretrained, FLA's loader

def test_train_save_and_load_into_fla(tmp_path):
    fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention not installed")
    for name in ("base", "gqa_tied_odd"):
        cfg = CONFIGS[name]
        torch.manual_seed(0)
        model = RetNetForCausalLM(RetNetConfig(**cfg)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ids = _ids(cfg["vocab_size"], 4, 24)
        ids[:, 12:] = ids[:, :12]        # learnable: the second half repeats the first
        losses = []
        for _ in range(8):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        for shards in ("1GB", "20KB"):
            path = str(tmp_path / f"{name}-{shards}")
            model.save_pretrained(path, max_shard_size=shards)
            assert os.path.exists(os.path.join(path, "model.safetensors.index.json")) == (shards == "20KB")
            fla_model, info = fla_models.RetNetForCausalLM.from_pretrained(path, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
            ours = model.state_dict()
            theirs = fla_model.state_dict()
            assert set(theirs) == set(ours)
            for k in ours:
                assert torch.equal(theirs[k], ours[k]), k
            # strict load of the raw files into FLA's model object
            from safetensors.torch import load_file
            files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
            raw = {}
            for f in files:
                raw.update(load_file(os.path.join(path, f)))
            if cfg.get("tie_word_embeddings"):
                raw["lm_head.weight"] = raw["model.embeddings.weight"]
            fla_models.RetNetForCausalLM(fla_models.RetNetConfig(**cfg)).load_state_dict(raw, strict=True)
            # and back into ours
            again = RetNetForCausalLM.from_pretrained(path)
            for k, v in again.state_dict().items():
                assert torch.equal(v, ours[k]), k
        for dtype in (torch.bfloat16, torch.float16):
            path = str(tmp_path / f"{name}-{dtype}")
            low = RetNetForCausalLM(model.config)
            low.load_state_dict(model.state_dict())
            low.to(dtype).save_pretrained(path)
            fla_model = fla_models.RetNetForCausalLM.from_pretrained(path, dtype=dtype)
            for k, v in low.state_dict().items():
                assert fla_model.state_dict()[k].dtype == dtype and torch.equal(fla_model.state_dict()[k], v), k


def test_loss_is_flas_shifted_cross_entropy(tmp_path):
    path, cfg, sd = _checkpoint(tmp_path, "base")
    model = RetNetForCausalLM.from_pretrained(path)
    ids = _ids(cfg["vocab_size"], 1, 12)
    labels = ids.clone()
    labels[0, 3] = -100
    loss = model(ids, labels=labels).loss
    ref = reference_logits(sd, cfg, ids[0])
    want = torch.nn.functional.cross_entropy(ref[:-1], labels[0, 1:], ignore_index=-100)
    assert abs(loss.item() - want.item()) < 1e-5 * max(1.0, want.item())


# ------------------------------------------------------------------------------------------------
# Bad directories and configs: errors name the file and the field

def test_missing_shard(tmp_path):
    path, _, _ = _checkpoint(tmp_path, "base", shards=2)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*model-00002-of-00002"):
        RetNetForCausalLM.from_pretrained(path)


def test_config_field_of_wrong_type(tmp_path):
    path, _, _ = _checkpoint(tmp_path, "base")
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["num_heads"] = "4"
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"config\.json.*'num_heads'.*integer"):
        RetNetForCausalLM.from_pretrained(path)


def test_tensor_shape_disagrees_with_config(tmp_path):
    cfg = dict(CONFIGS["base"])
    sd = random_state_dict(cfg)
    cfg["num_kv_heads"] = 2     # the weights were made for 4 kv heads
    path = str(tmp_path / "bad")
    write_fla_checkpoint(path, cfg, sd)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'model\.layers\.0\.attn\.k_proj\.weight'"
                                              r".*\[32, 32\].*num_kv_heads.*\[16, 32\]"):
        RetNetForCausalLM.from_pretrained(path)


def test_missing_tensor_and_unsupported_field(tmp_path):
    cfg = CONFIGS["base"]
    sd = random_state_dict(cfg)
    del sd["model.layers.1.mlp.up_proj.weight"]
    path = str(tmp_path / "missing")
    write_fla_checkpoint(path, cfg, sd)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing.*layers\.1\.mlp\.up_proj"):
        RetNetForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match="use_short_conv"):
        RetNetForCausalLM(RetNetConfig(**dict(cfg, use_short_conv=True)))
    with pytest.raises(CheckpointError, match="attnres_block_size"):
        RetNetForCausalLM(RetNetConfig(**dict(cfg, attnres_block_size=2)))


# ------------------------------------------------------------------------------------------------
# Auto classes and the optional dependency

def _python(code):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_auto_classes_register_retnet(tmp_path):
    path, _, _ = _checkpoint(tmp_path, "base")
    r = _python(
        "import transformers, retention.models as m\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({path!r})\n"
        "assert type(model) is m.RetNetForCausalLM, type(model)\n"
        "assert type(AutoConfig.for_model('retnet')) is m.RetNetConfig\n")
    assert r.returncode == 0, r.stderr[-3000:]


def test_fla_registration_is_kept():
    pytest.importorskip("fla.models", reason="flash-linear-attention not installed")
    r = _python(
        "import fla.models, retention.models as m\n"
        "from transformers import AutoConfig\n"
        "assert type(AutoConfig.for_model('retnet')) is fla.models.RetNetConfig\n"
        "m.RetNetForCausalLM(m.RetNetConfig(hidden_size=16, num_hidden_layers=1, num_heads=2, vocab_size=9))\n")
    assert r.returncode == 0, r.stderr[-3000:]


def test_clear_import_error_without_transformers():
    r = _python("import sys; sys.modules['transformers'] = None\n"
                "import retention\n"
                "try:\n"
                "    from retention.models import RetNetForCausalLM\n"
                "except ImportError as e:\n"
                "    assert 'retention[hf]' in str(e), e\n"
                "else:\n"
                "    raise SystemExit('no ImportError')\n")
    assert r.returncode == 0, r.stderr[-3000:]
