"""Packed rows through the SSD scan (kernels/ssd.py's seq_idx): a row that holds several documents equals its
documents run one by one, each from a zero state (the first from the row's initial state): the outputs, the final
state (the last document's) and the gradient of every input, for the sequential reference, the chunked path and the
Triton kernels (their backward and the vjp one). Without seq_idx nothing changes.

The Triton tests run under Triton's interpreter in a subprocess (`test_interpreter_suite`, as in
tests/test_ssd_triton.py), at tiny shapes; the one-by-one runs they are held to are the reference's (the Triton
scan of unpacked rows is held to the reference in tests/test_ssd_triton.py).
"""
import math
import os

import pytest
import torch

from helpers import run_interpreter_suite

from kernels.ssd import ssd_scan
from test_ssd import NAMES, make_inputs, rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="runs inside test_interpreter_suite (TRITON_INTERPRET=1)")

CHUNK = 16                 # the Triton kernels' smallest block: a shorter chunk would leave blocks half empty
# Document lengths per row, 37 tokens, chunks of 16 (edges at 16 and 32):
#   row 0: starts at 16 (a chunk edge), 17 (one token after an edge) and 27; the initial state crosses chunk 0
#   row 1: a one-token document at position 0, one of 34 tokens over all three chunks, starts at the last two tokens
LAYOUT = [[16, 1, 10, 10], [1, 34, 1, 1]]
SEQLEN = 37


def seq_idx_of(layout):
    """[[lengths of row 0], ...] -> (b, l) int32: 0, 0, 0, 1, 1, 2, ..."""
    rows = [[doc for doc, length in enumerate(lengths) for _ in range(length)] for lengths in layout]
    return torch.tensor(rows, dtype=torch.int32)


def loss_weights(y, final):
    gen = torch.Generator().manual_seed(1)            # drawn on the CPU (the same numbers on every device)
    return (torch.randn(y.shape, generator=gen).to(y.device), torch.randn(final.shape, generator=gen).to(y.device))


def scan(inputs, backend, **kwargs):
    """ssd_scan of (x, dt, A, B, C, D, z, dt_bias, h0) as the Mamba-2 mixer calls it (softplus), final state too."""
    x, dt, A, B, C, D, z, dt_bias, h0 = inputs
    kwargs = dict(dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True, initial_states=h0, return_final_states=True,
                       chunk_size=CHUNK), **kwargs)
    if backend.startswith("triton"):
        from kernels.triton_ssd_scan import ssd_scan_triton
        return ssd_scan_triton(x, dt, A, B, C, backward="vjp" if backend == "triton_vjp" else "kernels", **kwargs)
    return ssd_scan(x, dt, A, B, C, backend=backend, **kwargs)


def gradients(inputs, y, final):
    for t in inputs:
        t.grad = None
    dy, dfinal = loss_weights(y, final)
    ((y.float() * dy).sum() + (final * dfinal).sum()).backward()
    return [t.grad.clone() for t in inputs]


def run_packed(inputs, backend, layout, **kwargs):
    y, final = scan(inputs, backend, seq_idx=seq_idx_of(layout).to(inputs[0].device), **kwargs)
    return y.detach(), final.detach(), gradients(inputs, y, final)


def run_one_by_one(inputs, backend, layout, **kwargs):
    """Each document of each row scanned alone: the first from its row's initial state, the others from zeros; the
    outputs put back side by side, the final state of each row's last document."""
    x, dt, A, B, C, D, z, dt_bias, h0 = inputs
    ys, finals = [], []
    for row, lengths in enumerate(layout):
        start, row_ys = 0, []
        for doc, length in enumerate(lengths):
            piece = lambda t: t[row:row + 1, start:start + length]          # noqa: E731
            doc_inputs = [piece(x), piece(dt), A, piece(B), piece(C), D, piece(z), dt_bias,
                          h0[row:row + 1] if doc == 0 else None]
            y, final = scan(doc_inputs, backend, **kwargs)
            row_ys.append(y)
            start += length
        assert start == x.shape[1]
        ys.append(torch.cat(row_ys, dim=1))
        finals.append(final)
    y, final = torch.cat(ys), torch.cat(finals)
    return y.detach(), final.detach(), gradients(inputs, y, final)


def assert_same(packed, one_by_one, tol_y=1e-5, tol_g=1e-4):
    (y, final, grads), (y_ref, final_ref, grads_ref) = packed, one_by_one
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert rel_err(y, y_ref) < tol_y
    assert rel_err(final, final_ref) < tol_y
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, g_ref) < tol_g, name


def packed_inputs(h=4, g=2, D_per_channel=False, seed=0):
    return make_inputs(b=len(LAYOUT), l=SEQLEN, h=h, p=3, g=g, n=5, D_per_channel=D_per_channel, seed=seed)


# ---------------------------------------------------------------- the PyTorch paths

@pytest.mark.parametrize("backend, g, D_per_channel, dt_limit", [
    ("ref", 2, False, (0.0, math.inf)),
    ("chunked", 2, False, (0.0, math.inf)),
    ("chunked", 1, True, (0.05, 2.0)),          # one group, D per channel, dt clamped
])
def test_packed_row_equals_its_documents(backend, g, D_per_channel, dt_limit):
    inputs = packed_inputs(g=g, D_per_channel=D_per_channel)
    assert_same(run_packed(inputs, backend, LAYOUT, dt_limit=dt_limit),
                run_one_by_one(inputs, "ref", LAYOUT, dt_limit=dt_limit))


def test_chunked_boundaries_under_strong_decay():
    """With very negative dt * A every decay underflows to 0: the -inf exponents at the starts must not turn into
    NaN anywhere (forward or backward), and the result still matches the documents one by one."""
    inputs = make_inputs(b=len(LAYOUT), l=SEQLEN, h=4, p=3, g=2, n=5, scale_dt=6.0, A_scale=40.0)
    assert_same(run_packed(inputs, "chunked", LAYOUT), run_one_by_one(inputs, "ref", LAYOUT))


def test_without_seq_idx_nothing_changes():
    """seq_idx=None is the default, bit for bit; one document per row (any index) gives the unpacked result."""
    inputs = packed_inputs()
    for backend in ("ref", "chunked"):
        y, final = scan(inputs, backend)
        y_none, final_none = scan(inputs, backend, seq_idx=None)
        assert torch.equal(y, y_none) and torch.equal(final, final_none)
        y_one, final_one = scan(inputs, backend, seq_idx=torch.full((2, SEQLEN), 3, dtype=torch.int32))
        assert rel_err(y_one, y) < 1e-6 and rel_err(final_one, final) < 1e-6


def relabelled(seq_idx):
    """The same documents under other numbers: int64, not from 0, with gaps, and one index used twice (row 0's
    fourth document numbered as its second: a start is wherever the index changes)."""
    other = seq_idx.long() * 5 + 11
    other[0][seq_idx[0] == 3] = 16
    return other


def test_document_numbers_only_need_to_change():
    inputs = packed_inputs()
    for backend in ("ref", "chunked"):
        y, final = scan(inputs, backend, seq_idx=seq_idx_of(LAYOUT))
        y_other, final_other = scan(inputs, backend, seq_idx=relabelled(seq_idx_of(LAYOUT)))
        assert torch.equal(y, y_other) and torch.equal(final, final_other)


@pytest.mark.parametrize("seq_idx, message", [
    (torch.zeros(2, 28, dtype=torch.int32), "seq_idx must have shape"),
    (torch.zeros(2, SEQLEN), "seq_idx must be int32"),
])
def test_bad_seq_idx_is_refused(seq_idx, message):
    with pytest.raises(ValueError, match=message):
        scan(packed_inputs(), "chunked", seq_idx=seq_idx)


# ---------------------------------------------------------------- Triton (interpreter)
# Two heads in two groups: the interpreter's time grows with batch x heads x chunks.

@interp
@pytest.mark.parametrize("backward", ["triton", "triton_vjp"])
def test_interp_triton_packed_row_equals_its_documents(backward):
    inputs = packed_inputs(h=2, g=2)
    packed = run_packed(inputs, backward, LAYOUT)
    assert_same(packed, run_one_by_one(inputs, "ref", LAYOUT))
    if backward == "triton":       # documents under other numbers: the same packed result (the forward suffices)
        y_other, final_other = scan(inputs, "triton", seq_idx=relabelled(seq_idx_of(LAYOUT)))
        assert torch.equal(y_other.detach(), packed[0]) and torch.equal(final_other.detach(), packed[1])


@interp
def test_interp_triton_without_seq_idx_nothing_changes():
    inputs = packed_inputs(h=2, g=1, D_per_channel=True)
    y, final = scan(inputs, "triton")
    y_none, final_none = scan(inputs, "triton", seq_idx=None)
    assert torch.equal(y, y_none) and torch.equal(final, final_none)
    # one document per row (labelled 7, int64): the masked kernels give the unpacked result
    y_one, final_one = scan(inputs, "triton", seq_idx=torch.full((2, SEQLEN), 7, dtype=torch.int64))
    assert rel_err(y_one, y) < 1e-6 and rel_err(final_one, final) < 1e-6


def test_interpreter_suite():
    """Run this module's `interp_` tests in a fresh interpreter with TRITON_INTERPRET=1 (see the module doc)."""
    run_interpreter_suite(__file__)


# ---------------------------------------------------------------- GPU (real chunk size)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_packed_row_equals_its_documents(dtype):
    """At chunk 256 (several blocks per chunk in every kernel): starts on a chunk edge, one token after one, a
    one-token document at position 0 and at the last token, documents inside one chunk and across three. fp32: the
    Triton scan of the documents one by one; bf16: the chunked scan of the packed rows (fp32 math on the same
    inputs), at tests/test_ssd_triton.py's bf16 bounds."""
    from test_ssd_triton import TOL, grad_err
    layout = [[256, 1, 100, 667], [1, 700, 67, 255, 1]]
    inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(b=2, l=1024, h=4, p=64, g=2, n=128,
                                                                      dtype=dtype)]
    packed = run_packed(inputs, "triton", layout, chunk_size=256)
    if dtype == torch.float32:
        assert_same(packed, run_one_by_one(inputs, "triton", layout, chunk_size=256))
        return
    y, final, grads = packed
    y_ref, final_ref, grads_ref = run_packed(inputs, "chunked", layout, chunk_size=256)
    tol_y, tol_f, tol_g = TOL[dtype]
    assert rel_err(y, y_ref) < tol_y and rel_err(final, final_ref) < tol_f
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert grad_err(name, g, g_ref, grads_ref, dtype) < tol_g, name
