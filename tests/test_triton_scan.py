"""The Triton scan and single-token kernels against the reference: values, last state and every gradient.

On the CPU the kernels run under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before Triton
is imported; so a plain `pytest` run has `test_interpreter_suite` re-run this module in a subprocess with the
variable set, and the tests marked `interp` run there (small shapes). The `gpu` tests run on CUDA (larger shapes,
bf16) and are skipped without a GPU.
"""
import os

import pytest
import torch

from helpers import run_interpreter_suite

from kernels import selective_scan, selective_state_update
from kernels.reference import selective_scan_ref
from kernels.state_update import selective_state_update_torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="runs inside test_interpreter_suite (TRITON_INTERPRET=1)")
release = pytest.mark.triton_release     # an interp_ case .ci/run runs on the other Triton releases too

# Relative error bounds (max |out - ref| / max |ref|). bf16 outputs carry bf16 rounding (2^-8 relative per element).
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 4e-3}


def make_inputs(batch, dim, seqlen, dstate, dtype, device, seed, with_d=True, with_z=True, with_bias=True):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    u = rand(batch, dim, seqlen).to(device, dtype)
    delta = rand(batch, dim, seqlen, scale=0.5).to(device, dtype)
    A = -(torch.rand(dim, dstate, generator=g) * 2 + 0.05).to(device)
    B = rand(batch, dstate, seqlen).to(device, dtype)
    C = rand(batch, dstate, seqlen).to(device, dtype)
    D = rand(dim).to(device) if with_d else None
    z = rand(batch, dim, seqlen).to(device, dtype) if with_z else None
    bias = rand(dim, scale=0.5, shift=-1.0).to(device) if with_bias else None
    return u, delta, A, B, C, D, z, bias


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def token_major(t, pad=0):
    """The same values as a transposed view of (b, l, c + pad) storage, of which t is the first c columns."""
    if t is None:
        return None
    b, c, l = t.shape
    storage = torch.randn(b, l, c + pad, dtype=t.dtype, device=t.device)
    storage[:, :, :c] = t.transpose(1, 2)
    return storage[:, :, :c].transpose(1, 2)


def check_scan(shape, dtype, device, seed=0, softplus=True, last_state=True, token_major=False, **flags):
    """Triton vs ref: y, the last state, and the gradient of every input of a random linear loss of both.
    token_major: the Triton call gets the model's layout (transposed views of (b, l, ·) storage)."""
    inputs = make_inputs(*shape, dtype, device, seed, **flags)
    if token_major:
        u, delta, A, B, C, D, z, bias = inputs
        inputs = (globals()["token_major"](u), globals()["token_major"](delta), A,
                  globals()["token_major"](B, pad=3), globals()["token_major"](C, pad=1), D,
                  globals()["token_major"](z, pad=2), bias)
    present = [t.requires_grad_() if t is not None else None for t in inputs]
    leaves = [t for t in present if t is not None]
    g = torch.Generator().manual_seed(seed + 1)
    results = {}
    for backend in ("triton", "ref"):
        u, delta, A, B, C, D, z, bias = present
        if backend == "ref":
            out = selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=softplus,
                                     return_last_state=last_state)
        else:
            out = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=softplus,
                                 return_last_state=last_state, backend="triton")
        y, last = out if last_state else (out, None)
        g.manual_seed(seed + 1)
        w_y = torch.randn(y.shape, generator=g).to(device)
        loss = (y.float() * w_y).sum()
        if last_state:
            loss = loss + (last * torch.randn(last.shape, generator=g).to(device)).sum()
        results[backend] = (y, last, torch.autograd.grad(loss, leaves))
    (y, last, grads), (y_ref, last_ref, grads_ref) = results["triton"], results["ref"]
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == y_ref.shape
    if token_major:
        assert y.transpose(1, 2).is_contiguous()
    assert torch.isfinite(y.float()).all()
    assert rel_err(y, y_ref) < tol, f"y: {rel_err(y, y_ref):.2e}"
    if last_state:
        assert last.dtype == torch.float32
        assert rel_err(last, last_ref) < max(tol / 4, 2e-5), f"last state: {rel_err(last, last_ref):.2e}"
    names = [n for n, t in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), present) if t is not None]
    for name, leaf, grad, grad_ref in zip(names, leaves, grads, grads_ref):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, name
        if token_major and name in ("u", "delta", "z"):   # written in the input's layout: no copy to transpose
            assert grad.transpose(1, 2).is_contiguous(), name
        assert torch.isfinite(grad.float()).all(), name
        if grad_ref.abs().max() == 0:                     # e.g. dA at L = 1, where h_{t-1} is zero
            assert grad.abs().max() < 1e-6, name
        else:
            # A, D and delta_bias gradients sum over batch and time: bf16 rounding of each term adds up.
            assert rel_err(grad, grad_ref) < tol * (2 if dtype != torch.float32 else 5), \
                f"d{name}: {rel_err(grad, grad_ref):.2e}"


# ---------------------------------------------------------------- CPU, under the interpreter (small shapes)

@interp
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 7, 4), (1, 3, 17, 3), (2, 6, 33, 16), (1, 4, 16, 2),
                                   (1, 2, 5, 33), (1, 17, 9, 16), (1, 33, 5, 3), (1, 2, 9, 256)])
def test_interp_fp32_all_flags(shape):
    check_scan(shape, torch.float32, "cpu", seed=sum(shape))


@interp
@pytest.mark.parametrize("seg_chunks", [1, 3])
def test_interp_many_segments(seg_chunks, monkeypatch):
    """The backward restarts from the forward's segment states: several segments, a ragged last one."""
    import kernels.triton_scan as triton_scan
    monkeypatch.setattr(triton_scan, "SEG_CHUNKS", seg_chunks)
    check_scan((1, 3, 29, 4), torch.float32, "cpu", seed=13)


@interp
@pytest.mark.parametrize("seg_chunks,target_programs", [(1, 1 << 20), (2, 1 << 20), (2, 3), (1, 2)])
def test_interp_sequence_parts(seg_chunks, target_programs, monkeypatch):
    """The backward splits the sequence into parts that run in parallel, each starting from the carry that the
    later parts hand it (pass 1): one segment per part, several, a ragged last part, and a single part."""
    import kernels.triton_scan as triton_scan
    monkeypatch.setattr(triton_scan, "SEG_CHUNKS", seg_chunks)
    monkeypatch.setattr(triton_scan, "TARGET_PROGRAMS", target_programs)
    check_scan((2, 3, 83, 4), torch.float32, "cpu", seed=17)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_token_major_layout(dtype, monkeypatch):
    """The model's layout: u, delta, z and B, C are transposed views of (b, l, ·) storage (z and B, C slices of
    wider rows). y and every gradient come back in the same layout, with the reference's values."""
    import kernels.triton_scan as triton_scan
    monkeypatch.setattr(triton_scan, "SEG_CHUNKS", 2)
    check_scan((2, 5, 37, 4), dtype, "cpu", seed=23, token_major=True)


@interp
@pytest.mark.parametrize("flags", [dict(with_d=False, with_z=False, with_bias=False, softplus=False),
                                   dict(with_z=False, last_state=False), dict(with_d=False, with_bias=False)])
def test_interp_fp32_flag_combinations(flags):
    check_scan((2, 3, 11, 4), torch.float32, "cpu", seed=3, **flags)


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=release)])
def test_interp_half_inputs(dtype):
    check_scan((2, 4, 19, 8), dtype, "cpu", seed=5)


@interp
def test_interp_non_contiguous_inputs():
    """Views with strided channels or time (as a model's projections produce) give the same result."""
    u, delta, A, B, C, D, z, bias = make_inputs(2, 4, 9, 4, torch.float32, "cpu", seed=7)
    delta_t = delta.transpose(1, 2).contiguous().transpose(1, 2)          # time stride != 1
    BC = torch.cat([B, C], dim=1)                                           # (b, 2n, l): B, C are slices
    args = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    y, last = selective_scan(u, delta_t, A, BC[:, :4], BC[:, 4:], backend="triton", **args)
    y_ref, last_ref = selective_scan_ref(u, delta, A, B, C, **args)
    assert rel_err(y, y_ref) < 2e-5 and rel_err(last, last_ref) < 2e-5


if INTERPRET:
    import triton
    import triton.language as tl

    from kernels.triton_scan import _adjoint_combine, _affine_combine

    @triton.jit
    def _scan_flip_reduce_kernel(a_ptr, b_ptr, out_a_ptr, out_b_ptr, sum_a_ptr, sum_b_ptr, L: tl.constexpr,
                                 N: tl.constexpr, ADJOINT: tl.constexpr, REVERSE: tl.constexpr):
        offs = tl.arange(0, L)[:, None] * N + tl.arange(0, N)[None, :]
        a, b = tl.load(a_ptr + offs), tl.load(b_ptr + offs)
        if ADJOINT:
            a, b = tl.associative_scan((a, b), 0, _adjoint_combine, reverse=REVERSE)
        else:
            a, b = tl.associative_scan((a, b), 0, _affine_combine, reverse=REVERSE)
        b = tl.flip(b, 0)                                       # xor_sum reductions (an integer user combine)
        tl.store(out_a_ptr + offs, a)
        tl.store(out_b_ptr + offs, b)
        sum_a, sum_b = tl.reduce((a, b), 0, _affine_combine)    # a float user combine, whose order shows in the bits
        tl.store(sum_a_ptr + tl.arange(0, N), sum_a)
        tl.store(sum_b_ptr + tl.arange(0, N), sum_b)


@interp
@pytest.mark.parametrize("adjoint", [False, pytest.param(True, marks=release)])
def test_interp_fast_loops_give_the_interpreters_bits(adjoint):
    """conftest.py swaps the interpreter's element-by-element scan and reduce loops for tests/interpreter_loops.py's
    slice-at-a-time ones: through both of the kernels' combine functions, forward and reversed, tl.flip and a
    tl.reduce, they must give the interpreter's own results bit for bit (and must have been installed)."""
    import interpreter_loops
    from triton.runtime.interpreter import ReduceOps, ScanOps

    assert set(interpreter_loops.ELEMENTWISE) == {"generic_scan", "generic_reduce"}, \
        "tests/interpreter_loops.py found no ScanOps.generic_scan / ReduceOps.generic_reduce in this Triton's " \
        "interpreter: fit it to this release (without it the scan tests run element by element, several times slower)"
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(16, 8, generator=g), torch.randn(16, 8, generator=g)
    for reverse in (False, True):
        results = []
        for loops in ({}, interpreter_loops.ELEMENTWISE):        # the installed ones, then the interpreter's own
            out = torch.empty_like(a), torch.empty_like(b), torch.empty(8), torch.empty(8)
            installed = ScanOps.generic_scan, ReduceOps.generic_reduce
            ScanOps.generic_scan = loops.get("generic_scan", installed[0])
            ReduceOps.generic_reduce = loops.get("generic_reduce", installed[1])
            try:
                _scan_flip_reduce_kernel[(1,)](a, b, *out, L=16, N=8, ADJOINT=adjoint, REVERSE=reverse)
            finally:
                ScanOps.generic_scan, ReduceOps.generic_reduce = installed
            results.append(out)
        for fast, own in zip(*results):
            assert torch.equal(fast, own)
        assert not torch.equal(results[0][1], b.flip(0))        # the scan did something


@interp
def test_interp_only_last_state_used():
    """A loss of the last state alone (y unused) still back-propagates through every step."""
    u, delta, A, B, C, D, z, bias = [t.requires_grad_() for t in make_inputs(1, 3, 10, 4, torch.float32, "cpu", 9)]
    grads = {}
    for backend in ("triton", "ref"):
        _, last = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                 return_last_state=True, backend=backend)
        grads[backend] = torch.autograd.grad(last.sum(), (u, delta, A, B))
    for grad, grad_ref in zip(grads["triton"], grads["ref"]):
        assert rel_err(grad, grad_ref) < 2e-5


@interp
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=release)])
@pytest.mark.parametrize("batch,dim,dstate", [(2, 5, 16), (1, 3, 7)])
def test_interp_state_update(dtype, batch, dim, dstate):
    check_state_update(batch, dim, dstate, dtype, "cpu")


def check_state_update(batch, dim, dstate, dtype, device, steps=3):
    """Several Triton steps track both the PyTorch step and the full scan's states."""
    g = torch.Generator().manual_seed(batch * 100 + dim + dstate)
    A = -(torch.rand(dim, dstate, generator=g) + 0.1).to(device)
    D, bias = torch.randn(dim, generator=g).to(device), torch.randn(dim, generator=g).to(device)
    state = torch.randn(batch, dim, dstate, generator=g).to(device)
    state_ref = state.clone()
    for _ in range(steps):
        x, dt, z = (torch.randn(batch, dim, generator=g).to(device, dtype) for _ in range(3))
        B, C = (torch.randn(batch, dstate, generator=g).to(device, dtype) for _ in range(2))
        args = dict(D=D, z=z, dt_bias=bias, dt_softplus=True)
        y = selective_state_update(state, x, dt, A, B, C, backend="triton", **args)
        y_ref = selective_state_update_torch(state_ref, x, dt, A, B, C, **args)
        assert y.dtype == dtype and y.shape == (batch, dim)
        assert rel_err(y, y_ref) < TOL[dtype]
        assert rel_err(state, state_ref) < 1e-5


def test_triton_needs_cuda_or_interpreter():
    if INTERPRET or torch.cuda.is_available():
        pytest.skip("the kernels can run here")
    u, delta, A, B, C, *_ = make_inputs(1, 2, 3, 2, torch.float32, "cpu", 0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        selective_scan(u, delta, A, B, C, backend="triton")


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels, not the interpreter's")
@pytest.mark.parametrize("dim,dstate,seqlen,flags", [(1536, 16, 2048, True), (24, 5, 97, False), (8, 256, 129, True)])
def test_kernels_compile_for_hopper(dim, dstate, seqlen, flags):
    """The interpreter runs the kernels' Python, not Triton's compiler: compile them for sm_90 here (no GPU needed,
    Triton ships ptxas) so that a kernel the compiler rejects fails CI, not the first GPU run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.triton_scan as ts
    from kernels.triton_state_update import _state_update_kernel

    def compile_kernel(fn, constexprs, num_warps):
        io = ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr", "du_ptr", "ddelta_ptr", "dz_ptr",
              "x_ptr", "dt_ptr")
        signature = {name: "constexpr" if name in constexprs else ("*bf16" if name in io else "*fp32")
                     if name.endswith("_ptr") else "i32" for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert len(kernel.asm["cubin"]) > 0

    common = dict(HAS_D=flags, HAS_Z=flags, HAS_BIAS=flags, SOFTPLUS=flags)
    for fn, per_thread, warps, extra in ((ts._scan_fwd_kernel, ts.FWD_PER_THREAD, ts.FWD_WARPS,
                                          dict(SAVE_SEGS=True, HAS_SEQ_IDX=False)),
                                         (ts._scan_bwd_kernel, ts.BWD_PER_THREAD, ts.BWD_WARPS,
                                          dict(HAS_DLAST=True, HAS_SEQ_IDX=False))):
        cfg = ts._config(dim, dstate, seqlen, per_thread, warps)
        num_warps = cfg.pop("num_warps")
        compile_kernel(fn, dict(**common, **extra, SEG_CHUNKS=ts.SEG_CHUNKS, **cfg), num_warps)
    cfg = ts._config(dim, dstate, seqlen, ts.BWD_PER_THREAD, ts.BWD_WARPS)
    num_warps = cfg.pop("num_warps")
    compile_kernel(ts._scan_bwd_carry_kernel, dict(HAS_Z=flags, HAS_BIAS=flags, SOFTPLUS=flags, HAS_SEQ_IDX=False,
                                                   **cfg), num_warps)
    compile_kernel(_state_update_kernel, dict(**common, BLOCK_D=32, BLOCK_N=triton.next_power_of_2(dstate)), 4)


@pytest.mark.skipif(INTERPRET, reason="this is the launcher of the interpreter run")
def test_interpreter_suite():
    """Run this module's `interp` tests in a fresh interpreter with TRITON_INTERPRET=1 (see the module doc)."""
    run_interpreter_suite(__file__)


# ---------------------------------------------------------------- GPU (larger shapes, bf16)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 64, 1000, 16), (1, 33, 4099, 16), (2, 48, 257, 64), (1, 8, 129, 256),
                                   (3, 130, 1, 16), (2, 24, 97, 5)])
def test_gpu_scan(shape, dtype):
    check_scan(shape, dtype, "cuda", seed=shape[2])


@pytest.mark.gpu
def test_gpu_scan_flags():
    check_scan((2, 96, 300, 16), torch.bfloat16, "cuda", seed=11, with_d=False, with_z=False, with_bias=False,
               softplus=False, last_state=False)


@pytest.mark.gpu
def test_gpu_model_shaped_scan():
    """A mixer's call at a training shape: bf16 with delta_bias and softplus, L 2048, d_inner 512."""
    check_scan((2, 512, 2048, 16), torch.bfloat16, "cuda", seed=1, last_state=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,dim,dstate", [(1, 1536, 16), (64, 1536, 16), (3, 100, 7), (2, 40, 256)])
def test_gpu_state_update(dtype, batch, dim, dstate):
    check_state_update(batch, dim, dstate, dtype, "cuda")


@pytest.mark.gpu
def test_gpu_auto_picks_triton():
    from kernels import resolve_backend
    assert resolve_backend("auto", "cuda") == "triton"
