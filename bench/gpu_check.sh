#!/usr/bin/env bash
# One command for a GPU machine with no network: build with CUDA, then GPU checks and benchmarks.
#
#   bash bench/gpu_check.sh [quick|bench|full]      (from anywhere; OUT defaults to ./gpu_check_out)
#
# Modes, each sized to end within about 8-9 minutes including the build (a device call may run at
# most 10 minutes, and a session has little device time), steps ordered so that the most valuable
# results come first:
#   quick (default, budget 480 s): build; GPU tests (the full acceptance grid of tests/test_cuda.py
#          plus the other CUDA tests); Python benchmark on the LLaMA-7B shapes, patterns
#          2:4/64:2:5/64:2:8/128:2:8/64:2:16, N in {1,16,128,2048,8192}; then, if time remains,
#          memcheck on 3 small cases, SASS counts, a short C++ benchmark, a short models benchmark.
#   bench  (follow-up, budget 540 s): build; the C++ benchmark on its default grid; the models
#          benchmark; then, if time remains, the Python benchmark in bf16 on its default shapes.
#   full   (follow-up, budget 540 s): build; GPU tests; memcheck on every case of
#          bench/sanitize_cases.py; racecheck on 3; SASS counts; then, if time remains, the CPU
#          tests of the CUDA ops (test_mma_model, test_spmm, test_tensor) on this machine's torch.
# Every step has its own time limit (cut to what is left of the budget) and appends to its log as
# it goes, so a step that is cut short keeps its partial output. The required steps' limits add up
# to less than the budget; a step marked "if time remains" starts only with at least 30 s left.
#
# Build: `pip install --no-build-isolation --no-index` because the machine has no network: the
# build requirements (scikit-build-core, nanobind, cmake) come from the environment, and pip fails
# at once instead of waiting on an index. CMAKE_CUDA_ARCHITECTURES is this GPU's only, as real
# code (e.g. 90-real): each kernel is compiled once instead of for sm_80 and sm_90 + PTX, which
# keeps the build short. nvcc is looked for on PATH, then in /usr/local/cuda*/bin, and handed to
# CMake as CUDACXX, so that CMake cannot quietly fall back to the CPU-only core.
#
# Fails (exit 1) when any step fails: missing tools up front (cmake, nanobind, scikit-build-core,
# nvcc, a CUDA build of torch, a GPU), a build without CUDA (vnm.CUDA_BUILT false), any failed or
# SKIPPED GPU test, a failed benchmark correctness check, a sanitizer error. Leaves at most 8 files
# in $OUT: summary.txt (one line per step, written as each step ends, then the headline results
# and RESULT), build.log, tests.log, checks.log (sanitizers, SASS), bench.log (Python and models
# benchmarks), bench_cpp.log, bench_spmm.csv, bench_spmm.png. The summary is printed last.
#
# Side effect: removes an in-place build (python/vnm/_C*.so) of the checkout it runs in, and
# pip-installs vnm into PYTHON's environment.
#
# Environment: PYTHON (default python3), CUDA_ARCH (default: the GPU's, e.g. 90), BUDGET (seconds,
# overrides the mode's), OUT, KEEP_GOING=1 (run every step even after a failed preflight or build:
# a dry run that shows each later step failing; the result stays FAIL).
set -u -o pipefail

MODE=${1:-quick}
case "$MODE" in
  quick) BUDGET=${BUDGET:-480} ;;
  bench | full) BUDGET=${BUDGET:-540} ;;
  -h | --help) sed -n '2,41p' "$0"; exit 0 ;;
  *) echo "gpu_check.sh: unknown mode '$MODE' (want quick, bench or full)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
TMPD=$(mktemp -d)
FAILED_STEPS=()
: > "$SUMMARY"

elapsed() { echo $(( $(date +%s) - START )); }
first_existing() { local f; for f in "$@"; do [ -e "$f" ] && { echo "$f"; return 0; }; done; return 1; }
# After a failed preflight or build nothing later can pass: stop, unless KEEP_GOING=1 asks to see
# how every later step fails (a dry run on a machine without a GPU; the result stays FAIL).
stop_unless_keep_going() { [ "${KEEP_GOING:-0}" = 1 ] || finish; }

# record NAME STATUS SECONDS LOG: one line of the status table, written at once.
record() {
  printf '%-16s %-26s %5ss  %s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
  echo "[$(elapsed)s] $1: $2" >&2
  case "$2" in ok | SKIPPED*) ;; *) FAILED_STEPS+=("$1") ;; esac
}

# step NAME KIND LIMIT_S LOG CMD...: runs CMD under a time limit, appending to LOG. KIND is
# "required" (a step that cannot start for lack of time fails) or "optional" (it is skipped).
step() {
  local name=$1 kind=$2 limit=$3 log=$4
  shift 4
  local left=$(( BUDGET - $(elapsed) - 5 ))
  local need=30
  [ "$kind" = required ] && need=15
  if [ "$left" -lt "$need" ]; then
    if [ "$kind" = required ]; then record "$name" "FAIL(no time left)" 0 "-"
    else record "$name" "SKIPPED(no time left)" 0 "-"; fi
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "===== $name [$(date -u +%T), limit ${limit}s]: $*" >> "$log"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  status=ok
  [ "$rc" -ne 0 ] && status="FAIL(rc=$rc)"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="TIMEOUT(${limit}s)"
  record "$name" "$status" $(( $(date +%s) - t0 )) "$(basename "$log")"
  return "$rc"
}

# finish: headline results under the table, RESULT, the summary printed, exit status.
finish() {
  {
    echo
    [ -n "${TESTS_LINE:-}" ] && echo "GPU tests: $TESTS_LINE"
    if [ -s "$OUT/checks.log" ]; then
      grep -E 'ERROR SUMMARY|passed, [0-9]+ failed' "$OUT/checks.log" | sed 's/^/sanitizer: /'
      grep -E '^(HMMA.SP|LDG|LDGSTS|LDSM|LDL)' "$OUT/checks.log" | sed 's/^/SASS: /'
    fi
    if [ -s "$OUT/bench_spmm.csv" ]; then
      echo "vnm over torch.matmul and over torch 2:4 (geo-mean over shapes), by pattern and N:"
      "$PY" - "$OUT/bench_spmm.csv" <<'EOF' 2>&1
import collections, csv, math, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def geo(v):
    v = [x for x in v if math.isfinite(x) and x > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")
acc = collections.defaultdict(lambda: ([], []))
for r in rows:
    a = acc[(r["pattern"], int(r["N"]))]
    a[0].append(float(r["speedup_dense"])); a[1].append(float(r["speedup_24"]))
pats = list(dict.fromkeys(r["pattern"] for r in rows)); ns = sorted({k[1] for k in acc})
print(f"{'pattern':9s} " + " ".join(f"{'N=' + str(n):>11s}" for n in ns))
for p in pats:
    cells = [f"{geo(acc[(p, n)][0]):5.2f}/{geo(acc[(p, n)][1]):<5.2f}" if (p, n) in acc else f"{'-':>11s}" for n in ns]
    print(f"{p:9s} " + " ".join(cells))
EOF
    fi
    if [ -s "$OUT/bench.log" ] && grep -qE '^ *(llama|deit) ' "$OUT/bench.log"; then
      echo "end to end (bench/bench_models.py):"
      grep -E '^ *(llama|deit) ' "$OUT/bench.log" | head -40
    fi
    echo "total $(elapsed)s of a ${BUDGET}s budget (mode $MODE)"
    if [ ${#FAILED_STEPS[@]} -eq 0 ]; then echo "RESULT: PASS"
    else echo "RESULT: FAIL (${FAILED_STEPS[*]})"; fi
  } >> "$SUMMARY"
  rm -rf "$TMPD"
  cat "$SUMMARY"
  [ ${#FAILED_STEPS[@]} -eq 0 ]
  exit $?
}

# ---- 0. preflight: every tool the build and the checks need, or a clear message -------------------
PRE="$OUT/build.log"
: > "$PRE"
preflight_fail() { echo "preflight: $*" | tee -a "$PRE" >&2; PRE_OK=0; }
PRE_OK=1
{
  echo "# gpu_check $MODE, $(date -u +%FT%TZ) on $(hostname), commit $(git log --oneline -1 2>/dev/null || echo '?')"
} >> "$SUMMARY"
if [ -n "${CUDACXX:-}" ]; then
  [ -x "$CUDACXX" ] || preflight_fail "CUDACXX=$CUDACXX is not an executable; unset it or point it at nvcc"
elif ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
  done
fi
if [ -z "${CUDACXX:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then export CUDACXX; CUDACXX=$(command -v nvcc)
  else preflight_fail "nvcc not found on PATH or in /usr/local/cuda*/bin: install the CUDA toolkit or set CUDACXX"; fi
fi
CUDA_BIN=$(dirname "${CUDACXX:-/nonexistent/nvcc}")
command -v "$PY" >/dev/null 2>&1 || preflight_fail "PYTHON=$PY not found"
if command -v cmake >/dev/null 2>&1; then
  CMAKE_VER=$(cmake --version | head -1 | grep -oE '[0-9]+\.[0-9]+' | head -1)
  [ "$(printf '%s\n' 3.24 "$CMAKE_VER" | sort -V | head -1)" = 3.24 ] \
    || preflight_fail "cmake $CMAKE_VER is older than 3.24 (CMakeLists.txt needs 3.24)"
else
  preflight_fail "cmake not found on PATH (pip install cmake, or the system package)"
fi
"$PY" - >> "$PRE" 2>&1 <<'EOF' || preflight_fail "python packages or GPU missing (see build.log)"
import importlib, sys
bad = []
for mod in ("nanobind", "scikit_build_core", "pytest", "torch"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except ImportError as exc:
        bad.append(f"{mod} cannot be imported ({exc})")
if not bad:
    import torch
    if not torch.version.cuda:
        bad.append(f"torch {torch.__version__} is a CPU-only build")
    elif not torch.cuda.is_available():
        bad.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
    else:
        p = torch.cuda.get_device_properties(0)
        print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, L2 {p.L2_cache_size / 1e6:.0f} MB, "
              f"{p.total_memory / 2**30:.0f} GiB; torch {torch.__version__} CUDA {torch.version.cuda}")
        if p.major < 8:
            bad.append(f"{p.name} is sm_{p.major}{p.minor}: the kernels need sm_80 or newer")
for b in bad:
    print("preflight:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
{
  echo "nvcc: ${CUDACXX:-none} ($("${CUDACXX:-false}" --version 2>/dev/null | tail -1))"
  echo "cmake: $(cmake --version 2>/dev/null | head -1); ninja: $(ninja --version 2>/dev/null || echo 'none (make)')"
  timeout 20 nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
} >> "$PRE"
ARCH=${CUDA_ARCH:-$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null)}
[ -n "$ARCH" ] || preflight_fail "cannot read the GPU's compute capability; set CUDA_ARCH (e.g. 90)"
# cuBLAS for the C++ benchmark: the nvidia-cublas pip package, else the toolkit's.
CUBLAS_ROOT=$("$PY" - 2>/dev/null <<'EOF'
import pathlib, site
for sp in site.getsitepackages():
    for h in sorted(pathlib.Path(sp, "nvidia").glob("**/include/cublas_v2.h")):
        print(h.parent.parent); raise SystemExit
EOF
)
TOOLKIT_CUBLAS=$(first_existing "$CUDA_BIN"/../lib64/libcublas.so* "$CUDA_BIN"/../targets/*/lib/libcublas.so*)
SAN=$(command -v compute-sanitizer || first_existing "$CUDA_BIN"/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer)
CUOBJDUMP=$(command -v cuobjdump || first_existing "$CUDA_BIN"/cuobjdump)
{
  echo "arch sm_${ARCH:-?}; cuBLAS: ${CUBLAS_ROOT:-${TOOLKIT_CUBLAS:-not found (C++ benchmark not built)}}"
  echo "compute-sanitizer: ${SAN:-not found}; cuobjdump: ${CUOBJDUMP:-not found}"
} | tee -a "$PRE" >> "$SUMMARY"
{
  grep -E '^(GPU |nvcc: |cmake: )' "$PRE"
  echo
  printf '%-16s %-26s %6s  %s\n' step status time log
} >> "$SUMMARY"
if [ "$PRE_OK" -ne 1 ]; then
  record preflight "FAIL" "$(elapsed)" build.log
  grep '^preflight:' "$PRE" >> "$SUMMARY"
  stop_unless_keep_going
else
  record preflight ok "$(elapsed)" build.log
fi

# ---- 1. build (pip, replacing any earlier install) -------------------------------------------------
# The checks must import the fresh install: an in-place build would win (tests/conftest.py and
# the bench scripts put python/ first when it holds one), so it is removed.
for f in python/vnm/_C*.so; do
  [ -e "$f" ] && echo "removing the in-place build $f" >> "$OUT/build.log" && rm -f "$f"
done
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
step build required 180 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-index --no-deps -v . \
  -Cbuild-dir=build/gpu -Ccmake.define.VNM_ENABLE_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${ARCH}-real" \
  -Ccmake.define.VNM_CUDA_RESOURCE_USAGE=ON ${CUBLAS_ROOT:+-Ccmake.define.VNM_CUBLAS_ROOT="$CUBLAS_ROOT"} \
  || stop_unless_keep_going
step cuda_build required 60 "$OUT/build.log" "$PY" -c "
import pathlib, sys, torch, vnm
print('vnm', vnm.__file__, 'CUDA_BUILT', vnm.CUDA_BUILT, 'cuda available', torch.cuda.is_available())
if pathlib.Path(vnm.__file__).resolve().is_relative_to(pathlib.Path('python').resolve()):
    sys.exit('imported the source tree, not the installed package')
if not vnm.CUDA_BUILT:
    sys.exit('vnm was built WITHOUT CUDA: CMake found no CUDA compiler (see its output above)')
if not torch.cuda.is_available():
    sys.exit('torch sees no GPU: the GPU checks cannot run')
" || stop_unless_keep_going
BIN=build/gpu/bench/vnm_bench_spmm
SO=$("$PY" -c "import vnm._C as m; print(m.__file__)" 2>/dev/null)

# Runs the GPU tests into a junit file; fails on any failure and on ANY skip (a skipped GPU test
# is missing coverage, not a pass).
gpu_tests() {  # gpu_tests LIMIT PYTEST_ARGS...
  local limit=$1
  shift
  local xml="$TMPD/gpu_tests.xml"
  rm -f "$xml"
  step gpu_tests required "$limit" "$OUT/tests.log" "$PY" -m pytest -v -rs -p no:cacheprovider \
    --junitxml="$xml" "$@"
  local rc=$?
  TESTS_LINE=$(grep -E "[0-9]+ (passed|failed|error)" "$OUT/tests.log" | tail -1)
  if [ -s "$xml" ]; then
    if "$PY" - "$xml" >> "$OUT/tests.log" 2>&1 <<'EOF'
import sys, xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
skipped = [(c.get("classname"), c.get("name"), s.get("message")) for c in cases for s in c.findall("skipped")]
print(f"junit: {len(cases)} test cases, {len(skipped)} skipped")
for cls, name, msg in skipped:
    print(f"SKIPPED (counts as a failure here) {cls}::{name}: {msg}")
sys.exit(1 if skipped or not cases else 0)
EOF
    then
      record gpu_tests_skips ok 0 tests.log
    else
      record gpu_tests_skips "FAIL(skipped or none)" 0 tests.log
      { grep '^junit:' "$OUT/tests.log" | tail -1; grep '^SKIPPED (counts' "$OUT/tests.log" | head -5; } >> "$SUMMARY"
    fi
  else
    record gpu_tests_skips "FAIL(no junit file)" 0 tests.log
  fi
  return "$rc"
}

sanitizer() {  # sanitizer KIND LIMIT TOOL CASE_ARGS...
  local kind=$1 limit=$2 tool=$3
  shift 3
  if [ -z "$SAN" ]; then
    if [ "$MODE" = full ]; then record "$tool" "FAIL(no compute-sanitizer)" 0 -
    else record "$tool" "SKIPPED(no sanitizer)" 0 -; fi
    return 1
  fi
  # Without torch's caching allocator every tensor is its own allocation, so memcheck sees an
  # access past a tensor's end instead of landing inside a larger cached block.
  step "$tool" "$kind" "$limit" "$OUT/checks.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool "$tool" --error-exitcode 1 "$PY" bench/sanitize_cases.py "$@"
}

# shellcheck disable=SC2329  # run as `bash -c sass` under step's time limit
sass() {  # SASS evidence: are the sparse tensor-core instructions and 16-byte loads there
  [ -n "$CUOBJDUMP" ] && [ -n "$SO" ] || { echo "no cuobjdump or no extension"; return 1; }
  local dump
  dump=$("$CUOBJDUMP" -sass "$SO") || return 1
  echo "# $SO (sm_${ARCH})"
  echo "HMMA.SP (sparse tensor core mma):  $(grep -c 'HMMA.SP' <<< "$dump")"
  echo "LDG.E.128 (16-byte global loads):   $(grep -cE 'LDG\.E[.A-Z0-9]*\.128' <<< "$dump")"
  echo "LDGSTS (cp.async):                  $(grep -c 'LDGSTS' <<< "$dump")"
  echo "LDSM (ldmatrix):                    $(grep -c 'LDSM' <<< "$dump")"
  echo "LDL/STL (local memory, want 0):     $(grep -cE '\b(LDL|STL)\b' <<< "$dump")"
  echo "# per kernel: registers, shared memory, stack"
  "$CUOBJDUMP" -res-usage "$SO" | grep -A1 -E "spmm|pack|unpack|dense" | grep -E "Function|REG"
  echo "# ptxas --resource-usage at build time"
  grep -E "ptxas info +: (Compiling entry|Used)|spill" "$OUT/build.log" | head -60
}
export SO ARCH CUOBJDUMP OUT
export -f sass

bench_py() {  # bench_py KIND LIMIT ARGS...
  local kind=$1 limit=$2
  shift 2
  step bench_py "$kind" "$limit" "$OUT/bench.log" "$PY" bench/bench_spmm.py \
    --out "$OUT/bench_spmm.csv" --plot "$OUT/bench_spmm.png" "$@"
}

bench_cpp() {  # bench_cpp KIND LIMIT ARGS...
  local kind=$1 limit=$2
  shift 2
  if [ ! -x "$BIN" ]; then
    if [ "$kind" = required ]; then record bench_cpp "FAIL(not built: no cuBLAS)" 0 build.log
    else record bench_cpp "SKIPPED(no cuBLAS)" 0 build.log; fi
    return 1
  fi
  step bench_cpp "$kind" "$limit" "$OUT/bench_cpp.log" "$BIN" "$@"
}

# The CUDA tests: every test of the GPU test files, and the CUDA tests of the others (by name).
GPU_TEST_FILES=(tests/test_build.py tests/test_cuda.py tests/test_nn_cuda.py tests/test_select_torch.py tests/test_train.py)
GPU_TEST_FILTER="cuda or build"
LLAMA_PATTERNS=(2:4 64:2:5 64:2:8 128:2:8 64:2:16)

case "$MODE" in
  quick)
    gpu_tests 120 "${GPU_TEST_FILES[@]}" -k "$GPU_TEST_FILTER"
    bench_py required 150 --shapes llama7b --patterns "${LLAMA_PATTERNS[@]}" --tokens 1 16 128 2048 8192
    # If time remains:
    sanitizer optional 90 memcheck --cases 2,3,4
    step sass optional 30 "$OUT/checks.log" bash -c sass
    bench_cpp optional 60 --shapes llama7b --patterns 2:4,64:2:8 --tokens 1,16,2048,8192
    step bench_models optional 90 "$OUT/bench.log" "$PY" bench/bench_models.py --device cuda \
      --models llama --patterns 64:2:8 --repeat 10
    ;;
  bench)
    bench_cpp required 150
    step bench_models required 150 "$OUT/bench.log" "$PY" bench/bench_models.py --device cuda --repeat 20
    bench_py optional 200 --shapes default --dtype bfloat16 --patterns "${LLAMA_PATTERNS[@]}"
    ;;
  full)
    gpu_tests 150 "${GPU_TEST_FILES[@]}" -k "$GPU_TEST_FILTER"
    sanitizer required 120 memcheck
    sanitizer required 90 racecheck --cases 2,3,4
    step sass required 30 "$OUT/checks.log" bash -c sass
    # The CPU tests of the CUDA ops' Python side, against this machine's torch, if time remains.
    step cpu_tests optional 90 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_mma_model.py tests/test_spmm.py tests/test_tensor.py
    ;;
esac
finish
