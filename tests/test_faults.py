"""Faults a machine or a user can cause, injected for real: kill -9 during saves, damaged files in every part of
a checkpoint, SIGTERM/SIGINT mid-run (and a second one during the save), a full disk, a read-only run folder.
Each must end with a loadable checkpoint and a clear message, never a traceback.

FAULTS counts what was injected and recovered; BENCHMARKS.md (section faults) reports the totals.
"""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoint as ck
from training import manifest
from training.launch import main

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("state space models scan the sequence once and carry a fixed size state forward through time "
         "the selective scan makes the step size depend on the input so the model can choose what to keep ").split()
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = root / "docs"
    data.mkdir()
    for i in range(6):
        words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(1500)]
        (data / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    assert main(args(root, root / "warm", "--max_steps", "1")) == 0     # prepares the shared shards once
    return root


def args(corpus, out, *extra):
    return ["--data_dir", str(corpus / "docs"), "--cache_dir", str(corpus / "cache"), "--out_dir", str(out),
            "--model_size", "tiny", "--vram", "cpu", "--vocab_size", "300", "--seq_len", "32",
            "--micro_batch_size", "4", "--grad_accum_steps", "1", "--warmup_steps", "2", "--eval_interval", "2",
            "--eval_batches", "1", "--checkpoint_interval", "2", "--log_interval", "1", "--no-progress",
            "--val_fraction", "0.1", *extra]


def rows(run_dir, key):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def same_weights(a, b):
    x, y = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def no_traceback(text):
    assert "Traceback" not in text, text


# ------------------------------------------------------------------------------------------------ damaged files

def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


PARTS = [("model.safetensors", flip_byte), ("model.safetensors", truncate), ("training_state.pt", flip_byte),
         ("config.json", truncate), ("tokenizer.json", flip_byte), ("train_config.json", truncate),
         ("manifest.json", flip_byte), ("COMPLETE", truncate)]


@pytest.fixture(scope="module")
def trained(corpus):
    """A run of 4 steps with checkpoints at 2 and 4 (and best/)."""
    out = corpus / "trained"
    assert main(args(corpus, out, "--max_steps", "4")) == 0
    return out


@pytest.mark.parametrize("name,damage", PARTS, ids=[f"{n}-{d.__name__}" for n, d in PARTS])
def test_damaged_part_is_skipped_on_resume(corpus, trained, tmp_path, capsys, name, damage):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run / "step_000004" / name)
    capsys.readouterr()
    assert main(args(corpus, run, "--resume", "--max_steps", "6")) == 0
    err = capsys.readouterr()
    no_traceback(err.out + err.err)
    assert f"skipping the damaged checkpoint {run / 'step_000004'}" in err.err and name in err.err, err.err
    assert "resuming step 2 from" in err.out and "step_000002" in err.out
    assert ck.find_latest_checkpoint(run).name == "step_000006"


def test_damaged_checkpoint_named_by_every_loader(corpus, trained, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    step = run / "step_000004"
    truncate(step / "model.safetensors")

    # --init_from and generate.py on the damaged folder: one line naming the file, exit 2
    assert main(args(corpus, tmp_path / "ft", "--init_from", str(step), "--max_steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err and err.count("\n") == 1, err
    proc = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(step), "--prompt", "the",
                           "--max_new_tokens", "2"], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    no_traceback(proc.stderr)
    # from_pretrained on it: a ValueError naming the file (not safetensors' own error)
    from models import LanguageModel
    with pytest.raises(ValueError, match="model.safetensors.*damaged or cut short"):
        LanguageModel.from_pretrained(step, family="mamba1")
    # generate.py on the run: the damaged step is skipped with a warning, the older one is used
    model, _, found = ck.load_model_and_tokenizer(run)
    assert found.name == "step_000002"
    # a damaged optimizer state does not stop generation (it never reads it), but does stop a resume of it
    flip_byte(run / "step_000002" / "training_state.pt")
    assert ck.find_latest_checkpoint(run / "step_000002", for_inference=True).name == "step_000002"
    with pytest.raises(manifest.CheckpointDamaged, match="training_state.pt"):
        ck.find_latest_checkpoint(run / "step_000002")


def test_nothing_intact_is_one_line_and_exit_2(corpus, trained, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for d in ("step_000002", "step_000004", "best"):
        flip_byte(run / d / "model.safetensors")
    capsys.readouterr()
    assert main(args(corpus, run, "--resume", "--max_steps", "6")) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: --resume: no complete, intact checkpoint")
    assert sum("skipping the damaged" in line for line in lines) == 3


def test_best_is_a_real_copy(trained):
    step, best = trained / "step_000004", trained / "best"
    assert (step / "model.safetensors").stat().st_ino != (best / "model.safetensors").stat().st_ino
    assert same_weights(step, best)
    assert ck.damage(best) is None


# ------------------------------------------------------------------------------------------------ kill -9 mid-save

SAVER = r"""
import sys, torch
sys.path.insert(0, {root!r})
from training import checkpoint as ck
from models import LanguageModel, MambaConfig
class Tok:
    def save(self, path):
        (path / "tokenizer.json").write_text('{{"version": "1.0"}}')
model = LanguageModel(MambaConfig(d_model=64, n_layer=2, vocab_size=300))
blob = torch.randn(2_000_000)                      # 8 MB of optimizer-like state: a save takes a while
step = 0
while True:
    step += 1
    with torch.no_grad():
        model.backbone.embeddings.weight.fill_(step)
    ck.save_checkpoint({out!r}, step, model, Tok(), {{"step": step}}, {{"step": step, "blob": blob + step}},
                       best=step % 3 == 0)
    print("saved", step, flush=True)
"""


@pytest.mark.parametrize("seed", range(6))
def test_kill_9_at_random_points_of_saves(tmp_path, seed):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SAVER.format(root=str(ROOT), out=str(out))], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().startswith("saved 1")
        time.sleep(random.Random(seed).uniform(0.05, 1.5))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reported = [int(line.split()[1]) for line in proc.stdout.read().splitlines() if line.startswith("saved")]
    last_reported = max([1, *reported])
    found = ck.find_latest_checkpoint(out)              # verified against its manifest
    step = ck.load_training_state(found)["step"]
    assert step >= last_reported                         # no completed save was lost
    w = load_file(str(found / "model.safetensors"))["backbone.embeddings.weight"]
    assert torch.all(w == step)
    # a later save cleans up what the kill left behind
    assert ck.damage(found) is None


# ------------------------------------------------------------------------------------------------ signals

def _popen(corpus, out, *extra):
    return subprocess.Popen([sys.executable, "train.py", *args(corpus, out, *extra)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(s >= step for s, _ in rows(run, "loss")):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)


SIGNAL_STEPS = 40
SIGNAL_FLAGS = ("--max_steps", str(SIGNAL_STEPS), "--checkpoint_interval", "1000", "--eval_interval", "7")


@pytest.fixture(scope="module")
def straight(corpus):
    """The uninterrupted run the stopped ones are compared with (a subprocess, like them)."""
    out = corpus / "straight"
    proc = _popen(corpus, out, *SIGNAL_FLAGS)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_after_the_step_and_resume_is_exact(corpus, straight, tmp_path, sig, code):
    """N steps straight == a real signal to a real process at some step k + --resume: bit-identical."""
    stopped = tmp_path / "stopped"
    proc = _popen(corpus, stopped, *SIGNAL_FLAGS)
    _wait_for_step(stopped, 5, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    no_traceback(err)
    assert proc.returncode == code, err
    k = ck.load_training_state(ck.find_latest_checkpoint(stopped))["step"]
    assert 5 <= k < SIGNAL_STEPS, err
    assert f"stopped by {sig.name} after step {k}" in err and f"--resume {stopped}" in err

    proc = subprocess.run([sys.executable, "train.py", *args(corpus, stopped, "--resume", *SIGNAL_FLAGS)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = ck.step_dir_name(SIGNAL_STEPS)
    assert same_weights(straight / last, stopped / last)
    for key in ("loss", "grad_norm", "val_loss"):
        assert rows(straight, key) == rows(stopped, key), key


def test_second_signal_during_the_save_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    """SIGTERM mid-step, then another SIGTERM while that step's checkpoint is being written."""
    from training.trainer import Trainer
    run = tmp_path / "run"
    real_step, real_fill = Trainer.train_step, ck.save_checkpoint

    def step_then_signal(self, lr):
        out = real_step(self, lr)
        if self.step + 1 == 5:
            os.kill(os.getpid(), signal.SIGTERM)          # arrives during step 5
        return out

    def save_then_signal(run_dir, step, model, *a, **k):
        if step == 5:
            inner = model

            class Interrupted:                            # the second signal lands inside the write
                def save_pretrained(self, path):
                    inner.save_pretrained(path)
                    os.kill(os.getpid(), signal.SIGTERM)
            model = Interrupted()
        return real_fill(run_dir, step, model, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    monkeypatch.setattr(ck, "save_checkpoint", save_then_signal)
    assert main(args(corpus, run, "--max_steps", "20")) == 143
    err = capsys.readouterr().err
    no_traceback(err)
    assert "second SIGTERM: stopped at once" in err and "step_000004" in err and "is intact" in err
    assert ck.find_latest_checkpoint(run).name == "step_000004"
    assert not (run / "step_000005").exists() and not list(run.glob(".tmp-*"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL    # handlers put back


# ------------------------------------------------------------------------------------------------ full disk, read-only

def test_full_disk_during_saves(corpus, tmp_path, monkeypatch, capsys):
    """ENOSPC at the write of the optimizer state from step 4 on: step 2 stays intact, the messages say what
    failed and the space needed, training goes on, and the final save fails loudly (exit 1)."""
    run = tmp_path / "run"
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step", 0) >= 4:
            real_save(obj, f, *a, **k)                     # part of it lands on disk, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", disk_full)
    assert main(args(corpus, run, "--max_steps", "8")) == 1
    out = capsys.readouterr()
    no_traceback(out.out + out.err)
    assert out.out.count("warning: could not write the checkpoint of step") >= 2     # steps 4 and 6 (and best)
    assert "No space left on device" in out.out and "a checkpoint needs about" in out.out
    assert "training stopped: could not write the checkpoint of step 8" in out.err
    assert rows(run, "loss")[-1][0] == 8                                             # training went on
    found = ck.find_latest_checkpoint(run)
    assert found.name == "step_000002" and ck.load_training_state(found)["step"] == 2
    assert not list(run.glob(".tmp-*"))


def test_read_only_run_folder(corpus, tmp_path, monkeypatch, capsys):
    """The run folder turns read-only after the first checkpoint. As root chmod does not stop writes, so there
    the refusal is injected where the save creates its folder."""
    import pathlib
    run = tmp_path / "run"
    real_mkdir, real_step = pathlib.Path.mkdir, None
    from training.trainer import Trainer
    real_step = Trainer.train_step
    as_root = os.geteuid() == 0

    def step(self, lr):
        if self.step == 2 and not as_root:
            os.chmod(run, 0o555)
        return real_step(self, lr)

    def mkdir(self, *a, **k):
        if as_root and self.name.startswith(".tmp-step_00000") and not self.name.startswith(".tmp-step_000002"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    try:
        assert main(args(corpus, run, "--max_steps", "6")) == 1
    finally:
        os.chmod(run, 0o755)
    out = capsys.readouterr()
    no_traceback(out.out + out.err)
    assert "Permission denied" in out.out and "write permission" in out.out
    assert "training stopped: could not write the checkpoint of step 6" in out.err
    assert ck.find_latest_checkpoint(run).name == "step_000002"
    # and a folder that cannot be written at all: one line at start-up, exit 2
    locked = tmp_path / "locked"
    monkeypatch.setattr(pathlib.Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(self))) if self == locked else real_mkdir(self, *a, **k))
    assert main(args(corpus, locked, "--max_steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to the run directory") and err.count("\n") == 1, err
