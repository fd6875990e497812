#!/usr/bin/env bash
# Runs every GPU kernel test (tests/cpp/kernels/) on the CPU under the host execution backend
# (kernels/host_emu/): the unchanged kernel sources compiled with g++, executed thread by
# thread under the GPU's execution rules, for both device models:
#   nvidia  32-lane warps, mma.sync m16n8k16 for f16/bf16, SIMT fp32
#   amd     64-lane wavefronts, v_mfma_f32_16x16x16{f16,bf16_1k} and 16x16x4f32
#
# Steps (non-zero exit on any failure):
#   1. build both models (with gcov instrumentation) and an ASan + UBSan build (nvidia model)
#   2. run the whole kernel suite per model under two schedules (forward and reverse thread
#      order), each with an output digest; the digests of the two runs must be identical
#      (bit-identical outputs), and no test may be skipped
#   3. run the suite under the sanitizer build with a seeded random schedule
#   4. line coverage of kernels/ per model (gcovr), with the lines not reached
#
# Usage: scripts/test-kernels-host.sh [--model nvidia|amd|all] [--filter GTEST_FILTER]
#                                     [--no-asan] [--no-coverage] [--build-only] [--out DIR]
#
# One test under the emulator, by hand (what step 1 builds, for one model):
#   scripts/test-kernels-host.sh --model nvidia --build-only --no-asan --no-coverage
#   RETENTION_EMU_SCHEDULE=reverse build/kernels-host/nvidia/test_kernels_emu \
#       --gtest_filter='Shapes/RetentionKernels.ChunkForwardMatchesReference/f16_*'
# Run-time options of the emulator (environment):
#   RETENTION_EMU_SCHEDULE     forward (default) | reverse | random:SEED   thread order
#   RETENTION_EMU_BLOCK_ORDER  forward (default) | reverse                 block order
#   RETENTION_EMU_DIGEST       file: one line per device-to-host copy (test, index, bytes, hash)
# Env: CXX (g++), JOBS (2), GCOVR (gcovr)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/build/kernels-host
MODELS=(nvidia amd)
FILTER=""
ASAN=1
COVERAGE=1
BUILD_ONLY=0
while [ $# -gt 0 ]; do
  case $1 in
    --model)
      case $2 in nvidia | amd) MODELS=("$2") ;; all) MODELS=(nvidia amd) ;; *) echo "bad --model $2" >&2; exit 2 ;; esac
      shift 2 ;;
    --filter) FILTER=$2; shift 2 ;;
    --no-asan) ASAN=0; shift ;;
    --no-coverage) COVERAGE=0; shift ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

CXX=${CXX:-g++}
JOBS=${JOBS:-2}
GCOVR=${GCOVR:-gcovr}
CCACHE=$(command -v ccache || true)
T_START=$SECONDS
# Block order of the second run: reversed too, so a result that depends on the order in which
# blocks run (e.g. fp32 atomics across blocks, which the backward used to sum dq / dk with)
# changes the digests.
SECOND_BLOCK_ORDER=${SECOND_BLOCK_ORDER:-reverse}
cd "$ROOT"

for lib in /usr/include/boost/context/detail/fcontext.hpp /usr/include/gtest/gtest.h; do
  [ -f "$lib" ] || { echo "test-kernels-host: missing $lib (run scripts/install-deps.sh)" >&2; exit 1; }
done
if [ "$COVERAGE" = 1 ] && ! command -v "$GCOVR" >/dev/null; then
  echo "test-kernels-host: gcovr not found (run scripts/install-deps.sh)" >&2
  exit 1
fi

# ------------------------------------------------------------------------------------------
# Build: build_variant NAME WARP EXTRA_FLAGS...  -> $OUT/NAME/test_kernels_emu (the sources and
# the emulator's flags: cmake/kernels.cmake, the kernels' one build definition)
# ------------------------------------------------------------------------------------------
failures=()
fail() { failures+=("$1"); echo "test-kernels-host: FAIL: $1"; }

build_variant() {  # the CMake emulator target (cmake/gpu.cmake, RETENTION_GPU=EMU) for one model
  local name=$1 warp=$2
  shift 2
  local dir=$OUT/$name launcher=()
  [ -n "$CCACHE" ] && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER="$CCACHE")
  mkdir -p "$dir"
  find "$dir" -name '*.gcda' -delete
  # Build type Emulator: no flags of its own, so each variant's are exactly the ones given here.
  cmake -S "$ROOT" -B "$dir" -G Ninja -DRETENTION_GPU=EMU -DRETENTION_EMU_WARP="$warp" \
    -DCMAKE_BUILD_TYPE=Emulator -DCMAKE_CXX_FLAGS="$*" -DCMAKE_CXX_COMPILER="$CXX" \
    -DRETENTION_BUILD_EXAMPLES=OFF "${launcher[@]}" >"$dir/configure.log" 2>&1 ||
    { tail -30 "$dir/configure.log"; fail "configure $name"; return 1; }
  cmake --build "$dir" --target test_kernels_emu -j "$JOBS" >"$dir/build.log" 2>&1 ||
    { grep -E "error|FAILED" "$dir/build.log" | head -30; fail "build $name"; return 1; }
  ln -sf tests/cpp/kernels/test_kernels_emu "$dir/test_kernels_emu"
}

warp_of() { [ "$1" = amd ] && echo 64 || echo 32; }

echo "== host execution backend: build (${MODELS[*]}$([ "$ASAN" = 1 ] && echo ", asan-nvidia"))"
for m in "${MODELS[@]}"; do
  cov=()
  [ "$COVERAGE" = 1 ] && cov=(--coverage)
  t0=$SECONDS
  build_variant "$m" "$(warp_of "$m")" -O2 "${cov[@]}" && echo "  $m: built in $((SECONDS - t0))s"
done
if [ "$ASAN" = 1 ]; then
  t0=$SECONDS
  build_variant asan-nvidia 32 -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined &&
    echo "  asan-nvidia: built in $((SECONDS - t0))s"
fi
if [ "$BUILD_ONLY" = 1 ]; then
  [ ${#failures[@]} -eq 0 ] && exit 0 || exit 1
fi

# ------------------------------------------------------------------------------------------
# Run: run_suite VARIANT LABEL SCHEDULE BLOCK_ORDER
# ------------------------------------------------------------------------------------------
run_suite() {
  local variant=$1 label=$2 schedule=$3 blocks=$4
  local dir=$OUT/$variant log=$OUT/$variant/$label.log
  [ -x "$dir/test_kernels_emu" ] || return 1
  local args=(--gtest_brief=1)
  [ -n "$FILTER" ] && args+=("--gtest_filter=$FILTER")
  local t0=$SECONDS rc=0
  RETENTION_EMU_SCHEDULE=$schedule RETENTION_EMU_BLOCK_ORDER=$blocks RETENTION_EMU_DIGEST="$dir/$label.digest" \
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    "$dir/test_kernels_emu" "${args[@]}" >"$log" 2>&1 || rc=$?
  local ran passed failed skipped
  ran=$(grep -oE "^\[==========\] [0-9]+ tests? from .* ran" "$log" | grep -oE "[0-9]+" | head -1)
  passed=$(grep -oE "^\[  PASSED  \] [0-9]+" "$log" | grep -oE "[0-9]+$")
  failed=$(grep -cE "^\[  FAILED  \] .*\(" "$log")
  skipped=$(grep -cE "^\[  SKIPPED \] .*\(" "$log")
  echo "  $variant $label ($schedule threads, $blocks blocks): $((SECONDS - t0))s, ${ran:-0} tests: ${passed:-0} passed, $failed failed, $skipped skipped"
  if [ $rc -ne 0 ]; then
    grep -E "^\[  FAILED  \] .*\(|Failure|ERROR|runtime error|retention emu|Which is|actual:" "$log" | cut -c1-200 | head -40 |
      sed 's/^/      | /'
    fail "$variant $label: exit $rc (log: $log)"
  fi
  [ "$skipped" -eq 0 ] || fail "$variant $label: $skipped kernel tests skipped"
  [ "${ran:-0}" -gt 0 ] || fail "$variant $label: no tests ran"
  return 0
}

rm -f "$OUT"/*.summary
pids=()
for m in "${MODELS[@]}"; do
  (
    echo "== $m: suite under two schedules"
    run_suite "$m" forward forward forward
    run_suite "$m" reverse reverse "$SECOND_BLOCK_ORDER"
    if [ -s "$OUT/$m/forward.digest" ] && cmp -s "$OUT/$m/forward.digest" "$OUT/$m/reverse.digest"; then
      echo "  $m: outputs bit-identical under both schedules ($(wc -l <"$OUT/$m/forward.digest") downloads)"
    else
      diff "$OUT/$m/forward.digest" "$OUT/$m/reverse.digest" | head -20 | sed 's/^/      | /'
      echo "test-kernels-host: FAIL: $m: outputs differ between the schedules"
    fi
  ) >"$OUT/$m.summary" 2>&1 &
  pids+=($!)
done
if [ "$ASAN" = 1 ]; then
  (
    echo "== asan-nvidia: suite under ASan + UBSan, random schedule"
    run_suite asan-nvidia random random:12345 forward
  ) >"$OUT/asan.summary" 2>&1 &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
for s in "${MODELS[@]}" asan; do
  [ -f "$OUT/$s.summary" ] || continue
  cat "$OUT/$s.summary"
  while IFS= read -r line; do failures+=("${line#test-kernels-host: FAIL: }"); done < <(grep "^test-kernels-host: FAIL: " "$OUT/$s.summary")
done

# ------------------------------------------------------------------------------------------
# Coverage of kernels/ per model
# ------------------------------------------------------------------------------------------
if [ "$COVERAGE" = 1 ]; then
  for m in "${MODELS[@]}"; do
    echo "== $m: line coverage of kernels/ (gcovr)"
    "$GCOVR" -r "$ROOT" --object-directory "$OUT/$m" --filter "$ROOT/kernels/" --exclude "$ROOT/kernels/host_emu/" \
      --txt "$OUT/$m.coverage.txt" "$OUT/$m" >/dev/null 2>"$OUT/$m.gcovr.log" || { cat "$OUT/$m.gcovr.log"; fail "gcovr $m"; }
    sed -n '/^-\{10,\}/,$p' "$OUT/$m.coverage.txt" | sed 's/^/  /'
  done
fi

echo "test-kernels-host: total $((SECONDS - T_START))s"
if [ ${#failures[@]} -gt 0 ]; then
  echo "test-kernels-host: FAILED"
  for f in "${failures[@]}"; do echo "  - $f"; done
  exit 1
fi
echo "test-kernels-host: OK"
