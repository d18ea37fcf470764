"""Selective-scan backends side by side: forward and forward+backward times, ratios, and error against "ref".

    python bench/bench_scan.py                                   # CPU: small-model shapes, fp32
    python bench/bench_scan.py --device cuda                     # GPU: the issue's shapes, bf16, memory floor
    python bench/bench_scan.py --shapes 4x1024x1024x16 --backends ref,chunked --repeat 5
    python bench/bench_scan.py --device cuda --backends triton,chunked --json scan.json   # rows as JSON too

Shapes are batch x L x d_inner x d_state. Every call is a Mamba mixer's: delta_bias, softplus, D skip and z gate.
"speed vs chunked" is chunked's time divided by the backend's (above 1: faster than chunked). On CUDA times are
triton.testing.do_bench medians and the floor column is the memory-traffic floor of ../shared/ANCHORS.md: every
input read once and every output written once at 4.3 TB/s (backward: reads u, delta, z, B, C, dy; writes du,
delta's grad, dz, dB, dC). On the CPU times are time.perf_counter medians after one warm-up call, the backends
taking turns within each repeat.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import available_backends, selective_scan  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHAPES = {"cuda": "8x2048x1536x16,4x8192x2048x16", "cpu": "4x1024x1024x16,4x512x512x16"}
FLOOR_BYTES_PER_S = 4.3e12          # ANCHORS.md: the H200's device-to-device copy bandwidth


def runnable_backends(device: torch.device) -> list[str]:
    """The kernels' own list for this device, less triton until kernels/triton_scan.py exists."""
    names = available_backends(device)
    if importlib.util.find_spec("kernels.triton_scan") is None:
        names = [n for n in names if n != "triton"]
    return names


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {item!r} is not batch x L x d_inner x d_state with positive integers, "
                             "e.g. 4x1024x1024x16")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def make_inputs(batch, seqlen, d_inner, d_state, dtype, device, seed=0):
    """A Mamba mixer's scan inputs: (u, delta, A, B, C, D, z, delta_bias), fp32 A/D/delta_bias as in mamba_ssm."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    u = randn(batch, d_inner, seqlen).to(dtype)
    delta = randn(batch, d_inner, seqlen, scale=0.5).to(dtype)
    z = randn(batch, d_inner, seqlen).to(dtype)
    B = randn(batch, d_state, seqlen).to(dtype)
    C = randn(batch, d_state, seqlen).to(dtype)
    A = -torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(d_inner, 1)   # (d, n) as at init
    D = torch.ones(d_inner, device=device)
    # softplus(delta_bias) log-uniform in [1e-3, 1e-1], the released dt init
    dt = torch.exp(torch.rand(d_inner, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    delta_bias = (dt + torch.log(-torch.expm1(-dt))).to(device)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]


def floor_ms(batch, seqlen, d_inner, d_state, elem_bytes, backward):
    """Memory-traffic floor: every input read once, every output written once, at 4.3 TB/s."""
    big, small = batch * d_inner * seqlen * elem_bytes, batch * d_state * seqlen * elem_bytes
    fwd = 4 * big + 2 * small                          # read u, delta, z, B, C; write y
    bwd = 7 * big + 4 * small                          # read u, delta, z, dy, B, C; write du, ddelta, dz, dB, dC
    return (fwd + (bwd if backward else 0)) / FLOOR_BYTES_PER_S * 1e3


def time_backends(fns: dict, device: torch.device, repeat: int) -> dict:
    """Median ms per backend. On the CPU the backends take turns within each repeat, so that a load change on a
    shared machine hits them alike; on CUDA each gets triton.testing.do_bench."""
    if device.type == "cuda":
        import triton.testing

        return {name: triton.testing.do_bench(fn, rep=max(25, 25 * repeat), return_mode="median")
                for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()                                                           # warm-up
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_backend(inputs, backend, dy, backward):
    u, delta, A, B, C, D, z, delta_bias = inputs
    if not backward:
        with torch.no_grad():
            return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True,
                                  backend=backend), None
    y = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True, backend=backend)
    return y, torch.autograd.grad(y, inputs, dy)


def max_errors(out, ref):
    """Max |y - y_ref| and the largest over inputs of max |grad - grad_ref| / max |grad_ref|."""
    y, grads = out
    y_ref, grads_ref = ref
    y_err = (y.float() - y_ref.float()).abs().max().item()
    if grads is None:
        return y_err, None
    g_err = max(((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
                for g, r in zip(grads, grads_ref))
    return y_err, g_err


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of u, delta, z, B, C (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated batch x L x d_inner x d_state (default: "
                             f"{DEFAULT_SHAPES['cuda']} on cuda, {DEFAULT_SHAPES['cpu']} on cpu)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends to time (default: every one that runs on the device)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement on the CPU (median); "
                        "on CUDA it scales do_bench's time budget")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both (comma-separated)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write every row to this JSON file")
    args = parser.parse_args(argv)

    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    try:
        shapes = parse_shapes(args.shapes or DEFAULT_SHAPES[device.type])
    except ValueError as e:
        parser.error(str(e))
    allowed = runnable_backends(device)
    backends = args.backends.split(",") if args.backends else allowed
    unknown = [b for b in backends if b not in allowed]
    if unknown:
        parser.error(f"backend(s) {', '.join(unknown)} cannot run on {device.type}; allowed here: {', '.join(allowed)}")
    modes = args.modes.split(",")
    if any(m not in ("fwd", "fwd+bwd") for m in modes):
        parser.error(f"--modes takes fwd and/or fwd+bwd, got {args.modes!r}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    elem_bytes = torch.finfo(dtype).bits // 8
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"selective scan, {where}, torch {torch.__version__}, inputs {dtype}, delta_softplus + delta_bias + D + z")
    header = f"{'shape (b x L x d x n)':>22} {'mode':>8} {'backend':>8} {'time ms':>10} {'speed vs chunked':>17}"
    if device.type == "cuda":
        header += f" {'floor ms':>9} {'x floor':>8}"
    header += f" {'max|y-ref|':>11} {'max grad err':>13}"
    print(header)
    records = []
    for shape in shapes:
        inputs = make_inputs(*shape, dtype=dtype, device=device)
        dy = torch.randn_like(inputs[0])
        for mode in modes:
            backward = mode == "fwd+bwd"
            outs = {name: run_backend(inputs, name, dy, backward) for name in backends}
            fns = {name: (lambda name=name: run_backend(inputs, name, dy, backward)) for name in backends}
            times = time_backends(fns, device, args.repeat)
            for name in backends:
                ratio = f"{times['chunked'] / times[name]:.2f}x" if "chunked" in times else "-"
                row = f"{'x'.join(map(str, shape)):>22} {mode:>8} {name:>8} {times[name]:>10.3f} {ratio:>17}"
                record = dict(shape="x".join(map(str, shape)), mode=mode, backend=name, ms=times[name])
                if device.type == "cuda":
                    fl = floor_ms(*shape, elem_bytes, backward)
                    row += f" {fl:>9.3f} {times[name] / fl:>7.1f}x"
                    record["floor_ms"] = fl
                if "ref" in outs:
                    y_err, g_err = max_errors(outs[name], outs["ref"])
                    row += f" {y_err:>11.2e} {('-' if g_err is None else f'{g_err:.2e}'):>13}"
                    record.update(y_err=y_err, grad_err=g_err)
                else:
                    row += f" {'-':>11} {'-':>13}"
                print(row, flush=True)
                records.append(record)
            del outs
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "torch": torch.__version__, "dtype": str(dtype),
                                               "rows": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
