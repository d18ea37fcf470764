"""The Mamba-2 model: config checks, released initialisation, forward/step/prefill agreement, left padding, backends
and gradients, gradient checkpointing, bf16 autocast, the decoder, the family table and presets."""
import math

import pytest
import torch
import torch.nn.functional as F

from configs.model_sizes import MODEL_SIZES_BY_FAMILY, count_parameters, model_config
from inference import Decoder
from models import FAMILIES, LanguageModel, Mamba2Config, MambaConfig, build_model
from tests.helpers import randomize_parameters
from training.optim import param_groups


def tiny_config(**overrides):
    fields = dict(d_model=24, n_layer=2, vocab_size=53, d_state=6, d_conv=3, expand=2, headdim=12, ngroups=2,
                  chunk_size=4)
    return Mamba2Config(**{**fields, **overrides})


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(tiny_config(**overrides))
    randomize_parameters(model, scale=0.2)
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.dt_bias.copy_(torch.randn_like(layer.mixer.dt_bias) - 2)
    return model


@pytest.mark.parametrize("overrides, message", [
    (dict(headdim=10), "headdim 10 does not divide d_inner = expand * d_model = 48; allowed: a divisor of 48"),
    (dict(ngroups=3), "ngroups 3 does not divide the number of heads nheads = d_inner / headdim = 4"),
    (dict(scan_backend="fast"), "scan_backend must be one of auto, ref, chunked, triton"),
    (dict(dt_limit=(1.0, 0.1)), "dt_limit must be (min, max)"),
    (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
    (dict(A_init_range=(0, 16)), "A_init_range"),
])
def test_config_rejects_shapes_that_cannot_work(overrides, message):
    with pytest.raises(ValueError) as err:
        tiny_config(**overrides)
    assert message in str(err.value)


def test_config_derived_values_round_trip_and_family():
    cfg = Mamba2Config(d_model=768, n_layer=24, vocab_size=50277)
    assert (cfg.d_inner, cfg.nheads, cfg.conv_dim, cfg.d_in_proj, cfg.padded_vocab_size) == \
        (1536, 24, 1536 + 256, 2 * 1536 + 256 + 24, 50288)
    assert Mamba2Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.family == "mamba2" and MambaConfig.family == "mamba1" and "family" not in MambaConfig(
        d_model=8, n_layer=1, vocab_size=9).to_dict()
    assert FAMILIES["mamba2"] is Mamba2Config and isinstance(build_model(MambaConfig(
        d_model=8, n_layer=1, vocab_size=9)), LanguageModel)


def test_released_initialisation():
    torch.manual_seed(0)
    cfg = tiny_config(n_layer=4, d_model=32, headdim=8, ngroups=1, dt_min=0.002, dt_max=0.05, dt_init_floor=0.004,
                      bias=True)
    model = build_model(cfg)
    emb = model.backbone.embeddings.weight
    assert model.lm_head.weight is emb and emb.shape == (64, 32)            # tied, vocab 53 padded to 64 (x16)
    assert abs(emb.std().item() - 0.02) < 0.003
    for block in model.backbone.layers:
        mixer = block.mixer
        A = torch.exp(mixer.A_log)
        assert mixer.A_log.shape == (cfg.nheads,) and A.min() >= 1 and A.max() <= 16 and A.std() > 0.5
        assert torch.equal(mixer.D, torch.ones(cfg.nheads))
        dt = F.softplus(mixer.dt_bias)
        assert dt.min() >= cfg.dt_init_floor * (1 - 1e-5) and dt.max() <= cfg.dt_max * (1 + 1e-5)
        out_bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer)
        assert out_bound * 0.8 < mixer.out_proj.weight.abs().max() <= out_bound
        assert torch.equal(mixer.in_proj.bias, torch.zeros_like(mixer.in_proj.bias))
        assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay and mixer.dt_bias._no_weight_decay
        assert torch.equal(mixer.norm.weight, torch.ones(cfg.d_inner))
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    assert all(id(p) in no_decay for layer in model.backbone.layers
               for p in (layer.mixer.A_log, layer.mixer.D, layer.mixer.dt_bias))


@pytest.mark.parametrize("backend", ["auto", "ref"])
def test_step_by_step_and_prefill_match_forward(backend):
    model = make_model(scan_backend=backend, dt_limit=(0.01, 2.0))
    x = torch.randint(0, 53, (2, 13))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.init_cache(2)
        stepped = torch.stack([model.step(x[:, t], cache) for t in range(13)], dim=1)
        assert (stepped - full).abs().max() <= 1e-4
        cache = model.init_cache(2)
        prefill, _ = model(x[:, :6], cache=cache)
        rest = torch.stack([model.step(x[:, t], cache) for t in range(6, 13)], dim=1)
    assert (prefill - full[:, :6]).abs().max() <= 1e-5 and (rest - full[:, 6:]).abs().max() <= 1e-4
    conv_state, ssm_state = cache.states[0]
    assert ssm_state.shape == (2, 4, 12, 6) and conv_state.shape == (2, 48 + 24, 3)


def test_left_padding_leaves_the_state_untouched():
    model = make_model(bias=True, dt_limit=(0.05, 1.0))    # in_proj bias and a dt floor: pads must still not count
    a, b = torch.randint(0, 53, (1, 9)), torch.randint(0, 53, (1, 4))
    ids = torch.cat([a, torch.cat([torch.full((1, 5), 7), b], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        out = model.generate(ids, 5, temperature=0, attention_mask=mask)
        alone = model.generate(b, 5, temperature=0)
        cache_pad, cache_one = model.init_cache(2), model.init_cache(1)
        model.prefill(ids, cache_pad, mask)
        model.prefill(b, cache_one)
    assert torch.equal(out[1, 9:], alone[0, 4:])
    for s_pad, s_one in zip(sum(cache_pad.states, ()), sum(cache_one.states, ())):
        assert (s_pad[1] - s_one[0]).abs().max() <= 1e-5


def test_backends_agree_and_gradients_flow_with_checkpointing():
    x = torch.randint(0, 53, (2, 11))
    losses, grads = [], []
    for backend, ckpt in (("ref", False), ("chunked", True)):
        model = make_model(scan_backend=backend).train()
        model.set_gradient_checkpointing(ckpt)
        _, loss = model(x, targets=x, return_logits=False)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert (losses[0] - losses[1]).abs() <= 1e-5
    for name, g in grads[0].items():
        assert ((grads[1][name] - g).abs().max() / g.abs().max().clamp_min(1e-12)) <= 1e-4, name
        assert g.abs().max() > 0, name


def test_bf16_autocast_forward_backward_is_finite():
    model = make_model().train()
    x = torch.randint(0, 53, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, targets=x, return_logits=False)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_decoder_and_triton_fallback(caplog):
    model = make_model()
    prompts = torch.randint(0, 53, (3, 5))
    with torch.no_grad():
        expected = model.generate(prompts, 6, temperature=0)
    assert torch.equal(Decoder(model, 3).decode(prompts, 6, __import__("models").sampling.SamplingParams(0)),
                       expected)
    model = make_model(scan_backend="triton")
    with caplog.at_level("WARNING"):
        assert model.kernels_for(torch.device("cpu")).mamba2.scan == "chunked"
    assert "TRITON_INTERPRET=1" in caplog.text


def test_presets_cover_both_families():
    assert set(MODEL_SIZES_BY_FAMILY["mamba2"]) == set(MODEL_SIZES_BY_FAMILY["mamba1"])
    medium = model_config("medium", vocab_size=50277, family="mamba2")
    large = model_config("large", vocab_size=50277, family="mamba2")
    assert isinstance(medium, Mamba2Config) and (medium.d_model, medium.n_layer, medium.d_state,
                                                 medium.headdim, medium.expand, medium.ngroups) == (768, 24, 128, 64, 2, 1)
    assert (large.d_model, large.n_layer) == (1024, 48)
    # the published mamba2-130m has 129.1M parameters with its 50288-row embedding
    assert abs(count_parameters(medium) - 129.1e6) < 0.2e6
    assert isinstance(model_config("tiny"), MambaConfig)
    with pytest.raises(ValueError, match="family 'mamba3' is unknown; allowed: mamba1, mamba2"):
        model_config("tiny", family="mamba3")


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decoder_matches_eager(compile):
    from models.sampling import SamplingParams
    model = make_model(d_model=64, headdim=16, d_state=16).cuda()
    ids = torch.randint(0, 53, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    eager = Decoder(model, 4, cuda_graph=False).decode(ids, 30, SamplingParams(temperature=0))
    graphed = Decoder(model, 4, cuda_graph=True, compile=compile)
    assert torch.equal(graphed.decode(ids, 30, SamplingParams(temperature=0)), eager)
    assert torch.equal(eager, model.generate(ids, 30, temperature=0))
