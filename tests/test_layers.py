"""Every layer kind of the table (models/layers LAYERS) keeps the one interface: forward and step give
(h, residual) of the input's shape, a prefill into init_state's cache entry then step equals forward on the longer
sequence, and reset_parameters draws every parameter afresh."""
import pytest
import torch

from models import LAYERS, ModelConfig
from models.layers.attention import AttentionContext, positions_from_mask, rope_tables
from models.layers.base import Layer, ModelKernels

CONFIG = ModelConfig(d_model=16, n_layer=1, vocab_size=32, pattern="M", n_heads=4, n_kv_heads=2, d_ff=32,
                     mamba1=dict(d_state=4), mamba2=dict(d_state=8, headdim=8, chunk_size=4))
KERNELS = ModelKernels()


def context(b, l, mask=None):
    return AttentionContext(mask=mask, rope=rope_tables(positions_from_mask(mask, b, l, "cpu"), 4, 10000.0))


@pytest.mark.parametrize("letter", sorted(LAYERS))
def test_interface_and_prefill_then_step(letter):
    torch.manual_seed(0)
    layer = LAYERS[letter](CONFIG).eval()
    assert isinstance(layer, Layer) and isinstance(layer.description, str) and layer.description
    h = torch.randn(2, 7, 16)
    with torch.no_grad():
        full, full_residual = layer(h, None, context(2, 7), None, KERNELS)
        assert full.shape == h.shape and full_residual.shape == h.shape
        state = layer.init_state(2, 8, "cpu", torch.float32)
        layer(h[:, :6], None, context(2, 6), state, KERNELS)          # prefill six tokens
        ctx = context(2, 7)
        valid = torch.zeros(2, 8, dtype=torch.bool)
        valid[:, :7] = True
        step_ctx = AttentionContext(rope=(ctx.rope[0][:, 6:7], ctx.rope[1][:, 6:7]), kv_valid=valid,
                                    index=torch.tensor([6]))
        last, last_residual = layer.step(h[:, 6], None, step_ctx, state, KERNELS)
    torch.testing.assert_close(last, full[:, 6], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last_residual, full_residual[:, 6])


@pytest.mark.parametrize("letter", sorted(LAYERS))
def test_reset_parameters_draws_every_parameter_afresh(letter):
    layer = LAYERS[letter](CONFIG)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(0.125)
    layer.reset_parameters()
    for name, p in layer.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert not torch.all(p == 0.125), f"{name} kept the value it had before reset_parameters"
