"""Where a training step's GPU time goes: torch.profiler over forward + backward + AdamW of a Mamba LM.

    python bench/profile_train.py --model_size medium --batch 8 --seq_len 2048 [--compile] [--json PATH]

Prints the operators with the most CUDA time (self), and the step's median time and tokens/s. Random tokens.
--json also writes the step's figures, the profiled step's total GPU (self) time and the top operators.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.model_sizes import DEFAULT_VOCAB_SIZE, model_config  # noqa: E402
from models import LanguageModel  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_size", default="medium")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--backend", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--json", default=None, help="also write the figures and the top operators to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_train.py needs a CUDA GPU (it profiles CUDA time)")

    device = torch.device("cuda")
    model = LanguageModel(model_config(args.model_size, DEFAULT_VOCAB_SIZE, scan_backend=args.backend)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model) if args.compile else model
    x = torch.randint(0, DEFAULT_VOCAB_SIZE, (args.batch, args.seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    print(f"{args.model_size} b{args.batch} l{args.seq_len} compile={args.compile}: {ms:.1f} ms/step, "
          f"{args.batch * args.seq_len / ms * 1e3:,.0f} tokens/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.json:
        # self times add up to the GPU's busy time in the profiled step (the rest of ms_per_step it waited)
        ops = sorted(averages, key=lambda e: -e.self_device_time_total)
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "model_size": args.model_size,
            "batch": args.batch, "seq_len": args.seq_len, "compile": args.compile, "ms_per_step": ms,
            "tokens_per_s": args.batch * args.seq_len / ms * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "gpu_ms": sum(e.self_device_time_total for e in averages) / 1e3,
            "top": [dict(name=e.key[:80], calls=e.count, self_ms=e.self_device_time_total / 1e3)
                    for e in ops[:args.rows]]}, indent=1))


if __name__ == "__main__":
    main()
