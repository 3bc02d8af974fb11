#!/usr/bin/env bash
# Issue 12's GPU figures, made on a machine with an NVIDIA GPU whose Python has JAX and PyTorch with CUDA (no
# network needed): the bench (cnnjax against PyTorch eager and the torch.compile-d train step, batch 128) and
# the fast recipe's epoch times on CIFAR-shaped data against the same net in PyTorch, eager and compiled.
#
#   bash experiments/gpu_figures.sh OUTDIR SECTION...
#
# A SECTION is NAME[=MODELS][:SECONDS]: NAME one of check (one cnnjax and one PyTorch step: a broken set-up ends
# the run in seconds), bench_fp32, bench_bf16 (the bench's rows at that precision; MODELS a comma list, default
# the bench's six), recipe_fp32, recipe_bf16; SECONDS caps it (default: what is left). For example
#
#   bash experiments/gpu_figures.sh OUT check:120 bench_fp32 recipe_fp32:150
#
# BUDGET (seconds, default 540) bounds the whole run: each section runs under a timeout inside it (a section
# leaves each recipe after it its cap, or 150 s), and the bench and the recipe rewrite their JSON after
# every row / side, so a section cut short keeps what it finished. Pure-Python packages the machine lacks
# (ml_collections) may travel as wheels in .whl/; they are installed into /tmp/site first. PYTHON picks the
# interpreter (default python3).
set -u
out=${1:?usage: bash experiments/gpu_figures.sh OUTDIR SECTION...}
shift
[ $# -gt 0 ] || { echo "error: name at least one section, e.g. check bench_fp32 recipe_fp32" >&2; exit 2; }
for spec in "$@"; do
    case "${spec%%[=:]*}" in check|bench_fp32|bench_bf16|recipe_fp32|recipe_bf16) ;;
        *) echo "error: unknown section '$spec'; sections: check, bench_fp32, bench_bf16, recipe_fp32, recipe_bf16" >&2
           exit 2 ;;
    esac
done
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

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__,
'| optax', optax.__version__, '| torch', torch.__version__, torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee "$out/env.txt"
i=0
for spec in "$@"; do
    i=$((i + 1))
    name=${spec%%[=:]*} models= cap=
    case "$spec" in *=*) models=${spec#*=}; models=${models%%:*} ;; esac
    case "$spec" in *:*) cap=${spec##*:} ;; esac
    later=0
    for next in "${@:$((i + 1))}"; do  # keep each later recipe its cap, or 150 s
        case "$next" in recipe_*:*) later=$((later + ${next##*:})) ;; recipe_*) later=$((later + 150)) ;; esac
    done
    seconds=$(($(left) - later))
    if [ -n "$cap" ] && [ "$cap" -lt "$seconds" ]; then seconds=$cap; fi
    case "$name" in
        check) section check "$seconds" "$py" -m experiments.bench --quick --models lenet5 --steps 3 --warmup 1 \
                   --notorch_compile --nopipeline --nodata_modes || exit 3 ;;
        bench_*) section "$name" "$seconds" "$py" -m experiments.bench --batches 128 --precisions "${name#bench_}" \
                     ${models:+--models "$models"} --steps 50 --warmup 10 --nopipeline --nodata_modes \
                     --out "$out/$name.json" ;;
        recipe_*) section "$name" "$seconds" "$py" -m experiments.bench_recipe --train 50000 --test 2000 --epochs 3 \
                      --precision "${name#recipe_}" --out "$out/$name.json" ;;
    esac
done
echo "# done in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
