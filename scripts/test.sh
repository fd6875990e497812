#!/usr/bin/env bash
# The project's test command: installs what is missing, builds everything, runs every test
# (GoogleTest via ctest, the installed-package C++ example, GPU/HIP compile checks, pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
# Stage headers carry the run's elapsed time, so a slow CI log says where its minutes went.
stage() { echo "== $* [${SECONDS} s]"; }
# Compiler-cache hits across clones at different paths (CI checks out a fresh clone each run).
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}

stage "install and build"

bash scripts/install-deps.sh
bash scripts/build.sh

stage "ctest"
ctest --test-dir build/cmake --output-on-failure -j "$(nproc)"

stage "C++ example against the installed CMake package"
cmake -S examples/cpp -B build/example -G Ninja -DCMAKE_PREFIX_PATH="$PWD/build/install" >/dev/null
cmake --build build/example >/dev/null
build/example/prefill_decode

stage "serve from C++: Python-trained checkpoint decoded by retention-generate (round trip)"
bash scripts/test-serve.sh

if [ -x .ci/gpu_compile_check.sh ] || [ -f .ci/gpu_compile_check.sh ]; then
  if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
    stage "GPU kernels: compile and resource checks (CUDA sm_80/sm_90, HIP gfx90a)"
    bash .ci/gpu_compile_check.sh
  elif [ "${CI:-}" = true ]; then
    echo "CI needs the CUDA toolkit (nvcc) for the kernel compile checks" >&2
    exit 1
  else
    stage "GPU kernel compile checks SKIPPED: no CUDA toolkit (nvcc) on this machine"
  fi
fi
stage "GPU model"
bash scripts/test-gpu-model.sh  # GPU performance model vs the ptxas reports, GPU-check scripts parse

stage "emulated GPU kernels"
bash scripts/test-kernels-host.sh  # every GPU kernel executed on the CPU, both device models

stage "main job, quick mode (train a few steps, generate, forms agree)"
PYTHONPATH=python "$PYTHON" examples/train_lm.py --quick

stage "cost-curve benchmark, quick mode (runs and writes valid output; timings not asserted)"
cc_out=$(mktemp -d)
PYTHONPATH=python "$PYTHON" bench/cost_curves.py --quick --out "$cc_out"
rm -rf "$cc_out"

stage "fused-layer benchmark, quick mode (runs and writes valid output; timings not asserted)"
fl_out=$(mktemp -d)
PYTHONPATH=python "$PYTHON" bench/fused_layer.py --quick --out "$fl_out"
test -s "$(ls "$fl_out"/fused_layer_*.md)"
rm -rf "$fl_out"

stage "CPU retention benchmark, quick mode (runs and writes valid output; timings not asserted)"
cr_out=$(mktemp -d)
PYTHONPATH=python "$PYTHON" bench/cpu_retention.py --quick --out "$cr_out" >/dev/null
grep -q "^| 48 | 40 | 100 | 2 |" "$cr_out"/cpu_retention_*.md
rm -rf "$cr_out"

stage "distributed"
bash scripts/test-distributed.sh

stage "pytest"
PYTHONPATH=python "$PYTHON" -m pytest tests/python -q -p no:cacheprovider

stage "sanitizers"
bash scripts/test-sanitizers.sh  # ASan+UBSan (ctest, pytest subset) and TSan (threaded C++ test)

# PyPI's newest torch: the whole pytest suite (venv, CUDA glue built); then the GPU machines'
# torch 2.11: built the same way, with the registration, opcheck and torch.compile tests.
stage "torch 2.x legs"
bash scripts/test-torch2.sh scripts/torch2.15-requirements.txt
bash scripts/test-torch2.sh scripts/torch2.11-requirements.txt test_registration.py test_compile.py

stage "install list: every header, module and command used comes from scripts/install-deps.sh"
"$PYTHON" scripts/check-deps.py
# ... and the check notices a gap: without nlohmann-json3-dev the checkpoint code's headers fail it
if dropped=$("$PYTHON" scripts/check-deps.py --drop nlohmann-json3-dev); then
  echo "check-deps.py passed with nlohmann-json3-dev dropped from the list" >&2
  exit 1
fi
grep -q "csrc/model/.*nlohmann-json3-dev" <<<"$dropped" ||
  { echo "check-deps.py failed, but not on the checkpoint code's nlohmann headers:" >&2; echo "$dropped" >&2; exit 1; }
# ... and a library whose headers come with a wider package: boost's headers are in
# libboost1.74-dev, but only libboost-context-dev brings the emulator's libboost_context.so
if dropped=$("$PYTHON" scripts/check-deps.py --drop libboost-context-dev); then
  echo "check-deps.py passed with libboost-context-dev dropped from the list" >&2
  exit 1
fi
grep -q "library: build/kernels-host/.*libboost-context" <<<"$dropped" ||
  { echo "check-deps.py failed, but not on the emulator's libboost_context:" >&2; echo "$dropped" >&2; exit 1; }
stage "done"
