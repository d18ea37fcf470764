"""LoRA adapters: a fresh or disabled adapter is the base model, only adapters train, merge == unmerged, every path
(parallel forward, masked forward, one-token step) goes through them, and PEFT opens what we save."""
import json

import pytest
import torch

from models import MambaConfig, LanguageModel
from models import lora
from tests.helpers import randomize_parameters

ALL = ["in_proj", "out_proj", "dt_proj", "x_proj"]


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=50, scan_backend="chunked", **kw)
    return randomize_parameters(LanguageModel(cfg))


@torch.no_grad()
def randomize_adapters(model, scale=0.05):
    for m in lora.lora_modules(model).values():
        m.lora_B.weight.normal_(0, scale)
    return model


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw)[0]


def test_fresh_and_disabled_adapters_give_the_base_logits():
    model = tiny()
    x = torch.randint(0, 50, (2, 13))
    base = logits(model, x)
    wrapped = lora.apply_lora(model, lora.LoRAConfig(targets=ALL, rank=4, alpha=8, dropout=0.1))
    assert len(wrapped) == 8 and all(isinstance(m, lora.LoRALinear) for m in lora.lora_modules(model).values())
    model.eval()
    assert torch.equal(logits(model, x), base)                    # B = 0: nothing changes
    randomize_adapters(model)
    assert not torch.allclose(logits(model, x), base, atol=1e-4)
    with lora.adapters_disabled(model):
        assert torch.equal(logits(model, x), base)
    assert not torch.allclose(logits(model, x), base, atol=1e-4)  # restored on exit


def test_only_adapter_parameters_train():
    model = tiny()
    lora.apply_lora(model, lora.LoRAConfig(targets=["in_proj", "dt_proj"], rank=2))
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.layers.{i}.mixer.{m}.lora_{ab}.weight"
                         for i in range(2) for m in ("in_proj", "dt_proj") for ab in "AB"}
    x = torch.randint(0, 50, (2, 9))
    _, loss = model(x, targets=x)
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == trainable
    # B is zero, so A's gradient is zero at the start; B's is not
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B.weight"))
    # the base keeps its names (a LoRA'd state_dict is the base's plus lora_A/lora_B)
    assert "backbone.layers.0.mixer.in_proj.weight" in model.state_dict()


def test_merge_equals_unmerged_and_saves_as_a_plain_checkpoint(tmp_path):
    model = tiny()
    lora.apply_lora(model, lora.LoRAConfig(targets=ALL, rank=4, alpha=4, rslora=True))
    randomize_adapters(model)
    x = torch.randint(0, 50, (2, 11))
    want = logits(model, x)
    lora.merge(model)
    assert torch.allclose(logits(model, x), want, atol=1e-5)
    lora.unmerge(model)
    assert torch.allclose(logits(model, x), want, atol=1e-5)
    lora.merge_and_unload(model)
    assert not lora.lora_modules(model)
    model.save_pretrained(tmp_path / "merged")
    back = LanguageModel.from_pretrained(tmp_path / "merged", family="mamba1")
    assert torch.allclose(logits(back, x), want, atol=1e-5)


def test_adapters_act_on_the_decoding_step_and_the_masked_forward():
    model = tiny()
    lora.apply_lora(model, lora.LoRAConfig(targets=ALL, rank=4))
    randomize_adapters(model, 0.1)
    x = torch.randint(0, 50, (2, 10))
    full = logits(model, x)
    cache = model.init_cache(2)
    with torch.no_grad():
        first = model.prefill(x[:, :4], cache)
        steps = [first] + [model.step(x[:, t], cache) for t in range(4, 10)]
    assert torch.allclose(torch.stack(steps[:-1], 1), full[:, 3:9], atol=1e-4)
    assert torch.allclose(steps[-1], full[:, 9], atol=1e-4)
    # left padding + mask: the padded row equals the row alone (the adapter on dt_proj included)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[:1]], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 10)], 1).long()
    assert torch.allclose(logits(model, padded, attention_mask=mask)[:, 3:], full[:1], atol=1e-4)


def test_save_and_load_adapter_round_trip(tmp_path):
    model = tiny()
    cfg = lora.LoRAConfig(targets=["in_proj", "x_proj"], rank=3, alpha=6, base_model="some/base")
    lora.apply_lora(model, cfg)
    randomize_adapters(model)
    lora.save_adapter(model, cfg, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["r"] == 3 and saved["target_modules"] == ["in_proj", "x_proj"] and saved["peft_type"] == "LORA"
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight" in keys
    x = torch.randint(0, 50, (1, 7))
    fresh = tiny()
    got = lora.load_adapter(fresh, tmp_path / "a")
    assert got.rank == 3 and got.base_model == "some/base"
    assert torch.equal(logits(fresh, x), logits(model, x))


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="not linear"):
        lora.apply_lora(tiny(), lora.LoRAConfig(targets=["conv1d"]))
    with pytest.raises(ValueError, match="match no module.*in_proj"):
        lora.apply_lora(tiny(), lora.LoRAConfig(targets=["q_proj"]))
    model = tiny()
    assert len(lora.apply_lora(model, lora.LoRAConfig(targets=["in_proj", "q_proj"]), strict=False)) == 2


def test_peft_opens_our_adapter_on_transformers_mamba(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import MambaConfig as HFMambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    hf = randomize_parameters(MambaForCausalLM(HFMambaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2,
                                                             state_size=8, eos_token_id=None, bos_token_id=None,
                                                             pad_token_id=None)))
    hf.save_pretrained(tmp_path / "base")
    ours = LanguageModel.from_pretrained(tmp_path / "base", family="mamba1")
    # dt_proj left out: transformers' MambaMixer multiplies dt_proj.weight directly, so PEFT's adapter on it would be
    # silently skipped there (configs/lora.py, NOT_HONOURED_BY_TRANSFORMERS); our model applies it
    cfg = lora.LoRAConfig(targets=["in_proj", "x_proj"], rank=4, alpha=8,
                          base_model=str(tmp_path / "base"))
    lora.apply_lora(ours, cfg)
    randomize_adapters(ours, 0.1)
    lora.save_adapter(ours, cfg, tmp_path / "adapter")
    x = torch.randint(0, 48, (2, 9))
    want = logits(ours, x)
    with torch.no_grad():
        base_hf = hf(x).logits
    tuned = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = tuned(x).logits
    assert not torch.allclose(got, base_hf, atol=1e-3)          # the adapter is really applied
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
