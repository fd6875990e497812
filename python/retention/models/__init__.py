"""Language models built on the fused retention ops.

``retention.models.retnet_fla``: FLA's (flash-linear-attention) RetNet architecture, loading and
saving Hugging Face checkpoints in FLA's format, as a ``transformers`` model.  ``transformers``
and ``safetensors`` are optional dependencies (``pip install 'retention[hf]'``), so nothing here
is imported by ``import retention``; the names below import the module on first use.
"""

_FLA_NAMES = ("RetNetConfig", "RetNetModel", "RetNetForCausalLM", "RetNetCache",
              "check_checkpoint_dir", "CheckpointError")

__all__ = list(_FLA_NAMES)

try:
    from . import retnet_fla  # registers AutoConfig / AutoModelForCausalLM "retnet"
except ImportError:  # optional dependency missing: __getattr__ raises the explanation on use
    pass


def __getattr__(name):
    if name in _FLA_NAMES:
        import importlib
        return getattr(importlib.import_module(".retnet_fla", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
