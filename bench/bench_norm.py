"""Residual add + RMSNorm, forward + backward: the PyTorch reference (eager, and torch.compile'd) against the fused
Triton kernels, side by side (CUDA).

    python bench/bench_norm.py                               # (8, 2048, 768), x bf16, residual fp32, out bf16
    python bench/bench_norm.py --d 2048 --x-dtype fp32

Times are triton.testing.do_bench medians in microseconds of the forward alone and of forward + backward (both
outputs receive a gradient, as in a model). Also prints the largest |normed - normed_torch|.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.norm import add_rms_norm  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--x-dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--out-dtype", choices=DTYPES, default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (the Triton kernels run on CUDA)")
    import triton.testing

    shape = (args.batch, args.seqlen, args.d)
    x = torch.randn(shape, device="cuda", dtype=DTYPES[args.x_dtype], requires_grad=True)
    residual = torch.randn(shape, device="cuda", dtype=torch.float32, requires_grad=True)
    weight = torch.randn(args.d, device="cuda", requires_grad=True)
    dy = torch.randn(shape, device="cuda", dtype=DTYPES[args.out_dtype])
    dres = torch.randn(shape, device="cuda", dtype=torch.float32)
    out_dtype = DTYPES[args.out_dtype]

    def run(backend):
        return add_rms_norm(x, residual, weight, out_dtype=out_dtype, backend=backend)

    compiled = torch.compile(lambda: run("torch"))
    variants = {"torch": lambda: run("torch"), "torch.compile": compiled, "triton": lambda: run("triton")}
    print(f"add_rms_norm, {torch.cuda.get_device_name()}, torch {torch.__version__}: {shape}, x {args.x_dtype}, "
          f"residual fp32, out {args.out_dtype}")
    print(f"{'':14} {'fwd us':>8} {'fwd+bwd us':>11} {'max|normed-torch|':>18}")
    ref = run("torch")[0].float()
    for name, fn in variants.items():
        def fwd_bwd():
            normed, new_res = fn()
            torch.autograd.backward((normed, new_res), (dy, dres))
        with torch.no_grad():
            t_fwd = triton.testing.do_bench(fn)
        t_all = triton.testing.do_bench(fwd_bwd, grad_to_none=[x, residual, weight])
        err = (fn()[0].float() - ref).abs().max().item()
        print(f"{name:14} {t_fwd * 1e3:8.1f} {t_all * 1e3:11.1f} {err:18.2e}")


if __name__ == "__main__":
    main()
