#!/usr/bin/env bash
# Incremental in-place build for development: compiles the extension with CMake and copies it
# into python/vnm/, so `PYTHONPATH=python python -m pytest tests` runs against this checkout.
# Usage: scripts/dev_build.sh [python]   (default: python3 on PATH; CUDA is built when nvcc exists)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-python3}
# An absolute path, without resolving symlinks (a venv's python is a symlink to the base one).
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; *) py=$(command -v "$py") ;; esac
build="$root/build/dev"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVNM_BUILD_PYTHON=ON \
  -DPython_EXECUTABLE="$py" ${VNM_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j "$(nproc)"
cp "$build"/_C*.so "$root/python/vnm/"
echo "built $(ls "$root"/python/vnm/_C*.so)"
