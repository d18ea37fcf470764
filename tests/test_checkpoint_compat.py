"""Checkpoints written before models/ became one LanguageModel still load, and compute what they computed.

tests/fixtures/checkpoints/ holds one tiny random model per family and format, written by main at fcaf2be with
tests/fixtures/make_old_checkpoints.py: Mamba-1 in the HF Mamba format, Mamba-2 in the HF Mamba2 format (untied
head), a hybrid "M2ATF" and a transformer "TT" (untied) in the project's own format, and a PEFT LoRA adapter on
the Mamba-1 model; expected_logits.safetensors holds each one's logits on fixed, left-padded tokens.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import LanguageModel, load_pretrained, lora

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
TOKENS = torch.arange(2 * 9).reshape(2, 9) * 7 % 37
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
EXPECTED = load_file(str(FIXTURES / "expected_logits.safetensors"))


def logits(model):
    with torch.no_grad():
        return model(TOKENS, attention_mask=MASK)[0].float()


@pytest.mark.parametrize("name, family, pattern", [("mamba1_hf", "mamba1", "MM"), ("mamba2_hf", "mamba2", "22"),
                                                   ("hybrid_native", "hybrid", "M2ATF"),
                                                   ("transformer_native", "hybrid", "TT")])
def test_old_checkpoints_load_and_give_their_logits(name, family, pattern):
    model = load_pretrained(FIXTURES / name)
    assert isinstance(model, LanguageModel) and model.config.family == family and model.spec.pattern == pattern
    torch.testing.assert_close(logits(model), EXPECTED[name], rtol=1e-5, atol=1e-5)
    same = LanguageModel.from_pretrained(FIXTURES / name, family=family)
    torch.testing.assert_close(logits(same), EXPECTED[name], rtol=1e-5, atol=1e-5)


def test_old_lora_adapter_loads_onto_its_base():
    model = load_pretrained(FIXTURES / "mamba1_hf")
    config = lora.load_adapter(model, FIXTURES / "lora")
    assert config.rank == 2 and sorted(config.targets) == ["in_proj", "out_proj"]
    torch.testing.assert_close(logits(model), EXPECTED["lora"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(EXPECTED["lora"], EXPECTED["mamba1_hf"])      # the adapter does change the output


@pytest.mark.parametrize("name", ["mamba1_hf", "mamba2_hf", "hybrid_native"])
def test_a_resave_writes_the_same_files(tmp_path, name):
    """Saving a loaded old checkpoint writes what the old code wrote: the same config.json, the same tensors."""
    model = load_pretrained(FIXTURES / name)
    model.save_pretrained(tmp_path, eos_token_id=3)
    assert (tmp_path / "config.json").read_text() == (FIXTURES / name / "config.json").read_text()
    old, new = load_file(str(FIXTURES / name / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert sorted(old) == sorted(new) and all(torch.equal(old[k], new[k]) for k in old)
