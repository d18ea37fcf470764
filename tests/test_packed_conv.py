"""Packed rows through the causal conv: a row holding several documents (seq_idx) gives what its documents give when
each is convolved on its own: y, the conv_state a cache continues from (the last document's), and the gradients
of x, weight and bias.

The documents are convolved one by one with F.conv1d (the reference without seq_idx); the packed row runs through
the reference with seq_idx and through the Triton forward and both Triton backwards (rows: channels-contiguous x;
tiles: any layout), at their default tiles and at small ones, so that documents start on tile and segment edges,
inside the conv window (documents shorter than k), at position 0 and at the last token. Triton runs in
test_interpreter_suite's subprocess (TRITON_INTERPRET=1), tiny shapes.
"""
import os

import pytest
import torch

from helpers import run_interpreter_suite

from kernels import causal_conv1d
from kernels.causal_conv import causal_conv1d_ref
from kernels.documents import seq_idx_from_lengths

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="runs inside test_interpreter_suite (TRITON_INTERPRET=1)")

# Two rows of 24 tokens, k = 4. Row 0: starts at 8 and 16 (tile edges at 4 and 8 rows), 10 and 11 (documents of
# 2 and 1 tokens, inside the window), 23 (a one-token document at the last token). Row 1: a one-token document at
# position 0, then starts at 1, 4, 8 (tile edges) and 20.
LENGTHS = [[8, 2, 1, 5, 7, 1], [1, 3, 4, 12, 4]]
K = 4


def make_inputs(lengths, dim=5, k=K, layout="model", seed=0, device="cpu"):
    seqlen, batch = sum(lengths[0]), len(lengths)
    g = torch.Generator().manual_seed(seed)
    if layout == "model":         # a transposed view of (b, l, 2d) storage, channels contiguous (the mixer's x)
        x = torch.randn(batch, seqlen, 2 * dim, generator=g).to(device).transpose(1, 2)[:, :dim]
    else:
        x = torch.randn(batch, dim, seqlen, generator=g).to(device)
    weight = (torch.randn(dim, k, generator=g) / k ** 0.5).to(device)
    bias = torch.randn(dim, generator=g).to(device)
    dy = torch.randn(batch, dim, seqlen, generator=g).to(device)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), dy


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def documents_one_by_one(x, weight, bias, dy, lengths):
    """y, conv_state (the last document's) and the gradients of sum(y * dy) with every document convolved alone."""
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    y = torch.zeros(x.shape)
    state = torch.zeros(x.shape[0], x.shape[1], weight.shape[1])
    loss = 0.0
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            sl = slice(start, start + n)
            y_doc = causal_conv1d_ref(x[b:b + 1, :, sl], weight, bias, conv_state=state[b:b + 1])
            y[b:b + 1, :, sl] = y_doc.detach()
            loss = loss + (y_doc * dy[b:b + 1, :, sl]).sum()
            start += n
    return (y, state, *torch.autograd.grad(loss, (x, weight, bias)))


def check_close(got, want, tol=2e-5):
    for name, a, b in zip(("y", "conv_state", "dx", "dweight", "dbias"), got, want):
        if a is None:
            continue
        assert a.shape == b.shape, name
        assert rel_err(a, b) < tol, f"{name}: {rel_err(a, b):.2e}"


def packed(backend, x, weight, bias, dy, lengths):
    seq_idx = seq_idx_from_lengths(lengths)
    state = torch.zeros(x.shape[0], x.shape[1], weight.shape[1])
    y = causal_conv1d(x, weight, bias, conv_state=state, seq_idx=seq_idx, backend=backend)
    return (y, state, *torch.autograd.grad((y * dy).sum(), (x, weight, bias)))


@pytest.mark.parametrize("layout", ["model", "contiguous"])
def test_reference_packed_equals_documents(layout):
    x, weight, bias, dy = make_inputs(LENGTHS, layout=layout)
    check_close(packed("torch", x, weight, bias, dy, LENGTHS), documents_one_by_one(x, weight, bias, dy, LENGTHS))


def test_reference_mask_and_documents_together():
    """Left padding (mask) inside a packed row: pads feed zeros, documents still cut the window."""
    x, weight, bias, _ = make_inputs(LENGTHS)
    seq_idx = seq_idx_from_lengths(LENGTHS)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, 8:9] = False
    y = causal_conv1d(x, weight, bias, mask=mask, seq_idx=seq_idx, backend="torch")
    x_zeroed = x.detach().masked_fill(~mask[:, None, :], 0)
    y_ref = causal_conv1d(x_zeroed, weight, bias, seq_idx=seq_idx, backend="torch")
    assert torch.equal(y, y_ref)


def test_seq_idx_none_is_bit_identical_reference():
    x, weight, bias, _ = make_inputs(LENGTHS)
    assert torch.equal(causal_conv1d(x, weight, bias, backend="torch"),
                       causal_conv1d(x, weight, bias, seq_idx=None, backend="torch"))


# ---------------------------------------------------------------- Triton, under the interpreter

@interp
@pytest.mark.parametrize("layout", ["model", "contiguous"])
def test_interp_triton_packed_equals_documents(layout):
    """The training path: the Triton forward and the backward chosen for the layout (rows / tiles), default tiles."""
    x, weight, bias, dy = make_inputs(LENGTHS, layout=layout, seed=1)
    check_close(packed("triton", x, weight, bias, dy, LENGTHS), documents_one_by_one(x, weight, bias, dy, LENGTHS))


@interp
@pytest.mark.parametrize("kernel,config", [("rows", dict(block_l=4, segment=8)),
                                           ("tiles", dict(BLOCK_L=8, TIME_BLOCKS=2))])
def test_interp_triton_backward_small_tiles(kernel, config):
    """Each backward with tiles of 4 or 8 rows: documents start on tile and segment edges and inside the window."""
    from kernels.triton_conv import conv_bwd, split_weight_grads
    layout = "model" if kernel == "rows" else "contiguous"
    x, weight, bias, dy = make_inputs(LENGTHS, layout=layout, seed=2)
    dx, dwb = conv_bwd(x.detach(), weight.detach(), bias.detach(), None, dy, True, kernel=kernel,
                       seq_idx=seq_idx_from_lengths(LENGTHS), **config)
    want = documents_one_by_one(x, weight, bias, dy, LENGTHS)
    check_close((None, None, dx, *split_weight_grads(dwb, weight, bias)), want)


@interp
def test_interp_triton_seq_idx_none_is_bit_identical():
    x, weight, bias, dy = make_inputs(LENGTHS, seed=3)
    results = []
    for kwargs in ({}, dict(seq_idx=None)):
        y = causal_conv1d(x, weight, bias, backend="triton", **kwargs)
        results.append((y, *torch.autograd.grad((y * dy).sum(), (x, weight, bias))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@interp
def test_interp_custom_ops_with_seq_idx_opcheck():
    """The custom ops' schema, fake functions and autograd registration hold with seq_idx given."""
    from kernels.triton_conv import causal_conv1d_bwd_op, causal_conv1d_fwd_op
    x, weight, bias, dy = make_inputs([[3, 1, 4]], seed=5)
    seq_idx = seq_idx_from_lengths([[3, 1, 4]])
    torch.library.opcheck(causal_conv1d_fwd_op, (x, weight, bias, None, True, seq_idx))
    torch.library.opcheck(causal_conv1d_bwd_op, (x.detach(), weight.detach(), bias.detach(), None, dy, True, seq_idx))


def test_interpreter_suite():
    """Run this module's `interp` tests in a fresh interpreter with TRITON_INTERPRET=1."""
    if INTERPRET:
        pytest.skip("this is the launcher of the interpreter run")
    run_interpreter_suite(__file__)


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels, not the interpreter's")
def test_kernels_with_seq_idx_compile_for_hopper():
    """The forward and the rows backward with HAS_SEQ_IDX, built for sm_90 (no GPU needed) as the model calls them
    (bf16, channels-contiguous x, k 4): the interpreter never runs the compiled branches (COMPILED=True row shifts).
    The rows backward must not spill; its registers (233 at 8 x 2048 x 1536, against 157 without seq_idx) cost
    occupancy, not correctness. (The tiles backward has no compiled-only branch.)"""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.triton_conv as tc

    x = torch.empty(8, 2048, 2 * 1536, dtype=torch.bfloat16)[..., :1536].transpose(1, 2)
    rows_cfg = tc.bwd_rows_config(x, 4)
    rows_cfg.pop("SEG_LEN")
    for fn, cfg in ((tc._conv_fwd_kernel, tc.fwd_config(x)), (tc._conv_bwd_rows_kernel, dict(rows_cfg, COMPILED=True))):
        num_warps = cfg.pop("num_warps")
        constexprs = dict(K=4, HAS_BIAS=True, HAS_MASK=False, SILU=True, HAS_SEQ_IDX=True, **cfg)
        constexprs.update({name: 1 for name in ("s_xd", "s_yd", "s_dyd", "s_dxd", "s_sl") if name in fn.arg_names})
        signature = {name: "constexpr" if name in constexprs else
                     ("*bf16" if name in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr") else "*u8" if name == "m_ptr"
                      else "*i32" if name == "seq_ptr" else "*fp32") if name.endswith("_ptr") else "i32"
                     for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert len(kernel.asm["cubin"]) > 0
        if fn is tc._conv_bwd_rows_kernel:
            ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
            with tempfile.TemporaryDirectory() as tmp:
                ptx = Path(tmp) / "rows.ptx"
                ptx.write_text(kernel.asm["ptx"])
                report = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(Path(tmp) / "o")],
                                        capture_output=True, text=True, check=True).stderr
            assert int(re.search(r"(\d+) bytes spill stores", report).group(1)) == 0, report


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["model", "contiguous"])
def test_gpu_triton_packed_equals_documents(layout):
    """On CUDA at the default tiles: documents of 1 to 300 tokens, several backward segments."""
    lengths = [[256, 1, 2, 61, 128, 8, 1, 300, 267], [3, 997, 24]]
    x, weight, bias, dy = make_inputs(lengths, dim=40, layout=layout, seed=4, device="cuda")
    seq_idx = seq_idx_from_lengths(lengths, "cuda")
    state = torch.zeros(2, 40, K, device="cuda")
    y = causal_conv1d(x, weight, bias, conv_state=state, seq_idx=seq_idx, backend="triton")
    got = (y, state, *torch.autograd.grad((y * dy).sum(), (x, weight, bias)))
    want = documents_one_by_one(*(t.detach().cpu() for t in (x, weight, bias, dy)), lengths)   # (F.conv1d on CPU)
    check_close([t.cpu() for t in got], want, tol=1e-4)
