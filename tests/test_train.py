"""train.py end to end on the CPU with the tiny model: exact resume, crashes, non-finite steps, OOM fallback,
bad input, and checkpoints that our loader and transformers both open."""
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoint as ck
from training.launch import main, setup
from training.trainer import TrainingStopped

from helpers import WORDS, write_word_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small folder of documents and a shared cache of its prepared shards."""
    root = tmp_path_factory.mktemp("train")
    write_word_corpus(root)
    return root


def args(corpus, out, *extra):
    """Flags of a tiny CPU run on the fixture corpus."""
    return ["--data_dir", str(corpus / "docs"), "--cache_dir", str(corpus / "cache"), "--out_dir", str(out),
            "--model_size", "tiny", "--vram", "cpu", "--vocab_size", "300", "--seq_len", "32",
            "--micro_batch_size", "4", "--grad_accum_steps", "2", "--warmup_steps", "2", "--eval_interval", "3",
            "--eval_batches", "2", "--checkpoint_interval", "3", "--log_interval", "1", "--no-progress",
            "--val_fraction", "0.1", *extra]


def rows(run_dir, key):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def weights(step_dir):
    return load_file(str(Path(step_dir) / "model.safetensors"))


def test_exact_resume_and_checkpoint_format(corpus, tmp_path):
    """8 steps straight == 4 steps, a new process-like restart from the checkpoint, 4 more: bit for bit."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args(corpus, straight, "--max_steps", "8")) == 0
    assert main(args(corpus, split, "--max_steps", "8", "--stop_at_step", "4")) == 0
    assert ck.find_latest_checkpoint(split).name == "step_000004"
    assert main(args(corpus, split, "--resume")) == 0

    a, b = weights(straight / "step_000008"), weights(split / "step_000008")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert rows(straight, key) == rows(split, key), key
    losses = [v for _, v in rows(straight, "loss")]
    assert len(losses) == 8 and losses[-1] < losses[0]

    # the run directory: last K=2 complete steps + best, metrics, plot; the state loads with weights_only
    assert sorted(p.name for _, p in ck.list_step_dirs(straight)) == ["step_000006", "step_000008"]
    assert ck.is_complete(straight / "best") and (straight / "loss.png").stat().st_size > 1000
    state = ck.load_training_state(straight / "step_000008")
    assert state["step"] == 8 and len(state["sampler"]) == 1 and "optimizer" in state
    saved = ck.load_train_config(straight / "step_000008")
    assert saved["model_size"] == "tiny" and saved["seq_len"] == 32

    # our loader and transformers open the checkpoint and agree
    from transformers import MambaForCausalLM

    from models import LanguageModel
    model, tokenizer, found = ck.load_model_and_tokenizer(straight)
    assert found.name == "step_000008"
    ids = torch.tensor([tokenizer.encode("the selective scan makes the step size")])
    ours = LanguageModel.from_pretrained(straight / "step_000008", family="mamba1").eval()
    hf = MambaForCausalLM.from_pretrained(straight / "step_000008").eval()
    with torch.no_grad():
        lo, _ = ours(ids)
        lh = hf(ids).logits
        lm, _ = model.eval()(ids)
    assert torch.allclose(lo[..., :lh.shape[-1]], lh, atol=1e-4, rtol=1e-4)
    assert torch.equal(lo, lm)

    # fine-tuning from it: a new run whose first weights are the checkpoint's (args() names its size, tiny; another
    # explicit size is refused: tests/test_first_hour.py)
    tuned = tmp_path / "tuned"
    assert main(args(corpus, tuned, "--init_from", str(straight / "best"),
                     "--max_steps", "1", "--checkpoint_interval", "1")) == 0
    assert weights(tuned / "step_000001").keys() == a.keys()


def test_nonfinite_steps_are_skipped_then_stop(corpus, tmp_path):
    trainer = setup(_overrides(corpus, tmp_path / "nf", max_steps=12))
    bad = {3, 6, 7, 8, 9}
    trainer.cfg.max_nonfinite_steps = 4
    original = trainer._forward_backward
    before = {}

    def poisoned(batches):
        loss = original(batches)
        if trainer.step + 1 in bad:
            before[trainer.step + 1] = [p.detach().clone() for p in trainer.raw_model.parameters()]
            return loss * math.nan
        return loss

    trainer._forward_backward = poisoned
    with pytest.raises(TrainingStopped, match="4 non-finite steps in a row"):
        trainer.train()
    assert trainer.nonfinite_skipped == 5 and trainer.step == 9
    skipped = dict(rows(tmp_path / "nf", "skipped"))
    assert [s for s, v in skipped.items() if v] == [3, 6, 7, 8, 9]
    # a skipped step leaves the weights as they were
    after = [p.detach() for p in trainer.raw_model.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(before[6], after))


def _overrides(corpus, out, **extra):
    flags = args(corpus, out)
    over = {}
    i = 0
    while i < len(flags):
        key = flags[i][2:]
        if key.startswith("no-"):
            over[key[3:]] = False
            i += 1
            continue
        over[key] = flags[i + 1]
        i += 2
    from training.config import field_types
    types = field_types()
    over = {k: (types[k][0](v) if not isinstance(v, bool) else v) for k, v in over.items()}
    over.update(extra)
    return over


def test_out_of_memory_halves_the_micro_batch(corpus, tmp_path):
    ref = setup(_overrides(corpus, tmp_path / "ref", max_steps=2))
    ref_loss, _, _ = ref.train_step(1e-3)
    trainer = setup(_overrides(corpus, tmp_path / "oom", max_steps=2))
    forward = trainer.model.forward
    calls = []

    def small_memory(x, targets=None, **kw):
        calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x, targets=targets, **kw)

    trainer.model.forward = small_memory
    loss, _, finite = trainer.train_step(1e-3)
    assert finite and trainer.micro_split == 1 and calls[:3] == [4, 2, 1]
    assert calls.count(1) == 8                       # 2 micro-batches x 4 rows, one row per pass
    assert loss == pytest.approx(ref_loss, rel=1e-5)  # same rows, same effective batch
    a = [p.detach() for p in ref.raw_model.parameters()]
    b = [p.detach() for p in trainer.raw_model.parameters()]
    # Adam's first step moves each weight by ~lr * sign(grad) = 1e-3: a wrong row or a lost micro-batch shows at that
    # scale. Summation order alone (one row per pass, and the chunked loss's per-chunk dW) moves grads near Adam's
    # eps by rounding, a few 1e-6 at most.
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))
    assert trainer.training_state()["micro_split"] == 1

    def no_memory(x, targets=None, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    trainer.model.forward = no_memory
    with pytest.raises(TrainingStopped, match="out of GPU memory at micro-batch 1"):
        trainer.train_step(1e-3)


def test_failed_checkpoint_write_keeps_training(corpus, tmp_path, monkeypatch, capsys):
    trainer = setup(_overrides(corpus, tmp_path / "full", max_steps=6))
    real = ck.save_checkpoint
    calls = []

    def disk_full(run_dir, step, *a, **k):
        calls.append(step)
        if step == 6 and k.get("write_step", True):
            raise OSError(28, "No space left on device")
        return real(run_dir, step, *a, **k)

    monkeypatch.setattr(ck, "save_checkpoint", disk_full)
    with pytest.raises(TrainingStopped, match="No space left.*step_000003.*intact"):
        trainer.train()
    assert ck.find_latest_checkpoint(tmp_path / "full").name == "step_000003"
    assert not list((tmp_path / "full").glob(".tmp-*"))


def test_bad_input_exits_2_without_traceback(corpus, tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"lr": 0.001,')
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"learning_rate": 0.001}')
    wrong_type = tmp_path / "type.json"
    wrong_type.write_text('{"max_steps": "ten"}')
    cases = [
        (["--vram", "16"], "did you mean '16gb'"),
        (["--model_size", "huge"], "model_size 'huge' is not allowed"),
        (["--training", "turbo"], "training 'turbo' is not allowed"),
        (["--data_dir", str(tmp_path / "missing")], "does not exist"),
        (["--config", str(bad_json)], "not valid JSON"),
        (["--config", str(tmp_path / "nope.json")], "does not exist"),
        (["--config", str(unknown)], "unknown config key 'learning_rate'"),
        (["--config", str(wrong_type)], "'max_steps' .* must be int, got str"),
        (["--resume", str(tmp_path / "nothing")], "does not exist"),
        (["--keep_last", "1"], "keep_last must be at least 2"),
    ]
    for argv, match in cases:
        assert main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err and __import__("re").search(match, err), err

    if importlib.util.find_spec("wandb") is None:       # asked for a logger that is not installed
        assert main(args(corpus, tmp_path / "wandb", "--wandb", "--max_steps", "1")) == 2
        assert "needs the wandb package" in capsys.readouterr().err

    # a checkpoint of another model shape: train tiny, then resume it as small
    assert main(args(corpus, tmp_path / "shape", "--max_steps", "1")) == 0
    capsys.readouterr()
    assert main(args(corpus, tmp_path / "shape", "--resume", "--model_size", "small")) == 2
    err = capsys.readouterr().err
    assert "another shape" in err and "d_model 64 (this run: 512)" in err


def _run(argv, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=env, **kw)


def test_script_reports_bad_input_with_exit_2(tmp_path):
    for argv, match in ((["train.py", "--vram", "16"], "did you mean '16gb'"),
                        (["train.py", "--lr", "fast"], "argument --lr: invalid float value")):
        proc = _run(argv, timeout=120)
        assert proc.returncode == 2 and match in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_kill_9_mid_run_then_resume(corpus, tmp_path):
    """A real process killed with SIGKILL while training: the newest complete checkpoint resumes."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *args(corpus, out, "--max_steps", "400",
                                                              "--checkpoint_interval", "1", "--eval_interval", "50")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len([p for _, p in ck.list_step_dirs(out) if ck.is_complete(p)]) < 2:
            time.sleep(0.05)
        time.sleep(0.37)                     # somewhere in the middle of a later step or save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    found = ck.find_latest_checkpoint(out)
    assert found is not None
    step = ck.load_training_state(found)["step"]
    assert main(args(corpus, out, "--resume", "--max_steps", str(step + 2), "--checkpoint_interval", "1")) == 0
    assert ck.find_latest_checkpoint(out).name == ck.step_dir_name(step + 2)
    assert [s for s, _ in rows(out, "loss")][-3:] == [step, step + 1, step + 2]


def test_ddp_gloo_two_processes(corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo): trains, rank 0 checkpoints both ranks' data positions."""
    out = tmp_path / "ddp"
    # prepare the shards once in this process so both ranks only read them
    # with a second corpus scored at each evaluation: its documents shared out between the ranks, no deadlock
    proc = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29513", "train.py",
                 *args(corpus, out, "--max_steps", "3", "--device", "cpu", "--eval_data", str(corpus / "docs"),
                       "--eval_tokens", "400")], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in rows(out, "eval_bits_per_byte")] == [3] and math.isfinite(rows(out, "eval_loss")[0][1])
    state = ck.load_training_state(ck.find_latest_checkpoint(out))
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["sampler"]) == 2
    assert state["sampler"][0] != state["sampler"][1]          # each rank draws its own data
    assert proc.stdout.count("tokens per optimizer step") == 1   # rank 0 alone prints
    assert "x 2 processes" in proc.stdout and "DDP 2 processes" in proc.stdout
    assert len(rows(out, "loss")) == 3
    # resumable under torchrun; another process count is refused with a clear message
    proc = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29514", "train.py",
                 *args(corpus, out, "--resume", "--max_steps", "4", "--device", "cpu")], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in rows(out, "loss")] == [1, 2, 3, 4]
    assert main(args(corpus, out, "--resume", "--max_steps", "5")) == 2


def test_corpus_too_small_for_evaluation_or_training(tmp_path, capsys):
    """A few documents: a validation split shorter than one sequence turns evaluation off with a warning (the run
    still finishes); a training split shorter than one sequence is a usage error, exit 2."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(" ".join(WORDS * 12))
    common = ["--data_dir", str(docs), "--cache_dir", str(tmp_path / "cache"), "--model_size", "tiny",
              "--vram", "cpu", "--vocab_size", "300", "--micro_batch_size", "2", "--grad_accum_steps", "1",
              "--eval_interval", "2", "--checkpoint_interval", "2", "--no-progress", "--val_fraction", "0.01"]
    assert main(common + ["--out_dir", str(tmp_path / "run"), "--seq_len", "64", "--max_steps", "2"]) == 0
    out = capsys.readouterr()
    assert "no evaluation" in out.out + out.err
    assert rows(tmp_path / "run", "val_loss") == []
    assert ck.find_latest_checkpoint(tmp_path / "run").name == "step_000002"
    assert main(common + ["--out_dir", str(tmp_path / "run2"), "--seq_len", "4096", "--max_steps", "2"]) == 2
    assert "add more documents or use a smaller --seq_len" in capsys.readouterr().err
