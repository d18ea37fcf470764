#!/usr/bin/env bash
# The README's evaluation figures (section Evaluation), reproduced from scratch; results go to $OUT (default
# eval_out/). Two phases, each well under 3 minutes on a 16-core machine:
#
#   bash bench/eval_readme.sh train      # `python train.py` (the CPU preset: the README's first run) and the same
#                                        # run as a transformer (--family hybrid --pattern transformer)
#   bash bench/eval_readme.sh evaluate   # bits per byte on the built-in corpus and loss by position (PNG), on the
#                                        # CPU as in the README; then the GPU path (CUDA-graph steps) and its tests
#
# The training runs use no GPU (CUDA_VISIBLE_DEVICES=""), so they are the CPU preset whatever the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-eval_out}"
mkdir -p "$OUT"
case "${1:-}" in
train)
    CUDA_VISIBLE_DEVICES="" python train.py --out_dir runs/eval-mamba --no-progress 2>&1 | tail -4 | tee "$OUT/train_mamba.txt"
    CUDA_VISIBLE_DEVICES="" python train.py --family hybrid --pattern transformer --out_dir runs/eval-gpt \
        --no-progress 2>&1 | tail -4 | tee "$OUT/train_gpt.txt"
    for run in eval-mamba eval-gpt; do               # the checkpoints come back too (about 2 MB each)
        mkdir -p "$OUT/$run" && cp -r "runs/$run/best" "runs/$run/metrics.jsonl" "$OUT/$run/"
    done
    ;;
evaluate)
    CUDA_VISIBLE_DEVICES="" python evaluate.py --checkpoint runs/eval-mamba runs/eval-gpt --by_position \
        --plot "$OUT/loss_by_position.png" --no_progress 2>&1 | tee "$OUT/evaluate_cpu.txt"
    CUDA_VISIBLE_DEVICES="" python evaluate.py --checkpoint runs/eval-mamba runs/eval-gpt --stride 128 --window 256 \
        --no_progress 2>&1 | tee "$OUT/evaluate_cpu_sliding.txt"
    if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        python evaluate.py --checkpoint runs/eval-mamba runs/eval-gpt --device cuda --max_documents 20 --json \
            --no_progress > "$OUT/evaluate_gpu_pass.json"
        python evaluate.py --checkpoint runs/eval-mamba runs/eval-gpt --device cuda --max_documents 20 --window 256 \
            --json --no_progress > "$OUT/evaluate_gpu_window256.json"
        python -m pytest -q -m gpu tests/test_evaluate.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
    fi
    ;;
*)
    echo "usage: bash bench/eval_readme.sh train|evaluate" >&2
    exit 2
    ;;
esac
