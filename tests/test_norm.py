"""add_rms_norm: the Triton kernels against the PyTorch reference (normed, new_residual, and the gradients of x,
residual and weight through both outputs), and the reference against models/layers/base.py's RMSNorm.

As in test_triton_scan.py, the kernels run on the CPU only under Triton's interpreter, switched on before Triton is
imported: `test_interpreter_suite` re-runs this module with TRITON_INTERPRET=1 and the `interp` tests run there.
The `gpu` tests run on CUDA at a model's shape, and are skipped without a GPU.
"""
import os

import pytest
import torch

from helpers import run_interpreter_suite

from kernels import add_rms_norm
from kernels.norm import resolve_norm_backend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="runs inside test_interpreter_suite (TRITON_INTERPRET=1)")
release = pytest.mark.triton_release     # an interp_ case .ci/run runs on the other Triton releases too

# max |out - ref| / max |ref|, by the dtype of the tensor compared (bf16 / fp16 outputs carry one rounding)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def make_inputs(shape, x_dtype, res_dtype, device, seed, strided=False):
    """x, residual (None when res_dtype is None) and weight; with strided, x and residual are non-contiguous views."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]

    def make(dtype, scale):
        if strided:                              # every other row of a wider tensor, columns [1 : d + 1]
            big = (torch.randn(*shape[:-1], 2, d + 3, generator=g) * scale).to(device, dtype)
            view = big[..., 0, 1:d + 1]
            assert not view.is_contiguous()
            return view
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = make(x_dtype, 1.0)
    residual = make(res_dtype, 2.0) if res_dtype is not None else None
    weight = (1 + 0.3 * torch.randn(d, generator=g)).to(device)
    return x, residual, weight


def check_norm(shape, x_dtype, res_dtype, device="cpu", seed=0, out_dtype=None, residual_dtype=torch.float32,
               strided=False, use_normed=True, use_residual=True):
    x, residual, weight = make_inputs(shape, x_dtype, res_dtype, device, seed, strided)
    leaves = [t.requires_grad_() for t in (x, residual, weight) if t is not None]      # (views stay views)
    x_in = leaves[0]
    res_in = leaves[1] if residual is not None else None
    w_in = leaves[-1]
    results = {}
    for backend in ("triton", "torch"):
        normed, new_res = add_rms_norm(x_in, res_in, w_in, eps=1e-5, out_dtype=out_dtype,
                                       residual_dtype=residual_dtype, backend=backend)
        g = torch.Generator().manual_seed(seed + 1)
        loss = torch.zeros((), device=device)
        if use_normed:
            loss = loss + (normed.float() * torch.randn(normed.shape, generator=g).to(device)).sum()
        if use_residual:
            loss = loss + (new_res.float() * torch.randn(new_res.shape, generator=g).to(device)).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)    # (weight unused if normed is)
        results[backend] = (normed, new_res, [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)])
    (normed, new_res, grads), (normed_ref, new_res_ref, grads_ref) = results["triton"], results["torch"]
    out_dtype = out_dtype or weight.dtype
    assert normed.dtype == out_dtype and normed.shape == x.shape
    assert new_res.dtype == residual_dtype and new_res.shape == x.shape
    assert rel_err(normed, normed_ref) < TOL[out_dtype], f"normed {rel_err(normed, normed_ref):.2e}"
    assert rel_err(new_res, new_res_ref) < TOL[residual_dtype], "new_residual"
    names = ["x", "residual", "weight"] if residual is not None else ["x", "weight"]
    for name, leaf, grad, grad_ref in zip(names, leaves, grads, grads_ref):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        assert torch.isfinite(grad.float()).all(), name
        if grad_ref.abs().max() == 0:
            assert grad.abs().max() == 0, name
            continue
        # the gradients pass through out_dtype's rounding of normed only via its upstream gradient (fp32 here);
        # bf16 / fp16 gradients carry their own rounding, dweight sums over rows
        tol = max(TOL[leaf.dtype], TOL[out_dtype] if name == "weight" else 0) * 2
        assert rel_err(grad, grad_ref) < tol, f"d{name}: {rel_err(grad, grad_ref):.2e}"


# ---------------------------------------------------------------- CPU, no Triton needed

def test_reference_matches_model_rmsnorm():
    from models.layers.base import RMSNorm
    norm = RMSNorm(33, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(33))
    x = torch.randn(2, 5, 33)
    residual = torch.randn(2, 5, 33)
    normed, new_res = add_rms_norm(x, residual, norm.weight, eps=1e-5, backend="torch")
    assert torch.equal(new_res, residual + x)
    torch.testing.assert_close(normed, norm(residual + x), rtol=1e-6, atol=1e-6)
    normed, new_res = add_rms_norm(x.bfloat16(), None, norm.weight, out_dtype=torch.bfloat16)
    assert normed.dtype == torch.bfloat16 and new_res.dtype == torch.float32
    assert torch.equal(new_res, x.bfloat16().float())


def test_backend_choice():
    assert resolve_norm_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown"):
        resolve_norm_backend("cuda", "cpu")
    if not INTERPRET:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            add_rms_norm(torch.randn(2, 4), None, torch.ones(4), backend="triton")
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(torch.randn(2, 4), None, torch.ones(5), backend="torch")


# ---------------------------------------------------------------- CPU, under the interpreter (small shapes)

@interp
@pytest.mark.parametrize("shape", [(1, 5), (2, 7, 33), (13, 769), (3, 1, 1), (37, 64)])
@pytest.mark.parametrize("has_res", [True, pytest.param(False, marks=release)])
def test_interp_fp32(shape, has_res):
    check_norm(shape, torch.float32, torch.float32 if has_res else None, seed=sum(shape))


@interp
@pytest.mark.parametrize("x_dtype,res_dtype,out_dtype,residual_dtype", [
    (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),      # the model under autocast
    (torch.bfloat16, None, torch.bfloat16, torch.float32),               # its first layer
    pytest.param(torch.float16, torch.float16, torch.float16, torch.float16,    # residual kept in half: recompute
                 marks=release),                                                # from x, r
    (torch.bfloat16, torch.bfloat16, None, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16),
])
def test_interp_mixed_dtypes(x_dtype, res_dtype, out_dtype, residual_dtype):
    check_norm((3, 11, 33), x_dtype, res_dtype, seed=4, out_dtype=out_dtype, residual_dtype=residual_dtype)


@interp
@pytest.mark.parametrize("has_res", [True, False])
def test_interp_strided_inputs(has_res):
    check_norm((4, 9, 33), torch.float32, torch.float32 if has_res else None, seed=5, strided=True)


@interp
@pytest.mark.parametrize("use_normed,use_residual", [(True, False), pytest.param(False, True, marks=release)])
def test_interp_one_output_used(use_normed, use_residual):
    check_norm((5, 17), torch.bfloat16, torch.float32, seed=6, out_dtype=torch.bfloat16,
               use_normed=use_normed, use_residual=use_residual)


@interp
def test_interp_no_graph_breaks():
    """The custom ops keep torch.compile's graph whole: two blocks' norms and the final norm, forward and backward."""
    import torch._dynamo
    x, residual, weight = make_inputs((2, 5, 16), torch.float32, None, "cpu", 7)

    def blocks(x, w):
        h, res = add_rms_norm(x, None, w, out_dtype=torch.bfloat16, backend="triton")
        h, res = add_rms_norm(torch.tanh(h), res, w, out_dtype=torch.bfloat16, backend="triton")
        out, _ = add_rms_norm(h, res, w, backend="triton")
        return out.sum()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(blocks)(x.requires_grad_(), weight.requires_grad_())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code
    assert code.count("mamba_trainer.add_rms_norm_fwd") == 3, code


@interp
def test_interp_compiled_backward():
    """torch.compile (aot_eager: the custom ops' fake and autograd registrations, no Inductor) with fullgraph: the
    compiled forward and backward equal the eager Triton ones."""
    torch._dynamo.reset()
    x, _, weight = make_inputs((2, 5, 16), torch.float32, None, "cpu", 12)
    x.requires_grad_()
    weight.requires_grad_()

    def blocks(x, w):
        h, res = add_rms_norm(x, None, w, out_dtype=torch.bfloat16, backend="triton")
        h, res = add_rms_norm(torch.tanh(h), res, w, out_dtype=torch.bfloat16, backend="triton")
        out, _ = add_rms_norm(h, res, w, backend="triton")
        return (out * torch.arange(16.0)).sum()

    compiled = torch.compile(blocks, backend="aot_eager", fullgraph=True)
    results = [(loss, *torch.autograd.grad(loss, (x, weight))) for loss in (compiled(x, weight), blocks(x, weight))]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@interp
def test_interp_opcheck():
    """torch.library.opcheck: the fake implementations, schemas and autograd registration agree with the kernels."""
    x, residual, weight = make_inputs((6, 33), torch.bfloat16, torch.float32, "cpu", 8)
    from kernels.triton_norm import add_rms_norm_fwd
    torch.library.opcheck(add_rms_norm_fwd, (x, residual, weight.requires_grad_(), 1e-5, torch.bfloat16,
                                             torch.float32),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---------------------------------------------------------------- sm_90 compile, and the interpreter launcher

@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels, not the interpreter's")
@pytest.mark.parametrize("d,n_rows,dtype", [(768, 16384, "bf16"), (2048, 16384, "bf16"), (33, 7, "fp32"),
                                            (5000, 3, "fp16")])
def test_kernels_compile_for_hopper(d, n_rows, dtype):
    """The interpreter runs the kernels' Python, not Triton's compiler: compile them for sm_90 (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.triton_norm as tn

    io = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")
    cfg = tn._config(d, n_rows)
    num_warps = cfg.pop("num_warps")
    for fn, flags in ((tn._add_rms_norm_fwd_kernel, dict(HAS_RES=True)),
                      (tn._add_rms_norm_bwd_kernel, dict(HAS_RES=True, HAS_DRO=True, SEPARATE_DRES=True))):
        constexprs = dict(**flags, **cfg)
        signature = {name: "constexpr" if name in constexprs else (f"*{dtype}" if name in io else "*fp32")
                     if name.endswith("_ptr") else ("fp32" if name == "eps" else "i32") for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert len(kernel.asm["cubin"]) > 0


@pytest.mark.skipif(INTERPRET, reason="this is the launcher of the interpreter run")
def test_interpreter_suite():
    """Run this module's `interp` tests in a fresh interpreter with TRITON_INTERPRET=1 (see the module doc)."""
    run_interpreter_suite(__file__)


# ---------------------------------------------------------------- GPU (a model's shape)

@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,res_dtype,out_dtype", [(torch.bfloat16, torch.float32, torch.bfloat16),
                                                         (torch.bfloat16, None, torch.bfloat16),
                                                         (torch.float32, torch.float32, torch.float32),
                                                         (torch.float16, torch.float16, torch.float16)])
def test_gpu_model_shape(x_dtype, res_dtype, out_dtype):
    check_norm((8, 2048, 768), x_dtype, res_dtype, "cuda", seed=9, out_dtype=out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 2048, 2048), (3, 1001, 769), (1, 1, 5), (7, 33)])
def test_gpu_awkward_shapes(shape):
    check_norm(shape, torch.bfloat16, torch.float32, "cuda", seed=10, out_dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_strided():
    check_norm((4, 513, 768), torch.bfloat16, torch.float32, "cuda", seed=11, out_dtype=torch.bfloat16, strided=True)


@pytest.mark.gpu
def test_gpu_auto_picks_triton():
    assert resolve_norm_backend("auto", "cuda") == "triton"
