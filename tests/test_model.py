"""The Mamba-1 model: config checks, released initialisation, forward/step/prefill agreement, left padding,
gradient checkpointing, loss masking, sampling, model-size presets."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from configs.model_sizes import DEFAULT_VOCAB_SIZE, MODEL_SIZES, count_parameters, model_config, table
from models import Cache, LanguageModel, MambaConfig
from models.layers.mamba1 import Mamba1Layer, SelectiveSSM
from tests.helpers import randomize_parameters

# "auto" is what users get (chunked on the CPU); "ref" is the spec it must agree with.
SCAN_BACKENDS = ["auto", "ref"]


def tiny_config(**overrides):
    fields = dict(d_model=24, n_layer=3, vocab_size=53, d_state=5, d_conv=3, expand=2)
    return MambaConfig(**{**fields, **overrides})


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LanguageModel(tiny_config(**overrides))
    # random (not initial) values everywhere, so no term of the math hides behind a 0 or a 1
    return randomize_parameters(model, scale=0.2)


# ---- config ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, allowed", [
    ("d_model", 0, ">= 1"), ("n_layer", -1, ">= 1"), ("vocab_size", 2.5, "integer"), ("d_state", True, "integer"),
    ("d_conv", 0, ">= 1"), ("expand", 0, ">= 1"), ("dt_rank", "big", '"auto"'), ("dt_rank", 0, ">= 1"),
    ("dt_min", 0.0, "> 0"), ("dt_max", 1e-5, ">= dt_min"), ("dt_init_floor", -1.0, ">= 0"),
    ("norm_epsilon", 0, "> 0"), ("conv_bias", 1, "True or False"), ("tie_embeddings", "yes", "True or False"),
    ("scan_backend", "cuda", "auto, ref, chunked, triton"), ("pad_vocab_size_multiple", 0, ">= 1"),
])
def test_config_rejects_bad_values(field, value, allowed):
    with pytest.raises(ValueError) as err:
        tiny_config(**{field: value})
    message = str(err.value)
    assert field in message and repr(value) in message and allowed in message


def test_config_derived_values_and_dict_round_trip():
    cfg = MambaConfig(d_model=768, n_layer=24, vocab_size=50277)
    assert (cfg.d_inner, cfg.resolved_dt_rank, cfg.padded_vocab_size) == (1536, 48, 50280)
    assert MambaConfig(d_model=17, n_layer=1, vocab_size=8, dt_rank=5).resolved_dt_rank == 5
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field.*hidden_size"):
        MambaConfig.from_dict({**cfg.to_dict(), "hidden_size": 3})
    with pytest.raises(ValueError, match="n_layer"):
        MambaConfig.from_dict({"d_model": 4, "vocab_size": 9})


# ---- initialisation -------------------------------------------------------------------------------------------------

def test_released_initialisation_survives_construction():
    torch.manual_seed(0)
    cfg = tiny_config(n_layer=4, d_model=32, bias=True, dt_min=0.002, dt_max=0.05, dt_init_floor=0.004)
    model = LanguageModel(cfg)
    emb = model.backbone.embeddings.weight
    assert model.lm_head.weight is emb and emb.shape == (56, 32)          # tied, vocab padded 53 -> 56
    assert abs(emb.std().item() - 0.02) < 0.002 and abs(emb.mean().item()) < 0.002
    for block in model.backbone.layers:
        mixer = block.mixer
        expected_A_log = torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand(cfg.d_inner, -1)
        assert mixer.A_log.dtype == torch.float32 and torch.equal(mixer.A_log, expected_A_log)
        assert torch.equal(mixer.D, torch.ones(cfg.d_inner))
        assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay
        dt = F.softplus(mixer.dt_proj.bias)                                  # the initial step sizes
        assert dt.min() >= cfg.dt_init_floor * (1 - 1e-5) and dt.max() <= cfg.dt_max * (1 + 1e-5)
        assert (dt > cfg.dt_init_floor * 1.01).any()                         # log-uniform, not all floored
        bound = cfg.resolved_dt_rank ** -0.5
        assert mixer.dt_proj.weight.abs().max() <= bound and mixer.dt_proj.weight.abs().max() > 0.5 * bound
        out_bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer)     # kaiming-uniform / sqrt(n_layer)
        assert mixer.out_proj.weight.abs().max() <= out_bound
        assert mixer.out_proj.weight.abs().max() > 0.9 * out_bound
        assert torch.equal(mixer.in_proj.bias, torch.zeros_like(mixer.in_proj.bias))
        assert torch.equal(mixer.out_proj.bias, torch.zeros_like(mixer.out_proj.bias))
        assert torch.equal(block.norm.weight, torch.ones(cfg.d_model))
    # different draws per layer (each layer draws its own dt)
    layers = model.backbone.layers
    assert not torch.equal(layers[0].mixer.dt_proj.bias, layers[1].mixer.dt_proj.bias)


def test_untied_head_and_parameter_count():
    tied = LanguageModel(tiny_config())
    untied = LanguageModel(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.backbone.embeddings.weight
    assert untied.num_parameters() - tied.num_parameters() == 56 * 24
    assert tied.num_parameters() == sum(p.numel() for p in set(tied.parameters()))


# ---- forward, loss --------------------------------------------------------------------------------------------------

def test_forward_shapes_and_loss_ignores_minus_100():
    model = make_model()
    x = torch.randint(0, 53, (3, 11))
    logits, loss = model(x)
    assert logits.shape == (3, 11, 56) and loss is None
    targets = torch.randint(0, 53, (3, 11))
    targets[0, :4] = -100
    targets[2, 7:] = -100
    _, loss = model(x, targets=targets)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    # un-ignoring one position changes the loss: -100 really was left out
    targets2 = targets.clone()
    targets2[0, 0] = 5
    assert not torch.allclose(model(x, targets=targets2)[1], loss)
    with pytest.raises(ValueError, match="targets"):
        model(x, targets=targets[:, :5])
    with pytest.raises(ValueError, match="input_ids"):
        model(x.float())


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_step_by_step_matches_forward(backend):
    model = make_model(scan_backend=backend, bias=True)
    x = torch.randint(0, 53, (2, 13))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.init_cache(2)
        stepped = torch.stack([model.step(x[:, t], cache) for t in range(13)], dim=1)
    assert cache.seqlen_offset == 13
    assert (stepped - full).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("prompt_len", [1, 2, 7])   # shorter than, equal to, longer than d_conv - 1
def test_prefill_then_step_matches_forward(backend, prompt_len):
    model = make_model(scan_backend=backend, conv_bias=False)
    x = torch.randint(0, 53, (3, 12))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.init_cache(3)
        prefill, _ = model(x[:, :prompt_len], cache=cache)
        rest = torch.stack([model.step(x[:, t], cache) for t in range(prompt_len, 12)], dim=1)
    assert (prefill - full[:, :prompt_len]).abs().max() <= 1e-5
    assert (rest - full[:, prompt_len:]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="empty cache"):
        model(x, cache=cache)
    with pytest.raises(ValueError, match="one token per sequence"):
        model.step(x[:2, 0], cache)


def test_backends_agree_on_values_and_gradients():
    x = torch.randint(0, 53, (2, 37))
    grads = {}
    losses = {}
    for backend in ("ref", "auto"):
        model = make_model(d_state=16, scan_backend=backend)   # same seed: same weights
        _, losses[backend] = model(x, targets=x)
        losses[backend].backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(losses["auto"], losses["ref"], rtol=1e-5, atol=1e-5)
    for name, g in grads["ref"].items():
        torch.testing.assert_close(grads["auto"][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_backend_is_logged_once_and_fallback_warns(caplog, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = make_model(scan_backend="triton")
    x = torch.randint(0, 53, (1, 4))
    with caplog.at_level(logging.INFO, logger="models.lm"):
        model(x)
        model(x)
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "selective scan" in r.getMessage()]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(infos) == 1 and "chunked" in infos[0].getMessage() and "'triton'" in infos[0].getMessage()
    assert "causal conv torch" in infos[0].getMessage() and "add+RMSNorm torch" in infos[0].getMessage()
    assert len(warnings) == 1 and "triton" in warnings[0].getMessage() and "Falling back" in warnings[0].getMessage()


# ---- left padding ---------------------------------------------------------------------------------------------------

def test_left_padding_matches_each_prompt_alone():
    model = make_model(bias=True)   # in_proj bias: pads must still give zero conv input
    prompts = [torch.randint(1, 53, (n,)) for n in (6, 1, 3)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    ids[1, :5] = 7   # pad ids are arbitrary tokens: the mask alone must neutralise them
    with torch.no_grad():
        batched, _ = model(ids, attention_mask=mask)
        generated = model.generate(ids, 5, temperature=0, attention_mask=mask)
        for i, p in enumerate(prompts):
            alone, _ = model(p[None])
            torch.testing.assert_close(batched[i, -1], alone[0, -1], rtol=1e-5, atol=1e-5)
            alone_gen = model.generate(p[None], 5, temperature=0)
            assert torch.equal(generated[i, width:], alone_gen[0, len(p):])
    with pytest.raises(ValueError, match="LEFT padding"):
        model(ids, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="only 0"):
        model(ids, attention_mask=mask * 2)
    with pytest.raises(ValueError, match="shape"):
        model(ids, attention_mask=mask[:, 1:])


# ---- gradient checkpointing -----------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    model = make_model().train()
    x = torch.randint(0, 53, (2, 9))
    _, loss = model(x, targets=x)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = []
    import models.lm as lm_module
    real_checkpoint = lm_module.checkpoint
    monkeypatch.setattr(lm_module, "checkpoint", lambda *a, **k: calls.append(k) or real_checkpoint(*a, **k))
    model.set_gradient_checkpointing(True)
    _, loss_ckpt = model(x, targets=x)
    loss_ckpt.backward()
    assert len(calls) == 3 and all(k == {"use_reentrant": False} for k in calls)   # once per block
    torch.testing.assert_close(loss_ckpt, loss)
    for name, g in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, g, rtol=1e-6, atol=1e-7, msg=name)
    calls.clear()
    with torch.no_grad():
        model.eval()(x)
    assert calls == []   # never in eval / inference


# ---- generate -------------------------------------------------------------------------------------------------------

def test_greedy_generate_equals_argmax_of_full_forward():
    model = make_model()
    seq = torch.randint(0, 53, (2, 4))
    out = model.generate(seq, 6, temperature=0)
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1, :53].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_options():
    model = make_model()
    prompt = torch.randint(0, 53, (4, 3))
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 8, top_p=1e-6), greedy)
    g = lambda: torch.Generator().manual_seed(123)
    a = model.generate(prompt, 8, temperature=1.3, top_k=10, top_p=0.9, generator=g())
    b = model.generate(prompt, 8, temperature=1.3, top_k=10, top_p=0.9, generator=g())
    assert torch.equal(a, b) and a.shape == (4, 11) and torch.equal(a[:, :3], prompt)
    assert not torch.equal(a, greedy)
    # top_k: every sampled token is among the k most likely at its step
    with torch.no_grad():
        logits, _ = model(a[:, :-1])
    topk = logits[:, 2:, :53].topk(10, dim=-1).indices
    assert (topk == a[:, 3:, None]).any(-1).all()
    # never a padding row (ids 53..55 exist in the head but not in the vocabulary)
    with torch.no_grad():
        model.lm_head.weight[53:] = 0
        model.backbone.norm_f.weight.zero_()   # all logits 0: uniform over the real vocabulary
    many = model.generate(torch.zeros(64, 1, dtype=torch.long), 20, generator=g())
    assert many.max() < 53 and len(many.unique()) > 40


def test_eos_stops_a_sequence_and_pads_it():
    model = make_model()
    prompt = torch.randint(0, 53, (3, 2))
    free = model.generate(prompt, 10, temperature=0)
    eos = int(free[0, 4])   # row 0 emits it by its third new token
    out = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    for row_free, row in zip(free, out):
        new_free, new = row_free[2:], row[2:]
        hits = (new_free == eos).nonzero()
        if len(hits) == 0:
            assert torch.equal(new, new_free[:len(new)])
        else:
            stop = hits[0].item()
            assert torch.equal(new[:stop + 1], new_free[:stop + 1]) and (new[stop:] == eos).all()
    # all rows stopped -> generation ends early
    single = model.generate(prompt[:1], 10, temperature=0, eos_token_id=eos)
    first = (free[0, 2:] == eos).nonzero()[0].item()
    assert single.shape[1] == 2 + first + 1 and single[0, -1] == eos


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **{"max_new_tokens": 2, **kwargs})


def test_cache_layout():
    model = make_model()
    cache = model.init_cache(5, dtype=torch.bfloat16)
    assert isinstance(cache, Cache) and cache.batch_size == 5 and len(cache.states) == 3
    conv_state, ssm_state = cache.states[0]
    assert conv_state.shape == (5, 48, 3) and conv_state.dtype == torch.bfloat16
    assert ssm_state.shape == (5, 48, 5) and ssm_state.dtype == torch.float32


def test_blocks_are_usable_alone():
    cfg = tiny_config()
    block = Mamba1Layer(cfg.to_model_config())
    assert isinstance(block.mixer, SelectiveSSM)
    h = torch.randn(2, 5, 24)
    out, residual = block(h)
    assert out.shape == (2, 5, 24) and residual.dtype == torch.float32
    # residual + h, then the mixer of its norm: the pre-norm block h + mixer(norm(h)) in two pieces
    torch.testing.assert_close(residual, h)
    torch.testing.assert_close(out, block.mixer(block.norm(h)))


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_bf16_weights_and_the_residual_stream_dtype(residual_in_fp32):
    model = make_model(residual_in_fp32=residual_in_fp32).to(torch.bfloat16)
    x = torch.randint(0, 53, (2, 6))
    with torch.no_grad():
        full, _ = model(x)
        out = model.generate(x, 3, temperature=0)
        h = model.backbone.embeddings(x)
        block = model.backbone.layers[0]
        residual_dtype = torch.float32 if residual_in_fp32 else torch.bfloat16
        out_h, residual = block(h)
        assert residual.dtype == residual_dtype and out_h.dtype == torch.bfloat16
        cache = model.init_cache(2)
        _, residual = block.step(h[:, 0], None, None, cache.states[0])
        assert residual.dtype == residual_dtype
    assert full.dtype == torch.bfloat16 and torch.isfinite(full.float()).all() and out.shape == (2, 9)


# ---- presets --------------------------------------------------------------------------------------------------------

def test_model_size_presets():
    assert list(MODEL_SIZES) == ["tiny", "small", "medium", "large"]
    # the published mamba-130m / mamba-370m counts (GPT-NeoX vocabulary 50277, padded to 50280)
    assert count_parameters(model_config("medium", 50277)) == 129_135_360
    assert count_parameters(model_config("large", 50277)) == 371_516_416
    assert 45e6 < count_parameters(model_config("small")) < 55e6
    cfg = model_config("tiny", 1000, d_state=4)
    assert (cfg.vocab_size, cfg.d_state, cfg.d_model) == (1000, 4, MODEL_SIZES["tiny"]["d_model"])
    assert f"{count_parameters(model_config('small', DEFAULT_VOCAB_SIZE)):,}" in table()
    with pytest.raises(ValueError, match="huge.*tiny, small, medium, large"):
        model_config("huge")


def test_tiny_preset_trains():
    model = LanguageModel(model_config("tiny")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 100, (2, 32))
    losses = []
    for _ in range(4):
        _, loss = model(x, targets=x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.parameters())
