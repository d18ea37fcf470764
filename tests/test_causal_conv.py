"""The Triton causal conv1d (+ SiLU) against the PyTorch reference: values, conv_state and every gradient.

As in test_triton_scan.py: the tests marked `interp` run in a TRITON_INTERPRET=1 subprocess started by
`test_interpreter_suite` (small shapes); the `gpu` tests run on CUDA at training shapes and are skipped without one.
The reference itself is pinned to the model's nn.Conv1d formula by plain CPU tests.
"""
import math
import os

import pytest
import torch

from helpers import run_interpreter_suite
import torch.nn.functional as F

from kernels import causal_conv1d, causal_conv1d_update
from kernels.causal_conv import causal_conv1d_ref, resolve_conv_backend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="runs inside test_interpreter_suite (TRITON_INTERPRET=1)")
release = pytest.mark.triton_release     # an interp_ case .ci/run runs on the other Triton releases too

# Relative error bounds (max |out - ref| / max |ref|); half-precision outputs carry their rounding.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 4e-3}
LAYOUTS = ("model", "contiguous")      # a transposed view of a (b, l, 2d) slice (channels contiguous); (b, d, l)
# ... as interp_ parameters: the other Triton releases (.ci/run) see both
LAYOUT_CASES = ("model", pytest.param("contiguous", marks=release))


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def make_x(batch, dim, seqlen, dtype, device, layout, g):
    if layout == "model":
        xz = torch.randn(batch, seqlen, 2 * dim, generator=g).to(device, dtype)   # in_proj output (b, l, 2d)
        return xz.transpose(1, 2)[:, :dim]                                         # (b, d, l), strides (l 2d, 1, 2d)
    return torch.randn(batch, dim, seqlen, generator=g).to(device, dtype)


def make_mask(batch, seqlen, device, g):
    """Left padding of varied length per row: none, all but one token, and random ones."""
    pads = torch.randint(0, seqlen + 1, (batch,), generator=g)
    pads[0] = 0
    if batch > 1:
        pads[1] = seqlen - 1
    return (torch.arange(seqlen)[None, :] >= pads[:, None]).to(device)


def check_conv(batch, dim, seqlen, k, dtype=torch.float32, device="cpu", layout="model", with_bias=True,
               activation="silu", with_mask=True, with_state=True, weight_dtype=torch.float32, seed=0):
    """Triton vs torch: y (values, dtype, dim order), the filled conv_state, and the gradients of x, weight, bias
    under a random linear loss whose dy is itself a strided view."""
    g = torch.Generator().manual_seed(seed)
    x = make_x(batch, dim, seqlen, dtype, device, layout, g).requires_grad_()
    weight = (torch.randn(dim, k, generator=g) / math.sqrt(k)).to(device, weight_dtype).requires_grad_()
    bias = torch.randn(dim, generator=g).to(device, weight_dtype).requires_grad_() if with_bias else None
    mask = make_mask(batch, seqlen, device, g) if with_mask else None
    dy = torch.randn(batch, seqlen, dim, generator=g).to(device, dtype).transpose(1, 2)   # (b, d, l) strided
    leaves = [t for t in (x, weight, bias) if t is not None]
    results = {}
    for backend in ("triton", "torch"):
        state = torch.full((batch, dim, k), float("nan"), device=device, dtype=dtype) if with_state else None
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):      # an fp32 reference on CUDA too
            y = causal_conv1d(x, weight, bias, activation=activation, mask=mask, conv_state=state, backend=backend)
            results[backend] = (y, state, torch.autograd.grad(y, leaves, grad_outputs=dy))
    (y, state, grads), (y_ref, state_ref, grads_ref) = results["triton"], results["torch"]
    assert y.dtype == dtype and y.shape == (batch, dim, seqlen)
    assert y.stride() == y_ref.stride() == _order_strides(x), (y.stride(), x.stride())
    assert torch.isfinite(y.float()).all()
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol, f"y: {rel_err(y, y_ref):.2e}"
    if with_state:
        assert torch.equal(state, state_ref), "conv_state"
    for name, leaf, grad, grad_ref in zip(("x", "weight", "bias"), leaves, grads, grads_ref):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, name
        assert torch.isfinite(grad.float()).all(), name
        if name == "x":
            assert grad.stride() == _order_strides(x), "dx is not in x's dim order"
            if mask is not None:
                assert (grad.float().masked_select(~mask[:, None, :]) == 0).all(), "dx at pads"
        # weight and bias gradients sum over batch and time: half-precision rounding of each term adds up
        assert rel_err(grad, grad_ref) < tol * (1 if dtype == torch.float32 else 2), \
            f"d{name}: {rel_err(grad, grad_ref):.2e}"


def _order_strides(x):
    b, d, l = x.shape
    return (l * d, 1, d) if x.stride(1) == 1 and x.stride(2) != 1 else (d * l, l, 1)


@pytest.fixture
def poison_empty(monkeypatch):
    """Fresh float buffers come back full of NaN, so that an element a kernel forgets to write shows up."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", nan_empty)


# ---------------------------------------------------------------- CPU, under the interpreter (small shapes)

@interp
@pytest.mark.parametrize("layout", LAYOUT_CASES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (2, 5, 2, 4), (2, 5, 3, 4), (1, 33, 17, 3), (2, 129, 5, 2),
                                   (1, 3, 131, 4), (3, 17, 2, 3), (1, 6, 9, 8)])
def test_interp_shapes(shape, layout, poison_empty):
    check_conv(*shape, layout=layout, seed=sum(shape))


@interp
@pytest.mark.parametrize("layout", LAYOUT_CASES)
@pytest.mark.parametrize("with_bias,activation,with_mask", [(False, None, False), (True, None, True),
                                                            (False, "silu", True), (True, "silu", False)])
def test_interp_flags(with_bias, activation, with_mask, layout):
    check_conv(2, 5, 17, 4, layout=layout, with_bias=with_bias, activation=activation, with_mask=with_mask,
               with_state=with_mask, seed=3)


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=release)])
@pytest.mark.parametrize("layout", LAYOUT_CASES)
@pytest.mark.parametrize("weight_dtype", ["fp32", pytest.param("same", marks=release)])
def test_interp_half_inputs(dtype, layout, weight_dtype):
    """bf16/fp16 x with fp32 weights (autocast) or weights in x's dtype."""
    check_conv(2, 33, 19, 4, dtype=dtype, layout=layout, seed=5,
               weight_dtype=torch.float32 if weight_dtype == "fp32" else dtype)


@interp
@pytest.mark.parametrize("layout", LAYOUT_CASES)
def test_interp_many_time_segments(layout, monkeypatch):
    """Several backward programs along time (each adds its share of dw/dbias), the last one ragged."""
    import kernels.triton_conv as triton_conv
    monkeypatch.setattr(triton_conv, "BWD_SEGMENT", 16)
    monkeypatch.setattr(triton_conv, "ROWS_SEGMENT", 8)
    check_conv(2, 7, 45, 4, layout=layout, seed=11)


def check_bwd_kernel(batch, dim, seqlen, k, layout, kernel, dtype=torch.float32, with_bias=True, with_mask=True,
                     silu=True, seed=0, **config):
    """conv_bwd with one kernel forced (either works on either layout) against autograd through the reference."""
    from kernels.triton_conv import conv_bwd, split_weight_grads
    g = torch.Generator().manual_seed(seed)
    x = make_x(batch, dim, seqlen, dtype, "cpu", layout, g).requires_grad_()
    weight = (torch.randn(dim, k, generator=g) / math.sqrt(k)).requires_grad_()
    bias = torch.randn(dim, generator=g).requires_grad_() if with_bias else None
    mask = make_mask(batch, seqlen, "cpu", g) if with_mask else None
    dy = torch.randn(batch, seqlen, dim, generator=g).to(dtype).transpose(1, 2)
    leaves = [t for t in (x, weight, bias) if t is not None]
    grads_ref = torch.autograd.grad(causal_conv1d_ref(x, weight, bias, "silu" if silu else None, mask), leaves, dy)
    dx, dwb = conv_bwd(x.detach(), weight.detach(), bias.detach() if with_bias else None, mask, dy, silu,
                       kernel=kernel, **config)
    dweight, dbias = split_weight_grads(dwb, weight, bias)
    assert dx.stride() == _order_strides(x) and dx.dtype == dtype
    assert dweight.shape == weight.shape and (dbias is None) == (bias is None)
    tol = TOL[dtype] * (1 if dtype == torch.float32 else 2)
    for name, grad, grad_ref in zip(("x", "weight", "bias"), (dx, dweight, dbias), grads_ref):
        assert rel_err(grad, grad_ref) < tol, f"d{name} ({kernel}): {rel_err(grad, grad_ref):.2e}"


@interp
@pytest.mark.parametrize("kernel", ["rows", pytest.param("tiles", marks=release)])
@pytest.mark.parametrize("layout", LAYOUT_CASES)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 9, 23, 2), (1, 3, 13, 8)])
def test_interp_backward_kernels(shape, layout, kernel):
    """Each backward kernel on each layout (auto picks rows for the model's, tiles for (b, d, l))."""
    check_bwd_kernel(*shape, layout=layout, kernel=kernel, seed=sum(shape))


@interp
@pytest.mark.parametrize("config", [dict(segment=8, warps=1, block_l=4, prefetch=True),
                                    pytest.param(dict(segment=12, warps=2, block_l=4, prefetch=False), marks=release),
                                    dict(segment=8, warps=1, block_l=8, prefetch=False)])
def test_interp_rows_backward_configs(config):
    """The rows backward's tile choices, with the compiled kernel's 4-row tile (the interpreter's default is 16):
    several segments (the last ragged, a segment not a multiple of the tile), one and two warps' channels per
    program, d not a multiple of the block, with and without the prefetch; k 4 and 5 (k - 1 = 4 fills a tile)."""
    check_bwd_kernel(2, 130, 21, 4, "model", "rows", seed=9, **config)
    check_bwd_kernel(1, 6, 19, 5, "model", "rows", seed=10, **config)


@interp
@pytest.mark.parametrize("with_bias,with_mask,silu", [(False, False, True),
                                                      pytest.param(True, True, False, marks=release)])
def test_interp_rows_backward_flags(with_bias, with_mask, silu):
    check_bwd_kernel(2, 40, 11, 3, "model", "rows", with_bias=with_bias, with_mask=with_mask, silu=silu, seed=8)


@interp
def test_interp_fully_masked_row_and_odd_strides():
    """A row of pads only; x with every stride odd (a slice of a larger tensor in a permuted order)."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3, 13, 9, generator=g)                                  # (b, l', d')
    x = base.permute(0, 2, 1)[:, 1:6, 2:12:2].requires_grad_()                 # (3, 5, 5), strides (117, 1, 18)
    weight = torch.randn(5, 3, generator=g, requires_grad=True)
    mask = torch.tensor([[False] * 5, [False, False, True, True, True], [True] * 5])
    outs = {b: causal_conv1d(x, weight, None, "silu", mask, backend=b) for b in ("triton", "torch")}
    assert rel_err(outs["triton"], outs["torch"]) < 2e-5
    assert (outs["triton"][0] == 0).all()                                      # silu(0) for a row of pads
    grads = {b: torch.autograd.grad(outs[b].square().sum(), (x, weight)) for b in outs}
    for grad, grad_ref in zip(grads["triton"], grads["torch"]):
        assert rel_err(grad, grad_ref) < 2e-5


@interp
def test_interp_custom_op_opcheck():
    """The custom ops' schema, fake (meta) functions and autograd registration agree with the real kernels."""
    from kernels.triton_conv import causal_conv1d_bwd_op, causal_conv1d_fwd_op
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(5, 4, generator=g, requires_grad=True)
    bias = torch.randn(5, generator=g, requires_grad=True)
    mask = make_mask(2, 7, "cpu", g)
    for layout in LAYOUTS:
        x = make_x(2, 5, 7, torch.float32, "cpu", layout, g).requires_grad_()
        torch.library.opcheck(causal_conv1d_fwd_op, (x, weight, bias, mask, True))
    torch.library.opcheck(causal_conv1d_fwd_op, (x, weight, None, None, False))
    dy = torch.randn(x.shape, generator=g)
    torch.library.opcheck(causal_conv1d_bwd_op, (x.detach(), weight.detach(), bias.detach(), mask, dy, True))
    torch.library.opcheck(causal_conv1d_bwd_op, (x.detach(), weight.detach(), None, None, dy, False))


@interp
def test_interp_torch_compile_one_graph():
    """torch.compile traces the Triton path with no graph break, and the compiled function (aot_eager runs the
    custom ops for real) gives the eager values and gradients."""
    import torch._dynamo

    def fn(x, weight, bias, mask):
        return causal_conv1d(x, weight, bias, "silu", mask, backend="triton").float().square().sum()

    g = torch.Generator().manual_seed(6)
    x = make_x(2, 5, 9, torch.float32, "cpu", "model", g).requires_grad_()
    weight = torch.randn(5, 4, generator=g, requires_grad=True)
    bias = torch.randn(5, generator=g, requires_grad=True)
    mask = make_mask(2, 9, "cpu", g)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(x, weight, bias, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss, loss_ref = compiled(x, weight, bias, mask), fn(x, weight, bias, mask)
    assert rel_err(loss, loss_ref) < 1e-6
    for grad, grad_ref in zip(torch.autograd.grad(loss, (x, weight, bias)),
                              torch.autograd.grad(loss_ref, (x, weight, bias))):
        assert rel_err(grad, grad_ref) < 1e-6


def test_triton_needs_cuda_or_interpreter():
    if INTERPRET or torch.cuda.is_available():
        pytest.skip("the kernels can run here")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 4), backend="triton")


# ---------------------------------------------------------------- the reference and the decoding step (CPU)

def test_backend_choice_and_argument_errors():
    assert resolve_conv_backend("auto", "cpu") == "torch"
    assert resolve_conv_backend("torch", "cpu") == "torch"
    x, w = torch.randn(1, 2, 3), torch.randn(2, 4)
    with pytest.raises(ValueError, match="unknown"):
        causal_conv1d(x, w, backend="cudnn")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="gelu")
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="mask"):
        causal_conv1d(x, w, mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d(x, w, conv_state=torch.zeros(1, 2, 3))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seqlen", [1, 3, 4, 17])
def test_reference_is_the_models_conv(seqlen, layout):
    """The spec equals what SelectiveSSM.forward does today: mask by multiplying, F.pad into conv_state,
    nn.Conv1d(groups=d, padding=k-1) cut to l, SiLU."""
    g = torch.Generator().manual_seed(seqlen)
    batch, dim, k = 3, 6, 4
    conv = torch.nn.Conv1d(dim, dim, kernel_size=k, groups=dim, padding=k - 1, bias=True)
    x = make_x(batch, dim, seqlen, torch.float32, "cpu", layout, g)
    mask = make_mask(batch, seqlen, "cpu", g)
    xm = x * mask[:, None, :].to(x.dtype)
    state_model = F.pad(xm, (k - seqlen, 0))
    y_model = F.silu(conv(xm)[..., :seqlen])
    state = torch.empty(batch, dim, k)
    with torch.no_grad():
        y = causal_conv1d(x, conv.weight[:, 0, :], conv.bias, "silu", mask, state, backend="torch")
    assert torch.allclose(y, y_model, atol=1e-6) and torch.equal(state, state_model)
    assert y.stride() == _order_strides(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_steps_continue_the_prefill(dtype):
    """Prefill l tokens, then step token by token: the steps give the full sequence's outputs, and conv_state
    tracks what the model's step (roll, write, sum) keeps."""
    g = torch.Generator().manual_seed(0)
    batch, dim, k, prefill, steps = 2, 5, 4, 2, 6
    x = torch.randn(batch, dim, prefill + steps, generator=g).to(dtype)
    weight, bias = torch.randn(dim, k, generator=g), torch.randn(dim, generator=g)
    y_full = causal_conv1d_ref(x, weight, bias, "silu")
    state = torch.empty(batch, dim, k, dtype=dtype)
    causal_conv1d(x[..., :prefill], weight, bias, "silu", conv_state=state, backend="torch")
    state_model = state.clone()
    for t in range(prefill, prefill + steps):
        y = causal_conv1d_update(x[..., t], state, weight, bias, "silu", backend="torch")
        # the model's step today (SelectiveSSM.step)
        state_model.copy_(torch.roll(state_model, shifts=-1, dims=-1))
        state_model[:, :, -1] = x[..., t]
        y_model = F.silu(torch.sum(state_model * weight, dim=-1) + bias).to(dtype)
        assert y.dtype == dtype and torch.equal(state, state_model)
        assert rel_err(y, y_full[..., t]) < TOL[dtype] and rel_err(y, y_model) < TOL[dtype]


@interp
@pytest.mark.parametrize("dtype,state_dtype,k,dim,with_bias", [
    (torch.float32, torch.float32, 4, 5, True),
    pytest.param(torch.bfloat16, torch.bfloat16, 3, 33, False, marks=release),
    pytest.param(torch.float16, torch.float32, 1, 7, True, marks=release)])
def test_interp_update_kernel(dtype, state_dtype, k, dim, with_bias):
    """The one-kernel decoding step against the PyTorch step: y and the shifted window, several steps running."""
    g = torch.Generator().manual_seed(dim)
    batch = 3
    weight = torch.randn(dim, k, generator=g)
    bias = torch.randn(dim, generator=g) if with_bias else None
    state = torch.randn(batch, dim, k, generator=g).to(state_dtype)
    state_ref = state.clone()
    for _ in range(3):
        x = torch.randn(batch, dim, generator=g).to(dtype)
        y = causal_conv1d_update(x, state, weight, bias, "silu", backend="triton")
        y_ref = causal_conv1d_update(x, state_ref, weight, bias, "silu", backend="torch")
        assert y.dtype == dtype and torch.equal(state, state_ref)
        assert rel_err(y, y_ref) < TOL[dtype]


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels, not the interpreter's")
@pytest.mark.parametrize("shape,k,flags,stride_one", [((8, 1536, 2048), 4, True, "d"), ((8, 1536, 2048), 4, True, "l"),
                                                      ((3, 129, 1), 2, False, "d"), ((2, 24, 97), 8, True, None)])
def test_kernels_compile_for_hopper(shape, k, flags, stride_one):
    """Compile the kernels for sm_90 (no GPU needed: Triton ships ptxas), with the stride Triton specialises to 1
    on either axis (or none), so that a kernel the compiler rejects fails CI and not the first GPU run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.triton_conv as tc

    batch, dim, seqlen = shape
    x = (torch.empty(batch, seqlen, 2 * dim)[..., :dim].transpose(1, 2) if stride_one == "d"
         else torch.empty(batch, dim, seqlen))
    unit = {"d": ("s_xd", "s_yd", "s_dyd", "s_dxd"), "l": ("s_xl", "s_yl", "s_dyl", "s_dxl"), None: ()}[stride_one]
    kernels = [(tc._conv_fwd_kernel, tc.fwd_config(x)), (tc._conv_bwd_tiles_kernel, tc.bwd_tiles_config(x, k))]
    if stride_one == "d":                   # the layout the rows backward is chosen for (the only one it is fast on)
        rows_cfg = tc.bwd_rows_config(x, k)
        rows_cfg.pop("SEG_LEN")
        kernels.append((tc._conv_bwd_rows_kernel, dict(rows_cfg, COMPILED=True)))
    for fn, cfg in kernels:
        num_warps = cfg.pop("num_warps")
        constexprs = dict(K=k, HAS_BIAS=flags, HAS_MASK=flags, SILU=flags, HAS_SEQ_IDX=False, **cfg)
        constexprs.update({name: 1 for name in unit if name in fn.arg_names})
        signature = {name: "constexpr" if name in constexprs else
                     ("*bf16" if name in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr") else "*u8" if name == "m_ptr"
                      else "*fp32") if name.endswith("_ptr") else "i32" for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert len(kernel.asm["cubin"]) > 0
    # the decoding step's kernel, with the state's last axis contiguous (the cache's layout)
    fn = tc._conv_update_kernel
    constexprs = dict(K=k, BLOCK_K=triton.next_power_of_2(k), HAS_BIAS=flags, SILU=flags,
                      BLOCK_D=min(256, triton.next_power_of_2(dim)), s_sk=1)
    signature = {name: "constexpr" if name in constexprs else
                 ("*bf16" if name in ("x_ptr", "y_ptr", "state_ptr") else "*fp32") if name.endswith("_ptr") else "i32"
                 for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert len(kernel.asm["cubin"]) > 0


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernel, not the interpreter's")
@pytest.mark.parametrize("prefetch", [True, False])
def test_rows_backward_fits_registers_on_hopper(prefetch):
    """The rows backward at the model's call (bf16, token-major, k 4, aligned as at (8, 2048, 1536)), compiled for
    sm_90 as the launcher specialises it: no spills, and registers low enough for 12 one-warp programs per SM
    (<= 168: its loads need that many warps in flight). ptxas -v reports both."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.triton_conv as tc

    fn = tc._conv_bwd_rows_kernel
    x = torch.empty(8, 2048, 2 * 1536, dtype=torch.bfloat16)[..., :1536].transpose(1, 2)
    cfg = tc.bwd_rows_config(x, 4, prefetch=prefetch)
    cfg.pop("SEG_LEN")
    num_warps = cfg.pop("num_warps")
    constexprs = dict(K=4, HAS_BIAS=True, HAS_MASK=False, SILU=True, COMPILED=True, HAS_SEQ_IDX=False, **cfg,
                      s_xd=1, s_dyd=1, s_dxd=1, s_wk=1)
    signature = {name: "constexpr" if name in constexprs else
                 ("*bf16" if name in ("x_ptr", "dy_ptr", "dx_ptr") else "*u8" if name == "m_ptr" else "*fp32")
                 if name.endswith("_ptr") else "i32" for name in fn.arg_names}
    aligned = [name for name in fn.arg_names if name not in constexprs]       # pointers and strides: multiples of 16
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "rows.ptx"
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(Path(tmp) / "rows.o")],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    assert spills == 0 and registers <= 168, report


@pytest.mark.skipif(INTERPRET, reason="this is the launcher of the interpreter run")
def test_interpreter_suite():
    """Run this module's `interp` tests in a fresh interpreter with TRITON_INTERPRET=1 (see the module doc)."""
    run_interpreter_suite(__file__)


# ---------------------------------------------------------------- GPU (training shapes, bf16)

@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_model_shape(layout, dtype):
    """The mixer's call at (b 8, l 2048, d_inner 1536, k 4), fp32 weights as under autocast."""
    check_conv(8, 1536, 2048, 4, dtype=dtype, device="cuda", layout=layout, seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 129, 1, 4), (2, 33, 3, 4), (1, 5, 4099, 3), (2, 200, 131, 2),
                                   (1, 1537, 257, 8), (4, 64, 1000, 4)])
def test_gpu_awkward_shapes(shape, dtype, layout):
    check_conv(*shape, dtype=dtype, device="cuda", layout=layout, seed=shape[2])


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias,activation,with_mask", [(False, None, False), (True, None, True),
                                                            (False, "silu", False)])
def test_gpu_flags(with_bias, activation, with_mask):
    check_conv(2, 96, 300, 4, dtype=torch.bfloat16, device="cuda", with_bias=with_bias, activation=activation,
               with_mask=with_mask, with_state=with_mask, seed=7)


@pytest.mark.gpu
def test_gpu_auto_picks_triton():
    assert resolve_conv_backend("auto", "cuda") == "triton"
