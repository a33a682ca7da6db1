#!/usr/bin/env bash
# The GPU suite of the "triton" backend, in one call of at most 8 minutes:
#   install (if isofast is not importable), check every GPU path against the torch twin
#   (benchmarks/gpu_checks.py: paper shape and a large shape, fp32 gradients, tf32/bf16, the
#   official recipe, a whole IRVAE training step captured in a CUDA graph, regulariser timings at
#   batches 100..65536 against the targets), then the benchmark grid
#   (benchmarks/run.py --full --device cuda).
#
# Usage:   OUT=/some/folder bash benchmarks/gpu_suite.sh
#          DRY_RUN=1 bash benchmarks/gpu_suite.sh      (or --dry-run: CPU, Triton interpreter,
#                                                       tiny shapes, no CUDA graph, quick grid)
# Writes under $OUT (a temporary folder when unset): suite.log, checks.json, and bench/ (the
# benchmark runner's results.json, table.md, speedup.png). Exit status: non-zero when a check
# failed; timing targets are reported in suite.log and checks.json, not enforced.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=${DRY_RUN:-0}
for arg in "$@"; do
  [ "$arg" = "--dry-run" ] && DRY=1
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TRITON_DEFAULT_FP_FUSION=1
START=$(date +%s)
say() { echo "== [$(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }
left() { echo $((470 - ($(date +%s) - START))); }   # seconds left of the 8-minute call, with margin

status=0
if [ "$DRY" = "1" ]; then
  export TRITON_INTERPRET=1 DRY_RUN=1
  say "dry run: CPU tensors through the Triton interpreter"
else
  unset TRITON_INTERPRET
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"
fi

if ! python -c "import isofast, triton" >/dev/null 2>&1; then
  say "installing isofast (editable, no build isolation)"
  pip install --no-build-isolation -e . >>"$LOG" 2>&1 || { say "install FAILED"; exit 1; }
fi
python -m isofast doctor 2>&1 | tee -a "$LOG"

say "correctness, CUDA graph and timing checks"
if [ "$DRY" = "1" ]; then
  timeout "$(left)" python benchmarks/gpu_checks.py --dry-run --out "$OUT" 2>&1 | grep -v -e FP_FUSION -e warn_once | tee -a "$LOG"
else
  timeout "$(left)" python benchmarks/gpu_checks.py --out "$OUT" 2>&1 | tee -a "$LOG"
fi
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { say "gpu_checks FAILED (exit $rc)"; status=1; }

budget=$(left)
if [ "$budget" -lt 30 ]; then
  say "no time left for the benchmark grid"; status=1
elif [ "$DRY" = "1" ]; then
  # The grid's own CPU smoke mode, with compiled kernels off the interpreter (it would take hours).
  say "benchmark grid (quick, CPU, interpreter off), ${budget} s left"
  env -u TRITON_INTERPRET -u DRY_RUN timeout "$budget" python benchmarks/run.py --quick --out "$OUT/bench" >>"$LOG" 2>&1 \
    || { say "benchmark grid FAILED"; status=1; }
else
  say "benchmark grid (full, cuda), ${budget} s left"
  timeout "$budget" python benchmarks/run.py --full --device cuda --out "$OUT/bench" 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -ne 0 ] && { say "benchmark grid FAILED or ran out of time"; status=1; }
fi
say "done (status $status); files under $OUT"
ls -R "$OUT" | tee -a "$LOG"
exit $status
