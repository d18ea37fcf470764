"""kernels/backends.py: every kernel's backend resolves inside code that torch.compile traces (the decoding step on a
GPU) without a graph break, because Triton's presence is probed once, at import, and never again."""
import types

import pytest
import torch

from kernels import backends, resolve_backend
from kernels.causal_conv import resolve_conv_backend
from kernels.norm import resolve_norm_backend
from kernels.ssd import resolve_ssd_backend

RESOLVERS = {"scan": resolve_backend, "conv": resolve_conv_backend, "norm": resolve_norm_backend,
             "ssd": resolve_ssd_backend}


@pytest.mark.skipif(not backends.triton_importable(), reason="needs Triton installed (CI has it)")
@pytest.mark.parametrize("op", sorted(RESOLVERS))
def test_resolving_for_cuda_traces_as_one_graph(op, monkeypatch):
    """What the model's step does on a GPU: resolve "auto" and the stored "triton" for CUDA inside a fullgraph trace.
    Dynamo (torch 2.11) refuses importlib.util.find_spec there ("Attempted to call function marked as skipped"); a
    find_spec that Dynamo must not call stands in for it, so a probe at call time fails here on any torch."""
    refused = torch.compiler.disable(lambda name: pytest.fail("Triton probed again, after import"))
    monkeypatch.setattr(backends, "importlib", types.SimpleNamespace(util=types.SimpleNamespace(find_spec=refused)))
    resolve = RESOLVERS[op]

    def traced(x):
        cuda = torch.device("cuda")          # a device name: no GPU is needed to resolve for one
        fused = resolve("auto", cuda) == "triton" and resolve("triton", cuda) == "triton"
        return x + 1 if fused else x - 1

    compiled = torch.compile(traced, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(3)), torch.ones(3))
