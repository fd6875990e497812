#!/usr/bin/env bash
# torch.distributed stage: a smoke run of the context-parallel benchmark (2 gloo processes on the
# loopback interface).  The distributed tests themselves (tests/python/test_distributed.py) run
# with the rest of pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}

echo "== context-parallel benchmark, quick mode (runs and writes valid output; timings not asserted)"
out=$(mktemp -d)
GLOO_SOCKET_IFNAME=lo PYTHONPATH=python "$PYTHON" bench/distributed_cp.py --quick --out "$out"
md=$(ls "$out"/distributed_cp_*.md)
grep -q '^| msr | 300 | 2 | 150 |' "$md"
if grep -q 'error' "$md"; then cat "$md"; exit 1; fi
rm -rf "$out"
