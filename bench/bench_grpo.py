"""Sampled tokens per second during GRPO, and what the rest of a GRPO step costs.

    python bench/bench_grpo.py --json grpo.json        # GPU: mamba-130m's shape (medium, vocab 50280), 8 prompts x
                                                       # group 8 = 64 rows, prompt 128, 256 new tokens
    python bench/bench_grpo.py --smoke                 # CPU: a tiny shape, to check the script runs (seconds)

What --task grpo does per sampled batch, timed part by part on random weights (training/grpo.py):
  * sampling: the policy in eval mode, the batched Decoder (inference/decoder.py; a CUDA graph on a GPU), one
    parallel prefill of the left-padded prompts then one step per token, temperature 1, no end-of-text stop (every
    row makes all new tokens): sampled tokens/s = rows x new tokens / seconds. The policy's weights stay fp32 as in
    training (the Trainer's autocast covers the loss only).
  * reference: the frozen reference's token log-probs of prompt + completion (kl_beta > 0), under the run's autocast.
  * train: token log-probs of the policy, the clipped surrogate + KL, backward, AdamW step.
Each part is run `--repeats` times after one warm-up; the medians are reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs.model_sizes import model_config  # noqa: E402
from inference.decoder import Decoder  # noqa: E402
from models import build_model  # noqa: E402
from models.sampling import SamplingParams  # noqa: E402
from training.grpo import IGNORE, group_advantages, grpo_loss, token_logps  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int):
    fn()                                    # warm-up (and, for sampling, the CUDA graph capture)
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = model_config(args.model_size, vocab_size=args.vocab_size)
    policy = build_model(config).to(device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    rows = args.prompts * args.group
    def autocast():      # what the Trainer's precision gives: bf16 on a GPU, fp32 on the CPU
        return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    prompts = torch.randint(0, config.vocab_size, (rows, args.prompt_len), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    params = SamplingParams(temperature=1.0)

    policy.eval()
    decoder = Decoder(policy, rows, max_length=args.prompt_len + args.new_tokens)

    @torch.no_grad()
    def sample():
        new = list(decoder.generate(prompts, args.new_tokens, params, generator=generator))
        return torch.stack(new, dim=1)                                   # (rows, new_tokens)

    sample_s, completions = timed(sample, device, args.repeats)
    policy.train()
    x = torch.cat([prompts, completions], dim=1)[:, :-1]                 # (rows, L)
    y = torch.cat([prompts, completions], dim=1)[:, 1:].clone()
    y[:, :args.prompt_len - 1] = IGNORE                                  # the completion tokens only
    advantages, _ = group_advantages(torch.randn(rows, device=device), args.group)

    @torch.no_grad()
    def reference_logps():
        with autocast():
            return token_logps(reference, x, y)

    ref_s, ref = timed(reference_logps, device, args.repeats)

    def train():
        with autocast():
            logps = token_logps(policy, x, y)
        loss, _, _ = grpo_loss(logps, logps.detach(), ref, advantages, y != IGNORE, 0.2, 0.04)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_s, _ = timed(train, device, args.repeats)
    step_s = sample_s + ref_s + train_s
    sampled = rows * args.new_tokens
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model_size": args.model_size, "parameters": policy.num_parameters(), "vocab_size": config.vocab_size,
        "prompts": args.prompts, "group": args.group, "rows": rows, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "cuda_graph": decoder.cuda_graph,
        "sample_s": round(sample_s, 4), "sampled_tokens_per_s": round(sampled / sample_s, 1),
        "reference_s": round(ref_s, 4), "train_s": round(train_s, 4), "step_s": round(step_s, 4),
        "sampling_share": round(sample_s / step_s, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, few tokens: checks the script runs")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--model_size", default="medium")
    p.add_argument("--vocab_size", type=int, default=50277)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args()
    if args.smoke:
        args.device = args.device or "cpu"
        args.model_size, args.vocab_size, args.prompts, args.group = "tiny", 300, 2, 4
        args.prompt_len, args.new_tokens, args.repeats = 16, 8, 1
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run(args)
    print(json.dumps(result))
    print(f"\n{result['model_size']} ({result['parameters']:,} parameters) on {result['device']}: "
          f"{result['rows']} rows ({result['prompts']} prompts x group {result['group']}), prompt "
          f"{result['prompt_len']}, {result['new_tokens']} new tokens\n"
          f"  sampling   {result['sample_s']:.3f} s  = {result['sampled_tokens_per_s']:,.0f} sampled tokens/s "
          f"({'CUDA graph' if result['cuda_graph'] else 'eager'})\n"
          f"  reference  {result['reference_s']:.3f} s\n"
          f"  train      {result['train_s']:.3f} s   (log-probs, loss, backward, AdamW)\n"
          f"  step       {result['step_s']:.3f} s   sampling {100 * result['sampling_share']:.0f}% of it")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
