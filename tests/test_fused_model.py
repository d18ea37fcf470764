"""The model with every fused path on (Triton scan, conv, add+RMSNorm; chunked loss) against the reference path:
logits, loss and every parameter's gradient, with and without left padding; and torch.compile sees one graph.

On the CPU the Triton kernels run under Triton's interpreter, switched on before Triton is imported, so a plain
`pytest` run re-runs this module's `interp` tests in a subprocess with TRITON_INTERPRET=1 (as tests/test_triton_scan.py
does). The `gpu` tests run the same checks on CUDA at a real width.
"""
import os

import pytest
import torch

from helpers import randomize_parameters, run_interpreter_suite
from models import MambaConfig, LanguageModel

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="runs inside test_interpreter_suite (TRITON_INTERPRET=1)")
release = pytest.mark.triton_release     # an interp_ case .ci/run runs on the other Triton releases too


def make_model(backend, device="cpu", seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(d_model=24, n_layer=2, vocab_size=53, d_state=5, d_conv=3, expand=2, scan_backend=backend)
    model = LanguageModel(MambaConfig(**{**fields, **overrides}))
    return randomize_parameters(model, scale=0.2).to(device)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def run(model, ids, targets, mask, return_logits):
    model.zero_grad(set_to_none=True)
    logits, loss = model(ids, targets=targets, attention_mask=mask, return_logits=return_logits)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits, loss.detach(), grads


def check_fused_matches_reference(device, seqlen, batch=2, tol=2e-5, padded=False, **overrides):
    fused, ref = make_model("triton", device, **overrides).train(), make_model("ref", device, **overrides).train()
    g = torch.Generator().manual_seed(seqlen)
    ids = torch.randint(0, 53, (batch, seqlen), generator=g).to(device)
    targets = torch.randint(0, 53, (batch, seqlen), generator=g).to(device)
    targets[0, :2] = -100
    mask = None
    if padded:
        mask = torch.ones(batch, seqlen, dtype=torch.long, device=device)
        mask[0, :3] = 0
        targets[0, :3] = -100
    logits, loss, grads = run(fused, ids, targets, mask, return_logits=True)
    logits_ref, loss_ref, grads_ref = run(ref, ids, targets, mask, return_logits=True)
    fused_kernels = fused.kernels_for(ids.device).mamba1
    assert fused_kernels.conv == "triton" and fused_kernels.norm == "triton"
    assert rel_err(logits, logits_ref) < tol, f"logits {rel_err(logits, logits_ref):.2e}"
    assert abs(loss.item() - loss_ref.item()) < tol * max(1.0, abs(loss_ref.item()))
    for name, grad_ref in grads_ref.items():
        assert torch.isfinite(grads[name]).all(), name
        assert rel_err(grads[name], grad_ref) < 10 * tol, f"d{name}: {rel_err(grads[name], grad_ref):.2e}"
    # the chunked loss (no logits) gives the same loss and gradients as the logits path
    none, loss_chunked, grads_chunked = run(fused, ids, targets, mask, return_logits=False)
    assert none is None and abs(loss_chunked.item() - loss.item()) < 1e-5 * max(1.0, abs(loss.item()))
    for name, grad in grads.items():
        assert rel_err(grads_chunked[name], grad) < 1e-4, f"chunked loss d{name}"


@interp
@pytest.mark.parametrize("seqlen", [1, pytest.param(10, marks=release)])
def test_interp_fused_model_matches_reference(seqlen):
    check_fused_matches_reference("cpu", seqlen)


@interp
def test_interp_fused_model_left_padding():
    check_fused_matches_reference("cpu", 7, padded=True)


@interp
def test_interp_fused_model_prefill_then_step():
    """Prefill with the fused kernels fills the same cache the reference does; decoding from it matches."""
    fused, ref = make_model("triton"), make_model("ref")
    ids = torch.randint(0, 53, (2, 7))
    with torch.no_grad():
        outs = []
        for model in (fused, ref):
            cache = model.init_cache(2)
            first = model.prefill(ids, cache)
            outs.append((first, model.step(ids[:, 0], cache), cache))
    (f1, f2, fc), (r1, r2, rc) = outs     # the fused step: the Triton conv step and add+RMSNorm kernels
    assert rel_err(f1, r1) < 2e-5 and rel_err(f2, r2) < 2e-5
    for a, b in zip(sum(fc.states, ()), sum(rc.states, ())):
        assert rel_err(a, b) < 2e-5


@interp
def test_interp_compiled_model_is_one_graph():
    """torch.compile traces the fused model, loss and backward included, with no graph break (the Triton kernels
    are torch custom ops with fake versions)."""
    model = make_model("triton").train()
    ids = torch.randint(0, 53, (2, 9))
    model(ids)                                 # resolve and log the kernels outside the trace

    def step(ids, targets):
        _, loss = model(ids, targets=targets, return_logits=False)
        return loss

    explanation = torch._dynamo.explain(step)(ids, ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@interp
def test_interp_compiled_decode_step_matches_eager(monkeypatch):
    """generate.py --compile with the fused kernels (what crashed on the GPU): the decoding step traced whole
    (fullgraph), the add+RMSNorm custom ops inside it, from a model that has not chosen its kernels yet, as the
    CUDA-graph capture traces it before any prefill; its logits and states follow the eager fused step's, token by
    token. aot_eager: Dynamo and the custom ops' fake versions, not Inductor."""
    from inference import Decoder

    model = make_model("triton")
    compile_with_inductor = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_with_inductor(fn, **{**kw, "backend": "aot_eager"}))
    decoder = Decoder(model, 2, compile=True)
    eager = model.init_cache(2)
    ids = torch.randint(0, 53, (2, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in range(ids.shape[1]):
            tokens = ids[:, t].contiguous()
            got, want = decoder.step(tokens), model.step_states(tokens, *eager.step_args())
            assert rel_err(got, want) < 2e-5
    assert model.kernels_for(ids.device).mamba1.norm == "triton"
    for a, b in zip(sum(decoder.cache.states, ()), sum(eager.states, ())):
        assert rel_err(a, b) < 2e-5


@pytest.mark.skipif(INTERPRET, reason="this is the launcher of the interpreter run")
def test_interpreter_suite():
    """Run this module's `interp` tests in a fresh interpreter with TRITON_INTERPRET=1 (see the module doc)."""
    run_interpreter_suite(__file__)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_gpu_fused_model_matches_reference(padded):
    check_fused_matches_reference("cuda", 257, batch=3, tol=1e-4, padded=padded, d_model=128, d_state=16, d_conv=4)
