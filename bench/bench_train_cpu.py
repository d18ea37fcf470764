"""CPU training speed: tokens/s of one full step (forward, backward, AdamW) per scan backend, side by side.

    python bench/bench_train_cpu.py                       # the ANCHORS.md configuration
    python bench/bench_train_cpu.py --profile             # also print torch.profiler's top ops for one step

Defaults are the configuration of ../shared/ANCHORS.md's pure-PyTorch CPU peers: a Mamba LM of d_model 256 x 4
layers, d_state 16, vocabulary 8192, batch 4 x 512 tokens, fp32, 2 threads, median of 3 steps after one warm-up
step. "ref" is left out by default (it is the spec, not a training path); add it with --backends.
On a machine shared with other jobs the 2-thread figures swing widely (every parallel op waits for both threads);
compare backends in one run, at a quiet time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import available_backends  # noqa: E402
from models import MambaConfig, LanguageModel  # noqa: E402


def train_step(model, optimizer, x, y):
    _, loss = model(x, targets=y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--d_state", type=int, default=16)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median), after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default=None,
                        help="comma-separated scan backends (default: every CPU backend except ref)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops for one step")
    args = parser.parse_args(argv)

    allowed = available_backends("cpu")
    backends = args.backends.split(",") if args.backends else [b for b in allowed if b not in ("ref", "triton")]
    unknown = [b for b in backends if b not in allowed]
    if unknown:
        parser.error(f"backend(s) {', '.join(unknown)} cannot run on the CPU; allowed: {', '.join(allowed)}")
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    torch.set_num_threads(args.threads)

    tokens = args.batch_size * args.seq_len
    print(f"CPU train step, {args.threads} threads, torch {torch.__version__}: d_model {args.d_model} x "
          f"{args.n_layer} layers, d_state {args.d_state}, vocab {args.vocab_size}, batch {args.batch_size} x "
          f"{args.seq_len}, fp32, AdamW")
    print(f"{'backend':>8} {'step s (median)':>16} {'tokens/s':>10}   steps (s)")
    for backend in backends:
        torch.manual_seed(0)
        config = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab_size,
                             d_state=args.d_state, scan_backend=backend)
        model = LanguageModel(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        data = torch.randint(0, args.vocab_size, (args.steps + 1, args.batch_size, args.seq_len + 1), generator=gen)
        train_step(model, optimizer, data[0, :, :-1], data[0, :, 1:])                     # warm-up
        times = []
        for i in range(1, args.steps + 1):
            start = time.perf_counter()
            train_step(model, optimizer, data[i, :, :-1], data[i, :, 1:])
            times.append(time.perf_counter() - start)
        step = statistics.median(times)
        print(f"{backend:>8} {step:>16.3f} {tokens / step:>10.0f}   {' '.join(f'{t:.3f}' for t in times)}",
              flush=True)
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                train_step(model, optimizer, data[1, :, :-1], data[1, :, 1:])
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
