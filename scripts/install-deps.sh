#!/usr/bin/env bash
# Installs the Debian 12 packages the project needs, only those missing (apt-get update once).
# --list prints the list instead. scripts/check-deps.py checks, after the builds and tests, that
# every header, Python module and command they used comes from these packages (or their
# dependencies): add a package here the moment the project uses it.
set -euo pipefail

packages=(
  g++ cmake ninja-build ccache git
  libtorch-dev python3-torch python3-setuptools python3-numpy python3-pytest python3-tqdm
  python3-matplotlib pybind11-dev libgtest-dev googletest
  python3-hypothesis  # property-based fuzzing (tests/python/test_fuzz.py)
  python3-venv  # the torch 2.x test environment (scripts/test-torch2.sh)
  libopenblas0-pthread  # without it Debian's torch falls back to the reference BLAS (9-19x slower)
  hipcc libamdhip64-dev rocm-device-libs  # HIP compile checks for gfx90a
  libboost-context-dev gcovr  # host execution backend of the kernels (fibers), its coverage report
  nlohmann-json3-dev  # checkpoint metadata (csrc/model)
  libsentencepiece-dev pkgconf  # retention-generate: FLA directories' tokenizer.model (found by pkg-config)
  sentencepiece  # spm_train, spm_encode: the tokenizer the FLA round-trip test trains
  python3-pip unzip  # bench/gpu_prepare.sh: FLA's wheels for the GPU machine, their metadata
)

if [ "${1:-}" = --list ]; then
  printf '%s\n' "${packages[@]}"
  exit 0
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing Debian packages: ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
