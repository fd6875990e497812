"""Safetensors checkpoints of retention.nn.RetNet (retention.checkpoint).

The file layout is checked byte by byte against the format's definition (little-endian u64
header length, JSON header, data section), independently of the reader under test; corrupt
files must raise CheckpointError naming the tensor."""
import json
import struct

import pytest
import torch

from retention.checkpoint import CheckpointError, load_file, read_metadata, save_file
from retention.nn import RetNet


def small_model(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=23, embed_dim=16, value_dim=24, num_heads=2, num_layers=2, ffn_dim=20, chunk_size=4)
    args.update(kw)
    return RetNet(**args).eval()


def raw(header: dict, data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def test_file_layout_follows_the_format(tmp_path):
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    path = tmp_path / "x.safetensors"
    save_file({"a": a, "b": b}, path, {"k": "v"})
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0  # data section 8-byte aligned
    header = json.loads(blob[8:8 + n])
    assert header["__metadata__"] == {"k": "v"}
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"] == {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]}
    data = blob[8 + n:]
    assert struct.unpack("<6f", data[:24]) == tuple(float(i) for i in range(6))
    # bf16 = the upper 16 bits of the fp32 pattern (both values are exact in bf16)
    assert data[24:28] == struct.pack("<f", 1.5)[2:] + struct.pack("<f", -2.0)[2:]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                   torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
def test_every_dtype_round_trips(tmp_path, dtype):
    t = (torch.randn(3, 5) * 50).to(dtype)
    save_file({"t": t, "empty": torch.zeros(0, 4, dtype=dtype), "s": t[0, 0].clone()}, tmp_path / "f")
    out, meta = load_file(tmp_path / "f")
    assert meta == {}
    for name, ref in (("t", t), ("empty", torch.zeros(0, 4, dtype=dtype)), ("s", t[0, 0])):
        assert out[name].dtype == dtype and out[name].shape == ref.shape and torch.equal(out[name], ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_from_pretrained(tmp_path, dtype, tie):
    model = small_model(tie_embeddings=tie).to(dtype)
    vocab = [chr(ord("a") + i) for i in range(23)]
    path = model.save_pretrained(tmp_path, vocab=vocab)  # a directory: <dir>/model.safetensors
    assert path.endswith("model.safetensors")
    meta = read_metadata(path)
    config = json.loads(meta["config"])
    assert config["vocab_size"] == 23 and config["decay"] == "retnet" and config["tie_embeddings"] == tie
    loaded = RetNet.from_pretrained(tmp_path)
    assert loaded.vocab == vocab
    assert (loaded.output_projection.weight is loaded.embed_tokens.weight) == tie
    for name, p in model.state_dict().items():
        assert p.dtype == loaded.state_dict()[name].dtype and torch.equal(p, loaded.state_dict()[name]), name
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    assert torch.equal(model(tokens)[0], loaded(tokens)[0])


def test_custom_decay_and_dtype_cast(tmp_path):
    decay = torch.tensor([-0.05, -0.3])
    model = small_model(decay=decay)
    model.save_pretrained(tmp_path / "m.safetensors")
    loaded = RetNet.from_pretrained(tmp_path / "m.safetensors", dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.layers[1].retention.log_decay, decay)


def corrupt_cases(good: bytes):
    (n,) = struct.unpack("<Q", good[:8])
    four = bytes(16)
    return [
        ("truncated data", good[:-10], "outside the data section"),
        ("truncated header", good[:8 + n // 2], "runs past the end"),
        ("too short", good[:5], "too short"),
        ("not JSON", struct.pack("<Q", 5) + b"{\"a\":", "not valid JSON"),
        ("offsets past the end", raw({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10 ** 6]}}, four),
         "'x'"),
        ("shape vs bytes", raw({"x": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, four), "needs 20 bytes"),
        ("unknown dtype", raw({"x": {"dtype": "F8", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)), "unsupported dtype"),
        ("gap", raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "back to back"),
    ]


def test_corrupt_files_raise_clear_errors(tmp_path):
    model = small_model()
    path = model.save_pretrained(tmp_path / "good.safetensors")
    good = open(path, "rb").read()
    for what, blob, message in corrupt_cases(good):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(CheckpointError, match=message):
            load_file(bad)
        assert what


def test_wrong_model_tensors_raise_clear_errors(tmp_path):
    model = small_model()
    state = model.state_dict()
    meta = {"format": "pt", "model_type": "retention.RetNet",
            "config": json.dumps(json.loads(read_metadata(model.save_pretrained(tmp_path / "m"))["config"]))}
    name = "layers.1.ffn.fc2.weight"
    missing = {k: v for k, v in state.items() if k != name}
    save_file(missing, tmp_path / "missing", meta)
    with pytest.raises(CheckpointError, match=f"missing tensors \\['{name}'\\]"):
        RetNet.from_pretrained(tmp_path / "missing")
    wrong = dict(state)
    wrong[name] = torch.zeros(16, 21)
    save_file(wrong, tmp_path / "shape", meta)
    with pytest.raises(CheckpointError, match=f"'{name}' has shape \\[16, 21\\]"):
        RetNet.from_pretrained(tmp_path / "shape")
    save_file(state, tmp_path / "other", {"model_type": "something.else"})
    with pytest.raises(CheckpointError, match="model_type"):
        RetNet.from_pretrained(tmp_path / "other")


def test_interoperates_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="the safetensors package is not installed "
                             "(Debian 12 has no python3-safetensors; the reader here does not need it)")
    model = small_model().to(torch.bfloat16)
    path = model.save_pretrained(tmp_path / "ours.safetensors")
    theirs = st.load_file(path)
    for name, p in model.state_dict().items():
        assert torch.equal(theirs[name], p)
    st.save_file(theirs, str(tmp_path / "theirs.safetensors"), metadata=read_metadata(path))
    loaded = RetNet.from_pretrained(tmp_path / "theirs.safetensors")
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)
