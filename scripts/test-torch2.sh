#!/usr/bin/env bash
# The torch 2.x legs of the tests: a virtual environment with torch from PyPI (pinned in a
# requirements file), the package built against it with the CUDA glue and kernels (nvcc from the
# CUDA toolkit; no GPU needed to compile), installed with pip, and pytest run against the
# installed package from outside the source tree.
#
# Usage: scripts/test-torch2.sh [REQUIREMENTS] [PYTEST_TARGET...]
#   REQUIREMENTS    default scripts/torch2.15-requirements.txt (PyPI's newest torch);
#                   scripts/torch2.11-requirements.txt is the GPU machines' torch
#   PYTEST_TARGET   tests to run, relative to tests/python (default: all of them)
#
# The downloaded wheels and the environment are cached under
# ${RETENTION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retention}/<hash of the requirements>/, and
# reused while they are healthy, so only the first run on a machine downloads (~3 GB).
#
# Env: TORCH_CUDA_ARCH_LIST (default here: 8.0, one architecture to keep CI short; the package's
# own default, used by `pip install .`, is 8.0;9.0), RETENTION_GPU (default cuda when nvcc exists,
# else none), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

req=${1:-scripts/torch2.15-requirements.txt}
[ -f "$req" ] || { echo "test-torch2: no requirements file $req" >&2; exit 2; }
shift $(($# > 0 ? 1 : 0))
targets=()
for t in "$@"; do targets+=("$ROOT/tests/python/$t"); done
[ ${#targets[@]} -gt 0 ] || targets=("$ROOT/tests/python")
key=$(sha256sum "$req" | cut -c1-12)
base=${RETENTION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retention}
cache=$base/torch2-$key
venv=$cache/venv
wheels=$cache/wheels
# Wheels an earlier requirements set already downloaded (torch alone is ~3 GB) are taken from
# there: a changed pin downloads only what changed.
known=()
for w in "$base"/torch2-*/wheels; do
  [ -d "$w" ] && [ "$w" != "$wheels" ] && known+=(--find-links "$w")
done
py=$venv/bin/python

healthy() {
  [ -f "$venv/.complete" ] && "$py" -c "import torch, numpy, pytest, wheel" 2>/dev/null
}

if healthy; then
  echo "== torch 2.x environment: reusing $venv"
else
  echo "== torch 2.x environment: creating $venv"
  rm -rf "$venv"
  mkdir -p "$wheels"
  # Download first (into the cache), install from there without the index: a broken or
  # interrupted environment is rebuilt without downloading again.
  t0=$(date +%s)
  /usr/bin/python3 -m venv "$venv"
  "$py" -m pip download -q --disable-pip-version-check -d "$wheels" "${known[@]}" -r "$req"
  echo "   wheels: $(du -sh "$wheels" | cut -f1) ($(($(date +%s) - t0)) s)"
  "$py" -m pip install -q --disable-pip-version-check --no-index --find-links "$wheels" -r "$req"
  touch "$venv/.complete"
  echo "   environment ready ($(($(date +%s) - t0)) s)"
fi
"$py" -c "import torch; print('   torch', torch.__version__, 'CUDA', torch.version.cuda)"

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0}
if [ -z "${RETENTION_GPU:-}" ]; then
  if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
    export RETENTION_GPU=cuda
  elif [ "${CI:-}" = true ]; then
    echo "CI needs the CUDA toolkit (nvcc) to build the CUDA extension against torch 2.x" >&2
    exit 1
  else
    export RETENTION_GPU=none
    echo "== no CUDA toolkit: building the CPU-only extension against torch 2.x"
  fi
fi
if [ "$RETENTION_GPU" = cuda ] && [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null; then
  export CUDA_HOME=/usr/local/cuda
fi
# Same compiler cache as the rest of the build (C++ through the ccache symlinks, nvcc directly).
if command -v ccache >/dev/null; then
  [ -d /usr/lib/ccache ] && export PATH=/usr/lib/ccache:$PATH
  export PYTORCH_NVCC="ccache ${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}/bin/nvcc"
fi

echo "== building a wheel against torch 2.x (RETENTION_GPU=$RETENTION_GPU, arch $TORCH_CUDA_ARCH_LIST; log: build/torch2-wheel.log)"
dist=$(mktemp -d)
trap 'rm -rf "$dist"' EXIT
t0=$(date +%s)
mkdir -p build
if ! "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$dist" . >build/torch2-wheel.log 2>&1; then
  cat build/torch2-wheel.log
  exit 1
fi
echo "   $(basename "$dist"/retention-*.whl) ($(($(date +%s) - t0)) s)"
"$py" -m pip install -q --no-deps --force-reinstall "$dist"/retention-*.whl

echo "== torch 2.x: pytest against the installed package (outside the source tree): ${*:-all tests}"
cd "$dist"
# The import must resolve to the installed package, not the source tree.
"$py" - <<'EOF'
import os, retention, torch
here = os.path.dirname(retention.__file__)
assert "site-packages" in here, f"retention imported from {here}, not the installed package"
print("   retention from", here)
EOF
RETENTION_TEST_INSTALLED=1 RETENTION_EXPECT_GPU_BUILD="$RETENTION_GPU" \
  "$py" -m pytest "${targets[@]}" -q -p no:cacheprovider ${PYTEST_ARGS:-}
