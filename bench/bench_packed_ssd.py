"""The cost of packed rows on the SSD scan (Mamba-2): forward and forward+backward with seq_idx=None, with one
document per row given as seq_idx (the masked kernels, no boundary), and with 8 documents per row, side by side.

    python bench/bench_packed_ssd.py                      # CUDA, bf16, the Triton backend, (8, 2048, 24 x 64, n 128)
    python bench/bench_packed_ssd.py --json packed.json   # ... and the rows as JSON
    python bench/bench_packed_ssd.py --smoke              # a tiny CPU run of the same table (chunked backend), to
                                                          # check the script; its times mean nothing

Every call is the Mamba-2 mixer's: dt_bias, softplus, D skip, ngroups 1, chunk 256. The 8 documents of a row have
random lengths (cut points drawn uniformly, so boundaries fall anywhere in a chunk), a different layout per row.
GPU times are triton.testing.do_bench medians (ms); CPU times are time.perf_counter medians after a warm-up.
"x none" is the time over seq_idx=None's (1.00 = no cost); "max err" is the largest relative error
(max |a - b| / max |b|) of y and every gradient against the chunked backend given the same seq_idx (GPU only).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.ssd import ssd_scan  # noqa: E402

GPU_SHAPE = (8, 2048, 24, 64, 128)         # batch, length, heads, headdim, d_state
SMOKE_SHAPE = (2, 96, 2, 8, 16)
DOCS_PER_ROW = 8


def make_inputs(b, l, h, p, n, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g)
    dt = torch.randn(b, l, h, generator=g) - 1
    A = -torch.empty(h).uniform_(1, 16, generator=g)
    B = torch.randn(b, l, 1, n, generator=g)
    C = torch.randn(b, l, 1, n, generator=g)
    D = torch.ones(h)
    dt_bias = torch.randn(h, generator=g) - 3
    big = (x, dt, B, C)
    return ([t.to(device=device, dtype=dtype).requires_grad_() for t in big]
            + [t.to(device).requires_grad_() for t in (A, D, dt_bias)])


def packed_seq_idx(batch, seqlen, docs, device, seed=0):
    """(b, l) int32 with `docs` documents per row at random cut points (distinct, so no document is empty)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seqlen - 1, generator=g)[:docs - 1] + 1          # starts of documents 1 .. docs-1
        starts = torch.zeros(seqlen, dtype=torch.int32)
        starts[cuts] = 1
        rows.append(torch.cumsum(starts, 0, dtype=torch.int32))
    return torch.stack(rows).to(device)


def call(inputs, backend, chunk, seq_idx, with_grad):
    x, dt, B, C, A, D, dt_bias = inputs
    y = ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=chunk, seq_idx=seq_idx,
                 backend=backend)
    if not with_grad:
        return y.detach(), None
    return y.detach(), torch.autograd.grad(y, inputs, torch.ones_like(y) / y.numel() ** 0.5)


def time_ms(fn, cuda, repeat):
    if cuda:
        from triton.testing import do_bench
        return do_bench(fn)
    fn()                                                                      # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def max_err(out, ref):
    y, grads = out
    y_ref, grads_ref = ref
    pairs = [(y, y_ref)] + (list(zip(grads, grads_ref)) if grads is not None else [])
    return max(((a.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)).item()
               for a, r in pairs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny CPU run (chunked backend, fp32) to check the script")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--docs", type=int, default=DOCS_PER_ROW, help="documents per row of the packed variant")
    p.add_argument("--repeat", type=int, default=3, help="CPU timing repeats (the GPU uses do_bench's)")
    p.add_argument("--rounds", type=int, default=5, help="rounds in which the variants take turns (medians)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype, backend, shape, chunk = "cpu", torch.float32, "chunked", SMOKE_SHAPE, 32
    else:
        if not torch.cuda.is_available():
            print("error: needs a CUDA GPU (or --smoke for a tiny CPU run)", file=sys.stderr)
            return 2
        device, dtype, backend, shape, chunk = "cuda", torch.bfloat16, "triton", GPU_SHAPE, args.chunk
    b, l, h, hp, n = shape
    if not 1 <= args.docs <= l:
        print(f"error: --docs must be between 1 and the length {l}, got {args.docs}", file=sys.stderr)
        return 2
    cuda = device == "cuda"
    inputs = make_inputs(*shape, device=device, dtype=dtype)
    variants = [("seq_idx=None", None),
                ("1 document per row", torch.zeros(b, l, dtype=torch.int32, device=device)),
                (f"{args.docs} documents per row", packed_seq_idx(b, l, args.docs, device))]

    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {str(dtype).replace('torch.', '')}, backend {backend}, "
          f"chunk {chunk}, shape b={b} L={l} heads={h} headdim={hp} d_state={n}")
    print("| mode | variant | ms | x none | max err vs chunked |")
    print("| --- | --- | ---: | ---: | ---: |")
    records = []
    for with_grad in (False, True):
        mode = "fwd+bwd" if with_grad else "fwd"
        runs, errs = [], []
        with torch.set_grad_enabled(with_grad):
            for _, seq_idx in variants:
                run = functools.partial(call, inputs, backend, chunk, seq_idx, with_grad)
                out = run()                                                   # compiles this variant's kernels
                errs.append(max_err(out, call(inputs, "chunked", chunk, seq_idx, with_grad)) if cuda else None)
                runs.append(run)
            # the variants take turns, round after round, and each reports its median: one run's clock or order
            # effects (seen on the H200: +-10% between two runs of this script) then hit every variant alike
            rounds = [[time_ms(run, cuda, args.repeat) for run in runs] for _ in range(args.rounds)]
        times = [statistics.median(column) for column in zip(*rounds)]
        for (label, _), ms, err in zip(variants, times, errs):
            print(f"| {mode} | {label} | {ms:.3f} | {ms / times[0]:.2f} | "
                  f"{'-' if err is None else f'{err:.1e}'} |", flush=True)
            records.append(dict(mode=mode, variant=label, ms=ms, ratio_to_none=ms / times[0], max_err=err))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=where, torch=torch.__version__, dtype=str(dtype),
                                                   backend=backend, chunk=chunk, shape=dict(
                                                       batch=b, length=l, nheads=h, headdim=hp, d_state=n),
                                                   docs_per_row=args.docs, rows=records), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
