"""Causal depthwise conv1d + SiLU: the Triton kernels against nn.functional.conv1d + silu (cuDNN), on CUDA.

    python bench/bench_conv.py                                      # the issue's shapes, bf16, both layouts
    python bench/bench_conv.py --shapes 8x2048x1536x4 --dtype fp16 --repeat 5
    python bench/bench_conv.py --json conv.json                     # the rows as JSON too

Shapes are batch x L x d_inner x k. Layouts: "model" is x as the mixer has it, a transposed view of the (b, l, 2d)
in_proj output (channels contiguous); "contiguous" is a (b, d, l) tensor. The Triton path gets fp32 weight and bias
(as under autocast); the cuDNN path gets them in x's dtype (F.conv1d needs one dtype; autocast casts them too).
Times are triton.testing.do_bench medians, the implementations taking turns within each of --repeat rounds, and
the median over rounds is printed. "speed-up" is cuDNN's time over Triton's. The floor is the memory traffic at
4.3 TB/s (H200): forward reads x and writes y; forward+backward also reads x and dy and writes dx.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import causal_conv1d  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR_BYTES_PER_S = 4.3e12


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {item!r} is not batch x L x d_inner x k, e.g. 8x2048x1536x4")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def make_inputs(batch, seqlen, dim, k, dtype, layout, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "model":
        x = torch.randn(batch, seqlen, 2 * dim, device="cuda", generator=g).to(dtype).transpose(1, 2)[:, :dim]
    else:
        x = torch.randn(batch, dim, seqlen, device="cuda", generator=g).to(dtype)
    weight = torch.randn(dim, k, device="cuda", generator=g) / k ** 0.5
    bias = torch.randn(dim, device="cuda", generator=g)
    dy = torch.randn(batch, dim, seqlen, device="cuda", generator=g).to(dtype)
    dy = dy.transpose(1, 2).contiguous().transpose(1, 2) if layout == "model" else dy   # the layout y has
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), dy


def triton_conv(x, weight, bias):
    return causal_conv1d(x, weight, bias, "silu", backend="triton")


def cudnn_conv(x, weight, bias):
    k = weight.shape[1]
    return F.silu(F.conv1d(x, weight.to(x.dtype)[:, None, :], bias.to(x.dtype), padding=k - 1,
                           groups=x.shape[1])[..., :x.shape[2]])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8x2048x1536x4,4x8192x2048x4")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--layouts", default="model,contiguous")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_conv.py needs a CUDA GPU")
    import triton.testing

    dtype = DTYPES[args.dtype]
    impls = {"triton": triton_conv, "cudnn": cudnn_conv}
    print(f"{torch.cuda.get_device_name()}  {args.dtype}  torch {torch.__version__}")
    header = (f"{'shape (b x l x d x k)':<22} {'layout':<11} {'pass':<8} {'triton ms':>10} {'cudnn ms':>10} "
              f"{'speed-up':>9} {'floor ms':>9} {'triton/floor':>13} {'max rel err':>12}")
    print(header)
    print("-" * len(header))
    records = []
    for batch, seqlen, dim, k in parse_shapes(args.shapes):
        for layout in args.layouts.split(","):
            x, weight, bias, dy = make_inputs(batch, seqlen, dim, k, dtype, layout)
            with torch.no_grad():
                y, y_ref = triton_conv(x, weight, bias), cudnn_conv(x, weight, bias)
                ref = causal_conv1d(x, weight, bias, "silu", backend="torch")
                err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            del y, y_ref, ref
            fns = {}
            for name, fn in impls.items():
                fns[(name, "fwd")] = lambda fn=fn: fn(x, weight, bias)
                fns[(name, "fwd+bwd")] = lambda fn=fn: torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), dy)
            times = {key: [] for key in fns}
            for _ in range(args.repeat):
                for key, fn in fns.items():
                    times[key].append(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
            elem = x.element_size() * batch * seqlen * dim
            for pass_, n_tensors in (("fwd", 2), ("fwd+bwd", 5)):
                t_tri = statistics.median(times[("triton", pass_)])
                t_cud = statistics.median(times[("cudnn", pass_)])
                floor = n_tensors * elem / FLOOR_BYTES_PER_S * 1e3
                print(f"{f'{batch}x{seqlen}x{dim}x{k}':<22} {layout:<11} {pass_:<8} {t_tri:>10.3f} {t_cud:>10.3f} "
                      f"{t_cud / t_tri:>8.2f}x {floor:>9.3f} {t_tri / floor:>12.2f}x {err:>12.2e}")
                records.append(dict(shape=f"{batch}x{seqlen}x{dim}x{k}", layout=layout, mode=pass_, triton_ms=t_tri,
                                    cudnn_ms=t_cud, floor_ms=floor, max_rel_err=err))
            del x, weight, bias, dy, fns
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "dtype": args.dtype, "rows": records}, indent=1))


if __name__ == "__main__":
    main()
