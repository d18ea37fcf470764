"""HF Llama checkpoints in and out (models/formats/llama.py): our pattern of T layers computes exactly what
transformers' LlamaForCausalLM computes on the same weights (fp32, 1e-4), with GQA, tied and untied heads, Llama 3
RoPE scaling, left padding and cached decoding; our models save back to folders transformers opens with the same
logits; unsupported settings are one clear line; and train.py fine-tunes a Llama folder that generate.py then
chats with. Every Llama here is a small random one made in the test (no downloads)."""
import io
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models import HybridConfig, HybridLanguageModel, LanguageModel, load_pretrained, lora
from models.formats import read_config
from models.formats.llama import config_from_llama, save_llama
from models.layers.attention import rope_frequencies

VOCAB = 101        # not a multiple of anything: the vocabulary must come through exactly
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}    # tiny: at head_dim 16 every band has a frequency

VARIANTS = {
    # GQA (4 query heads over 2 KV heads), untied head, head_dim 24 != hidden / heads, a large theta
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # multi-head attention, tied head, Llama 3's RoPE scaling
    "mha-tied-llama3": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                            max_position_embeddings=128, rope_parameters={**LLAMA3, "rope_theta": 10000.0}),
}


def make_llama(folder, variant="gqa-untied", vocab_size=VOCAB, **extra):
    """A small random LlamaForCausalLM saved to `folder`; every weight random (norms around 1), so no term of the
    math hides behind a 0 or a 1. Returns the transformers model (fp32, eval)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         **{**VARIANTS[variant], **extra})
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf


def padded_batch(length=14, pads=(0, 5)):
    """(ids, mask, position_ids): random tokens, row i LEFT-padded by pads[i]; positions counted from each row's
    first real token (as transformers' generate counts them)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (len(pads), length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_llama(folder, request.param)
    return hf, load_pretrained(folder), folder


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_config_and_logits_match_transformers(pair):
    hf, ours, _ = pair
    c = ours.config
    assert isinstance(ours, LanguageModel) and c.pattern == "TT" and c.vocab_size == c.padded_vocab_size == VOCAB
    assert (c.n_heads, c.kv_heads, c.resolved_head_dim, c.resolved_d_ff, c.norm_epsilon) == \
        (4, hf.config.num_key_value_heads, hf.config.head_dim, 96, 1e-5)
    assert c.tie_embeddings == hf.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.backbone.embeddings.weight) == c.tie_embeddings
    ids, _, _ = padded_batch(length=40)
    assert max_diff(ours(ids)[0], hf(ids).logits) <= 1e-4


@torch.no_grad()
def test_left_padding_matches_transformers(pair):
    hf, ours, _ = pair
    ids, mask, positions = padded_batch()
    want = hf(ids, attention_mask=mask, position_ids=positions).logits
    got = ours(ids, attention_mask=mask)[0]
    real = mask.bool()
    assert max_diff(got[real], want[real]) <= 1e-4
    # and each padded row is what it is alone
    alone = hf(ids[1:, 5:]).logits[0]
    assert max_diff(got[1, 5:], alone) <= 1e-4


@torch.no_grad()
def test_cached_decoding_matches_transformers(pair):
    """Prefill of a left-padded batch, then steps: every step's logits are transformers' on the whole sequence;
    greedy generation gives transformers' tokens."""
    hf, ours, _ = pair
    ids, mask, positions = padded_batch(length=9, pads=(0, 4))
    new = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    want = hf(full, attention_mask=full_mask, position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits
    cache = ours.init_decode_cache(2, full.shape[1])
    got = [ours.prefill(ids, cache, attention_mask=mask)]
    for t in range(new.shape[1] - 1):
        got.append(ours.step(new[:, t], cache))
    assert max_diff(torch.stack(got, 1), want[:, ids.shape[1] - 1:-1]) <= 1e-4

    hf_tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, 8, temperature=0, attention_mask=mask), hf_tokens)


@torch.no_grad()
def test_save_back_opens_in_transformers_with_the_same_logits(pair, tmp_path):
    hf, ours, folder = pair
    save_llama(ours, tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids, _, _ = padded_batch()
    assert max_diff(again(ids).logits, hf(ids).logits) == 0       # the same weights, bit for bit
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["tie_word_embeddings"] == hf.config.tie_word_embeddings and written["vocab_size"] == VOCAB
    # and ours reads its own export back to the same config (our defaults never leak into the round trip)
    assert read_config(tmp_path)[0] == read_config(folder)[0]
    assert torch.equal(LanguageModel.from_pretrained(tmp_path, family="hybrid")(ids)[0], ours(ids)[0])


@torch.no_grad()
def test_a_padded_vocabulary_saves_as_the_real_one(tmp_path):
    """Our own transformer pads its embedding rows to 16; the export holds exactly vocab_size rows, whose logits
    are ours, so transformers can never sample a padding row."""
    torch.manual_seed(0)
    ours = HybridLanguageModel(HybridConfig(d_model=32, n_layer=2, vocab_size=VOCAB, pattern="TT", n_heads=4,
                                            n_kv_heads=2, tie_embeddings=False)).eval()
    assert ours.config.padded_vocab_size == 112
    save_llama(ours, tmp_path, eos_token_id=3)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.lm_head.weight.shape[0] == VOCAB and hf.config.eos_token_id == 3
    ids, _, _ = padded_batch()
    assert max_diff(hf(ids).logits, ours(ids)[0][..., :VOCAB]) <= 1e-4
    # a model with Mamba layers is no Llama: one clear error
    mixed = HybridLanguageModel(HybridConfig(d_model=32, n_layer=2, vocab_size=VOCAB, pattern="MT", n_heads=4))
    with pytest.raises(ValueError, match="only a transformer .pattern of T layers"):
        save_llama(mixed, tmp_path / "no")
    # unmerged LoRA adapters have no place in a Llama checkpoint: said, nothing written
    lora.apply_lora(ours, lora.LoRAConfig(targets=["q_proj"], rank=2, alpha=4.0, dropout=0.0, rslora=False,
                                          base_model="x"))
    with pytest.raises(ValueError, match="merge LoRA adapters first"):
        save_llama(ours, tmp_path / "lora")
    assert not (tmp_path / "lora").exists() and not (tmp_path / "no").exists()


def test_dtype_sharding_and_the_reference_rope(tmp_path):
    """config.json's dtype is honoured when none is asked for; a sharded folder loads; our Llama 3 frequencies are
    transformers'."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = make_llama(tmp_path, "mha-tied-llama3")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="40KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    model = load_pretrained(tmp_path / "bf16")
    assert model.backbone.embeddings.weight.dtype == torch.bfloat16
    assert load_pretrained(tmp_path / "bf16", dtype=torch.float32).backbone.embeddings.weight.dtype == torch.float32
    want, scale = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    got = rope_frequencies(16, 10000.0, model.config.rope_scaling)
    assert scale == 1.0 and torch.equal(got, want)                  # bit for bit: long contexts agree too
    plain_hf = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 500000.0})
    assert torch.equal(LlamaRotaryEmbedding(plain_hf).inv_freq, rope_frequencies(32, 500000.0))
    plain = rope_frequencies(16, 10000.0)
    assert got[0] == plain[0] and got[-1] == plain[-1] / 8          # the high band kept, the low one scaled
    assert plain[1] / 8 < got[1] < plain[1]                          # and one between, blended


@torch.no_grad()
def test_our_own_format_keeps_the_rope_scaling(pair, tmp_path):
    """A loaded Llama saved by save_pretrained (our format: what training checkpoints are) reads back with its RoPE
    settings, to the same logits; an unscaled one writes no rope_scaling key (files the older code reads)."""
    _, ours, _ = pair
    ours.save_pretrained(tmp_path)
    again = load_pretrained(tmp_path)
    assert again.config == ours.config
    ids, _, _ = padded_batch(length=40)
    assert torch.equal(again(ids)[0], ours(ids)[0])
    written = json.loads((tmp_path / "config.json").read_text())["config"]
    assert written.get("rope_scaling") == ours.config.rope_scaling


BASE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 96, "vocab_size": 50}


@pytest.mark.parametrize("extra, message", [
    ({"attention_bias": True}, "attention_bias true is not supported"),
    ({"mlp_bias": True}, "mlp_bias true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"sliding_window": 4096}, "sliding_window 4096 is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "RoPE scaling 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope_scaling\['low_freq_factor'\] must be"),
    ({"num_key_value_heads": 3}, "n_kv_heads 3 must divide n_heads 4"),
])
def test_unsupported_settings_are_one_clear_line(extra, message):
    with pytest.raises(ValueError, match=message) as err:
        config_from_llama({**BASE, **extra}, "x/config.json")
    assert str(err.value).startswith("x/config.json: ") and "\n" not in str(err.value)


def test_legacy_4x_config_keys_load():
    """transformers 4.x wrote rope_theta and rope_scaling at the top level (and torch_dtype)."""
    c = config_from_llama({**BASE, "rope_theta": 500000.0, "rope_scaling": {**LLAMA3, "rope_type": "llama3"},
                           "tie_word_embeddings": True}, "config.json")
    assert c.rope_theta == 500000.0 and c.rope_scaling == LLAMA3 and c.tie_embeddings and c.kv_heads == 4


def test_train_sft_lora_then_chat_and_export(tmp_path, capsys, monkeypatch):
    """The issue's command end to end on a tiny Llama folder: SFT (full weights), then generate.py --chat on the
    run; LoRA on the attention and MLP projections; the fine-tuned model exports back to Llama."""
    import generate
    from tests.test_finetune import CHATS, TEXT, chat_file, sft_args
    from training import checkpoint as ck
    from training.export_llama import main as export_main
    from training.launch import main
    from transformers import AutoTokenizer
    from utils.chat import encode_chat
    from utils.tokenizer import Tokenizer
    tok = Tokenizer.train([TEXT], vocab_size=300)
    base = tmp_path / "llama"
    make_llama(base, vocab_size=tok.vocab_size)
    tok.save(base)
    data = chat_file(tmp_path)
    llama_args = ("--family", "hybrid", "--pattern", "transformer", "--max_steps", "2")
    assert main(sft_args(base, data, tmp_path / "sft", *llama_args)) == 0
    out = capsys.readouterr().out
    assert "hybrid from" in out and "pattern TT" in out and "vocabulary grown" in out

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert generate.main(["--checkpoint", str(tmp_path / "sft"), "--chat", "--max_new_tokens", "4", "--seed", "0",
                          "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1

    assert main(sft_args(base, data, tmp_path / "lora", *llama_args,
                         "--lora", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")) == 0
    assert "on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj:" in capsys.readouterr().out
    # python -m training.export_llama: the run (base + adapter, merged) as a Llama folder transformers opens
    assert export_main([str(tmp_path / "lora"), str(tmp_path / "export")]) == 0
    tuned, tok2, _ = ck.load_model_and_tokenizer(tmp_path / "lora")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "export").encode("hello") == tok2.encode("hello")
    x = torch.tensor([encode_chat(tok2, CHATS[0], add_generation_prompt=True)[0]])
    with torch.no_grad():
        assert max_diff(hf(x).logits, tuned.eval()(x)[0]) <= 1e-4
    assert export_main([str(tmp_path / "absent"), str(tmp_path / "x")]) == 2

    # a setting our model cannot compute: one line, exit 2
    bad = tmp_path / "bad"
    make_llama(bad, vocab_size=tok.vocab_size, attention_bias=True)
    tok.save(bad)
    capsys.readouterr()
    assert main(sft_args(bad, data, tmp_path / "no", *llama_args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "attention_bias true is not supported" in err and err.count("\n") == 1
