"""SFT with --pack against padded rows: useful (non-padding) tokens per second, on chat-like lengths.

    python bench/bench_sft_packing.py                    # CUDA, bf16 autocast, mamba-130m's shape, seq_len 2048
    python bench/bench_sft_packing.py --json sft.json    # ... and the rows as JSON
    python bench/bench_sft_packing.py --smoke            # a tiny CPU run of the same table, to check the script;
                                                         # its times mean nothing

The examples are random tokens with lengths drawn log-uniformly from 32 to seq_len (a realistic chat spread, issue
22), the first half of each a prompt (-100 targets), the rest the answer. Each layout trains the same model from
the same weights with its own objective (training/objectives.py): padded, micro_batch_size examples per batch, each
batch padded to its longest; packed, micro_batch_size rows of seq_len by first-fit decreasing (utils/packing.py).
A step is forward, backward and AdamW on one micro-batch; useful tokens are the examples' positions (padding left
out), and a step's time is taken to a device sync. Medians over the timed steps after a warm-up.
The packed layout needs a model that reads seq_idx (issue 22, item 1).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import LanguageModel, MambaConfig  # noqa: E402
from training.objectives import PackedSFTObjective, SFTObjective  # noqa: E402
from utils.finetune_data import SFTExample, TaskData  # noqa: E402
from utils.packing import IGNORE, example_length  # noqa: E402

GPU = dict(d_model=768, n_layer=24, vocab_size=50280, seq_len=2048, micro_batch_size=8, examples=4000)
SMOKE = dict(d_model=32, n_layer=2, vocab_size=256, seq_len=128, micro_batch_size=4, examples=200)


def chat_examples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[SFTExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(math.exp(rng.uniform(math.log(32), math.log(seq_len)))) + 1      # inputs + the last target
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        prompt = length // 2
        out.append(SFTExample(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def run(layout: str, objective, model_state, shape, device, args) -> dict:
    model = LanguageModel(MambaConfig(d_model=shape["d_model"], n_layer=shape["n_layer"],
                                      vocab_size=shape["vocab_size"], scan_backend=args.scan_backend))
    model.load_state_dict(model_state)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, useful, positions = [], [], []
    for step in range(args.warmup + args.steps):
        items = [objective.train[i] for i in objective.sampler.next_indices()]
        batch = tuple(t.to(device) for t in objective.collate(items))
        examples = [e for item in items for e in (item if layout == "packed" else [item])]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss, _ = objective.loss(model, batch)
        (loss / objective.count(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            useful.append(sum(example_length(e, shape["seq_len"]) for e in examples))
            positions.append(batch[0].numel())
    seconds = statistics.median(times)
    return {"layout": layout, "batch": f"{shape['micro_batch_size']} x up to {shape['seq_len']}",
            "ms_per_step": round(1000 * seconds, 1),
            "useful_tokens_per_s": round(statistics.median(u / t for u, t in zip(useful, times))),
            "useful_share": round(sum(useful) / sum(positions), 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--scan_backend", default="auto")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    shape = SMOKE if args.smoke else GPU
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 3), 1
    device = torch.device("cpu" if args.smoke else "cuda")
    examples = chat_examples(shape["examples"], shape["seq_len"], shape["vocab_size"])
    data = TaskData("sft", examples, [], report=None)
    common = dict(batch_size=shape["micro_batch_size"], pad_id=0, seed=0)
    torch.manual_seed(0)
    state = LanguageModel(MambaConfig(d_model=shape["d_model"], n_layer=shape["n_layer"],
                                      vocab_size=shape["vocab_size"])).state_dict()
    rows = [run("padded", SFTObjective(data, **common), state, shape, device, args),
            run("packed", PackedSFTObjective(data, seq_len=shape["seq_len"], **common), state, shape, device, args)]
    rows[1]["x_padded"] = round(rows[1]["useful_tokens_per_s"] / rows[0]["useful_tokens_per_s"], 2)
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
