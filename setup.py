"""Builds the Python extension retention._C from csrc/ (and, with a CUDA or ROCm build of torch,
the kernels in kernels/ and the GPU glue in csrc/cuda/).

Env: RETENTION_GPU=none|cuda|rocm|auto (default auto); TORCH_CUDA_ARCH_LIST (default 8.0;9.0);
PYTORCH_ROCM_ARCH (default gfx90a)."""
import glob
import os
import re
import shlex
import subprocess
import sysconfig

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import (CUDA_HOME, ROCM_HOME, BuildExtension, CppExtension,
                                       CUDAExtension, include_paths)

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def kernel_build():
    """The kernels' build definition (cmake/kernels.cmake), as {name: [words]} for its
    set(RETENTION_KERNEL_<name> ...) lines: the same sources and flags as every other build."""
    text = open(os.path.join(ROOT, "cmake", "kernels.cmake")).read()
    text = re.sub(r"#[^\n]*", "", text)
    return {m.group(1): m.group(2).split()
            for m in re.finditer(r"^set\(RETENTION_KERNEL_(\w+)\s([^)]*)\)", text, re.M)}


KERNELS = kernel_build()
sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/meta/*.cpp") + rel(
    "csrc/autograd/*.cpp") + rel("csrc/autocast/*.cpp")
include_dirs = [os.path.join(ROOT, d) for d in ("csrc/include", "csrc", "kernels")]


def cxx_standard():
    """The C++ standard to build with: C++17 (the project's own need) unless this torch's headers
    refuse it (torch 2.15's require C++20), found by preprocessing them under C++17 (about 2 s);
    when both standards fail, the compile itself reports why."""
    includes = [f"-I{p}" for p in include_paths() + [sysconfig.get_paths()["include"]]]

    def accepts(std):
        cmd = shlex.split(os.environ.get("CXX", "c++")) + [f"-std=c++{std}", "-E", "-x", "c++", "-",
                                                            "-o", os.devnull] + includes
        return subprocess.run(cmd, input="#include <torch/extension.h>\n", text=True,
                              capture_output=True).returncode == 0
    return "c++20" if not accepts(17) and accepts(20) else "c++17"


STD = cxx_standard()
# -fopenmp: at::parallel_for is inline in ATen's headers; without OpenMP in *our* translation
# units it compiles to a serial loop even though torch itself runs on OpenMP.
cxx_flags = ["-O3", f"-std={STD}", "-fvisibility=hidden", "-fopenmp"]
# libmvec: glibc's vector math (csrc/cpu/vector_exp.cpp).
link_flags = ["-fopenmp", "-lmvec"]


def gpu_backend():
    """'cuda', 'rocm' or None (CPU only) for this torch.

    RETENTION_GPU=none|cuda|rocm|auto (default auto).  auto picks ROCm for a ROCm build of torch
    (torch.version.hip), CUDA for a CUDA build with a toolkit (CUDA_HOME), else CPU; an explicit
    cuda/rocm that this torch cannot build is an error rather than a silent CPU build.
    """
    want = os.environ.get("RETENTION_GPU", "auto").strip().lower()
    want = {"": "auto", "off": "none", "cpu": "none", "0": "none", "hip": "rocm"}.get(want, want)
    if want not in ("none", "cuda", "rocm", "auto"):
        raise SystemExit(f"RETENTION_GPU must be none, cuda, rocm or auto, not {want!r}")
    hip = getattr(torch.version, "hip", None) is not None
    cuda = torch.version.cuda is not None and not hip
    if want == "rocm" and not (hip and ROCM_HOME is not None):
        raise SystemExit("RETENTION_GPU=rocm needs a ROCm build of torch (torch.version.hip) "
                         "and ROCm (hipcc; ROCM_HOME)")
    if want == "cuda" and not (cuda and CUDA_HOME is not None):
        raise SystemExit("RETENTION_GPU=cuda needs a CUDA build of torch (torch.version.cuda) "
                         "and the CUDA toolkit (nvcc; CUDA_HOME)")
    if want == "none":
        return None
    if hip and ROCM_HOME is not None:
        return "rocm"
    if cuda and CUDA_HOME is not None:
        return "cuda"
    return None


def rocm_archs():
    """PYTORCH_ROCM_ARCH (';' or ' ' separated), default gfx90a.  CDNA (gfx9xx, wave64) only:
    kernels/gpu_compat.h refuses wave32 RDNA targets."""
    spec = os.environ.get("PYTORCH_ROCM_ARCH", ";".join(KERNELS["HIP_ARCHS"]))
    archs = [a for a in spec.replace(" ", ";").split(";") if a]
    bad = [a for a in archs if not a.startswith("gfx9")]
    if not archs or bad:
        raise SystemExit(f"PYTORCH_ROCM_ARCH: need CDNA (gfx9xx) architectures such as gfx90a, "
                         f"got {spec!r}")
    return archs


def extension(backend):
    if backend is None:
        return CppExtension("retention._C", sources, include_dirs=include_dirs,
                            extra_compile_args=cxx_flags, extra_link_args=link_flags)
    # One extension, so one flag set for the glue (csrc/cuda/*.cu) and the kernels: the kernels'.
    gpu_sources = sources + rel("csrc/cuda/*.cu") + [os.path.join("kernels", s) for s in KERNELS["SOURCES"]]
    if backend == "cuda":
        # sm_80 and sm_90 by default (no 9.0a: the kernels use mma.sync, not wgmma).
        default_archs = ";".join(f"{a[:-1]}.{a[-1]}" for a in KERNELS["CUDA_ARCHS"])
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", default_archs)
        device_flags = [f"-std={STD}"] + KERNELS["CUDA_FLAGS"]
    else:
        # torch's ROCm build hipifies the .cu sources and compiles them with hipcc; the flags
        # under "nvcc" go to hipcc.  Explicit --offload-arch (never auto-detection: it needs a
        # GPU); torch then adds only -fno-gpu-rdc.  PYTORCH_ROCM_ARCH is set to the same list for
        # torch versions that read it regardless.  gpu_compat.h detects HIP by itself.
        archs = rocm_archs()
        os.environ["PYTORCH_ROCM_ARCH"] = ";".join(archs)
        device_flags = [f"-std={STD}"] + [f"--offload-arch={a}" for a in archs] + KERNELS["HIP_FLAGS"]
    return CUDAExtension("retention._C", gpu_sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx_flags, "nvcc": device_flags},
                         extra_link_args=link_flags)


ext = extension(gpu_backend())

setup(
    # Objects compiled against one torch must never be linked into a build against another:
    # Debian's torch 1.13 and a pip torch 2.x share this tree and the same Python ABI tag, so the
    # intermediate build directory is keyed by the torch version.
    options={"build": {"build_base": os.path.join("build", f"torch-{torch.__version__}")}},
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
