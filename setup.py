"""Builds the Python extension retention._C from csrc/ (and, with a CUDA build of torch, the
kernels in kernels/ and the CUDA glue in csrc/cuda/)."""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/meta/*.cpp") + rel(
    "csrc/autograd/*.cpp")
include_dirs = [os.path.join(ROOT, d) for d in ("csrc/include", "csrc", "kernels")]
cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden"]

# CUDA when this torch was built with CUDA and a toolkit is present (RETENTION_GPU=none skips).
use_cuda = (os.environ.get("RETENTION_GPU", "auto") != "none" and torch.version.cuda is not None
            and CUDA_HOME is not None)
if use_cuda:
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    ext = CUDAExtension(
        "retention._C",
        sources + rel("csrc/cuda/*.cu") + rel("kernels/*.cu"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                                     "-lineinfo"]},
    )
else:
    ext = CppExtension("retention._C", sources, include_dirs=include_dirs,
                       extra_compile_args=cxx_flags)

setup(
    name="retention",
    version="0.1.0",
    description="Fused multi-scale retention (RetNet) ops for PyTorch and LibTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
