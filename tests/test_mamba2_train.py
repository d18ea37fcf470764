"""`python train.py --family mamba2` end to end on the CPU (tiny preset): it trains, resumes exactly, writes a
checkpoint transformers opens, generate.py samples from it, and a family or shape mismatch is one line, exit 2."""
import json

import pytest
import torch
from safetensors.torch import load_file

from models import LanguageModel, load_pretrained
from training import checkpoint as ck
from training.config import ConfigError, resolve_config
from training.launch import main

WORDS = ("the state space dual form turns the scan into matmuls within each chunk and a short recurrence "
         "across chunks so the same model trains fast and decodes one token at a time ").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("train2")
    (root / "docs").mkdir()
    for i in range(6):
        words = [WORDS[(i * 5 + j * j) % len(WORDS)] for j in range(1500)]
        (root / "docs" / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    return root


def args(corpus, out, *extra):
    return ["--family", "mamba2", "--data_dir", str(corpus / "docs"), "--cache_dir", str(corpus / "cache"),
            "--out_dir", str(out), "--model_size", "tiny", "--vram", "cpu", "--vocab_size", "300", "--seq_len", "32",
            "--micro_batch_size", "4", "--grad_accum_steps", "1", "--warmup_steps", "2", "--eval_interval", "3",
            "--eval_batches", "2", "--checkpoint_interval", "3", "--log_interval", "1", "--no-progress",
            "--val_fraction", "0.1", *extra]


def test_train_resume_generate_and_mismatches(corpus, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args(corpus, straight, "--max_steps", "6")) == 0
    out = capsys.readouterr().out
    assert "model        mamba2 tiny" in out
    assert main(args(corpus, split, "--max_steps", "6", "--stop_at_step", "3")) == 0
    assert main(["--resume", str(split / "step_000003"), "--no-progress"]) == 0
    a, b = load_file(str(straight / "step_000006" / "model.safetensors")), \
        load_file(str(split / "step_000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "backbone.layers.0.mixer.dt_bias" in a
    losses = [r["loss"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]
    assert ck.load_train_config(straight / "step_000006")["family"] == "mamba2"

    model = load_pretrained(straight / "step_000006")
    assert isinstance(model, LanguageModel) and model.config.family == "mamba2" and model.config.chunk_size == 64
    from transformers import Mamba2ForCausalLM
    hf = Mamba2ForCausalLM.from_pretrained(straight / "step_000006").eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-4

    import generate
    capsys.readouterr()
    assert generate.main(["--checkpoint", str(straight), "--prompt", "the state", "--temperature", "0",
                          "--max_new_tokens", "6", "--device", "cpu", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("the state")

    # a Mamba-1 run from a Mamba-2 checkpoint, and a Mamba-2 run of another size: one line each, exit 2
    capsys.readouterr()
    assert main(args(corpus, tmp_path / "m1", "--family", "mamba1", "--init_from", str(straight))) == 2
    err = capsys.readouterr().err
    assert "is a mamba2 model, but this run asks for family 'mamba1'; pass --family mamba2" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["--resume", str(split / "step_000006"), "--model_size", "small", "--no-progress"]) == 2
    assert "another shape: d_model 64 (this run: 512)" in capsys.readouterr().err


def test_family_setting_is_checked():
    assert resolve_config({"family": "mamba2", "vram": "16gb", "model_size": "medium"}).micro_batch_size == 8
    assert resolve_config({}).family == "mamba1"
    with pytest.raises(ConfigError, match="family 'mamba3' is not allowed; choose one of: mamba1, mamba2"):
        resolve_config({"family": "mamba3"})
    with pytest.raises(ConfigError, match="no 8gb layout for model_size 'large' of family mamba2"):
        resolve_config({"family": "mamba2", "vram": "8gb", "model_size": "large"})
