"""The CPU preset's training step under each OpenMP wait policy and thread count (utils/cpu_threads.py).

    python bench/bench_cpu_threads.py                   # PASSIVE (the scripts' default) vs ACTIVE, 1 and 2 threads
    python bench/bench_cpu_threads.py --steps 50 --repeats 3

Each configuration runs in a fresh Python (libgomp reads OMP_WAIT_POLICY once, when torch loads it): the tiny
model of `python train.py` on a 4,096-token vocabulary, 8 x 256 tokens, fp32, AdamW, random tokens; the median
over `repeats` processes of the mean step time after 3 warm-up steps, as wall and CPU time. On a quiet machine
PASSIVE should cost little against ACTIVE; under load from another process ACTIVE with 2 threads spins at every
barrier (measured on the shared 2-core machine, load ~11: 6.8 s per step against 0.59 s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from configs.model_sizes import model_config
from models import build_model
torch.set_num_threads({threads})
torch.manual_seed(0)
model = build_model(model_config("tiny", vocab_size=4096))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 4096, (8, 257))
def step():
    _, loss = model(x[:, :-1], targets=x[:, 1:], return_logits=False)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
wall, cpu = time.perf_counter(), time.process_time()
for _ in range({steps}):
    step()
print(json.dumps({{"wall": (time.perf_counter() - wall) / {steps}, "cpu": (time.process_time() - cpu) / {steps}}}))
"""


def run(policy: str, threads: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["OMP_WAIT_POLICY"] = policy
    code = CHILD.format(root=str(ROOT), threads=threads, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps per process")
    p.add_argument("--repeats", type=int, default=3, help="processes per configuration (the median is shown)")
    p.add_argument("--threads", default="1,2", help="thread counts to try")
    args = p.parse_args(argv)
    print(f"{'policy':<8} {'threads':>7} {'ms/step wall':>13} {'ms/step cpu':>12} {'tokens/s':>9}")
    for threads in map(int, args.threads.split(",")):
        for policy in ("PASSIVE", "ACTIVE"):
            runs = [run(policy, threads, args.steps) for _ in range(args.repeats)]
            wall = statistics.median(r["wall"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            print(f"{policy:<8} {threads:>7} {wall * 1e3:>13.1f} {cpu * 1e3:>12.1f} {8 * 256 / wall:>9,.0f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
