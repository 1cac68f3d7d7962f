#!/usr/bin/env bash
# scripts/gpu-check.sh OUT [--device cpu] [--docs]: the GPU path proved in one bounded command.
#
# On one CUDA machine, in this order, each step in its own process under its own `timeout`, the
# whole run inside TOTAL_S (9 minutes on CUDA): install the carried wheels (if .wheels/ exists);
# print the device, driver and library versions; pytest tests/gpu (each test bounded); write
# the full-size random-weight stand-in (`tiny-model --preset full`: configs only, the weights
# are drawn on the GPU as the server loads them); start the real server on it (bf16, default
# compile setting, memory probe) and record its start-up phases; the engine alone at 1024x1024,
# 8 steps, batch 1, 2, 4 (8 if the probe allows) with MFU (`python -m bench mfu`); the server
# again (warm compile cache) under 1, 4 and 16 closed-loop clients; if time is left, a 1328x1328
# point and a 4-step Lightning point. Everything lands in OUT: steps.tsv, one JSON per step,
# each step's log, and the merged gpu-check.json and summary.md (`python -m bench gpu-check
# report`). Exits non-zero, naming the failed steps, if any step failed or ran out of time.
#
#   --device cpu   the dry run: the tiny model at 64x64, 2 steps, a few seconds a step
#                  (tests/e2e/test_gpu_check.py runs it, so the script cannot rot)
#   --docs         also copy gpu-check.json to docs/benchmarks/ and refresh docs/gpu.md's block
#   --model DIR    use this model directory instead of writing one (the model step is skipped)
#   --skip A,B     skip these steps (say, a rerun that skips `tests` after they passed)
#
# The GPU machine has PyTorch, transformers and peft but no network. The rest travels as wheels
# in .wheels/ (git-ignored), fetched here for its Python (3.12 on the lent machines):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .wheels \
#     diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0 pydantic==2.14.4 \
#     pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing-extensions==4.16.0 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
#     grpcio==1.85.4 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
#
# (17 MB; their other needs, huggingface-hub, safetensors, numpy, Pillow and the rest, are on the
# lent machines with transformers: see each wheel's Requires-Dist.)
#
# and installed there by this script's first step (no index, no dependencies resolved):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .wheels/*.whl
#
# The project itself runs from the checkout (PYTHONPATH=server:client:.), nothing to install.
set -uo pipefail

usage() {
    echo "usage: $0 OUT [--device cuda|cpu] [--docs] [--model DIR] [--skip STEP,...]" >&2
    exit 2
}

[[ $# -ge 1 && $1 != -* ]] || usage
OUT=$1
shift
DEVICE=cuda
DOCS=()
MODEL=""
SKIP=""
AS_RUN="scripts/gpu-check.sh OUT" # the command line the report names (no local paths)
while [[ $# -gt 0 ]]; do
    case $1 in
        --device) DEVICE=${2:-}; AS_RUN+=" $1 $DEVICE"; shift 2 || usage ;;
        --model) MODEL=${2:-}; AS_RUN+=" $1 DIR"; shift 2 || usage ;;
        --skip) SKIP=,${2:-},; AS_RUN+=" $1 ${2:-}"; shift 2 || usage ;;
        --docs) DOCS=(--docs); AS_RUN+=" $1"; shift ;;
        *) usage ;;
    esac
done
[[ $DEVICE == cuda || $DEVICE == cpu ]] || usage

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then
    PY=$REPO/.venv/bin/python
else
    PY=python3
fi
export PYTHONPATH="$REPO/server:$REPO/client:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# One inductor cache for the whole run: the second server start reads the first one's kernels.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor-cache}

if [[ $DEVICE == cuda ]]; then
    TOTAL_S=540 # 9 minutes, all steps together
    REPORT_S=15 # kept back for the report, whatever the steps take
    PRESET=full
    SIZE=(--resolution 1024x1024 --steps 8 --min-size 256 --max-size 1328 --torch-threads 0)
    LARGE=1328x1328
    ENGINE=() # batch 1, 2, 4, and 8 where the start-up probe allows it; the device's peak sizes
    LOAD_S=20         # each client count's closed-loop run (up to twice as long for samples)
    LIGHTNING_LOAD_S=10
    TEST_TIMEOUT_S=110 # each test of tests/gpu, fixture set-up included
    declare -A BUDGET=([wheels]=30 [info]=20 [tests]=120 [model]=20 [startup]=100 [engine]=100
        [serve]=140 [engine-1328]=60 [lightning]=90)
else
    TOTAL_S=300
    REPORT_S=15
    PRESET=tiny
    SIZE=(--resolution 64x64 --steps 2 --min-size 32 --max-size 96 --torch-threads 1)
    LARGE=96x96
    ENGINE=(--batch-sizes "1,2" --peak-sizes 256) # the dry run's peak means nothing: be quick
    LOAD_S=1.5
    LIGHTNING_LOAD_S=1
    TEST_TIMEOUT_S=60
    declare -A BUDGET=([wheels]=30 [info]=30 [tests]=60 [model]=30 [startup]=60 [engine]=60
        [serve]=60 [engine-1328]=60 [lightning]=60)
fi
export IMAGEGEN_GPU_TEST_TIMEOUT_S=$TEST_TIMEOUT_S
if [[ -n $MODEL ]]; then
    MODEL=$(cd "$MODEL" && pwd) || usage
    SKIP="$SKIP,model,"
else
    MODEL=$WORK/model
fi
COMMON=(--out "$OUT" --model "$MODEL" --device "$DEVICE" "${SIZE[@]}")
STARTED=$EPOCHREALTIME
RUNNING="" # the pid of the step's `timeout`, which signals its whole process group

stop_running() {
    if [[ -n $RUNNING ]]; then
        kill -TERM "$RUNNING" 2>/dev/null
        wait "$RUNNING" 2>/dev/null
        RUNNING=""
    fi
}
cleanup() {
    stop_running
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "gpu-check: interrupted" >&2; exit 130' INT TERM

elapsed() { # seconds since $1 (an EPOCHREALTIME), to 0.1 s
    awk -v now="$EPOCHREALTIME" -v then="$1" 'BEGIN { printf "%.1f", now - then }'
}

seconds_left() {
    awk -v used="$(elapsed "$STARTED")" -v total="$TOTAL_S" -v keep="$REPORT_S" \
        'BEGIN { printf "%d", total - keep - used }'
}

record() { # NAME STATUS SECONDS BUDGET EXIT_CODE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$OUT/steps.tsv"
}

# run_step NAME required|optional COMMAND...: COMMAND under `timeout` with the step's budget
# (cut to what is left of TOTAL_S); an optional step that no longer fits is skipped.
run_step() {
    local name=$1 need=$2 budget=${BUDGET[$1]} left started code status
    shift 2
    if [[ $SKIP == *",$name,"* ]]; then
        echo "== $name: skipped (--skip or --model)"
        record "$name" skipped 0 "$budget" 0
        return
    fi
    left=$(seconds_left)
    if ((left < budget)); then
        if [[ $need == optional ]]; then
            echo "== $name: skipped, ${left} s left of the run's budget"
            record "$name" skipped 0 "$budget" 0
            return
        fi
        if ((left < 5)); then
            echo "== $name: no time left of the run's budget"
            record "$name" no-time 0 "$budget" 0
            return
        fi
        budget=$left
    fi
    echo "== $name (at most ${budget} s): $*"
    started=$EPOCHREALTIME
    timeout --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1 &
    RUNNING=$!
    wait "$RUNNING"
    code=$?
    RUNNING=""
    sed 's/^/   /' "$OUT/$name.log" | tail -n 40
    case $code in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" "$(elapsed "$started")" "$budget" "$code"
    echo "== $name: $status ($(elapsed "$started") s)"
}

: >"$OUT/steps.tsv"
echo "$AS_RUN" >"$OUT/command.txt"
if [[ $DEVICE == cuda && -d $REPO/.wheels ]]; then # wheels for the GPU machine's Python
    run_step wheels required "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --target "$WORK/site" "$REPO"/.wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
run_step info required "$PY" -m bench gpu-check info --out "$OUT" --device "$DEVICE"
run_step tests required "$PY" -m pytest -q -p no:cacheprovider tests/gpu
run_step model required "$PY" -m imagegen_server.main tiny-model "$MODEL" --preset "$PRESET"
run_step startup required "$PY" -m bench gpu-check server "${COMMON[@]}" --name cold
run_step engine required "$PY" -m bench gpu-check engine "${COMMON[@]}" --name main \
    --retries 0 "${ENGINE[@]}"
run_step serve required "$PY" -m bench gpu-check server "${COMMON[@]}" --name serve \
    --clients 1,4,16 --seconds "$LOAD_S"
run_step engine-1328 optional "$PY" -m bench gpu-check engine "${COMMON[@]}" --name 1328 \
    "${ENGINE[@]}" --resolution "$LARGE" --batch-sizes 1 --retries 0
run_step lightning optional "$PY" -m bench gpu-check server "${COMMON[@]}" --name lightning \
    --steps 4 --server-flag=--scheduler-preset --server-flag=lightning --clients 1,4 \
    --seconds "$LIGHTNING_LOAD_S"

echo "== report"
timeout --kill-after=5 "$REPORT_S" "$PY" -m bench gpu-check report --out "$OUT" "${DOCS[@]}"
code=$?
failed=$(awk -F '\t' '$2 != "ok" && $2 != "skipped" { print $1 }' "$OUT/steps.tsv" | paste -sd ,)
if [[ -n $failed ]]; then
    echo "gpu-check: FAILED: $failed (their logs: $OUT/STEP.log)" >&2
    exit 1
fi
if ((code != 0)); then
    echo "gpu-check: FAILED: report (exit code $code)" >&2
    exit "$code"
fi
echo "gpu-check: every step passed; $OUT/summary.md"
