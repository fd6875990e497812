"""Which dispatch keys every op has a kernel for, checked through the dispatcher (no GPU needed).
The fused ops (msr_*) have the backend kernels: CPU, Meta (FakeTensor / torch.compile), Autograd,
the autocast keys and, for a CUDA build of the extension, CUDA.  The raw ops have exactly one,
CompositeImplicitAutograd: they run as the fused ops with every option off, so they cannot drift
from them.  The torch 2.x CI leg builds the CUDA extension on a machine without a GPU and sets
RETENTION_EXPECT_GPU_BUILD=cuda, so a CUDA glue that silently failed to register is caught
there."""
import os

import pytest
import torch

import retention  # noqa: F401  (registers torch.ops.retention)

FUSED_OPS = ["retention::" + name for name in ("msr_forward", "msr_backward", "msr_step")]
RAW_OPS = ["retention::" + name for name in (
    "chunk_forward", "chunk_backward", "parallel_forward", "parallel_backward",
    "recurrent_forward", "recurrent_step")]
# Inference helpers: CPU only (callers take them for CPU tensors), with Meta for tracing and an
# Autograd kernel that refuses gradients.
CPU_OPS = ["retention::matvec"]
OPS = FUSED_OPS + RAW_OPS + CPU_OPS
BACKEND_KEYS = ["CPU", "CUDA", "Meta", "Autograd", "AutocastCPU", "AutocastCUDA"]
has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)

pytestmark = pytest.mark.skipif(
    has_kernel is None,
    reason=f"torch._C._dispatch_has_kernel_for_dispatch_key is missing in torch {torch.__version__}")


def test_op_list_is_complete():
    all_ops = getattr(torch._C, "_dispatch_get_all_op_names", None)
    if all_ops is None:
        pytest.skip(f"torch._C._dispatch_get_all_op_names is missing in torch {torch.__version__}")
    registered = sorted(n for n in all_ops() if n.startswith("retention::"))
    assert registered == sorted(OPS), f"update OPS: registered ops are {registered}"


@pytest.mark.parametrize("key", ["CPU", "Meta", "Autograd", "AutocastCPU", "AutocastCUDA"])
def test_every_fused_op_has_kernel(key):
    missing = [op for op in FUSED_OPS if not has_kernel(op, key)]
    assert not missing, f"no {key} kernel for {missing}"


@pytest.mark.parametrize("op", CPU_OPS)
def test_cpu_ops_have_cpu_meta_and_autograd_kernels(op):
    missing = [key for key in ("CPU", "Meta", "Autograd") if not has_kernel(op, key)]
    assert not missing, f"no {missing} kernel for {op}"


@pytest.mark.parametrize("op", RAW_OPS)
def test_raw_ops_are_the_fused_ops(op):
    assert has_kernel(op, "CompositeImplicitAutograd"), f"{op} has no CompositeImplicitAutograd kernel"
    own = [key for key in BACKEND_KEYS if has_kernel(op, key)]
    assert not own, f"{op} has its own {own} kernels beside its composite form"


def test_cuda_kernels_registered():
    expect = os.environ.get("RETENTION_EXPECT_GPU_BUILD") == "cuda" or (
        torch.cuda.is_available() and torch.version.hip is None)
    if not expect:
        pytest.skip("CPU build of the extension (set RETENTION_EXPECT_GPU_BUILD=cuda to require "
                    "the CUDA kernels; the torch 2.x CI leg does)")
    missing = [op for op in FUSED_OPS if not has_kernel(op, "CUDA")]
    assert not missing, f"the CUDA build has no CUDA kernel for {missing}"
