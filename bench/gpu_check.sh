#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one go, for a machine that has one (H100 assumed):
#
#   1. build the extension in place for the local GPU (setup.py, CUDA torch required)
#   2. build and run the kernel GoogleTests (tests/cpp/kernels) against kernels/*.cu
#   3. pytest tests/python (the CUDA-parametrised cases run; CPU ones too)
#   4. compute-sanitizer memcheck / racecheck / synccheck on a representative kernel subset
#   5. benchmarks (bench/gpu_bench.py): chunk fwd, fwd+bwd, decode vs eager PyTorch, SDPA and,
#      if present in third_party_bench/fla (git-ignored), FLA
#
# Usage: bench/gpu_check.sh OUTDIR
# Env:
#   PYTHON         python of the CUDA torch (default: python3)
#   CUDA_ARCH      compute capability without the dot (default: from nvidia-smi, else 90)
#   GTEST_SRC      GoogleTest source tree (default: third_party_bench/googletest, then
#                  /usr/src/googletest). The GPU machine has no network: carry it along.
#   SKIP_BUILD=1   reuse an existing in-place build
# Every step logs to OUTDIR/<step>.log; the summary lists each step's status. Exit status is
# nonzero if any step failed.
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=${NVCC:-$CUDA_HOME/bin/nvcc}
SANITIZER=${SANITIZER:-$CUDA_HOME/bin/compute-sanitizer}
if [[ -z ${CUDA_ARCH:-} ]]; then
  CUDA_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '.')
  CUDA_ARCH=${CUDA_ARCH:-90}
fi

declare -a SUMMARY=()
step() {  # step NAME CMD... : run, log, record status, never abort
  local name=$1 t0=$SECONDS rc
  shift
  echo "== $name"
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  SUMMARY+=("$(printf '%-22s %s (%ss)' "$name" "$([[ $rc == 0 ]] && echo ok || echo "FAILED rc=$rc")" $((SECONDS - t0)))")
  return $rc
}

# ---- environment ------------------------------------------------------------------------------
{
  echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit:  $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "host:    $(uname -n) $(uname -r)"
  echo "gpu:     $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null)"
  echo "arch:    sm_$CUDA_ARCH"
  echo "nvcc:    $("$NVCC" --version 2>/dev/null | grep -m1 release)"
  "$PY" -c 'import sys, torch; print("python: ", sys.version.split()[0]); print("torch:  ", torch.__version__, "cuda", torch.version.cuda)'
} | tee "$OUT/environment.txt"

# ---- 1. extension -------------------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  step build_extension env TORCH_CUDA_ARCH_LIST="${CUDA_ARCH:0:1}.${CUDA_ARCH:1}" MAX_JOBS=${MAX_JOBS:-8} \
    "$PY" setup.py build_ext --inplace
fi

# ---- 2. kernel GoogleTests ------------------------------------------------------------------------
build_gtests() {
  local src=${GTEST_SRC:-}
  [[ -z $src && -d third_party_bench/googletest ]] && src=third_party_bench/googletest
  [[ -z $src && -d /usr/src/googletest ]] && src=/usr/src/googletest
  [[ -n $src ]] || { echo "GoogleTest source not found: set GTEST_SRC"; return 1; }
  local gt=$src/googletest b=$OUT/gtest-build
  mkdir -p "$b"
  g++ -std=c++17 -O2 -I"$gt/include" -I"$gt" -c "$gt/src/gtest-all.cc" -o "$b/gtest-all.o" &&
    g++ -std=c++17 -O2 -I"$gt/include" -c "$gt/src/gtest_main.cc" -o "$b/gtest_main.o" &&
    ar rcs "$b/libgtest.a" "$b/gtest-all.o" "$b/gtest_main.o" &&
    "$NVCC" -std=c++17 -O3 -Ikernels -I"$gt/include" -gencode "arch=compute_$CUDA_ARCH,code=sm_$CUDA_ARCH" \
      -lineinfo tests/cpp/kernels/test_kernels.cu tests/cpp/kernels/test_msr.cu kernels/*.cu -o "$OUT/test_kernels" "$b/libgtest.a" -lpthread
}
step build_kernel_tests build_gtests &&
  step kernel_tests "$OUT/test_kernels" --gtest_output="xml:$OUT/kernel_tests.xml"

# ---- 3. python tests ---------------------------------------------------------------------------
step pytest env PYTHONPATH=python "$PY" -m pytest -q tests/python -rs --junitxml="$OUT/pytest.xml"

# ---- 4. compute-sanitizer -------------------------------------------------------------------------
# A small, representative subset: every kernel once, odd shapes, all dtypes of the forward.
SAN_FILTER='*ChunkForward*f16_B2_T63*:*ChunkForward*bf16_B1_T65*:*ChunkForward*f32_B2_T130*:*ChunkBackward*f16_B2_T63*:*ChunkBackward*f32_B1_T65*:*RecurrentForward*bf16_B2_T63*:*RecurrentStep*:*WarpReduce*:*MsrKernels*f16_B1_T150*:*MsrKernels*bf16_B2_T37*:*MsrStep*f32*'
if [[ -x $OUT/test_kernels && -x $SANITIZER ]]; then
  for tool in memcheck racecheck synccheck initcheck; do
    step "sanitizer_$tool" "$SANITIZER" --tool "$tool" --error-exitcode 1 "$OUT/test_kernels" --gtest_filter="$SAN_FILTER"
  done
fi

# ---- 5. benchmarks ------------------------------------------------------------------------------
step benchmarks env PYTHONPATH=python "$PY" bench/gpu_bench.py --out "$OUT/bench.json"
cp "$OUT/benchmarks.log" "$OUT/bench.txt" 2>/dev/null

echo
echo "== summary ($OUT)"
failed=0
for line in "${SUMMARY[@]}"; do
  echo "  $line"
  [[ $line == *FAILED* ]] && failed=1
done
printf '%s\n' "${SUMMARY[@]}" >"$OUT/summary.txt"
exit $failed
