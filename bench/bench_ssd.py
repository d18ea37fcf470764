"""SSD-scan backends side by side: forward and forward+backward times, the speed-up, and the error.

    python bench/bench_ssd.py                                     # the issue's shape: 4 x 1024, 16 heads x 64, n 64
    python bench/bench_ssd.py --shapes 4x1024x16x64x64 --chunks 64,128,256 --repeat 3
    python bench/bench_ssd.py --gpu                               # triton vs chunked on CUDA, bf16, chunk 256,
                                                                  # at (8, 2048, 24 heads x 64, d_state 128)
    python bench/bench_ssd.py --gpu --json ssd.json               # the rows as JSON too (GPU mode)

GPU mode (--gpu): the Triton backend against the chunked one at each shape, bf16 inputs, the model's call (dt_bias,
softplus, D), timed with triton.testing.do_bench (median ms over its repeats); forward under no_grad, and
forward+backward (the Triton backend's backward recomputes through the chunked scan, so expect the forward's gain
and not more there). "max |y - chunked|" is relative to max |y_chunked|.

Shapes are batch x L x nheads x headdim x d_state (ngroups 1). Every call is the Mamba-2 mixer's: dt_bias,
softplus, D skip (no z: the model gates in its norm). Times are time.perf_counter medians after one warm-up call,
the backends taking turns within each repeat; "max grad err" is the largest over x, dt, A, B, C, D, dt_bias of
max |grad - grad_ref| / max |grad_ref|.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.ssd import ssd_scan  # noqa: E402


def make_inputs(b, l, h, p, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g)
    dt = torch.randn(b, l, h, generator=g) - 1
    A = -torch.empty(h).uniform_(1, 16, generator=g)
    B = torch.randn(b, l, 1, n, generator=g)
    C = torch.randn(b, l, 1, n, generator=g)
    D = torch.ones(h)
    dt_bias = torch.randn(h, generator=g) - 3
    return [t.requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]


def run(inputs, backend, chunk, backward):
    x, dt, A, B, C, D, dt_bias = inputs
    for t in inputs:
        t.grad = None
    y = ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=chunk, backend=backend)
    if backward:
        y.backward(torch.ones_like(y) / y.numel() ** 0.5)
        return y.detach(), [t.grad.clone() for t in inputs]
    return y.detach(), None


def main_gpu(shapes, chunk, json_path=None):
    from triton.testing import do_bench

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, chunk {chunk}")
    print("| shape (b x L x h x p x n) | mode | chunked ms | triton ms | speed-up | max |y - chunked| |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    records = []
    for shape in shapes.split(","):
        b, l, h, hp, n = (int(v) for v in shape.lower().split("x"))
        inputs = [t.detach().cuda().to(torch.bfloat16 if t.dim() > 1 else torch.float32).requires_grad_()
                  for t in make_inputs(b, l, h, hp, n)]
        for backward in (False, True):
            ms, ys = {}, {}
            for backend in ("chunked", "triton"):
                if backward:
                    ms[backend] = do_bench(lambda: run(inputs, backend, chunk, True))
                else:
                    with torch.no_grad():
                        ms[backend] = do_bench(lambda: run(inputs, backend, chunk, False))
                        ys[backend] = run(inputs, backend, chunk, False)[0].float()
            err = "-" if backward else \
                f"{((ys['triton'] - ys['chunked']).abs().max() / ys['chunked'].abs().max()).item():.1e}"
            print(f"| {shape} | {'fwd+bwd' if backward else 'fwd'} | {ms['chunked']:.2f} | {ms['triton']:.2f} "
                  f"| {ms['chunked'] / ms['triton']:.2f}x | {err} |", flush=True)
            records.append(dict(shape=shape, mode="fwd+bwd" if backward else "fwd", chunked_ms=ms["chunked"],
                                triton_ms=ms["triton"], y_err=None if backward else float(err)))
    if json_path:
        Path(json_path).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "dtype": "bf16", "chunk": chunk, "rows": records}, indent=1))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4x1024x16x64x64")
    p.add_argument("--chunks", default="64,128,256", help="chunk sizes of the chunked backend to time")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gpu", action="store_true", help="triton vs chunked on CUDA, bf16 (shapes default to "
                   "8x2048x24x64x128, the first of --chunks as the chunk size, 256 by default)")
    p.add_argument("--json", default=None, help="GPU mode: also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.gpu:
        shapes = args.shapes if args.shapes != p.get_default("shapes") else "8x2048x24x64x128"
        chunk = int(args.chunks.split(",")[0]) if args.chunks != p.get_default("chunks") else 256
        return main_gpu(shapes, chunk, args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    print("| shape (b x L x h x p x n) | mode | ref ms | chunked Q | chunked ms | speed-up | max |y - ref| "
          "| max grad err |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in args.shapes.split(","):
        b, l, h, hp, n = (int(v) for v in shape.lower().split("x"))
        inputs = make_inputs(b, l, h, hp, n)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            times = {name: [] for name in ["ref"] + [f"chunked{q}" for q in chunks]}
            results = {}
            for i in range(args.repeat + 1):                                  # the first round warms up
                for name in times:
                    backend, chunk = ("ref", 256) if name == "ref" else ("chunked", int(name[7:]))
                    if backward:
                        t, out = timed(lambda: run(inputs, backend, chunk, True))
                    else:
                        with torch.no_grad():
                            t, out = timed(lambda: run(inputs, backend, chunk, False))
                    if i > 0:
                        times[name].append(t)
                    results[name] = out
            ref_ms = 1e3 * statistics.median(times["ref"])
            y_ref, g_ref = results["ref"]
            for q in chunks:
                name = f"chunked{q}"
                ms = 1e3 * statistics.median(times[name])
                y, grads = results[name]
                y_err = (y - y_ref).abs().max().item()
                g_err = "-"
                if backward:
                    g_err = f"{max(((a - r).abs().max() / r.abs().max()).item() for a, r in zip(grads, g_ref)):.1e}"
                print(f"| {shape} | {mode} | {ref_ms:.1f} | {q} | {ms:.1f} | {ref_ms / ms:.1f}x | {y_err:.1e} "
                      f"| {g_err} |", flush=True)


if __name__ == "__main__":
    main()
