"""Packed rows through the selective scan: a row holding several documents (seq_idx) gives what its documents give
when each is scanned on its own: y, the last state (the last document's) and the gradient of every input.

The documents are scanned one by one with the reference (the spec); the packed row runs through each backend. Rows
are laid out so that documents start on chunk edges (Triton's 8-step chunks, its segments and the backward's
parallel parts; the chunked path's chunks), mid-chunk, at position 0, and as one-token documents, the last one at
the last token. Triton runs in test_interpreter_suite's subprocess (TRITON_INTERPRET=1), tiny shapes.
"""
import os

import pytest
import torch

from helpers import run_interpreter_suite

from kernels import selective_scan
from kernels.documents import check_seq_idx, seq_idx_from_lengths
from kernels.reference import selective_scan_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="runs inside test_interpreter_suite (TRITON_INTERPRET=1)")

# Two rows of 24 tokens. Row 0: starts at 8 and 16 (chunk edges at 8 steps; segment/part edges with the patched
# SEG_CHUNKS below), 11 and 12 (one-token document), 23 (a one-token document at the last token). Row 1: a
# one-token document at position 0, then starts at 1, 4 (a chunk edge of the chunked path's 4), 17 and 22.
LENGTHS = [[8, 3, 1, 4, 7, 1], [1, 3, 13, 5, 2]]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(lengths, dim, dstate, dtype=torch.float32, seed=0, device="cpu"):
    seqlen = sum(lengths[0])
    batch = len(lengths)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, seqlen, generator=g).to(dtype)
    delta = (torch.randn(batch, dim, seqlen, generator=g) * 0.5).to(dtype)
    A = -(torch.rand(dim, dstate, generator=g) * 2 + 0.05)
    B = torch.randn(batch, dstate, seqlen, generator=g).to(dtype)
    C = torch.randn(batch, dstate, seqlen, generator=g).to(dtype)
    D = torch.randn(dim, generator=g)
    z = torch.randn(batch, dim, seqlen, generator=g).to(dtype)
    bias = torch.randn(dim, generator=g) * 0.5 - 1.0
    return [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def loss_weights(shape_y, shape_last, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape_y, generator=g).to(device), torch.randn(shape_last, generator=g).to(device)


def packed_vs_documents(backend, lengths=LENGTHS, dim=3, dstate=4, seed=0, device="cpu", **kwargs):
    """Packed row through `backend` against each document through the reference alone; asserts y, the last state
    and every gradient agree (fp32)."""
    inputs = make_inputs(lengths, dim, dstate, seed=seed, device=device)
    u, delta, A, B, C, D, z, bias = inputs
    seq_idx = seq_idx_from_lengths(lengths, device)
    batch, _, seqlen = u.shape
    w_y, w_last = loss_weights((batch, dim, seqlen), (batch, dim, dstate), seed + 1, device)
    args = dict(delta_softplus=True, return_last_state=True)

    if backend == "chunked":
        from kernels.chunked import selective_scan_chunked
        y, last = selective_scan_chunked(u, delta, A, B, C, D=D, z=z, delta_bias=bias, seq_idx=seq_idx, **args,
                                         **kwargs)
    else:
        y, last = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, seq_idx=seq_idx, backend=backend,
                                 **args)
    grads = torch.autograd.grad((y * w_y).sum() + (last * w_last).sum(), inputs)

    ys, loss = torch.zeros_like(y), 0.0
    lasts = torch.zeros_like(last)
    for b, row in enumerate(lengths):
        start = 0
        for i, n in enumerate(row):
            sl = slice(start, start + n)
            y_doc, last_doc = selective_scan_ref(u[b:b + 1, :, sl], delta[b:b + 1, :, sl], A, B[b:b + 1, :, sl],
                                                 C[b:b + 1, :, sl], D=D, z=z[b:b + 1, :, sl], delta_bias=bias,
                                                 **args)
            ys[b:b + 1, :, sl] = y_doc.detach()
            loss = loss + (y_doc * w_y[b:b + 1, :, sl]).sum()
            if i == len(row) - 1:                         # the packed row's last state is its last document's
                lasts[b] = last_doc[0].detach()
                loss = loss + (last_doc * w_last[b:b + 1]).sum()
            start += n
    grads_ref = torch.autograd.grad(loss, inputs)

    assert rel_err(y, ys) < 2e-5, f"y: {rel_err(y, ys):.2e}"
    assert rel_err(last, lasts) < 2e-5, f"last state: {rel_err(last, lasts):.2e}"
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref):
        assert grad.shape == grad_ref.shape, name
        assert rel_err(grad, grad_ref) < 1e-4, f"d{name}: {rel_err(grad, grad_ref):.2e}"


def test_reference_packed_equals_documents():
    packed_vs_documents("ref")


@pytest.mark.parametrize("chunk_size", [4, 8, 5])
def test_chunked_packed_equals_documents(chunk_size):
    packed_vs_documents("chunked", chunk_size=chunk_size)


def test_chunked_initial_state_goes_to_the_first_document_only():
    u, delta, A, B, C, D, z, bias = [t.detach() for t in make_inputs(LENGTHS, 3, 4)]
    from kernels.chunked import selective_scan_chunked
    h0 = torch.randn(2, 3, 4)
    seq_idx = seq_idx_from_lengths(LENGTHS)
    args = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True, initial_state=h0,
                seq_idx=seq_idx)
    y, last = selective_scan_chunked(u, delta, A, B, C, chunk_size=4, **args)
    y_ref, last_ref = selective_scan_ref(u, delta, A, B, C, **args)
    assert rel_err(y, y_ref) < 2e-5 and rel_err(last, last_ref) < 2e-5


@pytest.mark.parametrize("backend", ["ref", "chunked"])
def test_seq_idx_none_is_bit_identical(backend):
    u, delta, A, B, C, D, z, bias = [t.detach() for t in make_inputs(LENGTHS, 3, 4)]
    args = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True, backend=backend)
    y, last = selective_scan(u, delta, A, B, C, **args)
    y_none, last_none = selective_scan(u, delta, A, B, C, seq_idx=None, **args)
    assert torch.equal(y, y_none) and torch.equal(last, last_none)


def test_seq_idx_is_checked():
    with pytest.raises(ValueError, match="non-decreasing"):
        check_seq_idx(torch.tensor([[0, 1, 0]], dtype=torch.int32), 1, 3)
    with pytest.raises(ValueError, match="shape"):
        check_seq_idx(torch.zeros(1, 4, dtype=torch.int32), 1, 3)
    with pytest.raises(ValueError, match="integer"):
        check_seq_idx(torch.zeros(1, 3), 1, 3)
    assert check_seq_idx(torch.tensor([[0, 0, 5]]), 1, 3).dtype == torch.int32


# ---------------------------------------------------------------- Triton, under the interpreter

@interp
@pytest.mark.parametrize("seg_chunks,target_programs", [(8, 8192), (1, 1 << 20)])
def test_interp_triton_packed_equals_documents(seg_chunks, target_programs, monkeypatch):
    """Default blocking (one segment, one part), and one chunk per segment and per part: the backward's parallel
    parts start at 8 and 16, where row 0's documents start, and the carries between parts must stop there."""
    import kernels.triton_scan as triton_scan
    monkeypatch.setattr(triton_scan, "SEG_CHUNKS", seg_chunks)
    monkeypatch.setattr(triton_scan, "TARGET_PROGRAMS", target_programs)
    packed_vs_documents("triton")


@interp
def test_interp_triton_seq_idx_none_is_bit_identical_and_one_document_matches():
    u, delta, A, B, C, D, z, bias = [t.detach() for t in make_inputs(LENGTHS, 3, 4)]
    args = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True, backend="triton")
    y, last = selective_scan(u, delta, A, B, C, **args)
    y_none, last_none = selective_scan(u, delta, A, B, C, seq_idx=None, **args)
    assert torch.equal(y, y_none) and torch.equal(last, last_none)
    y_one, last_one = selective_scan(u, delta, A, B, C, seq_idx=torch.zeros(2, 24, dtype=torch.int32), **args)
    assert rel_err(y_one, y) < 1e-6 and rel_err(last_one, last) < 1e-6


@interp
def test_interp_custom_ops_with_seq_idx_opcheck():
    """The custom ops' fake (meta) functions agree with the kernels with seq_idx given. (Only that check: opcheck's
    full set runs the interpreted scan for minutes; the schema and autograd registration are exercised above.)"""
    from kernels.triton_scan import selective_scan_bwd_op, selective_scan_fwd_op
    only_fake = dict(test_utils=("test_faketensor",))
    lengths = [[3, 1, 5]]
    u, delta, A, B, C, D, z, bias = make_inputs(lengths, 3, 4)
    seq_idx = seq_idx_from_lengths(lengths)
    torch.library.opcheck(selective_scan_fwd_op, (u, delta, A, B, C, D, z, bias, True, True, seq_idx), **only_fake)
    with torch.no_grad():
        _, _, segs = selective_scan_fwd_op(u, delta, A, B, C, D, z, bias, True, True, seq_idx)
    detached = [t.detach() for t in (u, delta, A, B, C, D, z, bias)]
    torch.library.opcheck(selective_scan_bwd_op, (*detached, True, segs, torch.randn(u.shape), torch.randn(1, 3, 4),
                                                  seq_idx), **only_fake)


def test_interpreter_suite():
    """Run this module's `interp` tests in a fresh interpreter with TRITON_INTERPRET=1."""
    if INTERPRET:
        pytest.skip("this is the launcher of the interpreter run")
    run_interpreter_suite(__file__)


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels, not the interpreter's")
def test_kernels_with_seq_idx_compile_for_hopper():
    """The interpreter runs the kernels' Python, not Triton's compiler: build the HAS_SEQ_IDX kernels for sm_90 (no
    GPU needed), at the model's shape, so that a kernel the compiler rejects fails here, not on the first GPU run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.triton_scan as ts

    def compile_kernel(fn, constexprs, num_warps):
        io = ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")
        signature = {name: "constexpr" if name in constexprs else
                     ("*bf16" if name in io else "*i32" if name == "seq_ptr" else "*fp32") if name.endswith("_ptr")
                     else "i32" for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert len(kernel.asm["cubin"]) > 0

    flags = dict(HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_SEQ_IDX=True)
    for fn, per_thread, warps, extra in (
            (ts._scan_fwd_kernel, ts.FWD_PER_THREAD, ts.FWD_WARPS, dict(HAS_D=True, SAVE_SEGS=True,
                                                                        SEG_CHUNKS=ts.SEG_CHUNKS)),
            (ts._scan_bwd_kernel, ts.BWD_PER_THREAD, ts.BWD_WARPS, dict(HAS_D=True, HAS_DLAST=True,
                                                                        SEG_CHUNKS=ts.SEG_CHUNKS)),
            (ts._scan_bwd_carry_kernel, ts.BWD_PER_THREAD, ts.BWD_WARPS, {})):
        cfg = ts._config(1536, 16, 2048, per_thread, warps)
        num_warps = cfg.pop("num_warps")
        compile_kernel(fn, dict(**flags, **extra, **cfg), num_warps)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [LENGTHS, [[256, 1, 63, 128, 8, 1, 300, 267], [1000, 24]]])
def test_gpu_triton_packed_equals_documents(lengths):
    """On CUDA: the default blocking, and long documents across several segments and parts."""
    packed_vs_documents("triton", lengths=lengths, dim=40, dstate=16, device="cuda")
