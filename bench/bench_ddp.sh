#!/usr/bin/env bash
# DDP scaling of train.py: tokens/s of the same run on 1 and on N GPUs (torchrun), medium at seq_len 2048.
#   bash bench/bench_ddp.sh [N=2] [OUT_DIR=/tmp/bench_ddp]
# Each process keeps the preset's tokens per optimizer step, so N GPUs do N times the tokens per step.
# Reported: the median tokens/s (all ranks) over steps 3..max from metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-2}"
OUT="${2:-/tmp/bench_ddp}"
mkdir -p "$OUT"
common=(--model_size medium --vram 48gb --max_steps 10 --warmup_steps 2 --eval_interval 1000
        --checkpoint_interval 1000 --log_interval 1 --no-progress --cache_dir "$OUT/cache")
for n in 1 "$N"; do
    rm -rf "$OUT/run$n"
    torchrun --standalone --nproc_per_node="$n" train.py "${common[@]}" --out_dir "$OUT/run$n" > "$OUT/train$n.log" 2>&1
    python - "$OUT/run$n/metrics.jsonl" "$n" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
tps = [r["tokens_per_s"] for r in rows if r["step"] >= 3]
print(f"GPUs {sys.argv[2]}: median {statistics.median(tps):,.0f} tokens/s over steps 3-{rows[-1]['step']}, "
      f"final loss {rows[-1]['loss']:.3f}")
PY
done
