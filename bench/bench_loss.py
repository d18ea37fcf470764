"""The LM-head loss, plain (all logits, then F.cross_entropy) against chunked (kernels/loss.py), side by side:
time of forward + backward and the peak memory the step adds on top of its inputs.

    python bench/bench_loss.py                       # CUDA: 8 x 2048 tokens, d 768, V 50280, bf16 autocast
    python bench/bench_loss.py --device cpu          # CPU: 4 x 512 tokens, d 256, V 8192, fp32
    python bench/bench_loss.py --tokens 4096 --vocab 32000 --chunk-tokens 2048

CUDA memory is torch.cuda.max_memory_allocated() minus what was allocated before the step. On the CPU each variant
runs in a fresh subprocess and the figure is the growth of the process's peak RSS during the step (glibc returns
large blocks to the system when freed, so RSS follows live tensors closely). Times are medians of --repeats steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.loss import default_chunk_tokens, linear_cross_entropy  # noqa: E402

DEFAULTS = {"cuda": dict(batch=8, seqlen=2048, d=768, vocab=50280, dtype="bf16"),
            "cpu": dict(batch=4, seqlen=512, d=256, vocab=8192, dtype="fp32")}


def make_inputs(args, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.seqlen, args.d, generator=g).to(device).requires_grad_()
    weight = (torch.randn(args.vocab, args.d, generator=g) * 0.02).to(device).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.batch, args.seqlen), generator=g).to(device)
    return hidden, weight, targets


def step(hidden, weight, targets, chunk_tokens, autocast_dtype):
    hidden.grad = weight.grad = None
    with torch.autocast(hidden.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk_tokens)
    loss.backward()
    return loss


def measure(args, chunk_tokens, device):
    """(median seconds, peak bytes added, loss) of one forward + backward."""
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    hidden, weight, targets = make_inputs(args, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    loss = step(hidden, weight, targets, chunk_tokens, autocast_dtype)          # warm-up (and the memory figure)
    sync()
    hidden.grad = weight.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(hidden, weight, targets, chunk_tokens, autocast_dtype)
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = None                                                              # measured by the parent (RSS)
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        step(hidden, weight, targets, chunk_tokens, autocast_dtype)
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], peak, loss.item()


def cpu_child(args, chunk_tokens):
    """Run one variant in a fresh process; its peak-RSS growth during the first step is the memory figure."""
    torch.set_num_threads(args.threads)
    hidden, weight, targets = make_inputs(args, "cpu")
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    # a tiny step first, so that one-off set-up (thread pools, BLAS buffers) is not counted
    tiny = argparse.Namespace(**{**vars(args), "batch": 1, "seqlen": 8, "vocab": 64})
    step(*make_inputs(tiny, "cpu"), chunk_tokens, autocast_dtype)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(hidden, weight, targets, chunk_tokens, autocast_dtype)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024    # ru_maxrss is in KiB on Linux
    del hidden, weight, targets
    seconds, _, loss = measure(args, chunk_tokens, "cpu")
    print(json.dumps(dict(seconds=seconds, peak=peak, loss=loss)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seqlen", type=int)
    parser.add_argument("--d", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="fp32, or autocast to bf16 / fp16")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="chunk size (default: kernels/loss.py's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    if args.child is not None:
        return cpu_child(args, args.child)
    chunk = args.chunk_tokens if args.chunk_tokens is not None else default_chunk_tokens(args.vocab, args.device)
    tokens = args.batch * args.seqlen
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"linear cross-entropy, {where}, torch {torch.__version__}: {args.batch} x {args.seqlen} tokens, "
          f"d {args.d}, V {args.vocab}, {args.dtype}; chunk {chunk} tokens ({-(-tokens // chunk)} chunks)")
    rows = {}
    for name, chunk_tokens in (("plain", 0), ("chunked", chunk)):
        if args.device == "cuda":
            rows[name] = measure(args, chunk_tokens, "cuda")
            torch.cuda.empty_cache()
        else:
            cmd = [sys.executable, __file__, "--device", "cpu", "--child", str(chunk_tokens)] + [
                f"--{k}={getattr(args, k)}" for k in ("batch", "seqlen", "d", "vocab", "dtype", "repeats", "threads")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            rows[name] = (r["seconds"], r["peak"], r["loss"])
    print(f"{'':8} {'fwd+bwd ms':>11} {'peak MiB':>9} {'loss':>10}")
    for name, (seconds, peak, loss) in rows.items():
        print(f"{name:8} {seconds * 1e3:11.1f} {peak / 2**20:9.0f} {loss:10.5f}")
    (tp, mp, _), (tc, mc, _) = rows["plain"], rows["chunked"]
    print(f"chunked / plain: time x{tc / tp:.2f}, peak memory x{mc / max(mp, 1):.2f}")


if __name__ == "__main__":
    main()
