"""Selective scan: the chunked backend against "ref" and against a float64 loop, the dispatch, the decoding step."""
import pytest
import torch

from kernels import resolve_backend, selective_scan, selective_state_update
from kernels.chunked import selective_scan_chunked
from kernels.reference import selective_scan_ref

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_f64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """The recurrence in float64, one step at a time, written from the paper's equations (differentiable)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[None, :, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))
    batch, d_inner, seqlen = u.shape
    h = (torch.zeros(batch, d_inner, A.shape[1], dtype=torch.float64) if initial_state is None
         else initial_state.double())
    ys = []
    for t in range(seqlen):
        dt = delta[:, :, t, None]                                            # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))                            # (b, d)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, d_inner, 0)
    if D is not None:
        y = y + D.double()[None, :, None] * u
    if z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y, h


def make_inputs(batch, d_inner, seqlen, d_state, use_D=True, use_z=True, use_bias=True, dtype=torch.float32,
                seed=0, delta_scale=0.5, a_max=2.0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inputs = {
        "u": rand(batch, d_inner, seqlen).to(dtype),
        "delta": (rand(batch, d_inner, seqlen) * delta_scale).to(dtype),
        "A": -torch.rand(d_inner, d_state, generator=g) * a_max,             # fp32, negative
        "B": rand(batch, d_state, seqlen).to(dtype),
        "C": rand(batch, d_state, seqlen).to(dtype),
        "D": rand(d_inner) if use_D else None,
        "z": rand(batch, d_inner, seqlen).to(dtype) if use_z else None,
        "delta_bias": rand(d_inner) * 0.5 if use_bias else None,
    }
    for t in inputs.values():
        if t is not None:
            t.requires_grad_()
    return inputs


def run(fn, inputs, softplus, seed=1, **kwargs):
    """y, last state and the gradient of every given input of sum(y * w) + sum(h * w_h)."""
    y, h = fn(**inputs, delta_softplus=softplus, **kwargs) if fn is scan_f64 else \
        fn(**inputs, delta_softplus=softplus, return_last_state=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    w_h = torch.randn(h.shape, generator=g, dtype=torch.float64)
    loss = (y.double() * w).sum() + (h.double() * w_h).sum()
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    return y, h, dict(zip(names, grads))


def assert_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max(1, max |expected|): a tolerance relative to the tensor's scale."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} x scale {scale:.3e}"


def assert_all_close(out, expected, tol, tag):
    y, h, grads = out
    y_e, h_e, grads_e = expected
    assert_close(y, y_e, tol, f"{tag} y")
    assert_close(h, h_e, tol, f"{tag} last state")
    assert grads.keys() == grads_e.keys()
    for name in grads:
        assert_close(grads[name], grads_e[name], tol, f"{tag} d{name}")


# (batch, d_inner, L, d_state, chunk_size): L = 1, primes, longer than a chunk and not a multiple of it, batch 1,
# d_state 1 / 16 / 64, odd d_inner; chunk_size None is the automatic choice.
SHAPES = [
    (2, 3, 1, 16, None),
    (1, 5, 7, 1, None),
    (2, 7, 61, 16, 8),
    (1, 3, 100, 64, 16),
    (3, 5, 37, 4, 5),
    (2, 4, 61, 16, None),
]
# (D, z, delta_bias, delta_softplus)
FLAGS = [(True, True, True, True), (False, False, False, False), (True, False, False, False),
         (False, True, False, False), (False, False, True, True), (False, False, False, True)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_d{}_l{}_n{}_c{}".format(*s))
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "D{:d}z{:d}bias{:d}sp{:d}".format(*f))
def test_chunked_matches_ref_and_float64(shape, flags):
    batch, d_inner, seqlen, d_state, chunk = shape
    use_D, use_z, use_bias, softplus = flags
    inputs = make_inputs(batch, d_inner, seqlen, d_state, use_D, use_z, use_bias)
    out = run(selective_scan_chunked, inputs, softplus, chunk_size=chunk)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert out[0].shape == (batch, d_inner, seqlen) and out[1].shape == (batch, d_inner, d_state)
    assert_all_close(out, run(scan_f64, inputs, softplus), 2e-5, "chunked vs float64")
    assert_all_close(out, run(selective_scan_ref, inputs, softplus), 2e-5, "chunked vs ref")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)], ids=["bf16", "fp16"])
def test_chunked_low_precision_inputs(dtype, tol):
    inputs = make_inputs(2, 6, 45, 16, dtype=dtype)
    y, h, grads = run(selective_scan_chunked, inputs, True, chunk_size=8)
    assert y.dtype == dtype and h.dtype == torch.float32             # output in u's dtype, state fp32
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, f"d{name} is {grad.dtype}, its input {inputs[name].dtype}"
    # The float64 loop sees the same (rounded) inputs; what differs is rounding of y and the grads to `dtype`.
    assert_all_close((y, h, grads), run(scan_f64, inputs, True), tol, f"{dtype} chunked vs float64")
    assert_all_close((y, h, grads), run(selective_scan_ref, inputs, True), tol, f"{dtype} chunked vs ref")


def test_long_sequence_strong_decay_stays_finite_and_exact():
    # softplus(delta) up to ~8 and A down to -30: single-step decays reach exp(-240), far below fp32's range.
    inputs = make_inputs(1, 4, 4096, 8, delta_scale=3.0, a_max=30.0, seed=3)
    with torch.no_grad():
        inputs["delta_bias"].fill_(2.0)
    out = run(selective_scan_chunked, inputs, True)
    for tensor in (out[0], out[1], *out[2].values()):
        assert torch.isfinite(tensor).all()
    assert_all_close(out, run(scan_f64, inputs, True), 2e-5, "4096 steps, strong decay")


def test_chunk_size_does_not_change_results():
    inputs = make_inputs(2, 5, 50, 16)
    expected = run(selective_scan_chunked, inputs, True, chunk_size=50)
    for chunk in (1, 3, 7, 64, None):
        assert_all_close(run(selective_scan_chunked, inputs, True, chunk_size=chunk), expected, 1e-5,
                         f"chunk_size={chunk}")


def test_initial_state_and_its_gradient():
    inputs = make_inputs(2, 5, 23, 8)
    inputs["initial_state"] = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(7)).requires_grad_()
    out = run(selective_scan_chunked, inputs, True, chunk_size=6)
    assert "initial_state" in out[2]
    assert_all_close(out, run(scan_f64, inputs, True), 2e-5, "with initial_state")


def test_no_grad_path_and_strided_inputs_match():
    inputs = make_inputs(2, 6, 33, 16)
    y, h, _ = run(selective_scan_chunked, inputs, True, chunk_size=8)
    plain = {k: (None if v is None else v.detach()) for k, v in inputs.items()}
    with torch.no_grad():
        y2, h2 = selective_scan_chunked(**plain, delta_softplus=True, return_last_state=True, chunk_size=8)
    assert torch.equal(y, y2) and torch.equal(h, h2)
    # the model passes z as a (b, d, l) view of (b, l, 2d) storage, and u contiguous: layout must not matter
    strided = {k: (None if v is None or v.dim() != 3 else v.transpose(1, 2).contiguous().transpose(1, 2))
               for k, v in plain.items()}
    strided.update({k: v for k, v in plain.items() if v is not None and v.dim() != 3})
    y3, h3 = selective_scan_chunked(**strided, delta_softplus=True, return_last_state=True, chunk_size=8)
    assert torch.equal(y, y3) and torch.equal(h, h3)
    # ... and z exactly as the model makes it: the second half of in_proj's (b, l, 2d) output, seen as (b, d, l)
    xz = torch.cat([torch.randn_like(plain["z"]), plain["z"]], dim=1).transpose(1, 2).contiguous()   # (b, l, 2d)
    strided["z"] = xz.transpose(1, 2).chunk(2, dim=1)[1]
    assert not strided["z"].is_contiguous()
    y4, h4 = selective_scan_chunked(**strided, delta_softplus=True, return_last_state=True, chunk_size=8)
    assert torch.equal(h, h4)
    assert_close(y4, y, 1e-6, "y with the model's z layout")          # silu may round differently on a strided view


def test_zero_length_sequence():
    inputs = make_inputs(2, 3, 0, 4)
    y, h = selective_scan_chunked(**inputs, delta_softplus=True, return_last_state=True)
    assert y.shape == (2, 3, 0) and torch.equal(h, torch.zeros(2, 3, 4))


# ---- dispatch -----------------------------------------------------------------------------------------------------

def test_auto_resolves_to_chunked_on_cpu():
    assert resolve_backend("auto", "cpu") == "chunked"
    inputs = make_inputs(2, 4, 19, 8)
    plain = {k: (None if v is None else v.detach()) for k, v in inputs.items()}
    y_auto = selective_scan(**plain, delta_softplus=True, backend="auto")
    y_chunked = selective_scan_chunked(**plain, delta_softplus=True)
    assert torch.equal(y_auto, y_chunked)
    assert_close(selective_scan(**plain, delta_softplus=True, backend="ref"), y_chunked, 2e-5, "dispatch ref")


def test_unknown_backend_lists_the_allowed_ones():
    inputs = make_inputs(1, 2, 3, 2)
    with pytest.raises(ValueError, match="unknown.*auto, ref, chunked, triton"):
        selective_scan(**inputs, backend="cuda_fast")


def test_triton_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(1, 2, 3, 2)
    with pytest.raises(RuntimeError, match="triton.*cannot run here.*chunked"):
        selective_scan(**inputs, backend="triton")


@pytest.mark.parametrize("name,bad", [
    ("A", torch.zeros(5, 4)), ("B", torch.zeros(2, 4, 8)), ("C", torch.zeros(2, 3, 7)),
    ("D", torch.zeros(4)), ("delta", torch.zeros(2, 3, 6)), ("z", torch.zeros(1, 3, 7)),
    ("delta_bias", torch.zeros(3, 1)),
])
def test_shape_errors_name_the_input(name, bad):
    inputs = make_inputs(2, 3, 7, 4)
    inputs[name] = bad
    with pytest.raises(ValueError, match=f"^{name} must"):
        selective_scan(**inputs)


def test_u_must_be_3d():
    inputs = make_inputs(2, 3, 7, 4)
    inputs["u"] = torch.zeros(3, 7)
    with pytest.raises(ValueError, match="u must be"):
        selective_scan(**inputs)


# ---- decoding step ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_z", [True, False])
def test_state_update_steps_equal_the_full_scan(use_z):
    inputs = {k: (None if v is None else v.detach()) for k, v in make_inputs(2, 6, 17, 16, use_z=use_z).items()}
    y_full, h_full = selective_scan_chunked(**inputs, delta_softplus=True, return_last_state=True)
    state = torch.zeros(2, 6, 16)
    ys = []
    for t in range(17):
        ys.append(selective_state_update(
            state, inputs["u"][:, :, t], inputs["delta"][:, :, t], inputs["A"], inputs["B"][:, :, t],
            inputs["C"][:, :, t], D=inputs["D"], z=None if inputs["z"] is None else inputs["z"][:, :, t],
            dt_bias=inputs["delta_bias"], dt_softplus=True))
    assert_close(torch.stack(ys, dim=-1), y_full, 1e-5, "stepped y")
    assert_close(state, h_full, 1e-5, "stepped state")
