#!/usr/bin/env bash
# Builds the Python extension in place (python/retention/_C*.so) and the C++ library, tests and
# example with CMake (build/cmake), installing the CMake package into build/install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-/usr/bin/python3}  # Debian's python3 is the one with python3-torch
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
mkdir -p build

echo "== building the Python extension (log: build/setup.log)"
if ! "$PYTHON" setup.py build_ext --inplace >build/setup.log 2>&1; then
  cat build/setup.log
  exit 1
fi

if [ "${RETENTION_SKIP_CMAKE:-0}" != 1 ]; then
  echo "== building the C++ library, tests and example (CMake)"
  cmake -S . -B build/cmake -G Ninja "${launcher[@]}" -DCMAKE_INSTALL_PREFIX="$PWD/build/install" >/dev/null
  cmake --build build/cmake -j "$MAX_JOBS"
  cmake --install build/cmake >/dev/null
fi
