#!/usr/bin/env bash
# Compile-only checks of the GPU kernels (no GPU needed).
#
#   1. nvcc: every kernel TU for sm_80 and sm_90 with -Xptxas -v; fails on any register spill.
#   2. hipcc: every kernel TU for gfx90a with -save-temps; from the ISA and code-object
#      metadata: matrix kernels must contain v_mfma, no kernel may use scratch
#      (private_segment_fixed_size 0, vgpr_spill_count 0), LDS <= 64 KiB.
#   3. The CMake targets of each backend (cmake/gpu.cmake, as shipped): the kernel library and
#      the kernel GoogleTest binary, built and run (its GPU tests skip without a device; this
#      proves they link and start; the host-only tests, e.g. the MSR reference against finite
#      differences, must pass).
#   4. test_fragment_layout (host only): built with g++ and run; it must pass.
#
# Usage: .ci/gpu_compile_check.sh [build-dir]        (default: build/gpu-check)
# Env:   NVCC, HIPCC, CXX, GTEST_LIB, GTEST_MAIN_LIB, JOBS (default 2)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/build/gpu-check}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
HIPCC=${HIPCC:-$(command -v hipcc || echo hipcc)}
# hipcc picks its platform at every call: AMD only where it finds a clang++ on PATH, else NVIDIA
# whenever nvcc exists (Debian's clang-15, which hipcc depends on, installs no clang++).
export HIP_PLATFORM=amd
CXX=${CXX:-g++}
GTEST_LIB=${GTEST_LIB:-/usr/lib/x86_64-linux-gnu/libgtest.a}
GTEST_MAIN_LIB=${GTEST_MAIN_LIB:-/usr/lib/x86_64-linux-gnu/libgtest_main.a}
JOBS=${JOBS:-2}
PY=${PYTHON:-/usr/bin/python3}

# The sources, flags and architectures of the shipped build (cmake/kernels.cmake); the checks
# below add only report flags (-Xptxas -v, -save-temps).
eval "$(cmake -P "$ROOT/cmake/kernels.cmake")" || { echo "gpu_compile_check: FAIL: cmake -P cmake/kernels.cmake" >&2; exit 1; }
tu_name() { local b=${1##*/}; echo "${b%.cu}"; }  # instances/msr_fwd_f32.cu -> msr_fwd_f32
KERNEL_TUS=() HOST_ONLY_TUS=""
for s in "${KERNEL_SOURCES[@]}"; do KERNEL_TUS+=("$(tu_name "$s")"); done
for s in "${KERNEL_LAUNCHER_SOURCES[@]}"; do HOST_ONLY_TUS+=" $(tu_name "$s")"; done
export HOST_ONLY_TUS  # launchers only: ptxas reports no entry function for them
declare -A TU_SOURCE
for s in "${KERNEL_SOURCES[@]}"; do TU_SOURCE[$(tu_name "$s")]=$s; done
HIP_ARCH=${KERNEL_HIP_ARCHS[0]}
CUDA_ARCHS=("${KERNEL_CUDA_ARCHS[@]}")

mkdir -p "$OUT"/{cuda,hip,host,logs}
rm -f "$OUT"/logs/*.status
cd "$ROOT"

for tool in "$NVCC" "$HIPCC" "$CXX"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "gpu_compile_check: FAIL: required compiler not found: $tool" >&2
    exit 1
  fi
done
for lib in "$GTEST_LIB" "$GTEST_MAIN_LIB"; do
  [[ -f $lib ]] || { echo "gpu_compile_check: FAIL: GoogleTest library not found: $lib" >&2; exit 1; }
done

NVCC_FLAGS=(-std=c++17 "${KERNEL_CUDA_FLAGS[@]}" "-I$ROOT/kernels")
HIP_FLAGS=("--offload-arch=$HIP_ARCH" -std=c++17 "${KERNEL_HIP_FLAGS[@]}" "-I$ROOT/kernels")

# ------------------------------------------------------------------------------------------
# Jobs: each writes logs/<name>.log and logs/<name>.status; at most $JOBS run at once.
# ------------------------------------------------------------------------------------------
job() {  # job NAME CMD...
  local name=$1
  shift
  local t0=$SECONDS
  if "$@" >"$OUT/logs/$name.log" 2>&1; then
    echo "ok $((SECONDS - t0))s" >"$OUT/logs/$name.status"
  else
    echo "FAILED $((SECONDS - t0))s" >"$OUT/logs/$name.status"
  fi
}

running=0
spawn() {  # run a job in the background, keeping at most $JOBS in flight
  "$@" &
  running=$((running + 1))
  if ((running >= JOBS)); then
    wait -n
    running=$((running - 1))
  fi
}
drain() {
  wait
  running=0
}

CCACHE=$(command -v ccache || true)  # it replays ptxas's report (stderr) on a hit
nvcc_tu() {
  local tu=$1 arch=$2
  job "nvcc_${tu}_sm$arch" $CCACHE "$NVCC" "${NVCC_FLAGS[@]}" -Xptxas -v -gencode "arch=compute_$arch,code=sm_$arch" \
    -c "kernels/${TU_SOURCE[$tu]}" -o "$OUT/cuda/${tu}_sm$arch.o" -MD -MF "$OUT/cuda/${tu}_sm$arch.d"
}

hipcc_tu() {  # -save-temps drops the gfx90a ISA (.s) next to the object
  local tu=$1
  (cd "$OUT/hip" && job "hipcc_$tu" "$HIPCC" "${HIP_FLAGS[@]}" -save-temps -c -x hip "$ROOT/kernels/${TU_SOURCE[$tu]}" -o "$tu.o" -MD -MF "$tu.d")
}

fragment_test() {
  job fragment_build "$CXX" -std=c++17 -O2 -Wall -Wextra -Ikernels tests/cpp/kernels/test_fragment_layout.cpp \
    -o "$OUT/host/test_fragment_layout" "$GTEST_LIB" "$GTEST_MAIN_LIB" -pthread
  [[ -x $OUT/host/test_fragment_layout ]] && job fragment_run "$OUT/host/test_fragment_layout"
}

# The shipped CMake targets (cmake/gpu.cmake) of one backend: the kernel library and the kernel
# GoogleTest binary, configured as a user would (sm_80 only, to save time: phase 1 covers sm_90).
cmake_gpu() {  # cmake_gpu BACKEND CONFIGURE_ARGS...
  local backend=$1 dir=$OUT/cmake-$1 launcher=()
  shift
  command -v ccache >/dev/null && launcher=(-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  cmake -S "$ROOT" -B "$dir" -G Ninja -DRETENTION_BUILD_EXAMPLES=OFF "${launcher[@]}" "$@" &&
    cmake --build "$dir" -j "$JOBS" --target "test_kernels_$backend"
}

echo "gpu_compile_check: $("$NVCC" --version | grep -m1 release)"
echo "gpu_compile_check: hipcc $({ "$HIPCC" "--offload-arch=$HIP_ARCH" --version 2>/dev/null || true; } | grep -m1 -i 'HIP version' || true)"
echo "gpu_compile_check: building in $OUT with $JOBS jobs"
T_START=$SECONDS

# Phase 1: every kernel TU once per target (long nvcc jobs first), plus the host-only test.
for tu in "${KERNEL_TUS[@]}"; do
  for arch in "${CUDA_ARCHS[@]}"; do spawn nvcc_tu "$tu" "$arch"; done
done
for tu in "${KERNEL_TUS[@]}"; do spawn hipcc_tu "$tu"; done
spawn fragment_test
drain

# Phase 2: the CMake targets, one backend after the other (each build runs $JOBS jobs).
job cmake_cuda_build cmake_gpu cuda -DRETENTION_GPU=CUDA -DCMAKE_CUDA_ARCHITECTURES=80 "-DCMAKE_CUDA_COMPILER=$(command -v "$NVCC")"
job cmake_hip_build cmake_gpu hip -DRETENTION_GPU=HIP "-DRETENTION_HIP_ARCHS=$HIP_ARCH" "-DRETENTION_HIPCC=$(command -v "$HIPCC")"

# Phase 3: run the test binaries (no device here: every GPU test must skip, none may fail).
for b in cuda hip; do
  exe=$OUT/cmake-$b/tests/cpp/kernels/test_kernels_$b
  [[ -x $exe ]] && job "gtest_${b}_run" "$exe" --gtest_brief=1
done

# ------------------------------------------------------------------------------------------
# Analysis
# ------------------------------------------------------------------------------------------
"$PY" - "$OUT" "${KERNEL_TUS[@]}" <<'PYEOF'
import glob, os, re, subprocess, sys

out, tus = sys.argv[1], sys.argv[2:]
failures = []

def demangle(names):
    try:
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return r.stdout.splitlines()
    except Exception:
        return names

def short(name):
    name = re.sub(r"retention::kernels::(\(anonymous namespace\)::)?", "", name)
    name = name.replace(", NoFusion", "").replace("void ", "")
    return re.sub(r"\((RecurrentForwardParams|MsrChunkForward|MsrChunkBackward|MsrStepParams)\)", "", name)

# Matrix-core kernels (must show v_mfma on gfx90a, except their fp32 instantiations on NVIDIA
# which are SIMT by design).
# The MSR instantiations (MsrFusion) carry the same names.
MATRIX = ("chunk_forward_kernel", "chunk_backward_dq_kernel", "chunk_backward_dkv_kernel")

print("\n== job status ==")
for f in sorted(glob.glob(os.path.join(out, "logs", "*.status"))):
    name = os.path.basename(f)[:-7]
    status = open(f).read().strip()
    print(f"  {name:28s} {status}")
    if not status.startswith("ok"):
        failures.append(f"job {name} failed (log: {os.path.join(out, 'logs', name + '.log')})")
        log = open(os.path.join(out, "logs", name + ".log"), errors="replace").read().splitlines()
        print("\n".join("      | " + l for l in log[-25:]))

print("\n== nvcc -Xptxas -v (per kernel: registers, stack, spill stores/loads) ==")
for tu in tus:
    for arch in ("80", "90"):
        log = os.path.join(out, "logs", f"nvcc_{tu}_sm{arch}.log")
        if not os.path.exists(log):
            failures.append(f"missing {log}")
            continue
        rows, name, stack = [], None, None
        for line in open(log, errors="replace"):
            m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
            if m:
                name = m.group(1)
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                stack, sst, sld = map(int, m.groups())
            m = re.search(r"Used (\d+) registers", line)
            if m and name:
                rows.append((name, int(m.group(1)), stack, sst, sld))
                name = None
        names = demangle([r[0] for r in rows])
        for (mangled, regs, stack, sst, sld), pretty in zip(rows, names):
            flag = ""
            if sst or sld:
                flag = "  <-- SPILLS"
                failures.append(f"sm_{arch} {short(pretty)}: spill stores {sst}, loads {sld}")
            elif stack:
                flag = "  (stack frame, no spills)"
            print(f"  sm_{arch} {short(pretty):60s} regs {regs:3d} stack {stack:4d} spill {sst}/{sld}{flag}")
        if not rows and tu not in os.environ.get("HOST_ONLY_TUS", "").split():
            failures.append(f"no ptxas report in {log}")

print("\n== hipcc gfx90a (per kernel: v_mfma count, LDS bytes, scratch, VGPR/AGPR, spills) ==")
for tu in tus:
    asm = glob.glob(os.path.join(out, "hip", f"{tu}-hip-amdgcn-amd-amdhsa-gfx90a.s"))
    if not asm:
        failures.append(f"no gfx90a ISA for {tu}")
        continue
    text = open(asm[0], errors="replace").read()
    # Instruction counts per function body.
    mfma, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^(_Z\w+):", line)
        if m:
            current = m.group(1)
            mfma[current] = 0
        elif current and re.match(r"^\s+v_mfma", line):
            mfma[current] += 1
        elif line.startswith(".Lfunc_end"):
            current = None
    # Code-object metadata, one YAML map per kernel.
    meta = text[text.find(".amdgpu_metadata"):]
    kernels = []
    for block in re.split(r"\n  - \.", meta)[1:]:
        block = "." + block
        def field(key):
            m = re.search(r"\s\." + key + r":\s+(\S+)", " " + block)
            return m.group(1) if m else None
        if field("name"):
            kernels.append({k: field(k) for k in ("name", "group_segment_fixed_size", "private_segment_fixed_size",
                                                  "vgpr_count", "agpr_count", "vgpr_spill_count", "sgpr_spill_count")})
    names = demangle([k["name"] for k in kernels])
    for k, pretty in zip(kernels, names):
        n_mfma = mfma.get(k["name"], 0)
        lds, scratch = int(k["group_segment_fixed_size"]), int(k["private_segment_fixed_size"])
        vspill = int(k["vgpr_spill_count"] or 0)
        problems = []
        if any(s in pretty for s in MATRIX) and n_mfma == 0:
            problems.append("no v_mfma")
        if scratch != 0:
            problems.append(f"scratch {scratch} B")
        if vspill != 0:
            problems.append(f"{vspill} VGPR spills")
        if lds > 65536:
            problems.append(f"LDS {lds} > 65536")
        for p in problems:
            failures.append(f"gfx90a {short(pretty)}: {p}")
        print(f"  {short(pretty):62s} mfma {n_mfma:4d} LDS {lds:6d} scratch {scratch} "
              f"vgpr {k['vgpr_count']:>3s} agpr {k['agpr_count'] or '0':>3s} sgpr_spill {k['sgpr_spill_count']}"
              + ("  <-- " + ", ".join(problems) if problems else ""))

def gtest_summary(name):
    log = os.path.join(out, "logs", name + ".log")
    if not os.path.exists(log):
        return "not run"
    text = open(log, errors="replace").read()
    parts = [l.strip() for l in text.splitlines() if re.match(r"\[\s+(PASSED|SKIPPED|FAILED)\s+\]", l.strip())]
    return "; ".join(parts[-3:]) if parts else text.strip().splitlines()[-1] if text.strip() else "empty log"

print("\n== test binaries ==")
for name in ("fragment_run", "gtest_cuda_run", "gtest_hip_run"):
    print(f"  {name:16s} {gtest_summary(name)}")

print()
if failures:
    print("gpu_compile_check: FAIL")
    for f in failures:
        print("  - " + f)
    sys.exit(1)
print("gpu_compile_check: OK")
PYEOF
rc=$?
echo "gpu_compile_check: total $((SECONDS - T_START))s"
exit $rc
