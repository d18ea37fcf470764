"""Checkpoint compatibility: HF transformers' MambaForCausalLM <-> ours, the original mamba_ssm format, strict
loading errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import MambaConfig as HFMambaConfig, MambaForCausalLM  # noqa: E402

from models import LanguageModel, MambaConfig  # noqa: E402
from tests.helpers import randomize_parameters

# odd widths, d_state 1, conv width 2, no conv bias, bias=True, an explicit dt rank, an untied head
HF_SHAPES = [
    dict(vocab_size=37, hidden_size=20, num_hidden_layers=2, state_size=3, conv_kernel=2, use_conv_bias=False,
         use_bias=True, expand=2, time_step_rank=3),
    dict(vocab_size=61, hidden_size=17, num_hidden_layers=3, state_size=1, conv_kernel=4, expand=3),
    dict(vocab_size=40, hidden_size=32, num_hidden_layers=1, state_size=16, conv_kernel=3, expand=1,
         tie_word_embeddings=False, residual_in_fp32=False, layer_norm_epsilon=1e-3),
]


def random_hf_model(seed=0, **shape):
    torch.manual_seed(seed)
    model = MambaForCausalLM(HFMambaConfig(**shape, eos_token_id=None, bos_token_id=None, pad_token_id=None))
    return randomize_parameters(model, scale=0.2)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def our_logits(model, x):
    with torch.no_grad():
        return model(x)[0]


@pytest.mark.parametrize("shape", HF_SHAPES, ids=["bias-conv2-d3", "d_state1-odd", "untied-no-fp32-residual"])
def test_hf_checkpoint_loads_and_saves_back(tmp_path, shape):
    hf = random_hf_model(**shape)
    hf.save_pretrained(tmp_path / "hf")
    ours = LanguageModel.from_pretrained(tmp_path / "hf", family="mamba1")
    assert not ours.training and ours.config.padded_vocab_size == shape["vocab_size"]
    assert (ours.lm_head.weight is ours.backbone.embeddings.weight) == shape.get("tie_word_embeddings", True)
    x = torch.randint(0, shape["vocab_size"], (2, 11))
    expected = hf_logits(hf, x)
    assert rel_err(our_logits(ours, x), expected) <= 1e-5

    ours.save_pretrained(tmp_path / "ours")
    tensors = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert ("lm_head.weight" in tensors) == (not shape.get("tie_word_embeddings", True))
    back = MambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert rel_err(hf_logits(back, x), expected) <= 1e-5
    for name, p in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def test_greedy_generate_equals_transformers(tmp_path):
    hf = random_hf_model(seed=1, **HF_SHAPES[0])
    hf.save_pretrained(tmp_path)
    ours = LanguageModel.from_pretrained(tmp_path, family="mamba1")
    prompt = torch.randint(0, 37, (3, 5))
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours.generate(prompt, 12, temperature=0), expected)


def test_our_checkpoint_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(MambaConfig(d_model=16, n_layer=2, vocab_size=37, d_state=4, bias=True))
    model.save_pretrained(tmp_path, eos_token_id=3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "mamba" and cfg["architectures"] == ["MambaForCausalLM"]
    assert (cfg["vocab_size"], cfg["unpadded_vocab_size"], cfg["eos_token_id"]) == (40, 37, 3)
    assert (cfg["hidden_size"], cfg["state_size"], cfg["num_hidden_layers"], cfg["time_step_rank"]) == (16, 4, 2, 1)
    loaded = LanguageModel.from_pretrained(tmp_path, dtype="bfloat16", scan_backend="ref", family="mamba1")
    assert loaded.config == MambaConfig(d_model=16, n_layer=2, vocab_size=37, d_state=4, bias=True, dt_rank=1,
                                        scan_backend="ref")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p.to(torch.bfloat16)), name
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    assert loaded.num_parameters() == model.num_parameters()
    with pytest.raises(ValueError, match="dtype"):
        LanguageModel.from_pretrained(tmp_path, dtype="int8", family="mamba1")


def mamba_ssm_dir(path, hf, unpadded_vocab, **ssm_cfg):
    """An original mamba_ssm checkpoint (state-spaces/mamba-130m layout) holding hf's weights."""
    path.mkdir()
    state_dict = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
                  for k, v in hf.state_dict().items()}
    state_dict["lm_head.weight"] = state_dict["backbone.embedding.weight"]   # mamba_ssm saves the tied copy too
    torch.save(state_dict, path / "pytorch_model.bin")
    config = {"d_model": hf.config.hidden_size, "n_layer": hf.config.num_hidden_layers,
              "vocab_size": unpadded_vocab, "ssm_cfg": ssm_cfg, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_mamba_ssm_checkpoint_loads(tmp_path):
    hf = random_hf_model(vocab_size=56, hidden_size=24, num_hidden_layers=2, state_size=4, conv_kernel=3)
    path = mamba_ssm_dir(tmp_path / "ssm", hf, 50, d_state=4, d_conv=3, dt_init="random", layer="Mamba1")
    ours = LanguageModel.from_pretrained(path, family="mamba1")
    assert (ours.config.vocab_size, ours.config.padded_vocab_size, ours.config.d_conv) == (50, 56, 3)
    x = torch.randint(0, 50, (2, 9))
    assert rel_err(our_logits(ours, x), hf_logits(hf, x)) <= 1e-5

    for i, (bad_cfg, message) in enumerate(((dict(layer="Mamba2"), "Mamba1"), (dict(ngroups=2), "ngroups"))):
        bad = mamba_ssm_dir(tmp_path / f"bad{i}", hf, 50, **bad_cfg)
        with pytest.raises(ValueError, match=message):
            LanguageModel.from_pretrained(bad, family="mamba1")


def test_hf_pytorch_model_bin_and_sharded_safetensors_load(tmp_path):
    hf = random_hf_model(**HF_SHAPES[1])
    hf.save_pretrained(tmp_path / "ref")
    config = (tmp_path / "ref" / "config.json").read_text()
    state_dict = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    x = torch.randint(0, 61, (2, 7))
    expected = hf_logits(hf, x)

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(config)
    torch.save(state_dict, tmp_path / "bin" / "pytorch_model.bin")
    assert rel_err(our_logits(LanguageModel.from_pretrained(tmp_path / "bin", family="mamba1"), x), expected) <= 1e-5

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(config)
    names = sorted(state_dict)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state_dict[k].contiguous() for k in keys}, str(sharded / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert rel_err(our_logits(LanguageModel.from_pretrained(sharded, family="mamba1"), x), expected) <= 1e-5

    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        LanguageModel.from_pretrained(sharded, family="mamba1")


def test_strict_loading_errors(tmp_path):
    hf = random_hf_model(**HF_SHAPES[0])
    good = tmp_path / "good"
    hf.save_pretrained(good)
    config = json.loads((good / "config.json").read_text())
    tensors = load_file(str(good / "model.safetensors"))

    def variant(name, cfg=None, weights=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config if cfg is None else cfg))
        if weights is not None:
            save_file(weights, str(d / "model.safetensors"))
        return d

    with pytest.raises(FileNotFoundError, match="does not exist"):
        LanguageModel.from_pretrained(tmp_path / "nowhere", family="mamba1")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LanguageModel.from_pretrained(tmp_path, family="mamba1")
    with pytest.raises(FileNotFoundError, match="no weights"):
        LanguageModel.from_pretrained(variant("noweights"), family="mamba1")
    dropped = {k: v for k, v in tensors.items() if k != "backbone.layers.1.mixer.D"}
    with pytest.raises(ValueError, match=r"missing tensors backbone\.layers\.1\.mixer\.D"):
        LanguageModel.from_pretrained(variant("missing", weights=dropped), family="mamba1")
    extra = {**tensors, "backbone.layers.2.mixer.D": torch.ones(40)}
    with pytest.raises(ValueError, match=r"unexpected tensors backbone\.layers\.2\.mixer\.D"):
        LanguageModel.from_pretrained(variant("extra", weights=extra), family="mamba1")
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.A_log: checkpoint \(40, 3\) vs config \(40, 5\)"):
        LanguageModel.from_pretrained(variant("shape", cfg={**config, "state_size": 5}, weights=tensors),
                                      family="mamba1")
    untied_head = {**tensors, "lm_head.weight": torch.randn(37, 20)}
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        LanguageModel.from_pretrained(variant("head", weights=untied_head), family="mamba1")
    with pytest.raises(ValueError, match="model_type 'mamba2'"):
        LanguageModel.from_pretrained(variant("mamba2", cfg={**config, "model_type": "mamba2"}, weights=tensors),
                                      family="mamba1")
    with pytest.raises(ValueError, match="neither"):
        LanguageModel.from_pretrained(variant("other", cfg={"foo": 1}, weights=tensors), family="mamba1")
    with pytest.raises(ValueError, match="scan_backend"):
        LanguageModel.from_pretrained(good, scan_backend="fast", family="mamba1")
