"""Safetensors checkpoints for :class:`retention.nn.RetNet`: the state dict plus the model config
(and optionally the tokenizer's character vocabulary) in the file's metadata, so that a C++
process (``retention::RetNet::load``, the ``retention-generate`` app) can rebuild the model from
the file alone.

The safetensors format (https://huggingface.co/docs/safetensors) is read and written here
directly instead of through the ``safetensors`` package: Debian 12 has no ``python3-safetensors``
and Debian's ``/usr/bin/python3`` (the interpreter with ``python3-torch``) must not be
pip-installed into, while the format is small enough to implement completely:

    8 bytes   little-endian uint64 N = length of the header
    N bytes   UTF-8 JSON object: {"__metadata__": {str: str}, name: {"dtype": "F32",
              "shape": [..], "data_offsets": [begin, end]}, ...}, padded with spaces to a
              multiple of 8 bytes
    rest      the tensors' bytes (little-endian, row-major), at [begin, end) relative to the
              start of this section, back to back without gaps or overlaps

Files written here load with the ``safetensors`` package and vice versa (the test suite checks
this when the package is importable).

Metadata written by :func:`save_pretrained`:
    format         "pt"
    model_type     "retention.RetNet"
    config         JSON of :func:`model_config` (the RetNet constructor's arguments)
    vocab          (optional) JSON list of strings: token id -> text (character vocabulary)
"""

import json
import math
import os
import struct
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .functional import linspace_log_decay, retnet_log_decay

__all__ = [
    "save_file",
    "load_file",
    "read_metadata",
    "model_config",
    "save_pretrained",
    "from_pretrained",
    "CheckpointError",
    "MODEL_TYPE",
    "CHECKPOINT_NAME",
]

MODEL_TYPE = "retention.RetNet"
CHECKPOINT_NAME = "model.safetensors"  # file used when a directory is given

# safetensors dtype names <-> torch dtypes (the ones torch 1.13 has)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# same-size integer type used to get at a tensor's bytes (numpy has no bfloat16)
_BYTES_VIEW = {torch.bfloat16: torch.int16}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class CheckpointError(ValueError):
    """A file that is not a valid safetensors checkpoint (or not the expected model)."""


def _resolve(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    t = t.view(_BYTES_VIEW.get(t.dtype, t.dtype))
    return t.numpy().tobytes()  # numpy writes native order; checked little-endian below


def save_file(tensors: Dict[str, Tensor], path: Union[str, os.PathLike],
              metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` (name -> tensor, any device, no two sharing memory) to a safetensors
    file. ``metadata`` values must be strings (the format's rule)."""
    if struct.pack("=H", 1) != struct.pack("<H", 1):
        raise RuntimeError("save_file: big-endian hosts are not supported")
    header: Dict[str, object] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
        header["__metadata__"] = dict(metadata)
    blobs: List[bytes] = []
    offset = 0
    seen = {}
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        if t.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} has no safetensors equivalent")
        if t.numel() and t.device.type != "meta":
            key = (t.device, t.untyped_storage().data_ptr() if hasattr(t, "untyped_storage")
                   else t.storage().data_ptr())
            if key in seen:
                raise ValueError(f"tensors {seen[key]!r} and {name!r} share memory; save one of them")
            seen[key] = name
        data = _tensor_bytes(t)
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:  # write then rename: a crash never leaves a half-written checkpoint
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def _parse_header(buf: bytes, file_size: int, where: str) -> Tuple[dict, int]:
    if file_size < 8:
        raise CheckpointError(f"{where}: {file_size} bytes is too short for a safetensors file (8-byte header length missing)")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > file_size - 8 or n > _MAX_HEADER:
        raise CheckpointError(f"{where}: header length {n} runs past the end of the file ({file_size} bytes): truncated or not safetensors")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header must be a JSON object, got {type(header).__name__}")
    return header, 8 + n


def _check_entry(name: str, entry, data_size: int, where: str) -> Tuple[torch.dtype, List[int], int, int]:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: tensor {name!r}: entry must be an object")
    dt = entry.get("dtype")
    if dt not in _DTYPES:
        raise CheckpointError(f"{where}: tensor {name!r}: unsupported dtype {dt!r} (supported: {sorted(_DTYPES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    offs = entry.get("data_offsets")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)):
        raise CheckpointError(f"{where}: tensor {name!r}: data_offsets must be [begin, end], got {offs!r}")
    begin, end = offs
    if begin > end or end > data_size:
        raise CheckpointError(f"{where}: tensor {name!r}: data_offsets [{begin}, {end}] outside the data section "
                              f"({data_size} bytes): truncated file or corrupt header")
    nbytes = math.prod(shape) * torch.empty((), dtype=_DTYPES[dt]).element_size()
    if nbytes != end - begin:
        raise CheckpointError(f"{where}: tensor {name!r}: shape {shape} of {dt} needs {nbytes} bytes, "
                              f"data_offsets give {end - begin}")
    return _DTYPES[dt], shape, begin, end


def _read(path) -> Tuple[dict, Dict[str, str], bytes, int, str]:
    path = _resolve(path)
    with open(path, "rb") as f:
        buf = f.read()
    header, start = _parse_header(buf, len(buf), f"safetensors file {path!r}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"safetensors file {path!r}: __metadata__ must map strings to strings")
    return header, meta, buf, start, path


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The ``__metadata__`` map of a safetensors file (or of ``<dir>/model.safetensors``)."""
    path = _resolve(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(8)
        n = struct.unpack("<Q", first)[0] if len(first) == 8 else 0
        buf = first + (f.read(n) if len(first) == 8 and n <= size - 8 and n <= _MAX_HEADER else b"")
    header, _ = _parse_header(buf, size, f"safetensors file {path!r}")
    meta = header.get("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"safetensors file {path!r}: __metadata__ must be an object")
    return meta


def load_file(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"
              ) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Read every tensor of a safetensors file: returns (tensors, metadata). Every entry is
    validated (dtype, shape vs byte count, offsets inside the file, no gaps or overlaps) and a
    bad one raises :class:`CheckpointError` naming the tensor."""
    header, meta, buf, start, path = _read(path)
    where = f"safetensors file {path!r}"
    data_size = len(buf) - start
    entries = {name: _check_entry(name, e, data_size, where) for name, e in header.items()}
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            raise CheckpointError(f"{where}: tensor {name!r} starts at byte {begin} of the data section, expected {pos} "
                                  f"(tensors must be stored back to back without gaps or overlaps)")
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{where}: {data_size - pos} bytes after the last tensor")
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        raw = bytearray(buf[start + begin:start + end])
        view = _BYTES_VIEW.get(dtype, dtype)
        t = torch.frombuffer(raw, dtype=view) if raw else torch.empty(0, dtype=view)
        out[name] = t.view(dtype).reshape(shape).to(device)
    return out, dict(meta)


# ----------------------------------------------------------------------------------------------
def _decay_config(model) -> Union[str, List[float]]:
    """'retnet' / 'linspace' when every layer has that decay, else the log decays (exact)."""
    lds = [layer.retention.log_decay.detach().cpu() for layer in model.layers]
    H = model.layers[0].retention.num_heads if lds else 0
    for name, fn in (("retnet", retnet_log_decay), ("linspace", linspace_log_decay)):
        ref = fn(H)
        if all(ld.dtype == ref.dtype and torch.equal(ld, ref) for ld in lds):
            return name
    if any(not torch.equal(ld, lds[0]) for ld in lds):
        raise ValueError("save_pretrained: the layers have different decays, which the config cannot express")
    return [float(x) for x in lds[0].double().tolist()]  # float64 repr: exact round trip


def model_config(model) -> dict:
    """The constructor arguments of a RetNet (what ``RetNet(**config)`` rebuilds)."""
    first = model.layers[0] if len(model.layers) else None
    if first is None:
        raise ValueError("save_pretrained: a RetNet without layers")
    msr = first.retention
    return {
        "vocab_size": model.vocab_size,
        "embed_dim": model.embed_dim,
        "value_dim": msr.value_dim,
        "num_heads": msr.num_heads,
        "num_layers": model.num_layers,
        "ffn_dim": first.ffn.fc1.out_features,
        "layernorm_eps": msr.layernorm_eps,
        "chunk_size": msr.chunk_size,
        "decay": _decay_config(model),
        "gate_fn": msr.gate_fn,
        "activation_fn": first.ffn.activation_fn,
        "tie_embeddings": model.output_projection.weight is model.embed_tokens.weight,
        "rotary": "torchscale",  # what MultiScaleRetention applies (interleaved pairs)
    }


def save_pretrained(model, path: Union[str, os.PathLike], vocab: Optional[Sequence[str]] = None,
                    metadata: Optional[Dict[str, str]] = None) -> str:
    """Save ``model`` (a RetNet) as one safetensors file (``path`` or ``<path>/model.safetensors``
    when path is a directory): weights in their current dtype, config (and vocab) in the
    metadata. Returns the file written."""
    config = model_config(model)
    if vocab is not None:
        vocab = [str(s) for s in vocab]
        if len(vocab) != config["vocab_size"]:
            raise ValueError(f"vocab has {len(vocab)} entries, the model's vocab_size is {config['vocab_size']}")
    state = model.state_dict()
    if config["tie_embeddings"]:
        state.pop("output_projection.weight")  # the same tensor as embed_tokens.weight
    meta = {"format": "pt", "model_type": MODEL_TYPE, "config": json.dumps(config)}
    if vocab is not None:
        meta["vocab"] = json.dumps(vocab, ensure_ascii=False)
    for key, value in (metadata or {}).items():
        if key in meta:
            raise ValueError(f"metadata key {key!r} is reserved")
        meta[key] = value
    path = _resolve(path)
    save_file(state, path, meta)
    return path


def _config_from_metadata(meta: Dict[str, str], where: str) -> dict:
    if meta.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{where}: metadata model_type is {meta.get('model_type')!r}, expected {MODEL_TYPE!r}")
    try:
        config = json.loads(meta["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: metadata 'config' missing or not JSON ({e})") from None
    if config.pop("rotary", "torchscale") != "torchscale":
        raise CheckpointError(f"{where}: only rotary 'torchscale' is supported by retention.nn.RetNet")
    if isinstance(config.get("decay"), list):
        config["decay"] = torch.tensor(config["decay"], dtype=torch.float64).to(torch.float32)
    return config


def from_pretrained(cls, path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu",
                    dtype: Optional[torch.dtype] = None):
    """Build ``cls`` (RetNet) from the config in the file and load its weights (strict).
    ``dtype``: cast the weights (default: keep the stored dtype). The vocabulary, if saved, is
    available as ``model.vocab`` (a list of strings)."""
    tensors, meta = load_file(path)
    where = f"safetensors file {_resolve(path)!r}"
    config = _config_from_metadata(meta, where)
    model = cls(**config)
    if config.get("tie_embeddings"):
        if "output_projection.weight" in tensors:
            raise CheckpointError(f"{where}: tie_embeddings is set but 'output_projection.weight' is stored too")
        tensors["output_projection.weight"] = tensors["embed_tokens.weight"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                                  f"the config needs {list(ref.shape)}")
    stored = {t.dtype for t in tensors.values()}
    model = model.to(dtype or (stored.pop() if len(stored) == 1 else torch.float32))
    model.load_state_dict(tensors, strict=True)  # copies (and casts) into the parameters
    model.to(map_location)
    model.vocab = json.loads(meta["vocab"]) if "vocab" in meta else None
    model.eval()
    return model
