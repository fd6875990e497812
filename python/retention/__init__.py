"""Fused multi-scale retention (RetNet) for PyTorch.

The ops live in the C++ extension (``retention._C``) and are reached through
``torch.ops.retention``; this package adds typed Python entry points and the layers in
``retention.nn``.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.retention)
from .functional import (
    chunk_retention,
    linspace_log_decay,
    msr,
    msr_step,
    parallel_retention,
    recurrent_retention,
    recurrent_step,
    retention,
    retnet_log_decay,
)

ops = torch.ops.retention

__all__ = [
    "chunk_retention",
    "linspace_log_decay",
    "msr",
    "msr_step",
    "ops",
    "parallel_retention",
    "recurrent_retention",
    "recurrent_step",
    "retention",
    "retnet_log_decay",
]

from . import nn  # noqa: E402,F401
