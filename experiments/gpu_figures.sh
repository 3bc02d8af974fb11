#!/usr/bin/env bash
# Issue 12's GPU figures, made on a machine with an NVIDIA GPU whose Python has JAX and PyTorch with CUDA (no
# network needed): the bench (cnnjax against PyTorch eager and the torch.compile-d train step, batch 128) and
# the fast recipe's epoch times on CIFAR-shaped data against the same net in PyTorch, eager and compiled.
#
#   bash experiments/gpu_figures.sh OUTDIR fp32   # a one-step check, the bench's float32 rows, the recipe in fp32
#   bash experiments/gpu_figures.sh OUTDIR bf16   # the bench's bfloat16 rows, the recipe in bf16
#
# BUDGET (seconds, default 540) bounds the whole part: each section runs under a timeout inside it, and the
# bench and the recipe rewrite their JSON after every row / side, so a section cut short keeps what it
# finished. Pure-Python packages the machine lacks (ml_collections) may travel as wheels in .whl/; they are
# installed into /tmp/site first. PYTHON picks the interpreter (default python3).
set -u
out=${1:?usage: bash experiments/gpu_figures.sh OUTDIR fp32|bf16}
part=${2:?usage: bash experiments/gpu_figures.sh OUTDIR fp32|bf16}
case "$part" in fp32|bf16) ;; *) echo "error: the part must be fp32 or bf16; got '$part'" >&2; exit 2 ;; esac
budget=${BUDGET:-540}
py=${PYTHON:-python3}
mkdir -p "$out" || exit 2
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }

if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# JAX takes under half the GPU's memory, so the PyTorch processes the bench starts beside it have the rest.
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45

section() {  # NAME SECONDS COMMAND...: run COMMAND under a timeout, its output in OUTDIR/NAME.log
    local name=$1 seconds=$2
    shift 2
    if [ "$seconds" -lt 20 ]; then echo "# $name: skipped, ${seconds} s left" | tee -a "$out/summary.txt"; return 1; fi
    echo "# $name: up to ${seconds} s: $*"
    local t=$SECONDS rc
    set -o pipefail
    timeout -k 10 "$seconds" "$@" 2>&1 | tee "$out/$name.log"
    rc=$?
    set +o pipefail
    echo "# $name: exit $rc after $((SECONDS - t)) s" | tee -a "$out/summary.txt"
    return $rc
}

if [ "$part" = fp32 ]; then
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      "$py" -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__,
'| optax', optax.__version__, '| torch', torch.__version__, torch.cuda.get_device_name())"
      nproc; } 2>&1 | tee "$out/env.txt"
    # One cnnjax train step and one PyTorch step on the GPU first: a broken set-up ends the part in seconds.
    section check 120 "$py" -m experiments.bench --quick --models lenet5 --steps 3 --warmup 1 --notorch_compile \
        --nopipeline --nodata_modes || exit 3
fi
recipe_reserve=150
section "bench_$part" $(($(left) - recipe_reserve)) "$py" -m experiments.bench --batches 128 --precisions "$part" \
    --steps 50 --warmup 10 --nopipeline --nodata_modes --out "$out/bench_$part.json"
section "recipe_$part" $(($(left) - 5)) "$py" -m experiments.bench_recipe --train 50000 --test 2000 --epochs 3 \
    --precision "$part" --out "$out/recipe_$part.json"
echo "# part $part done in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
