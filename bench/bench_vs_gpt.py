"""Our Mamba training step against a GPT-2-124M-shaped transformer, in one process, taking turns (issue 9).

    python bench/bench_vs_gpt.py                              # mamba-130m's shape, 8 x 2048 and 2 x 8192, bf16
    python bench/bench_vs_gpt.py --compile                    # both models under torch.compile as well
    python bench/bench_vs_gpt.py --family mamba2 --shapes 8x2048   # mamba2-130m's shape (issue 12)
    python bench/bench_vs_gpt.py --device cpu --tiny          # a smoke test of this script on the CPU

The same step for both: fp32 weights, bf16 autocast (CUDA), fused AdamW (CUDA), an fp32 loss, one optimizer step per
batch; random tokens. Ours is models/mamba.py at mamba-130m's shape (d_model 768 x 24 layers, d_state 16, vocabulary
50,280) with every fused kernel the device has and the chunked loss (forward(..., return_logits=False)), as the
Trainer runs it; the GPT is bench/gpt_baseline.py (12 layers x 768, SDPA, plain fp32 cross-entropy over all logits).
After warm-up the two alternate step by step, so that clock and thermal drift hit both alike; medians are reported.
Peak memory is each model's own: the maximum allocated during its steps, less the other model's resident weights and
optimizer state. The ratio column is ours / GPT in tokens/s (issue 9: >= 0.47 at 8 x 2048 and >= 0.63 at 2 x 8192
required; >= 0.70 and >= 0.95 the target).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from configs.model_sizes import model_config  # noqa: E402
from gpt_baseline import GPT, GPTConfig  # noqa: E402
from models import build_model  # noqa: E402

GIB = 2 ** 30


def make_step(model, loss_fn, device, compile_model):
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    forward = torch.compile(loss_fn) if compile_model else loss_fn
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(x, y):
        with autocast:
            loss = forward(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def allocated(device):
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8x2048,2x8192", help="batch x length, comma-separated")
    p.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models (a smoke test of this script)")
    p.add_argument("--family", default="mamba1", choices=["mamba1", "mamba2"],
                   help="ours: the medium preset of this family (mamba-130m's or mamba2-130m's shape)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_vs_gpt.py: no CUDA GPU here (use --device cpu --tiny for a smoke test)")
    vocab = 512 if args.tiny else 50280
    mamba_cfg = model_config("tiny" if args.tiny else "medium", vocab, family=args.family)
    gpt_cfg = GPTConfig(vocab_size=vocab, n_layer=2 if args.tiny else 12, n_head=4 if args.tiny else 12,
                        n_embd=64 if args.tiny else 768)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        torch.manual_seed(0)
        base = allocated(device)
        mamba = build_model(mamba_cfg).to(device).train()
        mamba_step = make_step(mamba, lambda x, y: mamba(x, targets=y, return_logits=False)[1], device, compiled)
        gpt = GPT(gpt_cfg).to(device).train()
        gpt_step = make_step(gpt, gpt, device, compiled)
        print(f"kernels: {mamba.kernels_for(device)}; compile: {compiled}", flush=True)
        for batch, seqlen in shapes:
            x = torch.randint(0, vocab, (batch, seqlen), device=device)
            y = torch.randint(0, vocab, (batch, seqlen), device=device)
            resident = {}
            for name, step in (("mamba", mamba_step), ("gpt", gpt_step)):
                for _ in range(args.warmup):
                    step(x, y)
                sync(device)
                resident[name] = allocated(device)
            # each model's resident state: what stays allocated after its steps, less what was there before it
            own = {"mamba": resident["mamba"] - base, "gpt": resident["gpt"] - resident["mamba"]}
            times = {"mamba": [], "gpt": []}
            peaks = {"mamba": 0, "gpt": 0}
            for _ in range(args.steps):
                for name, step in (("mamba", mamba_step), ("gpt", gpt_step)):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    sync(device)
                    t0 = time.perf_counter()
                    step(x, y).item()
                    sync(device)
                    times[name].append(time.perf_counter() - t0)
                    if device.type == "cuda":
                        other = own["gpt" if name == "mamba" else "mamba"]
                        peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - other - base)
            tps = {n: batch * seqlen / statistics.median(t) for n, t in times.items()}
            row = (f"{batch} x {seqlen}", compiled, tps["mamba"], tps["gpt"], tps["mamba"] / tps["gpt"],
                   peaks["mamba"] / GIB, peaks["gpt"] / GIB)
            rows.append(row)
            print("  %s compile=%s: ours %.0f tok/s, GPT %.0f tok/s, ratio %.2f, peak ours %.1f GiB, GPT %.1f GiB"
                  % row, flush=True)
        del mamba, gpt, mamba_step, gpt_step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| batch x length | compile | ours tokens/s | GPT tokens/s | ours / GPT | ours peak GiB | GPT peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape, compiled, ours, gpt, ratio, pm, pg in rows:
        print(f"| {shape} | {'yes' if compiled else 'no'} | {ours:,.0f} | {gpt:,.0f} | {ratio:.2f} | {pm:.1f} | {pg:.1f} |")


if __name__ == "__main__":
    main()
