"""The hybrid family on the CPU: every layer kind's forward and gradients, attention against a naive reference,
the KV cache against the full forward, left padding, pattern errors, "M" * n against LanguageModel, the
native checkpoint format and the eager decoder."""
import json
import math

import pytest
import torch

from inference import Decoder, pad_left
from models import HybridConfig, MambaConfig, LanguageModel, build_model, load_pretrained
from models.layers.attention import AttentionContext, CausalSelfAttention, positions_from_mask, rope_tables

from helpers import randomize_parameters

M2 = dict(d_state=16, headdim=16, chunk_size=8)


def tiny(pattern, **kw):
    fields = dict(d_model=32, n_layer=len(pattern), vocab_size=61, pattern=pattern, n_heads=4, n_kv_heads=2,
                  mamba1=dict(d_state=8), mamba2=M2)
    fields.update(kw)
    torch.manual_seed(0)
    return build_model(HybridConfig(**fields))


PATTERNS = ["M", "2", "A", "F", "T", "MAMF", "2T2", "MMAM2TF"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_and_gradients_of_every_pattern(pattern):
    model = tiny(pattern).train()
    x = torch.randint(0, 61, (2, 12))
    logits, loss = model(x, targets=x)
    assert logits.shape == (2, 12, 64) and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "embeddings" not in n)
    # the chunked loss (training's path) equals the full one
    _, chunked = model(x, targets=x, return_logits=False)
    torch.testing.assert_close(chunked, loss, rtol=1e-5, atol=1e-5)


def naive_attention(attn, x, positions, key_mask=None, rope=True):
    """softmax(q k^T / sqrt(e) + causal mask) v, heads repeated for GQA, RoPE written out as complex rotations."""
    b, l, _ = x.shape
    h, g, e = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, l, h, e)
    k = attn.k_proj(x).view(b, l, g, e)
    v = attn.v_proj(x).view(b, l, g, e)
    if rope:
        freqs = 10000.0 ** (-torch.arange(0, e, 2).float() / e)                   # (e/2,)
        rot = torch.polar(torch.ones(b, l, e // 2), positions[..., None].float() * freqs)[:, :, None]

        def rotate(t):   # HF layout: pairs (i, i + e/2)
            c = torch.complex(t[..., : e // 2], t[..., e // 2:]) * rot
            return torch.cat([c.real, c.imag], dim=-1)
        q, k = rotate(q), rotate(k)
    k = k.repeat_interleave(h // g, dim=2)
    v = v.repeat_interleave(h // g, dim=2)
    scores = torch.einsum("bihe,bjhe->bhij", q, k) / math.sqrt(e)
    allowed = torch.ones(l, l, dtype=torch.bool).tril()[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v).reshape(b, l, h * e)
    return attn.o_proj(o)


@pytest.mark.parametrize("n_kv_heads,rope", [(4, True), (2, True), (1, False)])
def test_attention_matches_naive_reference(n_kv_heads, rope):
    torch.manual_seed(1)
    cfg = HybridConfig(d_model=32, n_layer=1, vocab_size=10, pattern="A", n_heads=4, n_kv_heads=n_kv_heads,
                       rope=rope)
    attn = CausalSelfAttention(cfg)
    x = torch.randn(2, 9, 32)
    pos = positions_from_mask(None, 2, 9, "cpu")
    ctx = AttentionContext(rope=rope_tables(pos, 8, 10000.0) if rope else None)
    torch.testing.assert_close(attn(x, ctx), naive_attention(attn, x, pos, rope=rope), rtol=1e-5, atol=1e-5)
    # left padding: pads are never keys, positions count from the first real token
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9]).bool()
    pos = positions_from_mask(mask, 2, 9, "cpu")
    ctx = AttentionContext(mask=mask, rope=rope_tables(pos, 8, 10000.0) if rope else None)
    out, ref = attn(x, ctx), naive_attention(attn, x, pos, key_mask=mask, rope=rope)
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern,rope", [("T", True), ("MAMF", True), ("2TA", False), ("MM", True)])
def test_prefill_then_steps_equals_full_forward(pattern, rope):
    model = randomize_parameters(tiny(pattern, rope=rope), scale=0.1)
    x = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.init_decode_cache(2, 11)
        outs = [model.prefill(x[:, :5], cache)]
        outs += [model.step(x[:, t], cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.stack(outs, 1), full[:, 4:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="full" if model.has_attention else "."):
        with torch.no_grad():
            for t in range(cache.slots):   # past the allocation: a clear error (pure Mamba has no limit)
                model.step(x[:, 0], cache)
            if not model.has_attention:
                raise ValueError("no limit")


@pytest.mark.parametrize("pattern", ["MAT", "2A"])
def test_left_padded_batch_gives_each_prompt_what_it_gets_alone(pattern):
    model = randomize_parameters(tiny(pattern), scale=0.1)
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4, 2], [11]]
    ids, mask = pad_left(prompts)
    with torch.no_grad():
        batch = model.generate(ids, 6, temperature=0, attention_mask=mask)[:, ids.shape[1]:]
        for i, p in enumerate(prompts):
            alone = model.generate(torch.tensor([p]), 6, temperature=0)[:, len(p):]
            assert torch.equal(batch[i], alone[0]), (i, batch[i], alone[0])
        # logits too, not only the argmax
        cache = model.init_decode_cache(3, 20)
        logits = model.prefill(ids, cache, mask)
        for i, p in enumerate(prompts):
            alone, _ = model(torch.tensor([p]))
            torch.testing.assert_close(logits[i], alone[0, -1], rtol=1e-4, atol=1e-4)


def test_pattern_errors_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown symbol\(s\) 'X'.*allowed: M \(Mamba-1\), 2 \(Mamba-2\), "
                                         r"A \(attention\)"):
        HybridConfig(d_model=32, n_layer=3, vocab_size=10, pattern="MXA")
    with pytest.raises(ValueError, match="has 2 symbols but n_layer is 3"):
        HybridConfig(d_model=32, n_layer=3, vocab_size=10, pattern="MA")
    with pytest.raises(ValueError, match="n_kv_heads 3 must divide n_heads 4"):
        HybridConfig(d_model=32, n_layer=1, vocab_size=10, pattern="A", n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"MambaConfig got unknown field\(s\) \[.bogus.\]"):
        HybridConfig(d_model=32, n_layer=1, vocab_size=10, pattern="M", mamba1=dict(bogus=1))


def test_pure_mamba_pattern_equals_mamba_language_model():
    torch.manual_seed(0)
    mamba = randomize_parameters(LanguageModel(MambaConfig(d_model=32, n_layer=3, vocab_size=61, d_state=8)))
    hybrid = tiny("MMM", pad_vocab_size_multiple=8).eval()
    hybrid.load_state_dict(mamba.state_dict(), strict=True)
    x = torch.randint(0, 61, (2, 13))
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    with torch.no_grad():
        assert torch.equal(hybrid(x)[0], mamba(x)[0])
        assert torch.equal(hybrid(x, attention_mask=mask)[0], mamba(x, attention_mask=mask)[0])
        assert torch.equal(hybrid.generate(x, 5, temperature=0), mamba.generate(x, 5, temperature=0))


def test_init_and_weight_decay_rules():
    model = tiny("TTTT", d_model=64, n_heads=4, n_kv_heads=4)
    layer = model.backbone.layers[0]
    assert abs(layer.mixer.q_proj.weight.std().item() - 0.02) < 0.003
    assert abs(layer.mlp.down_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001   # 2 n_layer branches
    from training.optim import param_groups
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    named = dict(model.named_parameters())
    assert id(named["backbone.layers.0.norm.weight"]) in no_decay
    assert id(named["backbone.layers.0.mlp_norm.weight"]) in no_decay
    assert id(named["backbone.layers.0.mixer.q_proj.weight"]) not in no_decay


def test_native_checkpoint_round_trip_and_strict_errors(tmp_path):
    model = randomize_parameters(tiny("MAT2F"))
    model.save_pretrained(tmp_path / "m", eos_token_id=3)
    header = json.loads((tmp_path / "m" / "config.json").read_text())
    assert header["format"] == "mamba-trainer" and header["family"] == "hybrid" and header["pattern"] == "MAT2F"
    loaded = load_pretrained(tmp_path / "m")
    x = torch.randint(0, 61, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    with pytest.raises(ValueError, match="a hybrid checkpoint .* but family 'mamba1' was asked for"):
        load_pretrained(tmp_path / "m", family="mamba1")
    header["config"]["pattern"] = header["pattern"] = "MAT2M"
    (tmp_path / "m" / "config.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="the weights do not match config.json: .*unexpected tensors"):
        load_pretrained(tmp_path / "m")
    header["config"]["wings"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['wings'\]"):
        load_pretrained(tmp_path / "m")


def test_eager_decoder_on_hybrid_patterns():
    model = randomize_parameters(tiny("MAT"), scale=0.1)
    ids, mask = pad_left([[1, 2, 3, 4], [5, 6]])
    with torch.no_grad():
        want = model.generate(ids, 8, temperature=0, attention_mask=mask)
        decoder = Decoder(model, 2, max_length=12)
        from models.sampling import SamplingParams
        got = decoder.decode(ids, 8, SamplingParams(temperature=0), attention_mask=mask)
        assert torch.equal(got, want)
        again = decoder.decode(ids, 8, SamplingParams(temperature=0), attention_mask=mask)   # reused
        assert torch.equal(again, want)
        with pytest.raises(ValueError, match="KV cache holds 16 tokens"):
            decoder.decode(ids, 20, SamplingParams(temperature=0), attention_mask=mask)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 61, (2, 10))
    grads = []
    for gc in (False, True):
        model = tiny("MAT2")
        model.set_gradient_checkpointing(gc)
        model.train()(x, targets=x)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_vocab_grows_on_every_layer_kind():
    # SFT adds the chat tokens: resize_vocab must handle layers without a mixer (F) and mixers of other configs
    from models.vocab import resize_vocab
    model = tiny("MAF2T").eval()
    x = torch.randint(0, 61, (1, 9))
    before = model(x)[0]
    assert resize_vocab(model, 70)
    assert model.config.vocab_size == 70 and model.config.padded_vocab_size == 80
    assert model.spec == model.config          # the spec follows (the Llama export cuts to spec.vocab_size)
    assert model.backbone.layers[0].mixer.config.d_inner == 64          # a Mamba-1 mixer keeps its own config
    after = model(x)[0]
    assert after.shape[-1] == 80
    torch.testing.assert_close(after[..., :61], before[..., :61])
