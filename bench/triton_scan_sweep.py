"""Block-size sweep of the Triton scan (kernels/triton_scan.py) on a GPU, checked against the chunked backend.

    python bench/triton_scan_sweep.py                                       # the issue's first shape, default configs
    python bench/triton_scan_sweep.py 8x2048x1536x16 "8,8,32,1,32,1;4,16,32,1,32,1"

A config is CHUNK_LEN, SEG_CHUNKS, FWD_PER_THREAD, FWD_WARPS, BWD_PER_THREAD, BWD_WARPS (the module's knobs). For
each: forward and forward+backward medians (triton.testing.do_bench), relative L2 error of y and the worst input
gradient against "chunked", and registers/spills of the compiled kernels. Inputs are bench/bench_scan.py's.
"""
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

DEFAULT_CONFIGS = "8,8,32,1,32,1;4,16,32,1,32,1;8,1,32,1,32,1;8,8,32,1,16,2;4,16,64,1,16,1"


def registers(kernel):
    return ",".join(f"{k.n_regs}r/{k.n_spills}s" for cache in kernel.device_caches.values() for k in cache[0].values())


def main():
    if not torch.cuda.is_available():
        sys.exit("this sweep needs a CUDA GPU")
    shape = tuple(int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8x2048x1536x16").split("x"))
    configs = [tuple(map(int, c.split(","))) for c in (sys.argv[2] if len(sys.argv) > 2 else DEFAULT_CONFIGS).split(";")]
    inputs = make_inputs(*shape, dtype=torch.bfloat16, device="cuda")
    u, delta, A, B, C, D, z, bias = inputs
    dy = torch.randn_like(u)
    args = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)

    def fwd():
        with torch.no_grad():
            return ts.selective_scan_triton(u, delta, A, B, C, **args)

    def fwd_bwd():
        return torch.autograd.grad(ts.selective_scan_triton(u, delta, A, B, C, **args), inputs, dy)

    y_ref = selective_scan_chunked(u, delta, A, B, C, **args)
    g_ref = torch.autograd.grad(y_ref, inputs, dy)
    print(f"{torch.cuda.get_device_name()}, shape {'x'.join(map(str, shape))} (b x L x d x n), bf16; floor "
          f"fwd {floor_ms(*shape, 2, False):.3f} ms, fwd+bwd {floor_ms(*shape, 2, True):.3f} ms", flush=True)
    for config in configs:
        (ts.CHUNK_LEN, ts.SEG_CHUNKS, ts.FWD_PER_THREAD, ts.FWD_WARPS, ts.BWD_PER_THREAD, ts.BWD_WARPS) = config
        ts._scan_fwd_kernel.device_caches.clear()
        ts._scan_bwd_kernel.device_caches.clear()
        y, g = fwd(), fwd_bwd()
        y_err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
        g_err = max(((a.float() - r.float()).norm() / r.float().norm()).item() for a, r in zip(g, g_ref))
        t_fwd = triton.testing.do_bench(fwd, rep=100, return_mode="median")
        t_fb = triton.testing.do_bench(fwd_bwd, rep=200, return_mode="median")
        print(f"config {','.join(map(str, config))}: fwd {t_fwd:.3f} ms  fwd+bwd {t_fb:.3f} ms  y err {y_err:.1e}  "
              f"grad err {g_err:.1e}  fwd {registers(ts._scan_fwd_kernel)}  bwd {registers(ts._scan_bwd_kernel)}",
              flush=True)


if __name__ == "__main__":
    main()
