"""The chunked linear cross-entropy against the plain one (full logits + F.cross_entropy): the loss and the gradients
of hidden and weight, at awkward shapes, with ignored tokens, in fp32 / bf16 / fp16 and under autocast; a weight
tied to an embedding; no graph breaks under torch.compile. The `gpu` tests run the real LM-head shape on CUDA."""
import pytest
import torch
import torch.nn as nn

from kernels import linear_cross_entropy
from kernels.loss import default_chunk_tokens, linear_cross_entropy_plain

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def make_inputs(n_shape, d, vocab, dtype, device, seed, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_shape, d, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, d, generator=g) / d ** 0.5).to(device, dtype)
    targets = torch.randint(0, vocab, n_shape, generator=g)
    targets[torch.rand(n_shape, generator=g) < ignore_frac] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), targets.to(device)


def check_loss(n_shape, d, vocab, dtype, device="cpu", seed=0, chunk_tokens=None, autocast=None, grad_scale=1.0,
               ignore_frac=0.25):
    hidden, weight, targets = make_inputs(n_shape, d, vocab, dtype, device, seed, ignore_frac)
    results = {}
    for name, fn in (("chunked", lambda: linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk_tokens)),
                     ("plain", lambda: linear_cross_entropy_plain(hidden, weight, targets))):
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            loss = fn()
        results[name] = (loss, *torch.autograd.grad(loss * grad_scale, (hidden, weight)))
    (loss, dh, dw), (loss_ref, dh_ref, dw_ref) = results["chunked"], results["plain"]
    tol = TOL[autocast or dtype]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - loss_ref.item()) <= tol * max(1.0, abs(loss_ref.item())), (loss, loss_ref)
    assert dh.dtype == hidden.dtype and dh.shape == hidden.shape
    assert dw.dtype == weight.dtype and dw.shape == weight.shape
    assert rel_err(dh, dh_ref) < tol, f"dhidden {rel_err(dh, dh_ref):.2e}"
    assert rel_err(dw, dw_ref) < tol, f"dweight {rel_err(dw, dw_ref):.2e}"


@pytest.mark.parametrize("n_shape,d,vocab,chunk", [((1,), 5, 7, None), ((37,), 33, 101, 8), ((2, 13), 16, 50, 1),
                                                   ((3, 7), 769, 31, 5), ((17,), 8, 257, 17), ((11,), 4, 3, 100)])
def test_fp32_matches_plain(n_shape, d, vocab, chunk):
    check_loss(n_shape, d, vocab, torch.float32, seed=d + vocab, chunk_tokens=chunk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    check_loss((2, 19), 24, 203, dtype, seed=3, chunk_tokens=7)


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16(hidden_dtype):
    """Under autocast the matmuls run in bf16 (weight cast like autocast casts it), the gradients come back in the
    inputs' dtypes (fp32 weight -> fp32 gradient)."""
    check_loss((2, 23), 32, 129, hidden_dtype, seed=4, chunk_tokens=10, autocast=torch.bfloat16)


def test_grad_output_is_scaled():
    check_loss((29,), 12, 61, torch.float32, seed=5, chunk_tokens=6, grad_scale=3.5)


def test_all_ignored_is_nan_with_zero_gradients():
    """Like F.cross_entropy: the mean over no tokens is nan; the gradients are zero (not nan)."""
    hidden, weight, targets = make_inputs((9,), 6, 11, torch.float32, "cpu", 6, ignore_frac=1.1)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=4)
    loss_ref = linear_cross_entropy_plain(hidden, weight, targets)
    assert torch.isnan(loss) and torch.isnan(loss_ref)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    dh_ref, dw_ref = torch.autograd.grad(loss_ref, (hidden, weight))
    assert (dh == 0).all() and (dw == 0).all() and (dh_ref == 0).all() and (dw_ref == 0).all()


def test_no_grad_and_partial_grads():
    hidden, weight, targets = make_inputs((15,), 8, 40, torch.float32, "cpu", 7)
    ref = linear_cross_entropy_plain(hidden, weight, targets)
    with torch.no_grad():
        assert abs(linear_cross_entropy(hidden, weight, targets, chunk_tokens=4).item() - ref.item()) < 1e-5
    frozen = weight.detach()
    (dh,) = torch.autograd.grad(linear_cross_entropy(hidden, frozen, targets, chunk_tokens=4), (hidden,))
    (dh_ref,) = torch.autograd.grad(linear_cross_entropy_plain(hidden, frozen, targets), (hidden,))
    assert rel_err(dh, dh_ref) < 1e-5


def test_plain_option_and_default_chunk():
    hidden, weight, targets = make_inputs((10,), 8, 40, torch.float32, "cpu", 8)
    assert torch.equal(linear_cross_entropy(hidden, weight, targets, chunk_tokens=0),
                       linear_cross_entropy_plain(hidden, weight, targets))
    assert default_chunk_tokens(50280, "cuda") * 50280 * 4 <= 256 * 2**20
    assert default_chunk_tokens(8192, "cpu") == 1024
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(hidden, weight.t(), targets)


class TinyLM(nn.Module):
    """Embedding -> a nonlinearity -> head, the head's weight tied to the embedding or not."""

    def __init__(self, vocab, d, tied):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embedding.weight

    def forward(self, ids, targets, chunked):
        hidden = torch.tanh(self.embedding(ids))                                 # (b, l, d)
        if chunked:
            return linear_cross_entropy(hidden, self.head.weight, targets, chunk_tokens=5)
        return linear_cross_entropy_plain(hidden, self.head.weight, targets)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_head(tied):
    torch.manual_seed(9)
    model = TinyLM(37, 12, tied)
    ids = torch.randint(0, 37, (3, 11))
    targets = torch.randint(0, 37, (3, 11))
    targets[0, :4] = -100
    grads = {}
    for chunked in (True, False):
        model.zero_grad()
        model(ids, targets, chunked).backward()
        grads[chunked] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(grads[True]) == (1 if tied else 2)
    for name in grads[False]:
        assert rel_err(grads[True][name], grads[False][name]) < 1e-5, name


def test_no_graph_breaks_under_dynamo():
    import torch._dynamo
    hidden, weight, targets = make_inputs((2, 9), 8, 30, torch.float32, "cpu", 10)

    def step(h, w, t):
        loss = linear_cross_entropy(torch.tanh(h), w, t, chunk_tokens=4)
        loss.backward()
        return loss

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(hidden, weight, targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ---------------------------------------------------------------- GPU (the LM head of a 130M model, 8 x 2048 tokens)

@pytest.mark.gpu
def test_gpu_real_shape_bf16_autocast():
    check_loss((8, 2048), 768, 50280, torch.float32, "cuda", seed=11, autocast=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_real_shape_saves_memory():
    hidden, weight, targets = make_inputs((8, 2048), 768, 50280, torch.float32, "cuda", 12)
    peaks = {}
    for chunk in (None, 0):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
        loss.backward()
        torch.cuda.synchronize()
        peaks[chunk] = torch.cuda.max_memory_allocated() - base
    assert peaks[None] < peaks[0] / 3, peaks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_awkward_shapes(dtype):
    check_loss((3, 1001), 769, 5003, dtype, "cuda", seed=13, chunk_tokens=257)
