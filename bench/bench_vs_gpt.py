"""Our Mamba training step against a GPT-2-124M-shaped transformer, in one process, taking turns (issue 9).

    python bench/bench_vs_gpt.py                              # mamba-130m's shape, 8 x 2048 and 2 x 8192, bf16
    python bench/bench_vs_gpt.py --step graph                 # our step replayed as CUDA graphs (issue 16)
    python bench/bench_vs_gpt.py --step eager,graph,compile   # our three steps side by side, and the GPT
    python bench/bench_vs_gpt.py --compile                    # both models under torch.compile as well
    python bench/bench_vs_gpt.py --family mamba2 --shapes 8x2048   # mamba2-130m's shape (issue 12)
    python bench/bench_vs_gpt.py --device cpu --tiny          # a smoke test of this script on the CPU

The same step for both: fp32 weights, bf16 autocast (CUDA), fused AdamW (CUDA), an fp32 loss, one optimizer step per
batch; random tokens. Ours is models/lm.py ("M" * 24) at mamba-130m's shape (d_model 768 x 24 layers, d_state 16,
vocabulary 50,280) with every fused kernel the device has and the chunked loss (forward(..., return_logits=False)), as the
Trainer runs it; the GPT is bench/gpt_baseline.py (12 layers x 768, SDPA, plain fp32 cross-entropy over all logits).

--step picks how our step is launched (a comma-separated list measures several, each its own model, same weights):
    eager    op by op, as PyTorch runs it
    graph    training/graph_step.py's CapturedStep, what the Trainer runs on a GPU by default: after 3 eager steps,
             forward + backward as one CUDA graph replay and the AdamW step as another (capturable, lr a tensor)
    compile  torch.compile(mode="reduce-overhead"): inductor's kernels under torch.compile's own CUDA graphs
--compile adds a pass with both models under torch.compile's default mode (ours marked "compile (default)").

After warm-up the peers alternate step by step, so that clock and thermal drift hit all alike; medians are reported.
Peak memory is each peer's own: its weights and AdamW state, plus the most that one of its steps allocated above what
was allocated before it (for the graph step: its capture, whose memory the replays reuse). The ratio column is
ours / GPT in tokens/s (issue 9: >= 0.47 at 8 x 2048 and >= 0.63 at 2 x 8192 required; >= 0.70 and >= 0.95 the
target). --json FILE also writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from configs.model_sizes import model_config  # noqa: E402
from gpt_baseline import GPT, GPTConfig  # noqa: E402
from models import build_model  # noqa: E402
from training.graph_step import WARMUP_STEPS, CapturedStep  # noqa: E402

GIB = 2 ** 30
STEPS = ("eager", "graph", "compile")
LR = 1e-4


@dataclass
class Peer:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: object                    # step(x, y) -> the loss (a 0-d tensor)
    warmup: int                     # calls before timing
    times: list = field(default_factory=list)
    transient: int = 0              # bytes: the most one step allocated above what was allocated before it

    def resident_bytes(self) -> int:
        """Weights and AdamW state (the tied embedding/head counted once)."""
        tensors = list(self.model.parameters()) + [t for s in self.optimizer.state.values() for t in s.values()
                                                   if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer(model, device):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, fused=device.type == "cuda")


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def eager_step(loss_fn, optimizer, device, compile_mode=None):
    """forward, backward, AdamW, zero_grad; the forward under torch.compile(mode=compile_mode) if given."""
    forward = torch.compile(loss_fn, mode=compile_mode) if compile_mode else loss_fn

    def step(x, y):
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()    # a new step: its graphs may overwrite the last one's outputs
        with _autocast(device):
            loss = forward(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def graph_step(loss_fn, optimizer, device):
    """The same step as eager_step, WARMUP_STEPS calls eagerly (on the capture's side stream), then two replays per
    call. A new CapturedStep per shape (a graph replays one shape)."""
    def forward_backward(batches):
        ((x, y),) = batches
        with _autocast(device):
            loss = loss_fn(x, y)
        loss.backward()
        return (loss.detach(),)

    eager = eager_step(loss_fn, optimizer, device)
    captured = {}                   # shape -> [CapturedStep, eager calls so far]

    def step(x, y):
        key = tuple(x.shape)
        if key not in captured:
            for old, _ in captured.values():
                old.release()
            captured.clear()
            captured[key] = [CapturedStep(forward_backward, optimizer, device), 0]
        entry = captured[key]
        if entry[1] < WARMUP_STEPS:
            entry[1] += 1
            with entry[0].warmup():
                return eager(x, y)
        (loss,) = entry[0].forward_backward([(x, y)], LR)
        entry[0].optimizer_step()
        return loss
    return step


def make_peer(name, kind, build, loss_of, device, warmup) -> Peer:
    """kind: one of STEPS for ours, "compile (default)", or "eager" / "compile" for the GPT."""
    torch.manual_seed(0)
    model = build().to(device).train()
    optimizer = _optimizer(model, device)
    loss_fn = loss_of(model)
    if kind == "graph":
        return Peer(name, model, optimizer, graph_step(loss_fn, optimizer, device), max(warmup, WARMUP_STEPS + 1))
    mode = {"eager": None, "compile": "reduce-overhead", "compile (default)": "default"}[kind]
    return Peer(name, model, optimizer, eager_step(loss_fn, optimizer, device, mode), warmup)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_call(peer, x, y, device, measure_memory=True) -> float:
    """One step of `peer`; returns its wall time (the loss read back on the host, as a trainer does)."""
    cuda = device.type == "cuda"
    sync(device)
    before = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    peer.step(x, y).item()
    sync(device)
    elapsed = time.perf_counter() - t0
    if cuda and measure_memory:
        peer.transient = max(peer.transient, torch.cuda.max_memory_allocated() - before)
    return elapsed


def parse_steps(text: str) -> list[str]:
    kinds = [s.strip() for s in text.split(",") if s.strip()]
    bad = [k for k in kinds if k not in STEPS]
    if bad or not kinds:
        print(f"bench_vs_gpt.py: --step {text!r}: choose from {', '.join(STEPS)} (comma-separated)", file=sys.stderr)
        sys.exit(2)
    return kinds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8x2048,2x8192", help="batch x length, comma-separated")
    p.add_argument("--step", default="eager",
                   help=f"how our step runs: {', '.join(STEPS)}, or several, comma-separated")
    p.add_argument("--compile", action="store_true", help="also time both models under torch.compile (default mode)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models (a smoke test of this script)")
    p.add_argument("--family", default="mamba1", choices=["mamba1", "mamba2"],
                   help="ours: the medium preset of this family (mamba-130m's or mamba2-130m's shape)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    kinds = parse_steps(args.step)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_vs_gpt.py: no CUDA GPU here (use --device cpu --tiny for a smoke test)")
    if "graph" in kinds and device.type != "cuda":
        print("bench_vs_gpt.py: --step graph needs a CUDA device (CUDA graphs)", file=sys.stderr)
        sys.exit(2)
    vocab = 512 if args.tiny else 50280
    mamba_cfg = model_config("tiny" if args.tiny else "medium", vocab, family=args.family)
    gpt_cfg = GPTConfig(vocab_size=vocab, n_layer=2 if args.tiny else 12, n_head=4 if args.tiny else 12,
                        n_embd=64 if args.tiny else 768)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")

    def ours_loss(model):
        return lambda x, y: model(x, targets=y, return_logits=False)[1]

    passes = [(kinds, "eager")] + ([(["compile (default)"], "compile")] if args.compile else [])
    rows = []
    for our_kinds, gpt_kind in passes:
        peers = [make_peer(f"ours {k}", k, lambda: build_model(mamba_cfg), ours_loss, device, args.warmup)
                 for k in our_kinds]
        peers.append(make_peer(f"GPT {gpt_kind}", gpt_kind, lambda: GPT(gpt_cfg), lambda m: m, device, args.warmup))
        print(f"kernels: {peers[0].model.kernels_for(device)}; ours: {', '.join(our_kinds)}; GPT: {gpt_kind}",
              flush=True)
        for batch, seqlen in shapes:
            x = torch.randint(0, vocab, (batch, seqlen), device=device)
            y = torch.randint(0, vocab, (batch, seqlen), device=device)
            for peer in peers:
                peer.times, peer.transient = [], 0
                for i in range(peer.warmup):
                    # the first call also creates the AdamW state, which resident_bytes counts
                    timed_call(peer, x, y, device, measure_memory=i > 0)
            for _ in range(args.steps):
                for peer in peers:
                    peer.times.append(timed_call(peer, x, y, device))
            tps = {peer.name: batch * seqlen / statistics.median(peer.times) for peer in peers}
            peak = {peer.name: (peer.resident_bytes() + peer.transient) / GIB for peer in peers}
            gpt = peers[-1]
            for peer, kind in zip(peers[:-1], our_kinds):
                row = dict(shape=f"{batch} x {seqlen}", ours=kind, gpt=gpt_kind,
                           ours_tokens_per_s=round(tps[peer.name]), gpt_tokens_per_s=round(tps[gpt.name]),
                           ratio=round(tps[peer.name] / tps[gpt.name], 3),
                           ours_ms=round(1000 * statistics.median(peer.times), 2),
                           ours_peak_gib=round(peak[peer.name], 2), gpt_peak_gib=round(peak[gpt.name], 2))
                rows.append(row)
                print("  {shape} ours {ours}: {ours_tokens_per_s:,} tok/s ({ours_ms} ms), GPT {gpt}: "
                      "{gpt_tokens_per_s:,} tok/s, ratio {ratio:.2f}, peak ours {ours_peak_gib:.1f} GiB, "
                      "GPT {gpt_peak_gib:.1f} GiB".format(**row), flush=True)
        del peers
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| batch x length | ours | GPT | ours tokens/s | GPT tokens/s | ours / GPT | ours peak GiB | "
          "GPT peak GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['ours']} | {r['gpt']} | {r['ours_tokens_per_s']:,} | {r['gpt_tokens_per_s']:,} | "
              f"{r['ratio']:.2f} | {r['ours_peak_gib']:.1f} | {r['gpt_peak_gib']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda"
                                               else "cpu", "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
