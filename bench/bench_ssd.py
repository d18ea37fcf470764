"""SSD-scan backends side by side: forward and forward+backward times, the speed-up, and the error.

    python bench/bench_ssd.py                                     # the issue's shape: 4 x 1024, 16 heads x 64, n 64
    python bench/bench_ssd.py --shapes 4x1024x16x64x64 --chunks 64,128,256 --repeat 3
    python bench/bench_ssd.py --gpu                               # triton vs chunked on CUDA, bf16, chunk 256,
                                                                  # at (8, 2048, 24 heads x 64, d_state 128)

GPU mode (--gpu): at each shape, bf16 inputs, the model's call (dt_bias, softplus, D), timed with
triton.testing.do_bench (median ms over its repeats): the forward under no_grad, and forward+backward, for the
chunked backend, the Triton backend with its earlier backward (autograd through the chunked scan, "vjp") and the
Triton backend as it runs (its backward kernels); beside each the memory-traffic floor (every input read once and
every output written once at 4.3 TB/s), the peak memory the call adds, and the largest error against the chunked
backend over y and every gradient (max |a - b| / max |b|).

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


FLOOR_BYTES_PER_S = 4.3e12          # ../shared/ANCHORS.md: the H200's device-to-device copy bandwidth
# the GPU variants: (label, backend, the Triton backend's backward)
GPU_VARIANTS = [("chunked", "chunked", None), ("triton, vjp backward", "triton", "vjp"),
                ("triton", "triton", "kernels")]


def run_variant(inputs, backend, backward, chunk, with_grad):
    x, dt, A, B, C, D, dt_bias = inputs
    kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=chunk)
    if backend == "triton":
        from kernels.triton_ssd_scan import ssd_scan_triton
        y = ssd_scan_triton(x, dt, A, B, C, backward=backward, **kwargs)
    else:
        y = ssd_scan(x, dt, A, B, C, backend=backend, **kwargs)
    if not with_grad:
        return y.detach(), None
    return y.detach(), torch.autograd.grad(y, inputs, torch.ones_like(y) / y.numel() ** 0.5)


def floor_ms(b, l, h, p, n, backward):
    """Memory-traffic floor: every input read once, every output written once, at 4.3 TB/s (bf16 x, dt, B, C, y;
    backward: also reads dy and writes dx, ddt, dB, dC)."""
    x, dt, bc = b * l * h * p * 2, b * l * h * 2, 2 * b * l * n * 2
    fwd = 2 * x + dt + bc
    bwd = 3 * x + 2 * dt + 2 * bc
    return (fwd + (bwd if backward else 0)) / FLOOR_BYTES_PER_S * 1e3


def profile_gpu(inputs, chunk, calls=5):
    """Where the Triton backend's forward+backward spends its GPU time, per kernel (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    run_variant(inputs, "triton", "kernels", chunk, True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run_variant(inputs, "triton", "kernels", chunk, True)
        torch.cuda.synchronize()
    print(f"\nper-kernel GPU time over {calls} triton fwd+bwd calls:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def main_gpu(shapes, chunk, profile=False, json_path=None):
    from triton.testing import do_bench

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, chunk {chunk}; ngroups 1, dt_bias, "
          "softplus, D; do_bench medians; peak = memory the call adds over its inputs")
    print("| shape (b x L x h x p x n) | mode | variant | ms | x chunked | floor ms | x floor | peak MiB "
          "| max err vs chunked |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    records = []
    for shape in shapes.split(","):
        b, l, h, hp, n = (int(v) for v in shape.lower().split("x"))
        inputs = [t.detach().cuda().to(torch.bfloat16 if t.dim() > 1 else torch.float32).requires_grad_()
                  for t in make_inputs(b, l, h, hp, n)]
        for with_grad in (False, True):
            ms, outs, peak = {}, {}, {}
            for label, backend, backward in GPU_VARIANTS:
                if not with_grad and backward == "vjp":
                    continue                     # the same forward as "triton"
                with torch.set_grad_enabled(with_grad):
                    outs[label] = run_variant(inputs, backend, backward, chunk, with_grad)       # warm-up
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    run_variant(inputs, backend, backward, chunk, with_grad)
                    torch.cuda.synchronize()
                    peak[label] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                    ms[label] = do_bench(lambda: run_variant(inputs, backend, backward, chunk, with_grad))
            floor = floor_ms(b, l, h, hp, n, with_grad)
            ref_y, ref_g = outs["chunked"]
            for label in ms:
                y, grads = outs[label]
                errs = [((y.float() - ref_y.float()).abs().max() / ref_y.float().abs().max()).item()]
                if with_grad:
                    errs += [((a.float() - r.float()).abs().max() / r.float().abs().max()).item()
                             for a, r in zip(grads, ref_g)]
                print(f"| {shape} | {'fwd+bwd' if with_grad else 'fwd'} | {label} | {ms[label]:.3f} "
                      f"| {ms['chunked'] / ms[label]:.2f} | {floor:.3f} | {ms[label] / floor:.1f} "
                      f"| {peak[label]:.0f} | {max(errs):.1e} |", flush=True)
            records.append(dict(shape=shape, mode="fwd+bwd" if with_grad else "fwd", chunked_ms=ms["chunked"],
                                triton_ms=ms["triton"], floor_ms=floor,
                                **({"triton_vjp_ms": ms["triton, vjp backward"]} if "triton, vjp backward" in ms
                                   else {})))
        if profile:
            profile_gpu(inputs, chunk)
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
    p.add_argument("--profile", action="store_true", help="with --gpu: also the Triton fwd+bwd's time per kernel")
    p.add_argument("--json", default=None, help="with --gpu: also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.gpu:
        shapes = args.shapes if args.shapes != p.get_default("shapes") else "8x2048x24x64x128"
        chunk = int(args.chunks.split(",")[0]) if args.chunks != p.get_default("chunks") else 256
        return main_gpu(shapes, chunk, args.profile, args.json)
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
