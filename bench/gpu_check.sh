#!/usr/bin/env bash
# One command on a GPU (issue 16): every figure the issue names, and the GPU tests, in 6 to 8 minutes on an H200
# (never more than the budget below plus a few seconds).
#
#     OUT=some/folder bash bench/gpu_check.sh          # default folder: gpu_check_out
#     bash bench/gpu_check.sh --smoke                  # the plumbing on a CPU: each bench's tiny mode (minutes)
#
# Steps, in this order, each under its own time limit (and all under GPU_CHECK_BUDGET_S, 480 s by default: a step
# gets what is left when its turn comes), each failure or timeout recorded and the next step run:
#   train     bench_vs_gpt.py at 8x2048 and 2x8192: eager and the CUDA-graph step (--step, where the script has it)
#   scan      bench_scan.py --device cuda at (8, 2048, 1536, 16) and (4, 8192, 2048, 16): triton and chunked
#   generate  bench_generate.py --parts variants: batch 1 and 64, every step variant
#   compile   bench_generate.py --parts compile: batch 1 and 64, torch.compile + CUDA graph
#   profile   profile_train.py: one step of mamba-130m's shape at 8 x 2048, the top GPU operators
#   tests     pytest -m gpu, 4 pytest-xdist workers (else 3 shards at once; Triton's compiles use the CPU cores)
#   conv      bench_conv.py at both issue shapes
#   ssd       bench_ssd.py --gpu (not an issue figure: last)
# Writes to $OUT (7 files at most): gpu_check.json (figures by name, each step's status, the benches' own JSON),
# gpu_check.md (the issue's figures against required/target, then every figure), bench.log, tests.log,
# profile.log. The Markdown is printed last.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_check_out}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
TRAIN_STEPS=${GPU_CHECK_TRAIN_STEPS:-eager,graph}
PY=${PYTHON:-$(command -v python || command -v python3)}
SMOKE=0
case "${1:-}" in
    "") ;;
    --smoke) SMOKE=1 ;;
    *) echo "usage: [OUT=folder] bash bench/gpu_check.sh [--smoke]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
BENCH_LOG=$OUT/bench.log
TEST_LOG=$OUT/tests.log
PROFILE_LOG=$OUT/profile.log
: > "$BENCH_LOG"; : > "$TEST_LOG"; : > "$PROFILE_LOG"; : > "$WORK/steps.tsv"
START=$SECONDS

# step NAME CAP_S LOG COMMAND...: run COMMAND (or a shell function, which gets the limit as its first argument)
# under min(CAP_S, what is left of the budget), append its output to LOG and record how it ended.
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((BUDGET_S - (SECONDS - START)))
    local limit=$((cap < left - 5 ? cap : left - 5))
    if [ "$limit" -lt 20 ]; then
        echo "gpu_check: $name skipped, ${left} s of the budget left" | tee -a "$log"
        printf '%s\tskipped (budget)\t0\t%s\n' "$name" "$*" >> "$WORK/steps.tsv"
        return
    fi
    echo "gpu_check: $name (limit ${limit} s): $*"
    printf '\n===== %s (limit %s s): %s\n' "$name" "$limit" "$*" >> "$log"
    local t0=$SECONDS rc
    if declare -F "$1" > /dev/null; then
        "$@" "$limit" >> "$log" 2>&1
    else
        timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    fi
    rc=$?
    local status=ok
    case $rc in
        0) ;;
        124|137) status="timed out after ${limit} s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    echo "gpu_check: $name: $status in $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$*" >> "$WORK/steps.tsv"
}

# The GPU tests: 4 pytest-xdist workers where xdist imports, else 3 shards run at once, the ids dealt out in turn. Only the modules that mark GPU
# tests are collected (quicker; and test_data_corpus.py, which has none, needs pypdf, absent on a bare GPU machine).
gpu_tests() {
    local limit=$1 t0=$SECONDS
    local common=(-m gpu -q -p no:cacheprovider)
    mapfile -t modules < <(grep -l "pytest.mark.gpu" tests/test_*.py)
    timeout -k 5 60 "$PY" -m pytest "${common[@]}" --collect-only "${modules[@]}" > "$WORK/collect.txt" 2>&1
    mapfile -t ids < <(grep '::' "$WORK/collect.txt")
    local shard_limit=$((limit - (SECONDS - t0) - 15))
    [ "$shard_limit" -ge 20 ] || return 124
    if "$PY" -c "import xdist" 2> /dev/null; then
        # pytest-xdist: 4 workers share the tests as they go (on the H200, 2026-12-02: 132 tests in 154 s, where
        # 3 fixed shards had not finished in 178 s)
        echo "collected ${#ids[@]} GPU tests in $((SECONDS - t0)) s; pytest-xdist, 4 workers, ${shard_limit} s"
        timeout -k 10 "$shard_limit" "$PY" -m pytest "${common[@]}" -n 4 -rfE --durations=8 \
            --junitxml="$WORK/tests_0.xml" "${modules[@]}" 2>&1
        return $?
    fi
    echo "collected ${#ids[@]} GPU tests in $((SECONDS - t0)) s; 3 shards, ${shard_limit} s each"
    local n=3 pids=() i
    for ((i = 0; i < n; i++)); do
        local shard=()
        local j
        for ((j = i; j < ${#ids[@]}; j += n)); do shard+=("${ids[j]}"); done
        [ ${#shard[@]} -gt 0 ] || continue
        timeout -k 10 "$shard_limit" "$PY" -m pytest "${common[@]}" -rfE --durations=8 \
            --junitxml="$WORK/tests_$i.xml" "${shard[@]}" > "$WORK/tests_$i.log" 2>&1 &
        pids+=($!)
    done
    if [ ${#pids[@]} -eq 0 ]; then            # nothing collected: say why (the collection's own output)
        cat "$WORK/collect.txt"
        return 1
    fi
    local rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
    for ((i = 0; i < n; i++)); do
        [ -f "$WORK/tests_$i.log" ] && { echo "----- shard $i"; cat "$WORK/tests_$i.log"; }
    done
    return $rc
}

# what each bench is asked for: the issue's shapes on the GPU; with --smoke, each script's tiny CPU mode (the
# CUDA-only ones then fail at once, which checks that a failure is recorded and the check goes on)
train_args=(--shapes 8x2048,2x8192)
scan_args=(--device cuda --shapes 8x2048x1536x16,4x8192x2048x16 --backends triton,chunked)
generate_args=(--device cuda --repeat 2)
if [ "$SMOKE" = 1 ]; then
    TRAIN_STEPS=eager
    train_args=(--shapes 2x64 --device cpu --tiny --steps 2 --warmup 1)
    scan_args=(--device cpu --shapes 1x64x32x4 --backends chunked --repeat 1)
    generate_args=(--device cpu --quick --repeat 1)
fi
help=$("$PY" bench/bench_vs_gpt.py --help 2>&1)
[[ $help =~ --step[[:space:]] ]] && train_args+=(--step "$TRAIN_STEPS")     # (not --steps)
[[ $help =~ --json[[:space:]] ]] && train_args+=(--json "$WORK/train.json")

step train 150 "$BENCH_LOG" "$PY" bench/bench_vs_gpt.py "${train_args[@]}"
step scan 90 "$BENCH_LOG" "$PY" bench/bench_scan.py "${scan_args[@]}" --json "$WORK/scan.json"
step generate 120 "$BENCH_LOG" "$PY" bench/bench_generate.py "${generate_args[@]}" --parts variants \
    --out "$WORK/generate.json"
step compile 150 "$BENCH_LOG" "$PY" bench/bench_generate.py "${generate_args[@]}" --parts compile \
    --out "$WORK/generate_compile.json"
step profile 75 "$PROFILE_LOG" "$PY" bench/profile_train.py --model_size medium --batch 8 --seq_len 2048 \
    --rows 30 --json "$WORK/profile.json"
step tests 200 "$TEST_LOG" gpu_tests
step conv 60 "$BENCH_LOG" "$PY" bench/bench_conv.py --shapes 8x2048x1536x4,4x8192x2048x4 --out "$WORK/conv"
[ -f "$WORK/conv/bench_conv.json" ] && cp "$WORK/conv/bench_conv.json" "$WORK/conv.json"
step ssd 60 "$BENCH_LOG" "$PY" bench/bench_ssd.py --gpu --json "$WORK/ssd.json"

"$PY" bench/gpu_check_report.py --work "$WORK" --out "$OUT" --wall_s $((SECONDS - START)) \
    || echo "gpu_check: the report failed; the raw logs are in $OUT"
echo "gpu_check: $((SECONDS - START)) s in all; results in $OUT"
