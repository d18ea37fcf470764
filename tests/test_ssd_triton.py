"""The Triton SSD scan (kernels/triton_ssd.py, its backward kernels/triton_ssd_bwd.py) against the sequential
reference and the chunked scan: values, the final state and every gradient; one graph under torch.compile; the
kernels compiled for sm_90.

On the CPU the kernels run under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before Triton
is imported; so a plain `pytest` run has `test_interpreter_suite` re-run this module in a subprocess with the
variable set, and the `interp_` tests run there (small shapes and chunks). The `gpu` tests run on CUDA at real
shapes and are skipped without a GPU.
"""
import math
import os

import pytest
import torch

from helpers import run_interpreter_suite

from kernels.ssd import ssd_scan
from test_ssd import NAMES, make_inputs, rel_err, run

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="runs inside test_interpreter_suite (TRITON_INTERPRET=1)")
release = pytest.mark.triton_release     # an interp_ case .ci/run runs on the other Triton releases too

# Relative error bounds (max |a - b| / max |b|) against the fp32 reference, for y / the final state / gradients.
TOL = {torch.float32: (1e-5, 1e-5, 1e-4), torch.bfloat16: (2e-2, 1e-2, 2e-2)}
# ... and of the gradients against the chunked scan's (fp32 inputs: the same math in another order)
TOL_GRAD_CHUNKED = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def grad_err(name, a, r, grads_ref, dtype):
    """rel_err, except for dt_bias with bf16 inputs: its gradient is a sum over every (batch, step) of dt's, which
    cancels to far below its terms (the Triton backward's bf16 dot operands leave errors of a bf16 ulp of each
    term), so its error is taken relative to the sum of the terms' sizes, sum over (b, l) of |dt's gradient|."""
    if name != "dt_bias" or dtype == torch.float32:
        return rel_err(a, r)
    scale = grads_ref[NAMES.index("dt")].float().abs().sum((0, 1))                      # (h,)
    return ((a.float() - r.float()).abs() / scale).max().item()


def check_against_ref_and_chunked(inputs, chunk, dtype, dt_limit=(0.0, math.inf)):
    y_ref, f_ref, g_ref = run(inputs, "ref", dt_limit=dt_limit)
    y_chk, f_chk, g_chk = run(inputs, "chunked", chunk_size=chunk, dt_limit=dt_limit)
    y, f, grads = run(inputs, "triton", chunk_size=chunk, dt_limit=dt_limit)
    tol_y, tol_f, tol_g = TOL[dtype]
    assert y.dtype == dtype and f.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(f).all()
    assert rel_err(y, y_ref) < tol_y and rel_err(f, f_ref) < tol_f
    assert rel_err(y, y_chk) < tol_y and rel_err(f, f_chk) < tol_f
    for name, a, r, c in zip(NAMES, grads, g_ref, g_chk):
        assert a.dtype == inputs[NAMES.index(name)].dtype, name
        assert grad_err(name, a, r, g_ref, dtype) < tol_g, name
        assert grad_err(name, a, c, g_chk, dtype) < TOL_GRAD_CHUNKED[dtype], name


@interp
@pytest.mark.parametrize("l, chunk, g, D_per_channel, dtype", [
    (13, 4, 1, False, torch.float32),      # 3 chunks and a partial one
    pytest.param(21, 8, 2, True, torch.float32, marks=release),   # ngroups 2, D per channel
    (40, 16, 1, False, torch.float32),     # 2 chunks of 16 and 8 steps
    (16, 16, 2, False, torch.float32),     # exactly one chunk
    (1, 4, 2, False, torch.float32),       # a single token
    pytest.param(19, 8, 2, False, torch.bfloat16, marks=release),
    (37, 16, 1, True, torch.bfloat16),
])
def test_interp_matches_ref_and_chunked(l, chunk, g, D_per_channel, dtype):
    check_against_ref_and_chunked(make_inputs(l=l, g=g, D_per_channel=D_per_channel, dtype=dtype), chunk, dtype)


@interp
@pytest.mark.parametrize("dtype", [torch.float32])
def test_interp_several_blocks_per_chunk(dtype, monkeypatch):
    """16-wide blocks in a chunk of 40 steps and a headdim of 20: several row, step and headdim blocks per chunk
    (the GPU's 64-wide blocks in a chunk of 256), the diagonal blocks' step loop stopping at the row block."""
    import kernels.triton_ssd as ks
    for name in ("BLOCK_M", "BLOCK_K", "BLOCK_P"):
        monkeypatch.setattr(ks, name, 16)
    monkeypatch.setattr(ks, "STATE_BLOCK", 64)
    check_against_ref_and_chunked(make_inputs(l=60, h=2, p=20, g=2, n=8, dtype=dtype), 40, dtype)


@interp
@pytest.mark.parametrize("block_m, block_k", [(32, 16), (16, 32)])
def test_interp_blocks_of_unequal_sizes(block_m, block_k, monkeypatch):
    """Row and step blocks of different sizes in a chunk of 40 (the backward's dC and dB kernels walk the blocks
    of dCB on and below the diagonal from either side)."""
    import kernels.triton_ssd as ks
    monkeypatch.setattr(ks, "BLOCK_M", block_m)
    monkeypatch.setattr(ks, "BLOCK_K", block_k)
    monkeypatch.setattr(ks, "BLOCK_P", 16)
    check_against_ref_and_chunked(make_inputs(l=45, h=2, p=4, g=2, n=6), 40, torch.float32)


@interp
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_interp_model_call_without_final_state(with_initial_state):
    """The Mamba-2 mixer's call: D, dt_bias, softplus and dt_limit, no z, y only (no gradient into a final state),
    with and without an initial state; every gradient against the chunked scan's."""
    x, dt, A, B, C, D, _, dt_bias, h0 = make_inputs(l=14, g=2)
    h0 = h0 if with_initial_state else None
    leaves = [t for t in (x, dt, A, B, C, D, dt_bias, h0) if t is not None]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    out = {}
    for backend in ("chunked", "triton"):
        y = ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.05, 2.0),
                     initial_states=h0, chunk_size=8, backend=backend)
        out[backend] = [y.detach()] + list(torch.autograd.grad((y * dy).sum(), leaves))
    for a, r in zip(out["triton"], out["chunked"]):
        assert rel_err(a, r) < 1e-5


@interp
def test_interp_dt_limit():
    check_against_ref_and_chunked(make_inputs(l=11, g=2), 4, torch.float32, dt_limit=(0.3, 0.9))


@interp
def test_interp_no_optional_inputs_and_no_final_state():
    """No D, z, dt_bias or initial state; y only (the final state gets no gradient)."""
    x, dt, A, B, C, *_ = make_inputs(l=10, g=2)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    out = {}
    for backend in ("ref", "triton"):
        for t in (x, dt, A, B, C):
            t.grad = None
        y = ssd_scan(x, dt, A, B, C, dt_softplus=True, chunk_size=4, backend=backend)
        (y * dy).sum().backward()
        out[backend] = [y.detach()] + [t.grad.clone() for t in (x, dt, A, B, C)]
    for name, a, r in zip(["y", "x", "dt", "A", "B", "C"], out["triton"], out["ref"]):
        assert rel_err(a, r) < 1e-4, name


@interp
def test_interp_extreme_decay_gives_no_nan():
    # dt*A down to about -2e5 per step: every decay underflows to 0, which must stay 0 and not become NaN
    inputs = make_inputs(l=23, g=1, scale_dt=40.0, A_scale=5e3)
    y_ref, f_ref, g_ref = run(inputs, "ref")
    y, f, grads = run(inputs, "triton", chunk_size=8)
    assert torch.isfinite(y).all() and torch.isfinite(f).all() and all(torch.isfinite(t).all() for t in grads)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(f, f_ref) < 1e-5
    for name, a, r in zip(NAMES, grads, g_ref):
        if name != "A":     # dA is a sum of terms each ~0 times huge dt: compare absolutely
            assert rel_err(a, r) < 1e-4, name
    assert (grads[2] - g_ref[2]).abs().max() < 1e-3


@interp
def test_interp_one_graph_under_compile():
    """The custom ops keep the scan in one graph (no break), and a compiled forward+backward matches eager."""
    x, dt, A, B, C, D, z, dt_bias, h0 = make_inputs(l=9, g=2)

    def f(x, dt, A, B, C, D, dt_bias, h0):
        y, final = ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, initial_states=h0,
                            return_final_states=True, chunk_size=4, backend="triton")
        return y.square().sum() + final.sum()

    args = (x, dt, A, B, C, D, dt_bias, h0)
    explained = torch._dynamo.explain(f)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    grads = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        loss = fn(*args)
        grads.append([loss.detach()] + list(torch.autograd.grad(loss, args)))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-6


@interp
def test_interp_model_with_triton_scan():
    """A tiny Mamba-2 with scan_backend="triton": the token-major views the mixer passes, loss and gradients as
    with the chunked scan."""
    from test_mamba2_model import make_model

    ids = torch.randint(0, 53, (2, 11), generator=torch.Generator().manual_seed(0))
    results = []
    for backend in ("chunked", "triton"):
        model = make_model(scan_backend=backend)
        assert model.kernels_for(torch.device("cpu")).mamba2.scan == backend
        _, loss = model(ids, targets=ids, return_logits=False)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-5


def test_triton_needs_cuda_or_interpreter():
    if INTERPRET or torch.cuda.is_available():
        pytest.skip("the kernels can run here")
    x, dt, A, B, C, *_ = [t.detach() for t in make_inputs(l=5)]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ssd_scan(x, dt, A, B, C, backend="triton")


def test_triton_backward_choice_is_checked():
    from kernels.triton_ssd_scan import ssd_scan_triton
    x, dt, A, B, C, *_ = [t.detach() for t in make_inputs(l=5)]
    with pytest.raises(ValueError, match="backward must be 'kernels' or 'vjp'"):
        ssd_scan_triton(x, dt, A, B, C, backward="fast")


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels, not the interpreter's")
@pytest.mark.parametrize("chunk, headdim, dstate, io_type, flags", [
    (256, 64, 128, "bf16", True),       # mamba2-130m: 24 heads x 64, d_state 128, chunk 256, bf16
    (64, 12, 5, "fp32", False),         # odd sizes, fp32 ("ieee" dots), no optional inputs
])
def test_kernels_compile_for_hopper(chunk, headdim, dstate, io_type, flags):
    """The interpreter runs the kernels' Python, not Triton's compiler: compile every kernel for sm_90 here (no GPU
    needed, Triton ships ptxas) so that a kernel the compiler rejects fails CI, not the first GPU run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.triton_ssd as ks
    import kernels.triton_ssd_bwd as kb

    def compile_kernel(fn, constexprs, num_warps=4):
        io = ("x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "y_pre_ptr", "dy_ptr", "dY_ptr", "dx_ptr",
              "ddt_ptr", "dB_ptr", "dC_ptr", "dz_ptr")
        if "HAS_SEQ_IDX" in fn.arg_names:          # packed rows (seq_idx) with the optional inputs
            constexprs = dict(constexprs, HAS_SEQ_IDX=flags)
        signature = {name: "constexpr" if name in constexprs
                     else "*i32" if name == "seq_ptr"
                     else (f"*{io_type}" if name in io else "*fp32") if name.endswith("_ptr")
                     else "fp32" if name in ("dt_min", "dt_max") else "i32" for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert len(kernel.asm["cubin"]) > 0

    cfg = ks._config(chunk, headdim, dstate)
    precision = "ieee" if io_type == "fp32" else "tf32"
    compile_kernel(ks._chunk_cumsum_kernel, dict(HAS_BIAS=flags, SOFTPLUS=flags, HAS_LIMIT=flags,
                                                 BLOCK_Q=triton.next_power_of_2(chunk), BLOCK_H=16))
    compile_kernel(ks._chunk_state_kernel, dict(DOT_PRECISION=precision, BF16_ROUNDTRIP=False, BLOCK_P=cfg["BLOCK_P"],
                                                BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"]))
    compile_kernel(ks._state_passing_kernel, dict(HAS_INIT=flags, BLOCK=ks.STATE_BLOCK))
    compile_kernel(ks._chunk_scan_kernel, dict(HAS_D=flags, D_PER_CHANNEL=not flags, HAS_Z=flags,
                                               DOT_PRECISION=precision, BF16_ROUNDTRIP=False, **cfg))
    # the backward, at the launcher's warps
    dots = dict(DOT_PRECISION=precision, BF16_ROUNDTRIP=False)
    warps = kb._num_warps(cfg["BLOCK_N"])
    compile_kernel(kb._gate_bwd_kernel, dict(BLOCK=1024))
    compile_kernel(kb._dstates_kernel, dict(**dots, BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"],
                                            BLOCK_K=cfg["BLOCK_K"]), warps)
    compile_kernel(kb._state_passing_bwd_kernel, dict(HAS_DFINAL=flags, HAS_INIT=flags, BLOCK=ks.STATE_BLOCK))
    compile_kernel(kb._dx_kernel, dict(HAS_D=flags, D_PER_CHANNEL=not flags, **dots, **cfg), warps)
    for kernel in (kb._dcb_kernel, kb._dc_kernel, kb._db_kernel):
        compile_kernel(kernel, dict(**dots, **cfg), warps)
    compile_kernel(kb._dt_bwd_kernel, dict(HAS_BIAS=flags, SOFTPLUS=flags, HAS_LIMIT=flags,
                                           BLOCK_Q=triton.next_power_of_2(chunk), BLOCK_H=16), 8)


@pytest.mark.skipif(INTERPRET, reason="this is the launcher of the interpreter run")
def test_interpreter_suite():
    """Run this module's `interp_` tests in a fresh interpreter with TRITON_INTERPRET=1 (see the module doc)."""
    run_interpreter_suite(__file__)


# ---------------------------------------------------------------- GPU (real shapes)

def grads_on_device(inputs, backend, chunk, backward="kernels"):
    """y, the final state and every gradient, with dy and dfinal made on the inputs' device (backward: the Triton
    backend's "kernels" or "vjp")."""
    x, dt, A, B, C, D, z, dt_bias, h0 = inputs
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True, initial_states=h0, return_final_states=True,
                  chunk_size=chunk)
    if backend == "triton":
        from kernels.triton_ssd_scan import ssd_scan_triton
        y, final = ssd_scan_triton(x, dt, A, B, C, backward=backward, **kwargs)
    else:
        y, final = ssd_scan(x, dt, A, B, C, backend=backend, **kwargs)
    gen = torch.Generator(device=x.device).manual_seed(1)
    dy = torch.randn(y.shape, generator=gen, device=x.device).to(y.dtype)
    dfinal = torch.randn(final.shape, generator=gen, device=x.device)
    grads = torch.autograd.grad((y.float() * dy.float()).sum() + (final * dfinal).sum(), inputs)
    return y.detach(), final.detach(), grads


def check_gpu(b, l, h, p, g, n, chunk, dtype, baseline):
    cpu = make_inputs(b=b, l=l, h=h, p=p, g=g, n=n, dtype=dtype)
    inputs = [t.detach().cuda().requires_grad_() for t in cpu]
    base = grads_on_device(inputs, baseline, chunk)
    y, f, grads = grads_on_device(inputs, "triton", chunk)
    tol_y, tol_f, tol_g = TOL[dtype]
    assert rel_err(y, base[0]) < tol_y and rel_err(f, base[1]) < tol_f
    for name, a, r in zip(NAMES, grads, base[2]):
        assert a.dtype == r.dtype and torch.isfinite(a).all(), name
        assert grad_err(name, a, r, base[2], dtype) < tol_g, name


@pytest.mark.gpu
@pytest.mark.parametrize("b, l, h, p, g, n, chunk, dtype", [
    (2, 2048, 24, 64, 1, 128, 256, torch.bfloat16),      # mamba2-130m's mixer at a training length
    (2, 2048, 24, 64, 1, 128, 256, torch.float32),
    (1, 1000, 8, 64, 2, 128, 256, torch.bfloat16),       # ngroups 2, a partial last chunk
    (3, 300, 6, 32, 3, 64, 64, torch.bfloat16),
    (2, 129, 4, 12, 1, 5, 16, torch.float32),            # odd sizes
    (2, 129, 4, 12, 1, 5, 16, torch.bfloat16),
    (1, 1, 4, 64, 2, 128, 256, torch.bfloat16),          # one token
    (2, 257, 8, 128, 1, 256, 128, torch.bfloat16),       # headdim 128 (two headdim blocks), d_state 256
])
def test_gpu_matches_chunked(b, l, h, p, g, n, chunk, dtype):
    check_gpu(b, l, h, p, g, n, chunk, dtype, "chunked")


@pytest.mark.gpu
def test_gpu_matches_ref():
    check_gpu(2, 300, 4, 64, 2, 128, 64, torch.float32, "ref")


@pytest.mark.gpu
def test_gpu_kernels_backward_matches_vjp_backward():
    """The Triton backward against the earlier one (autograd through the chunked scan) at the 130m shape, bf16."""
    inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(b=2, l=1024, h=24, p=64, g=1, n=128,
                                                                      dtype=torch.bfloat16)]
    _, _, g_kernels = grads_on_device(inputs, "triton", 256, backward="kernels")
    _, _, g_vjp = grads_on_device(inputs, "triton", 256, backward="vjp")
    for name, a, r in zip(NAMES, g_kernels, g_vjp):
        assert grad_err(name, a, r, g_vjp, torch.bfloat16) < TOL[torch.bfloat16][2], name


@pytest.mark.gpu
def test_gpu_model_gradients_match_chunked():
    """A small Mamba-2 (fp32, ngroups 2, dt_limit) on CUDA: loss and every parameter's gradient with the Triton
    scan as with the chunked one."""
    from test_mamba2_model import make_model
    ids = torch.randint(0, 53, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for backend in ("chunked", "triton"):
        model = make_model(scan_backend=backend, ngroups=2, dt_limit=(0.01, 5.0), chunk_size=64).cuda()
        assert model.kernels_for(ids.device).mamba2.scan == backend
        _, loss = model(ids, targets=ids, return_logits=False)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-4


@pytest.mark.gpu
def test_gpu_auto_picks_triton():
    from kernels.ssd import resolve_ssd_backend
    assert resolve_ssd_backend("auto", "cuda") == "triton"
