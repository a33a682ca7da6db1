#!/usr/bin/env bash
# The GPU suite: one call that ends inside 8 minutes with the most valuable results first, on a
# machine with no network (nothing is installed: it runs from the tree with PYTHONPATH).
#   1. in parallel: the C++/CUDA extension build (MAX_JOBS=16, in place), the Triton correctness
#      checks (one process per case), the CUDA sources' compile stats (nvcc -Xptxas -v), and the
#      warm-up of the timed shapes (fills Triton's cache while the CPUs are busy anyway);
#   2. alone on the GPU: the cuda-backend and generic-path checks (once the build is done), then
#      the headline timings (batch 100 CUDA-graphed, batch 65536 fp32/tf32/bf16, the whole IRVAE
#      training step graphed against the official eager step);
#   3. with what time remains: batches 1024 and 8192, then benchmarks/run.py --full --device cuda.
# Every step is time-boxed and none stops the others; the summary is written whatever happened.
#
# Usage:   OUT=DIR bash benchmarks/gpu_suite.sh [--dry-run] [--no-build] [--budget SECONDS]
#   --dry-run   CPU only: Triton interpreter, tiny shapes, no CUDA graph, a one-case CPU grid, no
#               build; checks the plumbing end to end (tests/test_gpu_suite.py runs it)
#   --no-build  do not build the extension (the cuda-backend checks are then skipped)
#   --budget S  seconds for the whole call (default 450: inside 8 minutes with a margin)
# Writes under $OUT (a temporary folder when unset), at most 8 files: suite.log, summary.md,
# suite.json (versions, commit, steps, targets), checks.json (every check and timing record),
# compile_stats.json, bench/results.json, bench/table.md, bench/speedup.png.
# Exit status: 1 when a correctness check failed or a step failed, else 0; timing targets are
# reported (summary.md, suite.json), not enforced.
set -uo pipefail
cd "$(dirname "$0")/.."

# --- paths this suite depends on: update here after a layout change ---------------------------
CHECKS=benchmarks/gpu_checks.py   # checks, timings and the summary (its own paths: top of the file)
GRID=benchmarks/run.py            # the benchmark grid
BUILD=setup.py                    # builds isofast/_C in place (its sources: setup.py, isofast/_ext.py)

DRY=0 NO_BUILD=0 BUDGET=450
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-build) NO_BUILD=1 ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "gpu_suite.sh: unknown argument $1 (--dry-run, --no-build, --budget S)" >&2; exit 2 ;;
  esac
  shift
done
[ "${DRY_RUN:-0}" = "1" ] && DRY=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
: >"$LOG"
TMPD=$(mktemp -d)
STEPS="$TMPD/steps.tsv"
: >"$STEPS"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
START=$(date +%s)

say() { echo "== [$(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
cap() { local a=$1 b=$2; [ "$a" -lt "$b" ] && echo "$a" || echo "$b"; }   # the smaller of two

# step NAME LIMIT CMD...: run CMD time-boxed into its own log, then append that log to suite.log,
# print its last lines, and record "NAME exit seconds note" for the summary. Never fatal.
step() {
  local name=$1 limit=$2 t0 rc note=""
  shift 2
  if [ "$limit" -lt 10 ]; then
    say "$name: skipped, ${limit} s left"
    printf '%s\t-1\t0\tskipped: no time left\n' "$name" >>"$STEPS"
    return 0
  fi
  say "$name: start (limit ${limit} s)"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$TMPD/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="timed out after ${limit} s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$note" >>"$STEPS"
  { echo "---- $name (exit $rc) ----"; grep -v -e FP_FUSION -e warn_once "$TMPD/$name.log"; } >>"$LOG"
  say "$name: exit $rc in $(($(date +%s) - t0)) s $note"
  grep -e '^\[' -e 'failed check' -e Error -e error "$TMPD/$name.log" | tail -n 25
  return 0
}

checks=("$PY" "$CHECKS" --out "$OUT")
if [ "$DRY" = "1" ]; then
  export TRITON_INTERPRET=1 DRY_RUN=1
  checks+=(--dry-run)
  say "dry run: no GPU needed; CPU tensors through the Triton interpreter, tiny shapes"
else
  unset TRITON_INTERPRET DRY_RUN
fi
say "python $PY; budget ${BUDGET} s; output $OUT"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"
else
  say "nvidia-smi: not found"
fi
if ! "$PY" -c "import torch, triton, isofast" >>"$LOG" 2>&1; then
  say "FAILED: torch, triton or isofast does not import with $PY (this suite installs nothing)"
  printf 'import\t1\t0\ttorch, triton or isofast does not import\n' >>"$STEPS"
fi
if [ "$DRY" = "0" ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>>"$LOG"; then
  say "no CUDA device visible to torch: GPU steps will fail; use --dry-run on a CPU machine"
fi
"$PY" -m isofast doctor 2>&1 | tee -a "$LOG"

# --- 1. build | correctness | compile stats | warm-up, in parallel ------------------------------
BUILD_PID=
if [ "$NO_BUILD" = "1" ] || [ "$DRY" = "1" ]; then
  say "extension build skipped ($([ "$DRY" = 1 ] && echo 'dry run' || echo '--no-build')): the cuda-backend checks will say so"
  printf 'build\t-1\t0\tskipped\n' >>"$STEPS"
else
  MAX_JOBS=16 step build "$(cap "$(left)" 180)" "$PY" "$BUILD" build_ext --inplace &
  BUILD_PID=$!
fi
P1=$(cap "$(($(left) - 200))" 200)
step correctness-paper-relu "$P1" "${checks[@]}" --sections correctness --cases paper-relu &
step correctness-paper-sigmoid "$P1" "${checks[@]}" --sections correctness --cases paper-sigmoid &
step correctness-large "$P1" "${checks[@]}" --sections correctness --cases large &
step official-and-cudagraph "$P1" "${checks[@]}" --sections correctness,cudagraph --cases official &
step compile-stats "$P1" "$PY" -m isofast doctor --compile-check --backend cuda --stats "$OUT/compile_stats.json" &
step warm-headline "$P1" "${checks[@]}" --sections headline --warm &
for pid in $(jobs -p); do
  [ "$pid" = "$BUILD_PID" ] || wait "$pid"
done
[ -n "$BUILD_PID" ] && wait "$BUILD_PID"

# --- 2. alone on the GPU: cuda backend and generic path, then the headline timings -------------
step cuda-and-generic "$(cap "$(($(left) - 150))" 90)" "${checks[@]}" --sections cuda,generic
step headline "$(cap "$(($(left) - 30))" 180)" "${checks[@]}" --sections headline

# --- 3. the grid, with what time remains --------------------------------------------------------
step timing "$(cap "$(($(left) - 90))" 120)" "${checks[@]}" --sections timing
GRID_LIMIT=$(($(left) - 20))
if [ "$DRY" = "1" ]; then
  # The grid's CPU smoke run, compiled kernels off the interpreter, one case, one repetition.
  step grid "$GRID_LIMIT" env -u TRITON_INTERPRET -u DRY_RUN "$PY" "$GRID" --quick --device cpu --cases paper \
    --reps 1 --no-compile --no-quality --no-memory --time-limit 1 --out "$OUT/bench"
else
  step grid "$GRID_LIMIT" "$PY" "$GRID" --full --device cuda --no-compile --no-quality \
    --time-limit "$((GRID_LIMIT - 60))" --out "$OUT/bench"
fi

# --- summary ------------------------------------------------------------------------------------
"$PY" "$CHECKS" --out "$OUT" --summarise "$STEPS" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
[ -f "$OUT/summary.md" ] && sed -n '/^## Targets/,/^## Checks/p' "$OUT/summary.md" | grep -v '^## Checks'
if awk -F'\t' '$2 > 0 { bad = 1 } END { exit !bad }' "$STEPS"; then
  say "a step failed: $(awk -F'\t' '$2 > 0 { printf "%s (exit %s) ", $1, $2 }' "$STEPS")"
  status=1
fi
n_files=$(find "$OUT" -type f | wc -l)
say "done (status $status) in $(($(date +%s) - START)) s; $n_files files under $OUT"
[ "$n_files" -le 8 ] || say "WARNING: more than 8 files under $OUT: only 8 come back from the GPU machine"
find "$OUT" -type f | sort | tee -a "$LOG"
rm -rf "$TMPD"
exit "$status"
