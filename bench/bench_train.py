"""Training benchmarks on a GPU: the memory of every (model_size, vram) preset, and medium's tokens/s.

    python bench/bench_train.py presets [--sizes tiny small medium large] [--vrams 8gb ... 48gb]
    python bench/bench_train.py speed --model_size medium --seq_len 2048 --micro_batch_size 8 --backends chunked triton

presets: for each combination, the process is capped at the card's size with
torch.cuda.set_per_process_memory_fraction (standing in for a smaller GPU), the start-up fit check is applied
exactly as train.py applies it, and two real optimizer steps of the Trainer run (forward, backward, clipping,
fused AdamW; accumulation cut to 2 micro-batches, which does not change the peak). Reports the peak allocated
and reserved memory against the budget, and whether the Trainer had to fall back (halve the micro-batch).
speed: tokens/s of Trainer.train_step at a fixed layout, per scan backend, median of the timed steps (the step
replayed as CUDA graphs where the Trainer does so, --cuda_graph auto; off for the eager step).
The token stream is random (memory and speed do not depend on the text).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.model_sizes import DEFAULT_VOCAB_SIZE, MODEL_SIZES, count_parameters, model_config  # noqa: E402
from configs.vram import VRAM_CHOICES  # noqa: E402
from models import LanguageModel  # noqa: E402
from training.config import resolve_config  # noqa: E402
from training.distributed import DistInfo  # noqa: E402
from training.graph_step import WARMUP_STEPS  # noqa: E402
from training.memory import GIB, budget_bytes, fit_layout  # noqa: E402
from training.precision import resolve_precision  # noqa: E402
from training.trainer import Trainer  # noqa: E402


class _Tok:
    vocab_size = DEFAULT_VOCAB_SIZE

    def save(self, path):
        pass


def _data(n_tokens=2_000_000):
    rng = np.random.default_rng(0)
    return types.SimpleNamespace(train_tokens=rng.integers(0, DEFAULT_VOCAB_SIZE, n_tokens, dtype=np.uint16),
                                 val_tokens=rng.integers(0, DEFAULT_VOCAB_SIZE, 100_000, dtype=np.uint16))


def _reset():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _trainer(cfg, backend, data, device, run_dir):
    mc = model_config(cfg.model_size, DEFAULT_VOCAB_SIZE, scan_backend=backend)
    model = LanguageModel(mc)
    precision = resolve_precision(cfg.precision, device)
    return Trainer(cfg, model, _Tok(), data, device, precision, DistInfo(), run_dir, log=print)


def presets(args):
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    data = _data()
    rows = []
    for size in args.sizes:
        mc = model_config(size, DEFAULT_VOCAB_SIZE)
        n_params = count_parameters(mc)
        for vram in args.vrams:
            cap = int(vram[:-2]) * GIB
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
            cfg = resolve_config({"model_size": size, "vram": vram, "progress": False, "scan_backend": args.backend},
                                 device_type="cuda", total_memory_bytes=total)
            budget = budget_bytes(vram, cap)
            micro, accum, fit_ckpt, est, notes = fit_layout(mc, n_params, cfg.micro_batch_size, cfg.grad_accum_steps,
                                                      cfg.seq_len, cfg.gradient_checkpointing, "bf16", budget)
            row = {"model_size": size, "vram": vram, "params": n_params, "preset_micro": cfg.micro_batch_size,
                   "micro": micro, "accum": accum, "seq_len": cfg.seq_len, "checkpointing": fit_ckpt,
                   "estimate_gib": round(est.total / GIB, 2), "budget_gib": round(budget / GIB, 2)}
            if args.raw:             # measure the preset as written, before the fit check adjusts it
                micro, gc_on = cfg.micro_batch_size, cfg.gradient_checkpointing
                row.update(micro=micro, checkpointing=gc_on)
            else:
                gc_on = fit_ckpt
            if est.total > budget and not args.raw:
                row.update(status="refused at start-up")
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            cfg = dataclasses.replace(cfg, micro_batch_size=micro, grad_accum_steps=2, gradient_checkpointing=gc_on)
            _reset()
            trainer = None
            try:
                trainer = _trainer(cfg, args.backend, data, device, Path(args.out) / f"{size}-{vram}")
                t0 = time.perf_counter()
                for _ in range(2):
                    trainer.train_step(1e-4)
                torch.cuda.synchronize()
                row.update(status="ok" if trainer.micro_split == micro else f"fell back to micro {trainer.micro_split}",
                           peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                           peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2),
                           backend=trainer.raw_model.scan_backend_for(device),
                           s_per_2_steps=round(time.perf_counter() - t0, 2))
            except Exception as err:   # a benchmark row records the failure and goes on to the next
                row.update(status=f"FAILED: {type(err).__name__}: {str(err)[:120]}")
            del trainer
            rows.append(row)
            print(json.dumps(row), flush=True)
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    print("\n| model | vram | micro x accum (preset) | ckpt | estimate GiB | peak alloc GiB | peak reserved GiB "
          "| budget GiB | status |")
    print("|---|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model_size']} | {r['vram']} | {r['micro']} x {r['accum']} ({r['preset_micro']}) | "
              f"{'yes' if r['checkpointing'] else 'no'} | {r['estimate_gib']} | {r.get('peak_alloc_gib', '-')} | "
              f"{r.get('peak_reserved_gib', '-')} | {r['budget_gib']} | {r['status']} |")
    return rows


def speed(args):
    device = torch.device("cuda", torch.cuda.current_device())
    data = _data(4_000_000)
    out = []
    for backend in args.backends:
        for ckpt_on in args.checkpointing:
            cfg = resolve_config({"model_size": args.model_size, "vram": "48gb", "progress": False,
                                  "micro_batch_size": args.micro_batch_size, "grad_accum_steps": 1,
                                  "seq_len": args.seq_len, "gradient_checkpointing": ckpt_on, "scan_backend": backend,
                                  "compile": args.compile, "cuda_graph": args.cuda_graph},
                                 device_type="cuda",
                                 total_memory_bytes=torch.cuda.get_device_properties(device).total_memory)
            _reset()
            trainer = _trainer(cfg, backend, data, device, Path(args.out) / f"speed-{backend}")
            graph = trainer.captured is not None
            for _ in range(args.warmup + (WARMUP_STEPS if graph else 0)):   # the graphs: eager steps, then capture
                trainer.train_step(1e-4)
            torch.cuda.synchronize()
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                trainer.train_step(1e-4)          # ends in a device sync (loss and grad norm to the host)
                times.append(time.perf_counter() - t0)
            tokens = cfg.micro_batch_size * cfg.seq_len
            row = {"model_size": args.model_size, "backend": backend, "checkpointing": ckpt_on,
                   "batch": f"{cfg.micro_batch_size}x{cfg.seq_len}",
                   "step": "graph" if graph and trainer.captured is not None else "eager",
                   "tokens_per_s": round(tokens / statistics.median(times)),
                   "ms_per_step": round(1000 * statistics.median(times), 1),
                   "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)}
            out.append(row)
            print(json.dumps(row), flush=True)
            del trainer
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("presets")
    a.add_argument("--sizes", nargs="+", default=list(MODEL_SIZES))
    a.add_argument("--vrams", nargs="+", default=list(VRAM_CHOICES))
    a.add_argument("--backend", default="auto")
    a.add_argument("--raw", action="store_true", help="measure the presets as written (no fit adjustment)")
    a.add_argument("--out", default="/tmp/bench_train")
    b = sub.add_parser("speed")
    b.add_argument("--model_size", default="medium")
    b.add_argument("--seq_len", type=int, default=2048)
    b.add_argument("--micro_batch_size", type=int, default=8)
    b.add_argument("--backends", nargs="+", default=["chunked", "triton"])
    b.add_argument("--checkpointing", nargs="+", type=lambda s: s == "1", default=[False])
    b.add_argument("--compile", action="store_true")
    b.add_argument("--cuda_graph", default="auto", choices=["auto", "on", "off"],
                   help="the Trainer's CUDA-graph step (training/graph_step.py)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--out", default="/tmp/bench_train")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    presets(args) if args.cmd == "presets" else speed(args)


if __name__ == "__main__":
    main()
