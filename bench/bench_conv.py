"""Causal depthwise conv1d + SiLU on CUDA: the Triton forward and each Triton backward, side by side, against
nn.functional.conv1d + silu (cuDNN).

    python bench/bench_conv.py                                      # the issue's shapes, bf16, both layouts
    python bench/bench_conv.py --shapes 8x2048x1536x4 --layouts model --sweep --out "$OUT"
    python bench/bench_conv.py --shapes 8x2048x1536x4 --dtype fp16 --repeat 5

Shapes are batch x L x d_inner x k. Layouts: "model" is x as the mixer has it, a transposed view of the (b, l, 2d)
in_proj output (channels contiguous); "contiguous" is a (b, d, l) tensor. Rows per (shape, layout):

    fwd              the Triton forward (conv_fwd) | cuDNN's forward
    bwd rows         the rows backward (kernels/triton_conv.py, chosen for channels-contiguous x): one kernel, dx and
                     the dweight/dbias sums, plus the zeroed buffer they are added into | cuDNN's backward alone
    bwd tiles        the tiles backward, the only backward before the rows one (it now adds its dweight/dbias
                     shares with atomics instead of writing partials for two torch sums), kept as the baseline
    fwd+bwd          the training path: causal_conv1d(..., backend="triton") and autograd (auto picks the backward)
                     | cuDNN forward and backward

"x fwd" is a row's time over the Triton forward's (the issue asks for a backward at most 2x its forward). The
floor is the memory traffic at 4.3 TB/s (H200): the forward reads x and writes y, the backward reads x and dy and
writes dx, fwd+bwd is both. "max rel err" is max |out - ref| / max |ref| over the row's outputs against the fp32
PyTorch reference (autograd through kernels/causal_conv.py's causal_conv1d_ref), the worst of dx, dweight, dbias
for a backward. Times are triton.testing.do_bench medians, the rows taking turns within each of --repeat rounds,
and the median over rounds is printed.

--sweep also times the rows backward's tile choices (warps per program, time steps per program, prefetch) at the
first shape in the first layout. --out DIR writes the tables as bench_conv.md and bench_conv.json there.
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
from kernels.causal_conv import causal_conv1d_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR_BYTES_PER_S = 4.3e12
SWEEP = [dict(warps=w, segment=s, prefetch=p) for p in (True, False) for w in (1, 2) for s in (64, 128, 256)]


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


def cudnn_conv(x, weight, bias):
    k = weight.shape[1]
    return F.silu(F.conv1d(x, weight.to(x.dtype)[:, None, :], bias.to(x.dtype), padding=k - 1,
                           groups=x.shape[1])[..., :x.shape[2]])


def rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def time_rounds(fns, repeat):
    """{name: median ms over `repeat` rounds of do_bench medians, the fns taking turns within a round}."""
    import triton.testing
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_case(batch, seqlen, dim, k, dtype, layout, repeat):
    from kernels.triton_conv import conv_bwd, conv_fwd, split_weight_grads
    x, weight, bias, dy = make_inputs(batch, seqlen, dim, k, dtype, layout)
    xd, wd, bd = x.detach(), weight.detach(), bias.detach()

    y_ref = causal_conv1d_ref(x, weight, bias, "silu")                   # fp32 math, autograd through F.conv1d
    grads_ref = torch.autograd.grad(y_ref, (x, weight, bias), dy)
    errs = {"fwd": rel_err(conv_fwd(xd, wd, bd, None, True), y_ref)}
    for kernel in ("rows", "tiles"):
        dx, dwb = conv_bwd(xd, wd, bd, None, dy, True, kernel=kernel)
        errs[f"bwd {kernel}"] = max(rel_err(g, r) for g, r in zip((dx, *split_weight_grads(dwb, wd, bd)), grads_ref))
    y = causal_conv1d(x, weight, bias, "silu", backend="triton")
    errs["fwd+bwd"] = max(rel_err(g, r) for g, r in zip(torch.autograd.grad(y, (x, weight, bias), dy), grads_ref))
    del y_ref, grads_ref, y
    y_cudnn = cudnn_conv(x, weight, bias)                                # kept: cuDNN's backward timed alone

    fns = {
        ("fwd", "triton"): lambda: conv_fwd(xd, wd, bd, None, True),
        ("fwd", "cudnn"): lambda: cudnn_conv(xd, wd, bd),
        ("bwd rows", "triton"): lambda: conv_bwd(xd, wd, bd, None, dy, True, kernel="rows"),
        ("bwd rows", "cudnn"): lambda: torch.autograd.grad(y_cudnn, (x, weight, bias), dy, retain_graph=True),
        ("bwd tiles", "triton"): lambda: conv_bwd(xd, wd, bd, None, dy, True, kernel="tiles"),
        ("fwd+bwd", "triton"): lambda: torch.autograd.grad(causal_conv1d(x, weight, bias, "silu", backend="triton"),
                                                           (x, weight, bias), dy),
        ("fwd+bwd", "cudnn"): lambda: torch.autograd.grad(cudnn_conv(x, weight, bias), (x, weight, bias), dy),
    }
    times = time_rounds(fns, repeat)
    elem = x.element_size() * batch * seqlen * dim
    rows = []
    for name, n_tensors in (("fwd", 2), ("bwd rows", 3), ("bwd tiles", 3), ("fwd+bwd", 5)):
        t = times[(name, "triton")]
        t_cudnn = times.get((name, "cudnn"))
        floor = n_tensors * elem / FLOOR_BYTES_PER_S * 1e3
        rows.append(dict(shape=f"{batch}x{seqlen}x{dim}x{k}", layout=layout, row=name, triton_ms=t,
                         x_fwd=t / times[("fwd", "triton")], cudnn_ms=t_cudnn, floor_ms=floor, over_floor=t / floor,
                         max_rel_err=errs[name]))
    return rows


def bench_sweep(batch, seqlen, dim, k, dtype, layout, repeat):
    from kernels.triton_conv import conv_bwd, conv_fwd
    x, weight, bias, dy = make_inputs(batch, seqlen, dim, k, dtype, layout)
    xd, wd, bd = x.detach(), weight.detach(), bias.detach()
    dx_ref, dwb_ref = conv_bwd(xd, wd, bd, None, dy, True, kernel="tiles")
    fns = {"fwd": lambda: conv_fwd(xd, wd, bd, None, True)}
    errs = {}
    for cfg in SWEEP:
        name = "rows warps={warps} segment={segment} prefetch={prefetch}".format(**cfg)
        dx, dwb = conv_bwd(xd, wd, bd, None, dy, True, kernel="rows", **cfg)
        errs[name] = max(rel_err(dx, dx_ref), rel_err(dwb, dwb_ref))
        fns[name] = lambda cfg=cfg: conv_bwd(xd, wd, bd, None, dy, True, kernel="rows", **cfg)
    times = time_rounds(fns, repeat)
    return [dict(shape=f"{batch}x{seqlen}x{dim}x{k}", layout=layout, config=name, ms=t, x_fwd=t / times["fwd"],
                 rel_err_vs_tiles=errs.get(name)) for name, t in times.items()]


def markdown(device, args, rows, sweep):
    lines = [f"# bench_conv: {device}, {args.dtype}, torch {torch.__version__}", "",
             "| shape (b x l x d x k) | layout | pass | triton ms | x fwd | cudnn ms | floor ms | x floor | max rel err |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cudnn = f"{r['cudnn_ms']:.4f}" if r["cudnn_ms"] is not None else "-"
        lines.append(f"| {r['shape']} | {r['layout']} | {r['row']} | {r['triton_ms']:.4f} | {r['x_fwd']:.2f} | "
                     f"{cudnn} | {r['floor_ms']:.4f} | {r['over_floor']:.2f} | {r['max_rel_err']:.1e} |")
    if sweep:
        lines += ["", f"Rows backward configurations at {sweep[0]['shape']} ({sweep[0]['layout']}):", "",
                  "| config | ms | x fwd | rel err vs tiles |", "| --- | ---: | ---: | ---: |"]
        for r in sweep:
            err = f"{r['rel_err_vs_tiles']:.1e}" if r["rel_err_vs_tiles"] is not None else "-"
            lines.append(f"| {r['config']} | {r['ms']:.4f} | {r['x_fwd']:.2f} | {err} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8x2048x1536x4,4x8192x2048x4")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--layouts", default="model,contiguous")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="also time the rows backward's tile choices")
    parser.add_argument("--out", type=Path, help="write bench_conv.md and bench_conv.json into this directory")
    args = parser.parse_args()
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as e:
        print(f"bench_conv.py: {e}", file=sys.stderr)
        sys.exit(2)
    layouts = args.layouts.split(",")
    if any(layout not in ("model", "contiguous") for layout in layouts) or args.repeat < 1:
        print("bench_conv.py: --layouts takes model and/or contiguous; --repeat at least 1", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print("bench_conv.py needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)

    dtype = DTYPES[args.dtype]
    device = torch.cuda.get_device_name()
    rows, sweep = [], []
    for batch, seqlen, dim, k in shapes:
        for layout in layouts:
            rows += bench_case(batch, seqlen, dim, k, dtype, layout, args.repeat)
            torch.cuda.empty_cache()
    if args.sweep:
        sweep = bench_sweep(*shapes[0], dtype, layouts[0], args.repeat)
    text = markdown(device, args, rows, sweep)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_conv.md").write_text(text)
        (args.out / "bench_conv.json").write_text(json.dumps(dict(device=device, dtype=args.dtype, rows=rows,
                                                                  sweep=sweep), indent=1))


if __name__ == "__main__":
    main()
