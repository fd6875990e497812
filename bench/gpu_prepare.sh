#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything bench/gpu_check.sh needs on the GPU machine, so
# that the GPU run spends its time running, not compiling.  Everything lands in ONE folder,
# build/gpu-carry (git-ignored), which travels with the working tree to the GPU machine:
#
#   bin/test_kernels.gz        kernel GoogleTests (cmake/kernels.cmake's tests and kernels), sm_90
#                              SASS, -lineinfo for compute-sanitizer; GoogleTest is Debian's static
#                              libgtest.a and the CUDA runtime is linked statically, so the binary
#                              needs only the driver (libcuda) and libstdc++ there
#   logs/nvcc_<tu>_sm90.log    ptxas -v report of every kernel TU (bench/gpu_model.py reads these)
#   ext/_C.*.so.gz             the extension for the GPU machine's torch and Python (TORCH_PYTHON,
#                              below), sm_90 only; gpu_check.sh unpacks it into python/retention/
#   (the two binaries are mostly SASS and shrink about 4x with gzip: what travels is limited)
#   wheels/*.whl               FLA's kernels (fla-core) and what the GPU machine lacks for them
#   manifest.json              date, commit, toolchain, per-step seconds and status, sizes
#
# Usage: bench/gpu_prepare.sh [--skip-ext] [--skip-fla] [--skip-tests]
# Env:
#   TORCH_PYTHON  a python whose torch matches the GPU machine's (CUDA build, same torch version
#                 and the same Python minor version: the extension's file name and ABI depend on
#                 both).  Without it the extension step is skipped and gpu_check.sh builds the
#                 extension on the GPU machine instead (minutes of GPU time).
#   FLA_VERSION   fla-core version to fetch (default below); PY_TARGET (default 3.12): the GPU
#                 machine's Python version, for the wheel download
#   NVCC, JOBS (parallel nvcc jobs, default nproc), GTEST_LIB, GTEST_MAIN_LIB
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=$ROOT/build/gpu-carry
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
PY=${PYTHON:-/usr/bin/python3}
JOBS=${JOBS:-$(nproc)}
GTEST_LIB=${GTEST_LIB:-/usr/lib/x86_64-linux-gnu/libgtest.a}
GTEST_MAIN_LIB=${GTEST_MAIN_LIB:-/usr/lib/x86_64-linux-gnu/libgtest_main.a}
FLA_VERSION=${FLA_VERSION:-0.6.0}
PY_TARGET=${PY_TARGET:-3.12}
# The CUDA architecture of the GPU machine (H100/H200: compute capability 9.0).  Plain sm_90:
# the kernels use mma.sync, nothing that needs sm_90a.
ARCH=90

do_tests=1 do_ext=1 do_fla=1
for a in "$@"; do
  case $a in
    --skip-tests) do_tests=0 ;;
    --skip-ext) do_ext=0 ;;
    --skip-fla) do_fla=0 ;;
    *) echo "usage: $0 [--skip-tests] [--skip-ext] [--skip-fla]" >&2; exit 2 ;;
  esac
done

cd "$ROOT"
OBJ=$ROOT/build/gpu-carry-tmp/obj  # not carried
mkdir -p "$CARRY"/{bin,logs,ext,wheels} "$OBJ"
LAUNCH=()
command -v ccache >/dev/null && LAUNCH=(ccache)

declare -a STEPS=()
step() {  # step NAME CMD... : run with its log in logs/NAME.log, record status and seconds
  local name=$1 t0=$SECONDS rc
  shift
  echo "== $name"
  "$@" >"$CARRY/logs/$name.log" 2>&1
  rc=$?
  STEPS+=("$name $rc $((SECONDS - t0))")
  if ((rc != 0)); then
    echo "   FAILED (rc=$rc), last lines of $CARRY/logs/$name.log:"
    tail -n 20 "$CARRY/logs/$name.log" | sed 's/^/   | /'
  fi
  return $rc
}

# ---- kernel GoogleTests for sm_90 ----------------------------------------------------------
# The kernels' sources and flags (cmake/kernels.cmake), plus the ptxas report.
eval "$(cmake -P "$ROOT/cmake/kernels.cmake")" || { echo "gpu_prepare: cmake -P cmake/kernels.cmake failed" >&2; exit 1; }
compile_tu() {  # one kernel TU with its ptxas report (same log name as .ci/gpu_compile_check.sh)
  local src=$1 tu
  tu=$(basename "$src" .cu)
  "${LAUNCH[@]}" "$NVCC" -std=c++17 "${KERNEL_CUDA_FLAGS[@]}" -I"$ROOT/kernels" -Xptxas -v \
    -gencode "arch=compute_$ARCH,code=sm_$ARCH" -c "kernels/$src" -o "$OBJ/$tu.o" \
    >"$CARRY/logs/nvcc_${tu}_sm$ARCH.log" 2>&1
}
compile_kernels() {
  local src pids=() rc=0 running=0
  for src in "${KERNEL_SOURCES[@]}"; do
    compile_tu "$src" &
    pids+=($!)
    running=$((running + 1))
    if ((running >= JOBS)); then wait -n || rc=1; running=$((running - 1)); fi
  done
  while ((running > 0)); do wait -n || rc=1; running=$((running - 1)); done
  for f in "$CARRY"/logs/nvcc_*_sm$ARCH.log; do echo "--- $f"; grep -E "error|warning" "$f" || true; done
  return $rc
}
link_tests() {
  [[ -f $GTEST_LIB && -f $GTEST_MAIN_LIB ]] || { echo "GoogleTest not found ($GTEST_LIB): apt-get install libgtest-dev"; return 1; }
  "${LAUNCH[@]}" "$NVCC" -std=c++17 -O2 -I"$ROOT/kernels" -lineinfo -gencode "arch=compute_$ARCH,code=sm_$ARCH" \
    "${KERNEL_TEST_SOURCES[@]/#/tests/cpp/kernels/}" "$OBJ"/*.o -o "$OBJ/test_kernels" "$GTEST_LIB" "$GTEST_MAIN_LIB" -lpthread &&
    "$OBJ/test_kernels" --gtest_brief=1 &&  # no GPU here: every GPU test must skip, none fail
    gzip -1 -c "$OBJ/test_kernels" >"$CARRY/bin/test_kernels.gz"
}
if ((do_tests)); then
  rm -f "$OBJ"/*.o "$OBJ/test_kernels" "$CARRY"/bin/test_kernels*
  step compile_kernels_sm90 compile_kernels && step link_kernel_tests link_tests
fi

# ---- the extension for the GPU machine's torch ---------------------------------------------
build_ext() {
  local py=$1
  "$py" - "$PY_TARGET" <<'EOF' || return 1
import sys, torch
want = sys.argv[1]
have = "%d.%d" % sys.version_info[:2]
print("python", have, "torch", torch.__version__, "cuda", torch.version.cuda)
if have != want or torch.version.cuda is None:
    sys.exit(f"TORCH_PYTHON must be Python {want} with a CUDA torch (got Python {have}, "
             f"torch {torch.__version__} cuda {torch.version.cuda})")
EOF
  rm -rf "$CARRY"/ext/* "$ROOT/build/gpu-carry-tmp/ext"
  local nvcc_cmd=()
  # ccache for nvcc only: torch checks the version of the C++ compiler it is given, and a
  # "ccache g++" fails that check
  [[ ${#LAUNCH[@]} -gt 0 ]] && nvcc_cmd=(PYTORCH_NVCC="ccache $NVCC")
  env "${nvcc_cmd[@]}" TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" RETENTION_GPU=cuda \
    "$py" setup.py build_ext -b "$ROOT/build/gpu-carry-tmp/ext" -t "$ROOT/build/gpu-carry-tmp" || return 1
  local so
  for so in "$ROOT"/build/gpu-carry-tmp/ext/retention/_C*.so; do
    strip --strip-debug "$so"  # torch builds host code with -g; the device code keeps -lineinfo
    gzip -1 -c "$so" >"$CARRY/ext/$(basename "$so").gz"
  done
  ls -la "$ROOT"/build/gpu-carry-tmp/ext/retention/_C*.so "$CARRY"/ext/
}
if ((do_ext)); then
  if [[ -n ${TORCH_PYTHON:-} ]]; then
    step build_extension build_ext "$TORCH_PYTHON"
  else
    echo "== build_extension skipped: set TORCH_PYTHON (Python $PY_TARGET with the GPU machine's CUDA torch)"
    STEPS+=("build_extension skipped 0")
  fi
fi

# ---- FLA as wheels (the GPU machine has no network) -----------------------------------------
fetch_fla() {
  rm -f "$CARRY"/wheels/*.whl
  # fla-core only (the ops); its other requirements (torch, triton, einops) are on the GPU
  # machine already.  --no-deps so pip cannot pull a second torch into the folder.
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_TARGET" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$CARRY/wheels" "fla-core==$FLA_VERSION" &&
    for w in "$CARRY"/wheels/*.whl; do
      echo "--- $w requires:"
      unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true
    done
}
((do_fla)) && step fetch_fla fetch_fla

# ---- manifest --------------------------------------------------------------------------------
"$PY" - "$CARRY" "$NVCC" "${STEPS[@]}" <<'EOF'
import datetime, json, os, subprocess, sys
carry, nvcc, steps = sys.argv[1], sys.argv[2], sys.argv[3:]
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=carry).stdout.strip()
    except OSError:
        return ""
files = {}
for d, _, names in os.walk(carry):
    for n in names:
        p = os.path.join(d, n)
        files[os.path.relpath(p, carry)] = os.path.getsize(p)
# Steps not re-run this time (e.g. --skip-ext) keep their earlier record.
path = os.path.join(carry, "manifest.json")
earlier = json.load(open(path)).get("steps", []) if os.path.exists(path) else []
new = [{"name": s.split()[0], "status": s.split()[1], "seconds": int(s.split()[2])} for s in steps]
new_names = {s["name"] for s in new}
manifest = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": run("git", "rev-parse", "HEAD"),
    "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
    "nvcc": next((l for l in run(nvcc, "--version").splitlines() if "release" in l), ""),
    "steps": [s for s in earlier if s["name"] not in new_names] + new,
    "files": files,
    "total_bytes": sum(files.values()),
}
json.dump(manifest, open(path, "w"), indent=1)
print(f"== {carry}: {len(files)} files, {manifest['total_bytes'] / 2**20:.1f} MiB to carry")
for s in manifest["steps"]:
    print(f"   {s['name']:22s} {'ok' if s['status'] == '0' else s['status']:8s} {s['seconds']:5d} s")
bad = [s for s in manifest["steps"] if s["status"] not in ("0", "skipped")]
sys.exit(1 if bad else 0)
EOF
