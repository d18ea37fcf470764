"""The Trainer's CUDA-graph step on a GPU (issue 16): is it the eager step, and how much faster is it?

    python bench/check_graph_step.py --out "$OUT"          # ~1-2 minutes on an H200

1. Correctness, at a small shape (d_model 256 x 4 layers, 4 x 512 tokens x 2 micro-batches): three Trainers from
   the same seed on the same random tokens, eager, eager again, and --cuda_graph on, each 8 steps with a new lr
   every step (3 eager warm-up steps, then 5 replays of the captured step). Reported per precision and family: the
   largest loss and grad-norm differences from eager, and the largest weight difference from eager against eager's
   own run-to-run difference (the scan's backward adds with atomics). PASS as tests/test_graph_step.py asserts.
2. Speed, at mamba-130m's shape (medium preset, vocabulary 50,280, 8 x 2048, bf16, fused AdamW, grad clip): an eager
   and a graph Trainer taking turns step by step; Trainer.train_step's wall time (median), tokens/s, and each step's
   GPU busy time from torch.profiler (the sum of its kernels: wall - busy is the time the GPU waited for the CPU).

Writes check_graph_step.json and check_graph_step.md to --out; exits 1 if a correctness check fails.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.model_sizes import model_config  # noqa: E402
from models import build_model  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.distributed import DistInfo  # noqa: E402
from training.graph_step import WARMUP_STEPS  # noqa: E402
from training.precision import resolve_precision  # noqa: E402
from training.trainer import Trainer  # noqa: E402

LRS = [3e-3, 2.5e-3, 2e-3, 3e-3, 1e-3, 2e-3, 1.5e-3, 1e-3]     # 3 warm-up steps + 5 replays
SMALL = dict(d_model=256, n_layer=4)


def make_trainer(run_dir, vocab, model_size, model_overrides, family="mamba1", **settings):
    """A Trainer on random tokens (the same tokens and initial weights every time)."""
    cfg = TrainConfig(model_size=model_size, family=family, vram="cpu", warmup_steps=0, progress=False,
                      device="cuda", **settings).validate()
    rng = np.random.default_rng(0)
    data = types.SimpleNamespace(train_tokens=rng.integers(0, vocab, 4_000_000, dtype=np.uint16),
                                 val_tokens=rng.integers(0, vocab, 100_000, dtype=np.uint16))
    torch.manual_seed(0)
    model = build_model(model_config(model_size, vocab, family=family, **model_overrides))
    tokenizer = types.SimpleNamespace(vocab_size=vocab, save=lambda path: None)
    return Trainer(cfg, model, tokenizer, data, torch.device("cuda"), resolve_precision(cfg.precision,
                   torch.device("cuda")), DistInfo(), run_dir, log=print)


def correctness(runs: Path, precision: str, family: str) -> dict:
    overrides = {} if family == "hybrid" else SMALL          # the hybrid's tiny preset: its own layer pattern
    results = {}
    for name, mode in (("eager", "off"), ("again", "off"), ("graph", "on")):
        trainer = make_trainer(runs / f"{precision}-{family}-{name}", 1000, "tiny", overrides, family=family,
                               precision=precision, cuda_graph=mode, seq_len=512, micro_batch_size=4,
                               grad_accum_steps=2)
        steps = [trainer.train_step(lr) for lr in LRS]
        torch.cuda.synchronize()
        captured = trainer.captured is not None and trainer.captured.captured
        results[name] = (steps, [p.detach().clone() for p in trainer.raw_model.parameters()], captured)
        del trainer
    (eager, w_eager, _), (_, w_again, _), (graph, w_graph, captured) = (results[k] for k in ("eager", "again",
                                                                                              "graph"))
    loss_diff = max(abs(c[0] - a[0]) / abs(a[0]) for a, c in zip(eager, graph))
    norm_diff = max(abs(c[1] - a[1]) / abs(a[1]) for a, c in zip(eager, graph))
    noise = max((x - y).abs().max().item() for x, y in zip(w_eager, w_again))
    diff = max((x - y).abs().max().item() for x, y in zip(w_eager, w_graph))
    loss_tol = 1e-5 if precision == "fp32" else 2e-3
    ok = (captured and all(f for _, _, f in graph) and loss_diff <= loss_tol and norm_diff <= 10 * loss_tol
          and diff <= 4 * noise + (1e-5 if precision == "fp32" else 2e-4))
    row = dict(precision=precision, family=family, captured=captured, max_loss_rel_diff=loss_diff,
               max_grad_norm_rel_diff=norm_diff, max_weight_diff=diff, eager_vs_eager_weight_diff=noise,
               losses_eager=[round(s[0], 6) for s in eager], losses_graph=[round(s[0], 6) for s in graph],
               passed=bool(ok))
    print(json.dumps(row), flush=True)
    return row


def busy_ms(trainer, lr) -> float:
    """GPU time of one train_step: the sum of its kernels' durations (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        trainer.train_step(lr)
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000


def speed(runs: Path, steps: int) -> list[dict]:
    batch, seqlen = 8, 2048
    trainers = {mode: make_trainer(runs / f"speed-{mode}", 50280, "medium", {}, cuda_graph=mode, seq_len=seqlen,
                                   micro_batch_size=batch, grad_accum_steps=1, lr=1e-4)
                for mode in ("off", "on")}
    for trainer in trainers.values():
        for _ in range(WARMUP_STEPS + 2):           # warm-up, the capture, one replay
            trainer.train_step(1e-4)
    torch.cuda.synchronize()
    times = {mode: [] for mode in trainers}
    for _ in range(steps):
        for mode, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train_step(1e-4)                # ends in a device sync (loss and grad norm to the host)
            times[mode].append(time.perf_counter() - t0)
    rows = []
    for mode, trainer in trainers.items():
        ms = 1000 * statistics.median(times[mode])
        rows.append(dict(step="graph" if mode == "on" else "eager",
                         captured=trainer.captured is not None and trainer.captured.captured,
                         shape=f"{batch} x {seqlen}", ms_per_step=round(ms, 2),
                         tokens_per_s=round(batch * seqlen / ms * 1000), gpu_busy_ms=round(busy_ms(trainer, 1e-4), 2)))
        print(json.dumps(rows[-1]), flush=True)
    rows[1]["speedup_vs_eager"] = round(rows[0]["ms_per_step"] / rows[1]["ms_per_step"], 3)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".", help="folder for check_graph_step.json / .md")
    p.add_argument("--steps", type=int, default=10, help="timed steps per Trainer")
    p.add_argument("--families", default="mamba1,mamba2,hybrid", help="families checked at bf16 (mamba1 also fp32)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("check_graph_step.py needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:          # the Trainers' run directories (metrics.jsonl)
        runs = Path(tmp)
        checks = [correctness(runs, "fp32", "mamba1")]
        checks += [correctness(runs, "bf16", f) for f in args.families.split(",")]
        timing = speed(runs, args.steps)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, correctness=checks, speed=timing,
                  seconds=round(time.perf_counter() - start, 1))
    (out / "check_graph_step.json").write_text(json.dumps(result, indent=1))
    lines = [f"# CUDA-graph step: {result['device']}, torch {result['torch']}", "",
             "| precision | family | captured | max loss rel diff | max grad-norm rel diff | max weight diff | "
             "eager vs eager | result |", "|---|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {c['precision']} | {c['family']} | {c['captured']} | {c['max_loss_rel_diff']:.2e} | "
              f"{c['max_grad_norm_rel_diff']:.2e} | {c['max_weight_diff']:.2e} | {c['eager_vs_eager_weight_diff']:.2e} "
              f"| {'PASS' if c['passed'] else 'FAIL'} |" for c in checks]
    lines += ["", "| Trainer step, medium, 8 x 2048, bf16 | ms / step | tokens/s | GPU busy ms | speed-up |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['ms_per_step']} | {r['tokens_per_s']:,} | {r['gpu_busy_ms']} | "
              f"{r.get('speedup_vs_eager', 1.0)} |" for r in timing]
    (out / "check_graph_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if all(c["passed"] for c in checks) else 1)


if __name__ == "__main__":
    main()
