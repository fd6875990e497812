#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in ONE run of under 9 minutes on a bare GPU machine
# (H100/H200, no network), using what bench/gpu_prepare.sh built beforehand on a machine
# without a GPU (build/gpu-carry: carry that folder along with the working tree).
#
#   environment   GPU, driver, Python, torch, Triton, nvcc, compute-sanitizer, the prepared build
#   setup         FLA wheels into a private folder; the prepared extension into python/retention
#                 (if it is missing or does not import: built here, sm_90 only, which costs minutes)
#   kernel_tests  the kernel GoogleTests (build/gpu-carry/bin/test_kernels)
#   pytest        tests/python, the CUDA-parametrised cases (-k cuda)
#   bench         bench/gpu_bench.py: correctness of ours and FLA's against the float64 reference,
#                 chunk fwd / fwd+bwd vs FLA and SDPA, decode steps (bench.json)
#   sanitizer     compute-sanitizer memcheck, racecheck, synccheck, initcheck on the first case of
#                 every kernel test (a small subset that runs every kernel, read from the test list)
#   model         bench/gpu_model.py --measured: the model table with the measured columns
#
# Every step has a time limit (timeout), and no step may start past the overall budget, so a slow
# or hung step cannot eat the run; a step that fails does not stop the others.
# What comes back (OUTDIR, at most 8 files): gpu_check.json (environment, step status and time,
# test counts, every measurement), gpu_check.txt (summary and the tail of every log), bench.json,
# logs.tar.gz (all logs, JUnit XML), gpu_model_*_measured.md / .json.
#
# Usage: bench/gpu_check.sh OUTDIR [--rehearse]
#   --rehearse  on a machine without a GPU: run every step that can run (environment, setup,
#               the test binaries with their GPU cases skipping, pytest collecting and skipping,
#               the sanitizer's test selection, the benchmark's dry run, the model) and time them
# Env:
#   PYTHON            python with the GPU machine's torch (default python3)
#   GPU_CHECK_BUDGET  seconds for all steps (default 500: the call's own limit is 600 s)
#   SANITIZER, NVCC   tool paths (default: on PATH, else /usr/local/cuda/bin)
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR [--rehearse]}
COMMAND="bench/gpu_check.sh $*"
REHEARSE=0
[[ ${2:-} == --rehearse ]] && REHEARSE=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=$ROOT/build/gpu-carry
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-500}
RESERVE=25  # kept back for the summary, the model and packing the logs
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
cd "$ROOT"
export PYTHONUNBUFFERED=1

find_tool() { command -v "$1" 2>/dev/null || { [[ -x /usr/local/cuda/bin/$1 ]] && echo "/usr/local/cuda/bin/$1"; } || echo "$1"; }
SANITIZER=${SANITIZER:-$(find_tool compute-sanitizer)}
NVCC=${NVCC:-$(find_tool nvcc)}

T0=$SECONDS
: >"$LOGS/steps.tsv"
# step NAME LIMIT CMD... : run CMD with its output in logs/NAME.log under min(LIMIT, what is left
# of the budget); record name, status, exit code, seconds and limit in logs/steps.tsv.
step() {
  local name=$1 limit=$2 left rc status t0=$SECONDS
  shift 2
  left=$((BUDGET - RESERVE - (SECONDS - T0)))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    printf '%s\tskipped\t-\t0\t%s\n' "$name" "$limit" >>"$LOGS/steps.tsv"
    echo "== $name: skipped, budget spent"
    return 1
  fi
  echo "== $name (limit ${limit}s)"
  # timeout signals its whole process group, so the children of a step (pytest, nvcc) go too;
  # shell functions run through bash -c (they are exported with export -f)
  if declare -F "$1" >/dev/null; then
    timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >"$LOGS/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  fi
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" $((SECONDS - t0)) "$limit" >>"$LOGS/steps.tsv"
  echo "   $status (rc=$rc, $((SECONDS - t0))s)"
  return $rc
}

# ---- environment --------------------------------------------------------------------------------
environment() {
  echo "date:      $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode:      $([[ $REHEARSE == 1 ]] && echo rehearsal || echo gpu)"
  echo "host:      $(uname -n) $(uname -r), $(nproc) cores"
  echo "gpu:       $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -n1)"
  echo "nvcc:      $("$NVCC" --version 2>/dev/null | grep -m1 release)"
  echo "sanitizer: $("$SANITIZER" --version 2>/dev/null | grep -m1 -i version)"
  "$PY" - <<'EOF'
import sys
print("python:   ", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch:    ", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
except Exception as e:
    print("torch:     not importable:", repr(e))
try:
    import triton
    print("triton:   ", triton.__version__)
except Exception as e:
    print("triton:    not importable:", repr(e))
EOF
  echo "prepared:  $(cat "$CARRY/manifest.json" 2>/dev/null | tr -d '\n' | head -c 2000 || echo 'none: run bench/gpu_prepare.sh before')"
  [[ $REHEARSE == 1 ]] || nvidia-smi
}
export REHEARSE CARRY PY NVCC SANITIZER ROOT
export -f environment
step environment 60 environment
COMMIT=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['commit'])" "$CARRY/manifest.json" 2>/dev/null ||
  git rev-parse HEAD 2>/dev/null || echo unknown)
export RETENTION_COMMIT=$COMMIT

# ---- setup --------------------------------------------------------------------------------------
WORK=$(mktemp -d)  # this run's unpacked binaries and wheels; nothing stale from an earlier run
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site
TESTS=$WORK/test_kernels  # unpacked from the carried .gz
export PYTHONPATH=$ROOT/python:$SITE${PYTHONPATH:+:$PYTHONPATH}
import_check() {
  "$PY" -c "import torch, retention; print('retention ops:', len(list(torch.ops.retention.__dir__())) > 0, retention.__file__)"
}
setup() {
  mkdir -p "$SITE"
  if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$CARRY"/wheels/*.whl ||
      echo "WARNING: the FLA wheels did not install: FLA is left out of the benchmarks"
  else
    echo "WARNING: no wheels in $CARRY/wheels: FLA is left out of the benchmarks"
  fi
  local gz
  for gz in "$CARRY"/ext/_C*.so.gz; do
    [[ -f $gz ]] && gunzip -c "$gz" >"python/retention/$(basename "$gz" .gz)" && ls -la "python/retention/$(basename "$gz" .gz)"
  done
  if [[ -f $CARRY/bin/test_kernels.gz ]]; then
    gunzip -c "$CARRY/bin/test_kernels.gz" >"$TESTS" && chmod +x "$TESTS"
  fi
  import_check
}
build_extension() {  # fallback: the prepared extension is missing or does not load here
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) RETENTION_GPU=cuda "$PY" setup.py build_ext --inplace && import_check
}
export SITE TESTS
export -f import_check setup build_extension
if ! step setup 90 setup; then
  if [[ $REHEARSE == 1 ]]; then
    echo "   (rehearsal: no extension build)"
  else
    step build_extension 300 build_extension
  fi
fi

# ---- kernel GoogleTests --------------------------------------------------------------------------
if [[ -x $TESTS ]]; then
  step kernel_tests 120 "$TESTS" --gtest_output="xml:$LOGS/kernel_tests.xml"
else
  printf 'kernel_tests\tmissing\t-\t0\t0\n' >>"$LOGS/steps.tsv"
  echo "== kernel_tests: $CARRY/bin/test_kernels.gz missing (bench/gpu_prepare.sh builds it; the GPU machine has no GoogleTest)"
fi

# ---- pytest on cuda ------------------------------------------------------------------------------
PYTEST_ARGS=(-q -rs -p no:cacheprovider -k cuda --junitxml="$LOGS/pytest.xml")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout=60)
step pytest 150 "$PY" -m pytest tests/python "${PYTEST_ARGS[@]}"

# ---- benchmarks ----------------------------------------------------------------------------------
# Before the sanitizer (the most likely step to be slow), capped so the sanitizer keeps its time.
# gpu_bench stops starting new measurements 30 s before its limit and writes its JSON lines as it
# goes, so even a run cut short keeps what it measured.
BENCH_LIMIT=200
if [[ $REHEARSE == 1 ]]; then
  step bench 60 "$PY" bench/gpu_bench.py --dry-run
else
  step bench "$BENCH_LIMIT" "$PY" bench/gpu_bench.py --out "$OUT/bench.json" --time-budget $((BENCH_LIMIT - 30))
fi


# ---- compute-sanitizer ---------------------------------------------------------------------------
# A small subset that still runs every kernel: per parameterised test, the cases of one dtype
# (16-bit if it has one: the tensor-core path) with 1 < T <= 300 (several chunks, every dk
# bucket, ragged and unaligned shapes; the case names carry _T<n>_), else its first case; and
# every plain test.
sanitizer_filter() {
  "$TESTS" --gtest_list_tests | awk '
    /^[^ ]/ { suite = $1; next }
    { name = $1; base = name; sub(/\/.*/, "", base); key = suite base
      if (!(key in count)) order[++n] = key
      c = ++count[key]; full[key, c] = suite name
      dt[key, c] = match(name, /\/[A-Za-z0-9]+_/) ? substr(name, RSTART + 1, RLENGTH - 2) : ""
      T[key, c] = match(name, /_T[0-9]+_/) ? substr(name, RSTART + 2, RLENGTH - 3) + 0 : -1
      if (!(key in want) && (dt[key, c] == "f16" || dt[key, c] == "bf16")) want[key] = dt[key, c] }
    END {
      for (i = 1; i <= n; i++) {
        k = order[i]; w = (k in want) ? want[k] : dt[k, 1]; picked = ""
        for (c = 1; c <= count[k]; c++)
          if (dt[k, c] == w && T[k, c] > 1 && T[k, c] <= 300) picked = picked ":" full[k, c]
        out = out (picked != "" ? picked : ":" full[k, 1]) }
      print substr(out, 2) }'
}
if [[ -x $TESTS ]]; then
  FILTER=$(sanitizer_filter)
  echo "$FILTER" | tr ':' '\n' >"$LOGS/sanitizer_filter.txt"
  if [[ $REHEARSE == 1 ]]; then
    # (no GPU, and possibly no compute-sanitizer, here: only the selection is rehearsed)
    step sanitizer_selection 20 bash -c "echo \$(wc -l <'$LOGS/sanitizer_filter.txt') tests selected; '$SANITIZER' --version || true"
  else
    for tool in memcheck racecheck synccheck initcheck; do
      limit=45
      [[ $tool == racecheck ]] && limit=60
      step "sanitizer_$tool" "$limit" "$SANITIZER" --tool "$tool" --error-exitcode 1 "$TESTS" --gtest_filter="$FILTER"
    done
  fi
fi

# ---- summary, model, logs ------------------------------------------------------------------------
"$PY" - "$OUT" "$REHEARSE" "$COMMIT" "$BUDGET" "$COMMAND" <<'EOF' | tee "$OUT/gpu_check.txt"
import json, os, sys, xml.etree.ElementTree as ET
out, rehearse, commit, budget, command = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4]), sys.argv[5]
logs = os.path.join(out, "logs")
steps = []
for line in open(os.path.join(logs, "steps.tsv")):
    name, status, rc, secs, limit = line.rstrip("\n").split("\t")
    steps.append({"name": name, "status": status, "rc": rc, "seconds": int(secs), "limit": limit})

def junit(path):
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped", "disabled")}
    c["failed_cases"] = [f"{tc.get('classname')}.{tc.get('name')}" for s in suites for tc in s.iter("testcase")
                         if tc.find("failure") is not None or tc.find("error") is not None][:50]
    return c

bench, info = [], {}
bpath = os.path.join(out, "bench.json")
if os.path.exists(bpath):
    for line in open(bpath):
        if line.strip():
            r = json.loads(line)
            info = r["info"] if "info" in r else info
            if "info" not in r:
                bench.append(r)
env = open(os.path.join(logs, "environment.log"), errors="replace").read() if os.path.exists(
    os.path.join(logs, "environment.log")) else ""
doc = {"info": {**info, "commit": info.get("commit") or commit, "mode": "rehearsal" if rehearse else "gpu",
                "command": command},
       "environment": env, "budget_s": budget, "steps": steps,
       "kernel_tests": junit(os.path.join(logs, "kernel_tests.xml")), "pytest": junit(os.path.join(logs, "pytest.xml")),
       "bench": bench}
json.dump(doc, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)

print("== gpu_check summary (%s, commit %s)" % (doc["info"]["mode"], str(commit)[:12]))
print(env.split("\nprepared:")[0] if env else "(no environment log)")
for s in steps:
    print(f"  {s['name']:22s} {s['status']:8s} {s['seconds']:4d} s (limit {s['limit']})")
print(f"  total {sum(s['seconds'] for s in steps)} s of {budget} s")
for name in ("kernel_tests", "pytest"):
    c = doc[name]
    if c:
        print(f"  {name}: {c['tests']} tests, {c['failures']} failures, {c['errors']} errors, {c['skipped']} skipped"
              + (" FAILED: " + ", ".join(c["failed_cases"][:10]) if c["failed_cases"] else ""))
checks = [r for r in bench if r.get("op") == "check"]
for r in checks:
    errs = " ".join(f"{n} {e:.1e}" for n, e in r.get("rel_err", {}).items())
    print(f"  check {r['impl']:10s} B{r['B']} T{r['T']} H{r['H']} {r['dk']}/{r['dv']}: {'ok' if r['ok'] else 'FAILED'} {errs}")
timed = [r for r in bench if r.get("ms") is not None]
print(f"  {len(timed)} timings in bench.json")
for s in steps:  # the tail of every log that did not end well
    if s["status"] not in ("ok",):
        p = os.path.join(logs, s["name"] + ".log")
        if os.path.exists(p):
            tail = open(p, errors="replace").read().splitlines()[-30:]
            print(f"\n--- {s['name']} ({s['status']}), last lines:\n" + "\n".join(tail))
EOF
if [[ -s $OUT/gpu_check.json ]]; then
  timeout 30 "$PY" bench/gpu_model.py --measured "$OUT/gpu_check.json" --out-dir "$OUT" \
    --ptxas-dir "$CARRY/logs" >"$LOGS/model.log" 2>&1 || echo "gpu_model failed: see logs/model.log"
fi
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$LOGS"
echo "== done in $((SECONDS - T0)) s; files in $OUT:"
ls -la "$OUT"
# Exit status: nonzero if any step failed or timed out.
! grep -q -E $'\t(failed|timeout|missing|skipped)\t' <(tar -xzOf "$OUT/logs.tar.gz" logs/steps.tsv)
