#!/usr/bin/env bash
# One command for the GPU machine (no network): build, GPU tests, compute-sanitizer, both
# benchmarks, SASS evidence. Keeps going after a failing step; every step has a time limit so
# the whole run stays well inside 10 minutes. Leaves at most 8 files in $OUT:
#   summary.txt  build.log  tests.log  sanitizer.log  sass.txt  bench.log  bench_spmm.csv  bench_spmm.png
# and prints the summary table last.
#
#   bash bench/gpu_check.sh            (from the repository root; OUT defaults to ./gpu_check_out)
# Environment: PYTHON (default python3), CUDA_ARCH (default: the GPU's, e.g. 90), QUICK=1 (fewer
# benchmark repetitions), BUDGET (seconds for everything, default 540).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
declare -a ROWS

BUDGET=${BUDGET:-540}  # seconds for the whole run: every step's limit is cut to what is left

step() {  # step NAME LIMIT_S LOG CMD...: runs CMD with a time limit, appends to LOG, records rc
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$(date +%s)
  local left=$(( BUDGET - (t0 - START) - 10 ))
  if [ "$left" -lt 15 ]; then
    ROWS+=("$(printf '%-22s %-16s' "$name" 'SKIPPED(no time)')")
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "===== $name: $*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  [ $rc -ne 0 ] && status="FAIL(rc=$rc)"
  [ $rc -eq 124 ] && status="TIMEOUT(${limit}s)"
  ROWS+=("$(printf '%-22s %-16s %5ss  %s' "$name" "$status" "$dt" "$(basename "$log")")")
  echo "[$(( $(date +%s) - START ))s] $name: $status" >&2
  return $rc
}

# ---- environment ---------------------------------------------------------------------------
{
  echo "# gpu_check $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  nvcc --version 2>&1 | tail -1
  git log --oneline -1 2>/dev/null
} >> "$SUMMARY"
ARCH=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')}
ARCH=${ARCH:-90}
# cuBLAS from the nvidia-cublas pip package (the folder holding include/cublas_v2.h).
CUBLAS_ROOT=$($PY - <<'EOF' 2>/dev/null
import pathlib, site
for sp in site.getsitepackages():
    for h in sorted(pathlib.Path(sp, "nvidia").glob("**/include/cublas_v2.h")):
        print(h.parent.parent); raise SystemExit
EOF
)
echo "CUDA arch ${ARCH}; cuBLAS root: ${CUBLAS_ROOT:-not found (C++ benchmark not built)}" >> "$SUMMARY"

# ---- 1. build (pip, in place of any earlier install) ----------------------------------------
rm -f python/vnm/_C*.so  # tests must import the fresh install, not a stale in-place build
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
step build 240 "$OUT/build.log" $PY -m pip install --no-build-isolation --no-deps --no-index -v . \
  -Cbuild-dir=build/gpu -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${ARCH}-real" \
  -Ccmake.define.VNM_CUDA_RESOURCE_USAGE=ON ${CUBLAS_ROOT:+-Ccmake.define.VNM_CUBLAS_ROOT="$CUBLAS_ROOT"}
$PY -c "import vnm; print('vnm', vnm.__file__, 'CUDA_BUILT', vnm.CUDA_BUILT)" >> "$OUT/build.log" 2>&1

# ---- 2. tests ------------------------------------------------------------------------------
step tests 180 "$OUT/tests.log" $PY -m pytest -q -p no:logging -rs tests/test_cuda.py \
  tests/test_mma_model.py tests/test_spmm.py tests/test_tensor.py tests/test_nn_cuda.py
TESTS_LINE=$(grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -1)

# ---- 3. compute-sanitizer ------------------------------------------------------------------
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  step memcheck 60 "$OUT/sanitizer.log" "$SAN" --tool memcheck --error-exitcode 1 $PY bench/sanitize_cases.py
  step racecheck 45 "$OUT/sanitizer.log" "$SAN" --tool racecheck --error-exitcode 1 $PY bench/sanitize_cases.py --quick
else
  echo "compute-sanitizer not found" >> "$OUT/sanitizer.log"
  ROWS+=("$(printf '%-22s %-16s' sanitizer 'SKIPPED(missing)')")
fi

# ---- 4. SASS evidence ----------------------------------------------------------------------
SO=$($PY -c "import vnm._C as m; print(m.__file__)" 2>/dev/null)
sass() {
  local dump
  dump=$(cuobjdump -sass "$SO") || return 1
  echo "# $SO (sm_${ARCH})"
  echo "HMMA.SP (sparse tensor core mma):  $(grep -c 'HMMA.SP' <<< "$dump")"
  echo "LDG.E.128 (16-byte global loads):   $(grep -cE 'LDG\.E[.A-Z]*\.128' <<< "$dump")"
  echo "LDGSTS (cp.async):                  $(grep -c 'LDGSTS' <<< "$dump")"
  echo "LDSM (ldmatrix):                    $(grep -c 'LDSM' <<< "$dump")"
  echo "LDL/STL (local memory, want 0):     $(grep -cE '\b(LDL|STL)\b' <<< "$dump")"
  echo "# per kernel: registers, shared memory, stack"
  cuobjdump -res-usage "$SO" | grep -A1 -E "spmm|pack|unpack|dense" | grep -E "Function|REG"
  echo "# HMMA.SP lines (first 8)"
  grep 'HMMA.SP' <<< "$dump" | head -8
}
export SO ARCH
export -f sass
step sass 60 "$OUT/sass.txt" bash -c sass
echo "# ptxas --resource-usage at build time" >> "$OUT/sass.txt"
grep -E "ptxas info +: (Compiling entry|Used)|spill" "$OUT/build.log" | head -60 >> "$OUT/sass.txt"

# ---- 5. benchmarks -------------------------------------------------------------------------
REPS=${QUICK:+10}
REPS=${REPS:-30}
BIN=build/gpu/bench/vnm_bench_spmm
if [ -x "$BIN" ]; then
  step bench_cpp 100 "$OUT/bench.log" "$BIN" --reps "$REPS" --warmup 5
else
  echo "C++ benchmark not built (no cuBLAS found)" >> "$OUT/bench.log"
  ROWS+=("$(printf '%-22s %-16s' bench_cpp 'SKIPPED(no cuBLAS)')")
fi
step bench_py 200 "$OUT/bench.log" $PY bench/bench_spmm.py --reps "$REPS" --warmup 5 \
  --out "$OUT/bench_spmm.csv" --plot "$OUT/bench_spmm.png"
# End to end (issue 6): LLaMA-7B-shaped decoder layers and DeiT-base, fp16, dense vs sparse.
MODEL_REPS=${QUICK:+5}
step bench_models 120 "$OUT/bench.log" $PY bench/bench_models.py --repeat "${MODEL_REPS:-20}"

# ---- summary -------------------------------------------------------------------------------
{
  echo
  echo "step                   status            time  log"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "tests: ${TESTS_LINE:-no result line}"
  echo "sanitizer: $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" 2>/dev/null | tr '\n' ' ')"
  sed -n '2,6p' "$OUT/sass.txt" 2>/dev/null
  if [ -s "$OUT/bench_spmm.csv" ]; then
    echo "speedup over torch.matmul (geo-mean over shapes), by pattern and N:"
    $PY - "$OUT/bench_spmm.csv" <<'EOF'
import csv, math, sys, collections
rows = list(csv.DictReader(open(sys.argv[1])))
acc = collections.defaultdict(list)
for r in rows:
    acc[(r["pattern"], int(r["N"]))].append(float(r["speedup_dense"]))
pats = list(dict.fromkeys(r["pattern"] for r in rows)); ns = sorted({k[1] for k in acc})
print("pattern   " + " ".join(f"{n:>7d}" for n in ns))
for p in pats:
    print(f"{p:9s} " + " ".join(f"{math.exp(sum(map(math.log, acc[(p, n)])) / len(acc[(p, n)])):7.2f}" if acc[(p, n)] else "      -" for n in ns))
EOF
  fi
  echo "end to end (bench/bench_models.py):"
  grep -E "^ *(llama|deit) " "$OUT/bench.log" | head -40
  echo "total $(( $(date +%s) - START ))s"
} >> "$SUMMARY"
cat "$SUMMARY"
