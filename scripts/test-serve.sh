#!/usr/bin/env bash
# Train in Python, serve from C++: trains the main job's RetNet for a few steps, saves it
# (safetensors), and checks that the installed retention-generate app decodes the same tokens and
# logits as Python's RetNet (tests/serve/roundtrip.py). Needs scripts/build.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
app=${RETENTION_GENERATE:-build/install/bin/retention-generate}
[ -x "$app" ] || { echo "missing $app: run scripts/build.sh first" >&2; exit 1; }

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
if ! PYTHONPATH=python "$PYTHON" examples/train_lm.py --quick --threads 1 --save "$dir/model.safetensors" >"$dir/train.log" 2>&1; then
  cat "$dir/train.log"
  exit 1
fi
grep '^saved' "$dir/train.log"
PYTHONPATH=python "$PYTHON" tests/serve/roundtrip.py --app "$app" --checkpoint "$dir/model.safetensors" --steps 80 --random-too
