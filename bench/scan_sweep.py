"""Sweep of the Triton scan's knobs and memory layouts on a GPU, checked against the chunked backend.

    python bench/scan_sweep.py                                   # both issue shapes, both layouts, default configs
    python bench/scan_sweep.py --shapes 8x2048x1536x16 --configs "BWD_TI=8,BWD_TL=4;DBC_ATOMIC=1"
    python bench/scan_sweep.py --baseline path/to/old_triton_scan.py   # an earlier version in the same run

A config sets some of the module's knobs (KNOBS below), the rest keeping their defaults; "default" is none. Layouts: "bdl" = contiguous (batch, d_inner, L) operands; "bld" = the model's, transposed views
of (batch, L, ·) storage (z and B, C slices of wider rows, as the projections produce them). For each: forward and
forward+backward medians (triton.testing.do_bench), relative L2 error of y and of the worst input gradient against
"chunked". A baseline module (an earlier triton_scan.py) runs first, in the contiguous layout, for a ratio.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import kernels.triton_scan as ts  # noqa: E402
from bench_scan import floor_ms, make_inputs  # noqa: E402
from kernels.chunked import selective_scan_chunked  # noqa: E402

KNOBS = ("CHUNK_LEN", "SEG_CHUNKS", "FWD_PER_THREAD", "FWD_WARPS", "BWD_PER_THREAD", "BWD_WARPS", "TARGET_PROGRAMS",
         "BWD_MAXNREG")
DEFAULT_CONFIGS = "default;BWD_MAXNREG=168;BWD_MAXNREG=128;TARGET_PROGRAMS=16384,BWD_MAXNREG=128"


def parse_config(text):
    """ "KNOB=value,KNOB=value" (or "default") -> {knob: int}"""
    if text.strip() == "default":
        return {}
    config = {}
    for item in text.split(","):
        knob, value = item.split("=")
        if knob.strip() not in KNOBS:
            raise SystemExit(f"unknown knob {knob!r}; knobs: {', '.join(KNOBS)}")
        config[knob.strip()] = None if value.strip() == "None" else int(value)
    return config


def token_major(t, pad=0):
    """t's values as a transposed view of (b, l, c + pad) storage."""
    b, c, l = t.shape
    storage = torch.empty(b, l, c + pad, dtype=t.dtype, device=t.device)
    storage[:, :, :c] = t.transpose(1, 2)
    return storage[:, :, :c].transpose(1, 2)


def layout_inputs(inputs, layout):
    u, delta, A, B, C, D, z, bias = inputs
    if layout == "bdl":
        return inputs
    return (token_major(u), token_major(delta), A, token_major(B, 16), token_major(C, 16), D, token_major(z, 1536),
            bias)


def measure(scan, inputs, dy, y_ref, g_ref):
    u, delta, A, B, C, D, z, bias = inputs
    leaves = [t.detach().requires_grad_() for t in inputs]
    args = dict(delta_softplus=True)

    def fwd():
        with torch.no_grad():
            return scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, **args)

    def fwd_bwd():
        lu, ld, lA, lB, lC, lD, lz, lb = leaves
        y = scan(lu, ld, lA, lB, lC, D=lD, z=lz, delta_bias=lb, **args)
        return torch.autograd.grad(y, leaves, dy)

    y, g = fwd(), fwd_bwd()
    y_err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
    g_err = max(((a.float() - r.float()).norm() / r.float().norm()).item() for a, r in zip(g, g_ref))
    t_fwd = triton.testing.do_bench(fwd, rep=100, return_mode="median")
    t_fb = triton.testing.do_bench(fwd_bwd, rep=200, return_mode="median")
    return t_fwd, t_fb, y_err, g_err


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8x2048x1536x16,4x8192x2048x16")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--layouts", default="bld")
    parser.add_argument("--baseline", default=None, help="an earlier triton_scan.py to time first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this sweep needs a CUDA GPU")
    baseline = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_triton_scan", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    configs = [(c, parse_config(c)) for c in args.configs.split(";")]
    defaults = {k: getattr(ts, k) for k in KNOBS}
    for shape_text in args.shapes.split(","):
        shape = tuple(int(x) for x in shape_text.split("x"))
        inputs = make_inputs(*shape, dtype=torch.bfloat16, device="cuda")
        u, delta, A, B, C, D, z, bias = inputs
        dy = torch.randn_like(u)
        leaves = [t.detach().requires_grad_() for t in inputs]
        y_ref = selective_scan_chunked(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7],
                                       delta_softplus=True)
        g_ref = torch.autograd.grad(y_ref, leaves, dy)
        y_ref = y_ref.detach()
        print(f"\n{torch.cuda.get_device_name()}, shape {shape_text} (b x L x d x n), bf16; floor "
              f"fwd {floor_ms(*shape, 2, False):.3f} ms, fwd+bwd {floor_ms(*shape, 2, True):.3f} ms", flush=True)
        base_fb = {}
        if baseline is not None:
            for layout in args.layouts.split(","):
                t_f, t_fb, ye, ge = measure(baseline.selective_scan_triton, layout_inputs(inputs, layout), dy, y_ref,
                                            g_ref)
                base_fb[layout] = t_fb
                print(f"  baseline {Path(args.baseline).name:<24} {layout}: fwd {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms  "
                      f"y err {ye:.1e}  grad err {ge:.1e}", flush=True)
        for name, config in configs:
            for knob, value in {**defaults, **config}.items():
                setattr(ts, knob, value)
            for layout in args.layouts.split(","):
                try:
                    t_f, t_fb, ye, ge = measure(ts.selective_scan_triton, layout_inputs(inputs, layout), dy, y_ref,
                                                g_ref)
                except Exception as error:          # a config the compiler rejects: say so, go on with the rest
                    print(f"  config {name:<32} {layout}: failed: {str(error).splitlines()[0][:160]}", flush=True)
                    continue
                ratio = f"  baseline/this {base_fb[layout] / t_fb:.2f}x" if layout in base_fb else ""
                print(f"  config {name:<32} {layout}: fwd {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms  "
                      f"y err {ye:.1e}  grad err {ge:.1e}{ratio}", flush=True)
        for knob, value in defaults.items():
            setattr(ts, knob, value)


if __name__ == "__main__":
    main()
