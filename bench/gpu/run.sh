#!/usr/bin/env bash
# The GPU benchmark of Elixir on one GPU, from the repository root; results in $OUT (default ./gpu-out).
#
#   stage 0  parity.py   Elixir's losses match PyTorch's for 5 steps (fp32 and bf16, two small models)
#   stage 0b checkpoint.py  save and load resume bit for bit, chunks on demand from pinned host shards
#   stage a  fits.py     OPT-1.3B dims in bf16: PyTorch eager vs Elixir's searched plan, TFLOPS ratio
#   stage b  offload.py  OPT-2.7B dims (42 GB of model data) on a GPU capped at 20 GiB: Elixir with host
#                        offload, then FSDP2 + CPUOffloadPolicy, each in its own process
#   stage c  report.py   the planner's predictions vs the measurements, and the summary table
#
# Each stage runs under its own time box (timeout) and stops starting repetitions at 80% of it; the
# boxes add up to under 9 minutes. Logs and JSON go to $OUT. Exit status 0 when every stage finished
# and the losses matched.
#
#   bash bench/gpu/run.sh            # on the GPU machine
#   bash bench/gpu/run.sh --dry-run  # every stage on tiny models on the CPU, in a minute or two
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
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$DRY" ]; then
    # Hardware.measure() of this GPU, made once by the first stage, kept with the results
    export ELIXIR_CACHE_DIR="${ELIXIR_CACHE_DIR:-$OUT/elixir-cache}"
fi
export PYTHONUNBUFFERED=1
failed=0
started=$SECONDS

stage() {  # stage NAME BOX_SECONDS SCRIPT [ARGS...]
    local name=$1 box=$2
    shift 2
    echo "=== stage $name (time box $box s, at $((SECONDS - started)) s) ==="
    # shellcheck disable=SC2086
    timeout --kill-after=15 "$box" python "$@" $DRY --out "$OUT" --budget-s "$box" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "stage $name: stopped by its time box ($box s)"
        else
            echo "stage $name: exit status $rc"
        fi
        failed=1
    fi
}

stage parity 90 bench/gpu/parity.py
stage checkpoint 40 bench/gpu/checkpoint.py
stage fits 150 bench/gpu/fits.py
stage offload-elixir 120 bench/gpu/offload.py --system elixir
stage offload-fsdp2 120 bench/gpu/offload.py --system fsdp2-offload
# shellcheck disable=SC2086
python bench/gpu/report.py --out "$OUT" $DRY | tee "$OUT/summary.md"
echo "total $((SECONDS - started)) s; logs and JSON in $OUT"
exit $failed
