#!/usr/bin/env bash
# GPU acceptance (issue 48): bash experiments/gpu_acceptance.sh [OUTDIR]
#
# On one H100 / H200 with the machine's own jax (CUDA) and torch: nothing is installed, nothing is downloaded.
# OUTDIR (default $OUT, else ./gpu_acceptance_out) receives every section's log (NAME.log), the checks' results
# (checks.json), the bench JSONs (throughput_fp32.json, throughput_bf16.json, recipe.json), sections.tsv (name,
# budget s, exit status, seconds) and summary.md; data, workdirs and caches live in a temporary directory.
#
# Sections, in order, each under `timeout` with the budget (seconds) that is the second argument of its `section`
# line; the budgets sum to at most 480 (8 minutes; tests/test_accelerator_check.py parses and checks them):
#   backend        jax.default_backend() == "gpu", else the script stops at once (exit 1)
#   data           CIFAR-shaped synthetic data, 50,000 + 2,000 images (experiments.make_synthetic_cifar)
#   step_parity    train steps on the GPU (scan) equal to the CPU's (host loop), float32 at 'highest' precision
#   resume         stop + resume bitwise equal to an uninterrupted run (XLA's deterministic GPU ops)
#   bf16           mixed-precision training: finite, decreasing loss, float32 parameters
#   throughput_*   bench rows: cnnjax vs PyTorch eager and torch.compile, batch 128 and 1024, fp32 then bf16
#   recipe         the fast recipe's epoch (cifar10_fast) against the same in PyTorch eager and torch.compile
#   compile_cache  one training twice in fresh processes with one fresh CNNJAX_COMPILATION_CACHE
#   two_process    with >= 2 GPUs: a 2-process sharded run through experiments.launch (skipped otherwise)
#   summary        one markdown summary (python -m experiments.bench.accelerator_check summary OUTDIR)
# A section that fails or runs out of time is recorded (its bench JSON keeps the rows finished so far) and the
# next one runs; the script then exits 1 after the summary. Bench rows: GPU_ACCEPTANCE_MODELS (default
# cifar_resnet20; comma-separated bench rows of experiments.bench.throughput). CNNJAX_CPU_BACKEND defaults to 0
# here (step_parity's CPU side in plain XLA, no oneDNN build on the GPU machine); set it to 1 to compare with the
# CPU backend. PYTHON (default python3) is the interpreter.
set -euo pipefail

OUTDIR=${1:-${OUT:-./gpu_acceptance_out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
MODELS=${GPU_ACCEPTANCE_MODELS:-cifar_resnet20}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_acceptance.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
# Plain XLA on the CPU too (step_parity's CPU side): no attempt to build the oneDNN library on this machine.
export CNNJAX_CPU_BACKEND=${CNNJAX_CPU_BACKEND:-0}
CHECK=("$PY" -m experiments.bench.accelerator_check)
: >"$OUTDIR/sections.tsv"
rm -f "$OUTDIR/checks.json"
FAILED=()
LAST_RC=0
STARTED=$SECONDS

# section NAME BUDGET_S COMMAND...: COMMAND under `timeout BUDGET_S` (SIGTERM, SIGKILL 5 s later), its output in
# OUTDIR/NAME.log; a row of sections.tsv; a failure or a timeout (exit 124) is added to FAILED.
section() {
  local name=$1 budget=$2
  shift 2
  local start=$SECONDS
  LAST_RC=0
  echo "== $name (at most ${budget} s)"
  timeout --kill-after=5 "$budget" "$@" >"$OUTDIR/$name.log" 2>&1 || LAST_RC=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$LAST_RC" "$((SECONDS - start))" >>"$OUTDIR/sections.tsv"
  [ "$name" = summary ] || tail -n 2 "$OUTDIR/$name.log"
  if [ "$LAST_RC" -ne 0 ]; then
    FAILED+=("$name")
    if [ "$LAST_RC" -eq 124 ]; then
      echo "!! $name ran out of its ${budget} s"
    else
      echo "!! $name failed (exit $LAST_RC)"
    fi
  fi
  return 0
}

finish() {
  section summary 10 "${CHECK[@]}" summary "$OUTDIR"
  cat "$OUTDIR/summary.md" 2>/dev/null || true
  echo "acceptance: $((SECONDS - STARTED)) s; results in $OUTDIR"
  if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
  fi
}

section backend 20 "${CHECK[@]}" backend --out "$OUTDIR/checks.json"
if [ "$LAST_RC" -ne 0 ]; then
  cat "$OUTDIR/backend.log"
  finish
fi
section data 15 "$PY" -m experiments.make_synthetic_cifar --out "$WORK/data" --train 50000 --test 2000
section step_parity 50 "${CHECK[@]}" step_parity --out "$OUTDIR/checks.json"
section resume 45 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" \
  "${CHECK[@]}" resume --out "$OUTDIR/checks.json" --data "$WORK/data"
section bf16 30 "${CHECK[@]}" bf16 --out "$OUTDIR/checks.json" --data "$WORK/data" --epochs 3
section throughput_fp32 75 "$PY" -m experiments.bench.throughput --models "$MODELS" --batches 128,1024 \
  --precisions fp32 --steps 20 --warmup 5 --nopipeline --out "$OUTDIR/throughput_fp32.json"
section throughput_bf16 75 "$PY" -m experiments.bench.throughput --models "$MODELS" --batches 128,1024 \
  --precisions bf16 --steps 20 --warmup 5 --nopipeline --out "$OUTDIR/throughput_bf16.json"
section recipe 80 "$PY" -m experiments.bench.recipe --train 50000 --test 2000 --epochs 2 --precision fp32 \
  --out "$OUTDIR/recipe.json"
section compile_cache 55 "${CHECK[@]}" compile_cache --out "$OUTDIR/checks.json" --data "$WORK/data" \
  --train_config experiments/configs/cifar10_fast.py --epochs 2
GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [ "${GPUS:-0}" -ge 2 ]; then
  section two_process 20 "${CHECK[@]}" two_process --out "$OUTDIR/checks.json" --data "$WORK/data" \
    --train_config experiments/configs/cifar10_resnet20.py --epochs 1 --stop_after 10
else
  echo "== two_process skipped: ${GPUS:-0} GPU(s) on this host"
fi
finish
