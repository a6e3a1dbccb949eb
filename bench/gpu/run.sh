#!/usr/bin/env bash
# The GPU benchmark of Elixir on one GPU, from the repository root; results in $OUT (default ./gpu-out).
#
#   stage 0  parity.py      Elixir's losses match PyTorch's for 5 steps (fp32 and bf16, two small models);
#                           measures the machine once for every later stage ($OUT/hardware.json)
#   stage 0b checkpoint.py  save and load resume bit for bit, chunks on demand from pinned host shards
#   plans    plans.py       the planner's searches for (b) and (c), in parallel on the CPUs, in the background
#                           beside checkpoint and offload-pytorch (which keep the GPU busy)
#   stage b  offload.py     OPT-2.7B dims, bf16, 64k tokens per step, clipped to norm 1.0, one process each:
#                           PyTorch eager with the whole GPU; Elixir's plan, then FSDP2 + CPUOffloadPolicy,
#                           both with the GPU capped at half the model data
#   stage c  curve.py       Elixir alone under that cap at 8k, 16k, 32k and 128k tokens per step
#   stage d  fidelity.py    the planner's predicted step and memory against measured ones, on five small
#                           Hugging Face families under four plans each (bench/bench_fidelity.py's report)
#   stage e  host_adamw.py  the host's fused AdamW on one chunk alone, with pinned buffers, beside a thread that
#                           launches kernels, beside copies both ways: what slows the optimizer's worker in a step
#   report   report.py      the summary table
#
# Each stage runs under its own time box (timeout) and stops starting repetitions at 80% of it: the
# foreground boxes add up to 580 s, and waiting for the plans stage at most 20 s more (its box less those of
# the two stages beside it). Logs and JSON go to $OUT. Exit status 0 when every stage finished and the
# losses matched.
#
#   bash bench/gpu/run.sh            # on the GPU machine
#   bash bench/gpu/run.sh --dry-run  # every stage on tiny models on the CPU, in a minute or so
set -u -o pipefail
cd "$(dirname "$0")/../.."
DRY=""
if [ "${1:-}" = "--dry-run" ]; then
    DRY="--dry-run"
    shift
    export CUDA_VISIBLE_DEVICES=""                 # the CPU, even on a GPU machine
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # toy ops on shared cores: threads only wait for each other
fi
if [ $# -ne 0 ]; then
    echo "usage: bash bench/gpu/run.sh [--dry-run]" >&2
    exit 2
fi
OUT="${OUT:-./gpu-out}"
export OUT
mkdir -p "$OUT"
# a stage that fails this time must not be reported from an earlier run's files
rm -f "$OUT"/{hardware,plans,parity,checkpoint,offload-pytorch,offload-elixir,offload-fsdp2-offload,curve,fidelity,host-adamw,summary}.json
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$DRY" ]; then
    # Hardware.measure() of this GPU, made once by the first stage, kept with the results
    export ELIXIR_CACHE_DIR="${ELIXIR_CACHE_DIR:-$OUT/elixir-cache}"
fi
export PYTHONUNBUFFERED=1
failed=0
started=$SECONDS

stage() {  # stage NAME BOX_SECONDS SCRIPT [ARGS...]: its output to the terminal and $OUT/NAME.log; 1 if it failed
    local name=$1 box=$2
    shift 2
    if [ -n "$DRY" ]; then
        box=150  # the boxes are the GPU's; tiny models on a shared CPU spend their time starting Python
    fi
    echo "=== stage $name (time box $box s, at $((SECONDS - started)) s) ==="
    # shellcheck disable=SC2086
    timeout --kill-after=15 "$box" python "$@" $DRY --out "$OUT" --budget-s "$box" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        return 0
    fi
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "stage $name: stopped by its time box ($box s)" | tee -a "$OUT/$name.log"
    else
        echo "stage $name: exit status $rc" | tee -a "$OUT/$name.log"
    fi
    return 1
}

stage parity 75 bench/gpu/parity.py || failed=1
stage plans 100 bench/gpu/plans.py >/dev/null &  # its log is shown once it is done
plans=$!
stage checkpoint 25 bench/gpu/checkpoint.py || failed=1
stage offload-pytorch 55 bench/gpu/offload.py --system pytorch || failed=1
wait "$plans" || failed=1
echo "=== stage plans (ran in the background; done at $((SECONDS - started)) s at the latest) ==="
cat "$OUT/plans.log"
stage offload-elixir 80 bench/gpu/offload.py --system elixir || failed=1
stage offload-fsdp2 85 bench/gpu/offload.py --system fsdp2-offload || failed=1
stage curve 130 bench/gpu/curve.py || failed=1
stage fidelity 100 bench/gpu/fidelity.py || failed=1
stage host-adamw 30 bench/gpu/host_adamw.py || failed=1
# shellcheck disable=SC2086
python bench/gpu/report.py --out "$OUT" $DRY | tee "$OUT/summary.md"
# everything in one file too, for machines from which only a few files can be carried back
tar czf "$OUT/all.tgz" --exclude=all.tgz -C "$OUT" . 2>/dev/null || true
echo "total $((SECONDS - started)) s; logs and JSON in $OUT (and all of them in $OUT/all.tgz)"
exit $failed
