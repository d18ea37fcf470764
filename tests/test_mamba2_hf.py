"""Mamba-2 checkpoints: HF transformers' Mamba2ForCausalLM <-> ours (logits both ways, greedy tokens), the original
mamba_ssm format, and the one-line errors for shapes and families that cannot load."""
import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
from transformers import Mamba2Config as HFMamba2Config, Mamba2ForCausalLM  # noqa: E402

from models import LanguageModel, Mamba2Config, build_model, load_pretrained  # noqa: E402
from tests.helpers import randomize_parameters  # noqa: E402

# hidden_size * expand == num_heads * head_dim; ngroups 1 and 2; chunk sizes that do not divide the lengths
HF_SHAPES = [
    dict(vocab_size=48, hidden_size=16, num_hidden_layers=2, state_size=8, expand=2, head_dim=8, num_heads=4,
         n_groups=1, conv_kernel=4, chunk_size=4, tie_word_embeddings=True),
    dict(vocab_size=40, hidden_size=24, num_hidden_layers=2, state_size=4, expand=2, head_dim=12, num_heads=4,
         n_groups=2, conv_kernel=3, chunk_size=8, use_bias=True, use_conv_bias=False, tie_word_embeddings=False,
         time_step_limit=(0.01, 0.5), layer_norm_epsilon=1e-3),
]


def random_hf_model(seed=0, **shape):
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(HFMamba2Config(**shape, eos_token_id=None, bos_token_id=None, pad_token_id=None))
    randomize_parameters(model, scale=0.2)
    with torch.no_grad():
        for layer in model.backbone.layers:       # dt near the trained range, so the decays matter
            layer.mixer.dt_bias.copy_(torch.randn_like(layer.mixer.dt_bias) - 2)
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


def our_logits(model, x):
    with torch.no_grad():
        return model(x)[0]


@pytest.mark.parametrize("shape", HF_SHAPES, ids=["groups1-tied", "groups2-untied-bias-limit"])
def test_hf_mamba2_loads_and_saves_back(tmp_path, shape):
    hf = random_hf_model(**shape)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert isinstance(ours, LanguageModel) and ours.config.family == "mamba2"
    assert ours.config.ngroups == shape["n_groups"]
    assert (ours.lm_head.weight is ours.backbone.embeddings.weight) == shape["tie_word_embeddings"]
    x = torch.randint(0, shape["vocab_size"], (2, 11))
    expected = hf_logits(hf, x)
    assert rel_err(our_logits(ours, x), expected) <= 1e-4
    assert rel_err(our_logits(LanguageModel.from_pretrained(tmp_path / "hf", scan_backend="ref", family="mamba2"), x),
                   expected) <= 1e-4

    ours.save_pretrained(tmp_path / "ours")
    assert ("lm_head.weight" in load_file(str(tmp_path / "ours" / "model.safetensors"))) \
        == (not shape["tie_word_embeddings"])
    back = Mamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert rel_err(hf_logits(back, x), expected) <= 1e-4
    for name, p in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def test_ours_to_hf_same_logits_and_greedy_tokens(tmp_path):
    torch.manual_seed(3)
    ours = build_model(Mamba2Config(d_model=32, n_layer=2, vocab_size=45, d_state=8, headdim=16, ngroups=2,
                                    chunk_size=4))
    randomize_parameters(ours, scale=0.2)
    ours.save_pretrained(tmp_path, eos_token_id=3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_heads"], cfg["head_dim"], cfg["n_groups"]) == ("mamba2", 4, 16, 2)
    assert (cfg["vocab_size"], cfg["unpadded_vocab_size"]) == (48, 45)
    hf = Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 45, (3, 9))
    assert rel_err(our_logits(ours, x), hf_logits(hf, x)) <= 1e-4
    # ours never picks the padding rows 45..47 of the embedding; tell transformers the same
    expected = hf.generate(x, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(x), suppress_tokens=[45, 46, 47])
    assert torch.equal(ours.generate(x, 8, temperature=0), expected)
    again = load_pretrained(tmp_path)
    assert again.config == ours.config
    for name, p in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name


def test_mamba_ssm_mamba2_checkpoint_loads(tmp_path):
    hf = random_hf_model(**HF_SHAPES[0])
    path = tmp_path / "ssm"
    path.mkdir()
    state_dict = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
                  for k, v in hf.state_dict().items()}
    torch.save(state_dict, path / "pytorch_model.bin")
    config = {"d_model": 16, "d_intermediate": 0, "n_layer": 2, "vocab_size": 45,
              "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 1, "chunk_size": 4},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    (path / "config.json").write_text(json.dumps(config))
    ours = load_pretrained(path)
    assert (ours.config.vocab_size, ours.config.padded_vocab_size, ours.config.nheads) == (45, 48, 4)
    x = torch.randint(0, 45, (2, 9))
    assert rel_err(our_logits(ours, x), hf_logits(hf, x)) <= 1e-4
    with pytest.raises(ValueError, match="ssm_cfg.layer is 'Mamba2': a mamba2 checkpoint.*family 'mamba1'"):
        LanguageModel.from_pretrained(path, family="mamba1")
    (path / "config.json").write_text(json.dumps({**config, "ssm_cfg": {"layer": "Mamba2", "headdim": 7}}))
    with pytest.raises(ValueError, match="headdim 7 does not divide d_inner = expand \\* d_model = 32"):
        load_pretrained(path)


def test_shapes_and_families_that_cannot_load(tmp_path):
    hf = random_hf_model(**HF_SHAPES[0])
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type 'mamba2': a mamba2 checkpoint, but family 'mamba1'"):
        LanguageModel.from_pretrained(tmp_path / "hf", family="mamba1")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**config, "num_heads": 3}))
    with pytest.raises(ValueError, match=r"hidden_size \* expand \(16 \* 2 = 32\) must equal num_heads \* head_dim"):
        load_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**config, "n_groups": 3}))
    with pytest.raises(ValueError, match="ngroups 3 does not divide the number of heads nheads .* = 4"):
        load_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**config, "state_size": 4}))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pretrained(bad)
    LanguageModel(__import__("models").MambaConfig(d_model=8, n_layer=1, vocab_size=9)).save_pretrained(
        tmp_path / "m1")
    with pytest.raises(ValueError, match="a mamba1 checkpoint, but family 'mamba2'"):
        LanguageModel.from_pretrained(tmp_path / "m1", family="mamba2")
