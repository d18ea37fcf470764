"""`python train.py --family hybrid --pattern ...` end to end on the CPU: a tiny hybrid trains, resumes exactly,
saves the native format, generate.py samples from it, and a bad pattern or a family mismatch is one line, exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import LanguageModel, load_pretrained
from training.config import ConfigError, resolve_config
from training.launch import main

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("attention looks back at every token while the state space layer carries a fixed state forward so a "
         "hybrid of both keeps most of the speed and gains exact recall of what it has seen ").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainh")
    (root / "docs").mkdir()
    for i in range(6):
        words = [WORDS[(i * 5 + j * j) % len(WORDS)] for j in range(1500)]
        (root / "docs" / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    return root


def args(corpus, out, *extra):
    return ["--family", "hybrid", "--data_dir", str(corpus / "docs"), "--cache_dir", str(corpus / "cache"),
            "--out_dir", str(out), "--model_size", "tiny", "--vram", "cpu", "--vocab_size", "300", "--seq_len", "32",
            "--micro_batch_size", "4", "--grad_accum_steps", "2", "--warmup_steps", "2", "--eval_interval", "3",
            "--eval_batches", "2", "--checkpoint_interval", "3", "--log_interval", "1", "--no-progress",
            "--val_fraction", "0.1", *extra]


def test_train_resume_generate_and_errors(corpus, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run = subprocess.run([sys.executable, "train.py", *args(corpus, straight, "--pattern", "MA2T", "--max_steps",
                                                            "6")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "model        hybrid tiny" in run.stdout and "pattern MA2T" in run.stdout
    assert main(args(corpus, split, "--pattern", "MA2T", "--max_steps", "6", "--stop_at_step", "3")) == 0
    assert main(["--resume", str(split / "step_000003"), "--no-progress"]) == 0
    a, b = load_file(str(straight / "step_000006" / "model.safetensors")), \
        load_file(str(split / "step_000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "backbone.layers.1.mixer.k_proj.weight" in a and "backbone.layers.3.mlp.down_proj.weight" in a
    losses = [r["loss"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]
    header = json.loads((straight / "step_000006" / "config.json").read_text())
    assert header["format"] == "mamba-trainer" and header["pattern"] == "MA2T"
    loaded = load_pretrained(straight / "step_000006")
    assert isinstance(loaded, LanguageModel) and loaded.config.family == "hybrid"

    run = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(straight), "--prompt", "attention",
                          "--temperature", "0", "--max_new_tokens", "6", "--device", "cpu", "--no-stream"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("attention")

    # a bad pattern, and a Mamba-1 run from a hybrid checkpoint: one line each, exit 2
    capsys.readouterr()
    assert main(args(corpus, tmp_path / "bad", "--pattern", "MMXA")) == 2
    err = capsys.readouterr().err
    assert "pattern 'MMXA' is neither a preset (mamba, mamba2, transformer, alternating, hybrid, hybrid2)" in err
    assert "M (Mamba-1), 2 (Mamba-2), A (attention), F (SwiGLU MLP), T (attention + SwiGLU MLP)" in err
    assert len(err.strip().splitlines()) == 1
    assert main(args(corpus, tmp_path / "m1", "--family", "mamba1", "--init_from", str(straight))) == 2
    err = capsys.readouterr().err
    assert "is a hybrid model, but this run asks for family 'mamba1'; pass --family hybrid" in err
    assert main(["--resume", str(split / "step_000006"), "--pattern", "MMMM", "--no-progress"]) == 2
    assert "another shape: pattern MA2T (this run: MMMM)" in capsys.readouterr().err


def test_pattern_setting_is_checked():
    assert resolve_config({"family": "hybrid", "pattern": "transformer", "vram": "16gb",
                           "model_size": "medium"}).micro_batch_size == 16
    with pytest.raises(ConfigError, match="pattern 'MA' is for --family hybrid only"):
        resolve_config({"pattern": "MA"})


def test_memory_estimate_knows_attention_and_sequence_length():
    from configs.hybrid import hybrid_config
    from training.memory import estimate_for
    mamba = hybrid_config("medium", 16384, "mamba")
    gpt = hybrid_config("medium", 16384, "transformer")
    est = lambda cfg, seq, prec: estimate_for(cfg, 10**8, 8, seq, False, prec, "triton").activations / (8 * seq)
    assert est(gpt, 2048, "bf16") == est(gpt, 8192, "bf16")          # flash: O(l) per sequence
    assert est(gpt, 8192, "fp32") > 2 * est(gpt, 2048, "fp32")       # the math kernel's (l, l) scores
    assert est(mamba, 2048, "bf16") == est(mamba, 8192, "bf16")


def test_compare_quality_script_smoke(tmp_path):
    """bench/compare_quality.py end to end at toy sizes: corpus, tokenizer, plan, every arm, report and plot."""
    sys.path.insert(0, str(ROOT / "bench"))
    import compare_quality as cq
    rows = cq.check_counts(16384, log=lambda *a: None)          # the real arms: within 5% (it raises otherwise)
    assert len(rows) == 6
    assert cq.main(["all", "--smoke", "--out", str(tmp_path), "--steps", "2", "--evals", "1", "--corpus_mb",
                    "0.3"]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert set(summary["arms"]) == set(cq.ARMS) and (tmp_path / "val_loss.png").is_file()
    assert summary["corpus"]["files_used"] > 0 and summary["plan"]["steps"] == 2
    assert all(r["final_val_loss"] > 0 and r["tokens"] == 2 * 4 * 64 for r in summary["arms"].values())
