"""The cost of packed rows (seq_idx, kernels/documents.py) on the sequence kernels: each kernel's forward and
forward+backward with seq_idx=None (one document per row, today's path) against the same tensors with N documents
per row, side by side.

    python bench/bench_packed.py                      # CUDA: the Mamba-1 shape (8, 2048, 1536, 16), bf16, 8 documents
    python bench/bench_packed.py --json > packed.json
    python bench/bench_packed.py --ops scan --docs 32 --shape 8x2048x1536x16
    python bench/bench_packed.py --smoke              # a tiny CPU run of every case (PyTorch paths), seconds

Columns: "none ms" with seq_idx=None, "packed ms" with --docs documents in every row (cut at random points, seeded,
every document at least one token), "packed / none" the ratio (the issue asks for nil cost without boundaries,
which this cannot show: compare "none ms" with bench_scan.py / bench_conv.py before and after the change, or the
sm_90 SASS, which is unchanged for HAS_SEQ_IDX=False). Every operand is in the model's token-major layout
(transposed views of (b, l, ·) storage), as the mixer calls the kernels. Times are triton.testing.do_bench medians
on CUDA (the two rows of a case taking turns, median over --repeat rounds), time.perf_counter medians on the CPU.

Adding a kernel: write a `case_<name>(shape, dtype, device, seq_idx, **options)` returning {"fwd": fn,
"fwd+bwd": fn} of zero-argument callables that run it with that seq_idx (None or packed), and add it to CASES (the
Mamba-2 SSD scan goes here the same way). `shape` is the four numbers of --shape: batch, length, channels, and the
kernel's own fourth (d_state for the scans, ignored by the conv); `options` are the other command-line settings
(today d_conv): take the ones the case needs, and **_ for the rest.
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
from kernels import causal_conv1d, selective_scan  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOKE_SHAPE = (2, 64, 32, 4)


def token_major(batch, seqlen, channels, dtype, device, g, extra=0, scale=1.0):
    """A (batch, channels, seqlen) transposed view of (batch, seqlen, channels + extra) storage, as the model's
    projections produce (extra: the other columns of the row that the view skips), normal with std `scale`."""
    storage = (scale * torch.randn(batch, seqlen, channels + extra, device=device, generator=g)).to(dtype)
    return storage[..., :channels].transpose(1, 2)


def random_seq_idx(batch, seqlen, docs, device, seed=0):
    """(batch, seqlen) int32, `docs` documents per row cut at distinct random points (each at least one token)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seqlen - 1, generator=g)[:docs - 1] + 1           # where documents 1.. start
        starts = torch.zeros(seqlen, dtype=torch.int32)
        starts[cuts] = 1
        rows.append(torch.cumsum(starts, 0, dtype=torch.int32))
    return torch.stack(rows).to(device)


def case_scan(shape, dtype, device, seq_idx, **_):
    """The Mamba-1 selective scan as the mixer calls it: softplus(delta + bias), D, the z gate, A fp32."""
    batch, seqlen, dim, dstate = shape
    g = torch.Generator(device=device).manual_seed(0)
    u = token_major(batch, seqlen, dim, dtype, device, g).requires_grad_()
    delta = token_major(batch, seqlen, dim, dtype, device, g, scale=0.5).requires_grad_()
    B = token_major(batch, seqlen, dstate, dtype, device, g, extra=dstate).requires_grad_()
    C = token_major(batch, seqlen, dstate, dtype, device, g, extra=dstate).requires_grad_()
    z = token_major(batch, seqlen, dim, dtype, device, g, extra=dim).requires_grad_()
    A = (-torch.rand(dim, dstate, device=device, generator=g) - 0.5).requires_grad_()
    D = torch.randn(dim, device=device, generator=g).requires_grad_()
    bias = (torch.randn(dim, device=device, generator=g) - 2).requires_grad_()
    dy = token_major(batch, seqlen, dim, dtype, device, g)
    leaves = (u, delta, A, B, C, D, z, bias)

    def forward():
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, seq_idx=seq_idx)

    def fwd():
        with torch.no_grad():
            forward()

    return {"fwd": fwd, "fwd+bwd": lambda: torch.autograd.grad(forward(), leaves, dy)}


def case_conv(shape, dtype, device, seq_idx, d_conv=4, **_):
    """The Mamba-1 causal conv (+ SiLU) on the mixer's x: a (b, d, l) view of the (b, l, 2d) in_proj output."""
    batch, seqlen, dim, _ = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = token_major(batch, seqlen, dim, dtype, device, g, extra=dim).requires_grad_()
    weight = (torch.randn(dim, d_conv, device=device, generator=g) / d_conv ** 0.5).requires_grad_()
    bias = torch.randn(dim, device=device, generator=g).requires_grad_()
    dy = token_major(batch, seqlen, dim, dtype, device, g)

    def forward():
        return causal_conv1d(x, weight, bias, activation="silu", seq_idx=seq_idx)

    def fwd():
        with torch.no_grad():
            forward()

    return {"fwd": fwd, "fwd+bwd": lambda: torch.autograd.grad(forward(), (x, weight, bias), dy)}


CASES = {"scan": case_scan, "conv": case_conv}


def time_pair(fns, device, repeat):
    """{name: median ms}, the callables taking turns within each of `repeat` rounds."""
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if device.type == "cuda":
                import triton.testing
                times[name].append(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
            else:
                fn()                                                            # warm-up
                runs = []
                for _ in range(3):
                    start = time.perf_counter()
                    fn()
                    runs.append((time.perf_counter() - start) * 1e3)
                times[name].append(statistics.median(runs))
    return {name: statistics.median(t) for name, t in times.items()}


def run(ops, shape, dtype, docs, d_conv, device, repeat):
    seq_idx = random_seq_idx(shape[0], shape[1], docs, device)
    rows = []
    for op in ops:
        plain = CASES[op](shape, dtype, device, None, d_conv=d_conv)
        packed = CASES[op](shape, dtype, device, seq_idx, d_conv=d_conv)
        for phase in plain:
            t = time_pair({"none": plain[phase], "packed": packed[phase]}, device, repeat)
            rows.append(dict(op=op, phase=phase, shape="x".join(map(str, shape)), dtype=str(dtype).split(".")[-1],
                             docs_per_row=docs, none_ms=t["none"], packed_ms=t["packed"],
                             ratio=t["packed"] / t["none"]))
    return rows


def print_table(rows, device):
    print(f"# bench_packed on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(f"| op | phase | shape | dtype | docs/row | none ms | packed ms | packed / none |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['phase']} | {r['shape']} | {r['dtype']} | {r['docs_per_row']} | {r['none_ms']:.3f} "
              f"| {r['packed_ms']:.3f} | {r['ratio']:.2f} |")


def parse_shape(text):
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shape {text!r} is not batch x length x channels x d_state, e.g. 8x2048x1536x16")
    return tuple(int(p) for p in parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--shape", default="8x2048x1536x16", help="batch x length x channels x d_state")
    parser.add_argument("--d_conv", type=int, default=4, help="the conv's width (1 to 16)")
    parser.add_argument("--docs", type=int, default=8, help="documents per row in the packed run")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--smoke", action="store_true", help=f"tiny CPU run ({'x'.join(map(str, SMOKE_SHAPE))}, "
                        "fp32, PyTorch paths): checks that every case runs")
    args = parser.parse_args(argv)
    try:
        ops = [op.strip() for op in args.ops.split(",") if op.strip()]
        unknown = [op for op in ops if op not in CASES]
        if unknown or not ops:
            raise ValueError(f"--ops {args.ops!r}: unknown {unknown}; allowed: {', '.join(CASES)}")
        shape = SMOKE_SHAPE if args.smoke else parse_shape(args.shape)
        if not 1 <= args.docs <= shape[1]:
            raise ValueError(f"--docs must be 1 to the length ({shape[1]}), got {args.docs}")
        if not 1 <= args.d_conv <= 16 or args.repeat < 1:
            raise ValueError("--d_conv must be 1 to 16 and --repeat at least 1")
        if not args.smoke and not torch.cuda.is_available():
            raise ValueError("no CUDA device: this benchmark times the GPU kernels (use --smoke for a CPU check)")
    except ValueError as err:
        print(f"bench_packed.py: error: {err}", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else DTYPES[args.dtype]
    rows = run(ops, shape, dtype, args.docs, args.d_conv, device, 1 if args.smoke else args.repeat)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
