"""FLA-format directories served from C++: the retention-generate app (retention::FlaRetNet,
SentencePiece tokenizer) against Python's retention.models.RetNetForCausalLM on the same files.

Each test trains a small SentencePiece model on a licence text every Debian system ships
(spm_train, Debian package ``sentencepiece``), writes a random FLA-format checkpoint with that
vocabulary (fla_retnet_reference.write_fla_checkpoint: config.json + model.safetensors, or
sharded with model.safetensors.index.json) and the tokenizer as ``tokenizer.model``, then

  * runs the app on two text prompts and one prompt of token ids, decoded together as a batch;
  * checks the app's prompt ids against ``spm_encode`` and its text against ``spm_decode``;
  * generates greedily from the same ids with Python's ``generate`` (one prompt at a time) and
    compares the tokens step by step, and the logits each token was chosen from.

fp32 checkpoints must give the same tokens at every one of the STEPS steps.  Both sides run the
same fp32 ops on different torch builds (the app: the system LibTorch; Python: this
environment's torch), whose GEMMs sum in different orders, so logits agree to ~1e-6 relative
(measured <= 1.2e-6; tolerance 1e-4), not bit for bit.  bf16 checkpoints keep bf16 weights and
activations on both sides, rounded to 2^-9 relative at every op, so two GEMM implementations round
values either way and the logits differ by ~1e-2 relative (measured <= 1.0e-2; tolerance 3e-2);
bf16 logits are also coarse enough (spacing 2^-6 at |logit| ~ 3) to tie exactly.  So in bf16 each
of the app's tokens must be Python's argmax on the app's own sequence (teacher forced) up to that
tolerance, and where the app parts from Python's generate the two logits must be that close.

Needs the app (``scripts/build.sh`` installs it to build/install/bin; RETENTION_GENERATE
overrides the path), spm_train/spm_encode/spm_decode, and transformers (the torch 2.x test
environment); otherwise skipped, saying which is missing.
"""
import json
import os
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("transformers", reason="optional extra retention[hf] (transformers) not installed")
pytest.importorskip("safetensors", reason="optional extra retention[hf] (safetensors) not installed")

from fla_retnet_reference import random_state_dict, write_fla_checkpoint  # noqa: E402

from retention.models import RetNetForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APP = os.environ.get("RETENTION_GENERATE", os.path.join(ROOT, "build", "install", "bin", "retention-generate"))
LICENCE = "/usr/share/common-licenses/GPL-3"   # base-files: on every Debian system
STEPS = 80
TEXT_PROMPTS = ["This License applies to any program", "GNU"]
VOCAB = 320          # the model's vocabulary: the tokenizer's 300 pieces plus padding, as hub models pad
CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
              hidden_ratio=2)

pytestmark = [
    pytest.mark.skipif(not os.access(APP, os.X_OK), reason=f"retention-generate not built ({APP}): run "
                       "scripts/build.sh, or set RETENTION_GENERATE"),
    pytest.mark.skipif(shutil.which("spm_train") is None, reason="spm_train not installed (Debian package "
                       "sentencepiece)"),
    pytest.mark.skipif(not os.path.exists(LICENCE), reason=f"{LICENCE} not found"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    subprocess.run(["spm_train", f"--input={LICENCE}", f"--model_prefix={d / 'sp'}", "--vocab_size=300",
                    "--character_coverage=1.0", "--num_threads=1", "--minloglevel=2"],
                   check=True, capture_output=True, text=True)
    return str(d / "sp.model")


def _spm(cmd, model, text):
    return subprocess.run([cmd, f"--model={model}"] + (["--output_format=id"] if cmd == "spm_encode" else
                                                        ["--input_format=id"]),
                          input=text + "\n", check=True, capture_output=True, text=True).stdout.rstrip("\n")


def _decode(tokenizer, ids, pieces=300):
    """spm_decode of each run of ids the tokenizer knows, "<id>" for the model's padding ids (the
    app's rule)."""
    out, run = "", []
    for t in ids + [None]:
        if t is not None and t < pieces:
            run.append(t)
            continue
        if run:
            out += _spm("spm_decode", tokenizer, " ".join(map(str, run)))
            run = []
        if t is not None:
            out += f"<{t}>"
    return out


def _checkpoint(path, tokenizer, dtype, shards, seed=0):
    sd = random_state_dict(CONFIG, torch.Generator().manual_seed(seed))
    # a larger spread of the embedding, so that greedy continuations vary from token to token
    sd["model.embeddings.weight"] = sd["model.embeddings.weight"] * 3
    write_fla_checkpoint(path, CONFIG, sd, dtype=dtype, shards=shards)
    shutil.copy(tokenizer, os.path.join(path, "tokenizer.model"))
    return path


def _run_app(*args):
    return subprocess.run([APP, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("dtype,shards", [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 2)],
                         ids=["fp32", "fp32-sharded", "bf16-sharded"])
def test_app_generates_pythons_greedy_tokens(tmp_path, tokenizer, dtype, shards):
    path = _checkpoint(str(tmp_path / "model"), tokenizer, dtype, shards)
    out = str(tmp_path / "out.json")
    ids_prompt = [5, 17, 3, 250, 311, 42, 9]   # 311: beyond the tokenizer, inside the model's vocabulary
    r = _run_app("--checkpoint", path, "--prompt", TEXT_PROMPTS[0], "--prompt", TEXT_PROMPTS[1],
                 "--ids", ",".join(map(str, ids_prompt)), "--max-new-tokens", str(STEPS), "--threads", "1",
                 "--eos-token-id", "none", "--json", out, "--save-logits")
    assert r.returncode == 0, r.stdout + r.stderr
    # weights kept in the stored dtype
    assert "model: FLA RetNet" in r.stdout and f"({'BFloat16' if dtype == torch.bfloat16 else 'Float'}, " in r.stdout, \
        r.stdout
    with open(out) as f:
        app = json.load(f)

    # the tokenizer: the app's prompt ids and text are SentencePiece's own
    for i, text in enumerate(TEXT_PROMPTS):
        assert app["prompts"][i] == [int(t) for t in _spm("spm_encode", tokenizer, text).split()], text
    assert app["prompts"][2] == ids_prompt
    for i in range(3):
        assert app["texts"][i] == _decode(tokenizer, app["tokens"][i])

    model = RetNetForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None      # both sides generate STEPS tokens, eos or not
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # relative to max(1, max |logit|); see the docstring
    for i, prompt in enumerate(app["prompts"]):
        app_tokens, app_logits = app["tokens"][i], torch.tensor(app["logits"][i])   # [STEPS, V]
        with torch.no_grad():
            gen = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                                 output_logits=True)
            # Python's logits along the app's tokens (teacher forced, one chunk-form pass)
            forced = model(torch.tensor([prompt + app_tokens[:-1]])).logits[0, len(prompt) - 1:].float()
        py_tokens = gen.sequences[0, len(prompt):].tolist()
        assert len(py_tokens) == STEPS
        agree = next((s for s in range(STEPS) if py_tokens[s] != app_tokens[s]), STEPS)
        scale = max(1.0, float(forced.abs().max()))
        err = float((app_logits - forced).abs().max()) / scale
        assert err <= tol, (i, err)
        # every token the app chose is Python's argmax on the app's sequence, up to the logits'
        # tolerance (bf16: ties and near ties, where either choice is right)
        chosen = forced.gather(1, torch.tensor(app_tokens)[:, None])[:, 0]
        slack = tol * forced.abs().max(1).values.clamp(min=1.0)
        assert bool((chosen >= forced.max(1).values - slack).all()), (i, app_tokens, forced.argmax(1).tolist())
        if dtype == torch.float32:
            assert agree == STEPS, (f"prompt {i}: tokens part at step {agree}: Python {py_tokens[agree:agree + 5]}, "
                                    f"C++ {app_tokens[agree:agree + 5]}")
        elif agree < STEPS:   # parted from Python's own continuation only at a near tie
            row = torch.cat([l.float() for l in gen.logits])[agree]
            gap = float(row[py_tokens[agree]] - row[app_tokens[agree]])
            assert gap <= tol * max(1.0, float(row.abs().max())), (i, agree, gap)
        print(f"prompt {i} ({len(prompt)} tokens, {dtype}): {agree}/{STEPS} greedy tokens equal to Python's "
              f"generate, logits within {err:.1e} relative")


def test_app_ends_at_configs_eos_as_python_generate(tmp_path, tokenizer):
    """config.json's eos_token_id ends a prompt in the app as in transformers' generate: the eos
    token is the last one; the other prompts of the batch go on."""
    path = _checkpoint(str(tmp_path / "model"), tokenizer, torch.float32, 1)
    prompts = [[5, 17, 3, 250, 311, 42, 9], [7, 7, 1]]
    ids = [a for p in prompts for a in ("--ids", ",".join(map(str, p)))]

    def app_tokens(*extra):
        out = str(tmp_path / "out.json")
        r = _run_app("--checkpoint", path, *ids, "--max-new-tokens", "24", "--threads", "1", "--json", out,
                     *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        with open(out) as f:
            return json.load(f)["tokens"]

    free = app_tokens("--eos-token-id", "none")
    eos = free[0][6]
    assert eos not in free[0][:6]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = eos
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    ended = app_tokens()   # --eos-token-id auto: config.json's
    assert ended[0] == free[0][:7]
    cut = free[1].index(eos) + 1 if eos in free[1] else len(free[1])
    assert ended[1] == free[1][:cut]

    model = RetNetForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, app in zip(prompts, ended):
        with torch.no_grad():
            seq = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        assert seq == app, (prompt, seq, app)


def test_app_bad_directory_names_file_and_field(tmp_path, tokenizer):
    path = _checkpoint(str(tmp_path / "model"), tokenizer, torch.float32, 2)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    r = _run_app("--checkpoint", path, "--ids", "1,2", "--max-new-tokens", "2")
    assert r.returncode == 1
    assert "model.safetensors.index.json" in r.stderr and "shard 'model-00002-of-00002.safetensors'" in r.stderr

    path = _checkpoint(str(tmp_path / "model2"), tokenizer, torch.float32, 1)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_heads"] = "4"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    r = _run_app("--checkpoint", path, "--prompt", "GNU")
    assert r.returncode == 1
    assert "config.json" in r.stderr and "config field 'num_heads' must be an integer" in r.stderr, r.stderr

    # the same directory with a good config, but no tokenizer: ids work, text is refused clearly
    cfg["num_heads"] = 4
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    os.remove(os.path.join(path, "tokenizer.model"))
    assert _run_app("--checkpoint", path, "--ids", "1,2", "--max-new-tokens", "2", "--quiet").returncode == 0
    r = _run_app("--checkpoint", path, "--prompt", "GNU")
    assert r.returncode == 1 and "tokenizer.model" in r.stderr, r.stderr
