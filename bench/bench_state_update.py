"""One decoding step of the selective scan: the PyTorch step against the Triton single-token kernel, side by side.

    python bench/bench_state_update.py                          # GPU: batch 1 and 64, d_inner 1536, d_state 16
    python bench/bench_state_update.py --batches 1,8 --d-inner 2048 --layers 24

Times are triton.testing.do_bench medians of one call (one layer's step), plus the same call repeated for --layers
layers (the per-token cost of a whole model's scans, launch overhead included). "speedup" is torch's time over
triton's. Also prints the largest |y - y_torch| as a sanity check.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import selective_state_update  # noqa: E402


def make_inputs(batch, d_inner, d_state, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(batch, d_inner, d_state, generator=g).to(device)
    x, dt, z = (torch.randn(batch, d_inner, generator=g).to(device, dtype) for _ in range(3))
    B, C = (torch.randn(batch, d_state, generator=g).to(device, dtype) for _ in range(2))
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1).to(device)
    D = torch.ones(d_inner, device=device)
    dt_bias = torch.full((d_inner,), -3.0, device=device)
    return state, (x, dt, A, B, C), dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default 1,64)")
    parser.add_argument("--d-inner", type=int, default=1536)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--layers", type=int, default=24, help="steps per timed call in the 'model' column")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (the Triton kernel runs on CUDA)")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if min(batches) < 1 or args.d_inner < 1 or args.d_state < 1 or args.layers < 1:
        parser.error("batch sizes, --d-inner, --d-state and --layers must be positive")
    import triton.testing

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"selective_state_update, {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, "
          f"d_inner {args.d_inner}, d_state {args.d_state}")
    print(f"{'batch':>6} {'torch us':>9} {'triton us':>10} {'speedup':>8} {f'x{args.layers} torch us':>15} "
          f"{f'x{args.layers} triton us':>16} {'max|y-y_torch|':>15}")
    for batch in batches:
        state, inputs, kwargs = make_inputs(batch, args.d_inner, args.d_state, dtype, "cuda")
        states = {name: state.clone() for name in ("torch", "triton")}
        ys = {name: selective_state_update(states[name], *inputs, backend=name, **kwargs) for name in states}
        err = (ys["triton"].float() - ys["torch"].float()).abs().max().item()
        one, many = {}, {}
        for name in states:
            s = states[name]
            one[name] = triton.testing.do_bench(lambda: selective_state_update(s, *inputs, backend=name, **kwargs),
                                                return_mode="median") * 1e3

            def model_step():
                for _ in range(args.layers):
                    selective_state_update(s, *inputs, backend=name, **kwargs)

            many[name] = triton.testing.do_bench(model_step, return_mode="median") * 1e3
        print(f"{batch:>6} {one['torch']:>9.1f} {one['triton']:>10.1f} {one['torch'] / one['triton']:>7.1f}x "
              f"{many['torch']:>15.1f} {many['triton']:>16.1f} {err:>15.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
