"""The SSD scan (Mamba-2): the chunked PyTorch form against the sequential reference, values and every gradient;
the one-step decoding update; the backend choice."""
import math

import pytest
import torch

from kernels.ssd import (SSD_BACKENDS, resolve_ssd_backend, ssd_scan, ssd_scan_ref, ssd_state_update)
from kernels.ssd_chunked import segsum

NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]


def make_inputs(b=2, l=13, h=4, p=3, g=1, n=5, dtype=torch.float32, seed=0, D_per_channel=False, scale_dt=0.0,
                A_scale=3.0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift)

    x = rnd(b, l, h, p).to(dtype)
    dt = rnd(b, l, h, shift=scale_dt).to(dtype)
    A = -(torch.rand(h, generator=gen) * A_scale + 0.1)
    B = rnd(b, l, g, n).to(dtype)
    C = rnd(b, l, g, n).to(dtype)
    D = rnd(h, p) if D_per_channel else rnd(h)
    z = rnd(b, l, h, p).to(dtype)
    dt_bias = rnd(h, scale=0.5, shift=-1.0)
    h0 = rnd(b, h, p, n, scale=0.5)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D, z, dt_bias, h0)]


def run(inputs, backend, chunk_size=4, dt_limit=(0.0, math.inf), with_grad=True):
    x, dt, A, B, C, D, z, dt_bias, h0 = inputs
    for t in inputs:
        t.grad = None
    y, final = ssd_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit,
                        initial_states=h0, return_final_states=True, chunk_size=chunk_size, backend=backend)
    if not with_grad:
        return y, final, None
    gen = torch.Generator().manual_seed(1)         # drawn on the CPU (the same numbers on every device), then moved
    dy = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)
    dfinal = torch.randn(final.shape, generator=gen).to(final.device)
    (y.float() * dy.float()).sum().add_((final * dfinal).sum()).backward()
    return y.detach(), final.detach(), [t.grad.clone() for t in inputs]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("l, chunk, g, D_per_channel", [
    (13, 4, 1, False),        # 3 chunks and a partial one
    (21, 8, 2, True),         # ngroups 2, D per channel
    (8, 8, 2, False),         # exactly one chunk
    (70, 64, 1, False),       # the released chunk sizes: one full chunk and a short one
    (259, 128, 2, False),     # two chunks of 128 and 3 steps
    (300, 256, 1, True),      # one chunk of 256 and a short one
    (1, 4, 2, False),         # a single token
])
def test_chunked_matches_reference_values_and_gradients(l, chunk, g, D_per_channel):
    inputs = make_inputs(l=l, g=g, D_per_channel=D_per_channel)
    y_ref, f_ref, g_ref = run(inputs, "ref")
    y, f, grads = run(inputs, "chunked", chunk_size=chunk)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(f, f_ref) < 1e-5
    for name, a, r in zip(NAMES, grads, g_ref):
        assert rel_err(a, r) < 1e-4, name


def test_dt_limit_and_no_optional_inputs():
    x, dt, A, B, C, *_ = make_inputs(l=11, g=2)
    kwargs = dict(dt_softplus=True, dt_limit=(0.3, 0.9), return_final_states=True)
    y_ref, f_ref = ssd_scan(x, dt, A, B, C, backend="ref", **kwargs)
    y, f = ssd_scan(x, dt, A, B, C, backend="chunked", chunk_size=4, **kwargs)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(f, f_ref) < 1e-5
    # the limit acts: without it the result differs
    assert rel_err(ssd_scan(x, dt, A, B, C, dt_softplus=True, backend="ref"), y_ref) > 1e-3


def test_bf16_inputs():
    inputs = make_inputs(l=19, g=2, dtype=torch.bfloat16)
    y_ref, f_ref, g_ref = run(inputs, "ref")
    y, f, grads = run(inputs, "chunked", chunk_size=8)
    assert y.dtype == torch.bfloat16 and f.dtype == torch.float32
    assert rel_err(y, y_ref) < 2e-2 and rel_err(f, f_ref) < 1e-4
    for name, a, r in zip(NAMES, grads, g_ref):
        assert a.dtype == inputs[NAMES.index(name)].dtype
        assert rel_err(a, r) < 2e-2, name


def test_extreme_decay_gives_no_nan():
    # dt*A down to about -2e5 per step: every decay underflows to 0, which must stay 0 and not become NaN
    inputs = make_inputs(l=23, g=1, scale_dt=40.0, A_scale=5e3)
    y_ref, f_ref, g_ref = run(inputs, "ref")
    y, f, grads = run(inputs, "chunked", chunk_size=8)
    assert torch.isfinite(y).all() and torch.isfinite(f).all()
    assert all(torch.isfinite(t).all() for t in grads)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(f, f_ref) < 1e-5
    for name, a, r in zip(NAMES, grads, g_ref):
        if name != "A":     # dA is a sum of terms each ~0 times huge dt: compare absolutely
            assert rel_err(a, r) < 1e-4, name
    assert (grads[2] - g_ref[2]).abs().max() < 1e-3


def test_padding_steps_with_dt_zero_leave_the_state():
    # what the model does for left padding: dt = 0 at a position moves nothing
    x, dt, A, B, C, *_ = [t.detach() for t in make_inputs(l=9)]
    dt_pad = dt.clone().abs()
    dt_pad[:, :4] = 0
    _, f_full = ssd_scan(x, dt_pad, A, B, C, return_final_states=True, chunk_size=4)
    _, f_tail = ssd_scan(x[:, 4:], dt_pad[:, 4:], A, B[:, 4:], C[:, 4:], return_final_states=True, chunk_size=4)
    assert rel_err(f_full, f_tail) < 1e-6


def test_state_update_steps_match_the_scan():
    x, dt, A, B, C, D, z, dt_bias, h0 = [t.detach() for t in make_inputs(l=6, g=2)]
    y_ref, f_ref = ssd_scan_ref(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                dt_limit=(0.05, 5.0), initial_states=h0, return_final_states=True)
    state = h0.clone()
    for t in range(x.shape[1]):
        y = ssd_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D, z=z[:, t], dt_bias=dt_bias,
                             dt_softplus=True, dt_limit=(0.05, 5.0))
        assert rel_err(y, y_ref[:, t]) < 1e-5
    assert rel_err(state, f_ref) < 1e-5


def test_segsum_is_the_sum_over_the_segment():
    a = torch.tensor([1.0, 2.0, 4.0])
    expected = torch.tensor([[0.0, -math.inf, -math.inf], [2.0, 0.0, -math.inf], [6.0, 4.0, 0.0]])
    assert torch.equal(segsum(a), expected)


def test_backend_choice_and_errors():
    assert resolve_ssd_backend("auto", "cpu") == "chunked" and set(SSD_BACKENDS) >= {"ref", "chunked", "triton"}
    assert resolve_ssd_backend("auto", "cuda") == "triton"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*'chunked'"):
        resolve_ssd_backend("triton", "cpu")
    with pytest.raises(ValueError, match="unknown; allowed: auto, ref, chunked, triton"):
        resolve_ssd_backend("fast")
    x, dt, A, B, C, *_ = [t.detach() for t in make_inputs(h=4, g=1)]
    with pytest.raises(ValueError, match=r"multiple of ngroups \(3\)"):
        ssd_scan(x, dt, A, B.expand(-1, -1, 3, -1), C.expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="dt must have shape"):
        ssd_scan(x, dt[:, :-1], A, B, C)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="dt_limit"):
        ssd_scan(x, dt, A, B, C, dt_limit=(1.0, 0.5))
