#!/usr/bin/env bash
# GPU performance model and GPU-check scripts, on a machine without a GPU (runs after
# .ci/gpu_compile_check.sh, whose sm_90 ptxas reports the model reads):
#   * bench/gpu_model.py --check: every launch it models maps to a compiled kernel with its
#     registers (fails when the tiling in kernels/ drifts from the model's mirror of it)
#   * the table renders, with measured columns from a synthetic measurement file
#   * bench/gpu_check.sh and bench/gpu_prepare.sh parse (bash -n), and gpu_check.sh --rehearse
#     runs to the end with this python (about 30 s)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ptx=${GPU_MODEL_PTXAS_DIR:-build/gpu-check/logs}
if ! compgen -G "$ptx/nvcc_*_sm90.log" >/dev/null; then
  if [ "${CI:-}" = true ]; then
    echo "gpu-model: no sm_90 ptxas reports in $ptx (.ci/gpu_compile_check.sh writes them)" >&2
    exit 1
  fi
  echo "== gpu-model checks SKIPPED: no sm_90 ptxas reports in $ptx (run .ci/gpu_compile_check.sh first)"
  exit 0
fi
"$PYTHON" bench/gpu_model.py --check --ptxas-dir "$ptx" --stdout >"$tmp/model.md"
grep -q "## Chunk forward (ms)" "$tmp/model.md"

# measured columns: one synthetic row must land in its own line of the table
cat >"$tmp/m.json" <<'JSON'
{"info": {"gpu": "synthetic", "date": "2000-01-01", "commit": "0000000"}}
{"op": "chunk_fwd", "key": "chunk_fwd:B4_T2048_H16_dk128_dv128", "impl": "retention", "ms": 0.125}
{"op": "chunk_fwd", "key": "chunk_fwd:B4_T2048_H16_dk128_dv128", "impl": "fla", "ms": 0.25}
{"op": "decode_step", "key": "decode_step:B8_H8_dk128_dv128", "impl": "retention_graph", "ms": 0.004}
JSON
"$PYTHON" bench/gpu_model.py --ptxas-dir "$ptx" --measured "$tmp/m.json" --stdout >"$tmp/measured.md"
grep -E "^\| FLA B4 T2048 H16 128/128 .*\| 0\.125 \| [0-9.]+ \| 0\.250 \| - \|$" "$tmp/measured.md" >/dev/null ||
  { echo "measured column missing"; grep "B4 T2048" "$tmp/measured.md"; exit 1; }
grep -E "^\| decode_step \| B8 H8 128x128 .*\| 4\.0 \| [0-9.]+ \|$" "$tmp/measured.md" >/dev/null ||
  { echo "decode measured column missing"; grep "B8 H8 128x128" "$tmp/measured.md"; exit 1; }

bash -n bench/gpu_check.sh
bash -n bench/gpu_prepare.sh

# bench/gpu_check.sh, rehearsed with this python (no GPU): it must run to the end, time its steps
# and pack what it promises.
PYTHON="$PYTHON" bash bench/gpu_check.sh "$tmp/check" --rehearse >"$tmp/check.log" 2>&1 || true
"$PYTHON" - "$tmp/check" <<'PY' || { cat "$tmp/check.log"; exit 1; }
import json, os, sys
out = sys.argv[1]
doc = json.load(open(os.path.join(out, "gpu_check.json")))
status = {s["name"]: s["status"] for s in doc["steps"]}
assert doc["info"]["mode"] == "rehearsal", doc["info"]
for name in ("environment", "setup", "pytest", "bench"):
    assert status.get(name) == "ok", (name, status)
# 'missing' without a prepared build (CI); 'ok' (every GPU test skipping) where bench/gpu_prepare.sh ran
assert status.get("kernel_tests") in ("missing", "ok"), status
files = sorted(os.listdir(out))
assert "logs.tar.gz" in files and "gpu_check.txt" in files and len(files) <= 8, files
print("gpu_check rehearsal:", ", ".join(f"{k} {v}" for k, v in status.items()))
PY
echo "gpu-model: 6 passed, 0 failed"
