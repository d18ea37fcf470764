"""Checkpoint format and atomicity: complete folders only, crashes and failed writes leave the old ones."""
import json
import os

import pytest
import torch

from training import checkpoint as ck


class FakeModel:
    """Writes what save_pretrained writes, with a payload we can recognise."""

    def __init__(self, value=1.0, fail=False):
        self.value, self.fail = value, fail

    def save_pretrained(self, path):
        (path / "config.json").write_text(json.dumps({"value": self.value}))
        if self.fail:
            raise OSError(28, "No space left on device")
        torch.save({"w": torch.full((4,), self.value)}, path / "pytorch_model.bin")


class FakeTokenizer:
    def save(self, path):
        (path / "tokenizer.json").write_text("{}")


def save(run_dir, step, value=None, **kw):
    return ck.save_checkpoint(run_dir, step, FakeModel(step if value is None else value), FakeTokenizer(),
                              {"seed": 1}, {"step": step, "t": torch.arange(3)}, **kw)


def test_layout_and_weights_only_state(tmp_path):
    (d,) = save(tmp_path, 10)
    assert d.name == "step_000010"
    assert {p.name for p in d.iterdir()} == {"config.json", "pytorch_model.bin", "tokenizer.json",
                                              "train_config.json", "training_state.pt", "manifest.json",
                                              "COMPLETE"}
    state = ck.load_training_state(d)      # weights_only=True inside
    assert state["step"] == 10 and torch.equal(state["t"], torch.arange(3))
    assert ck.load_train_config(d) == {"seed": 1}
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_and_best(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep_last=2, best=(step == 2))
    assert [p.name for _, p in ck.list_step_dirs(tmp_path)] == ["step_000003", "step_000004"]
    assert ck.is_complete(tmp_path / "best")
    assert json.loads((tmp_path / "best" / "config.json").read_text())["value"] == 2
    assert ck.load_training_state(tmp_path / "best")["step"] == 2
    # best written alone (an eval between checkpoint steps) replaces the old best atomically
    save(tmp_path, 5, best=True, write_step=False)
    assert json.loads((tmp_path / "best" / "config.json").read_text())["value"] == 5
    assert ck.find_latest_checkpoint(tmp_path).name == "step_000004"
    with pytest.raises(ValueError, match="at least 2"):
        save(tmp_path, 6, keep_last=1)


def test_half_written_checkpoint_is_skipped_with_a_message(tmp_path):
    save(tmp_path, 100)
    save(tmp_path, 200)
    partial = tmp_path / "step_000300"          # what kill -9 during a save could leave (non-atomic fs)
    partial.mkdir()
    (partial / "config.json").write_text("{")
    messages = []
    found = ck.find_latest_checkpoint(tmp_path, log=messages.append)
    assert found.name == "step_000200"
    assert len(messages) == 1 and "step_000300" in messages[0] and "incomplete" in messages[0]
    with pytest.raises(ValueError, match="incomplete"):
        ck.find_latest_checkpoint(partial)
    assert ck.find_latest_checkpoint(found) == found
    # the next save of a later step removes the stale partial folder
    save(tmp_path, 400)
    assert not partial.exists()


def test_folder_of_runs_picks_the_most_recent(tmp_path):
    save(tmp_path / "run_a", 500)
    save(tmp_path / "run_b", 20)                 # written later: newer, though fewer steps
    assert ck.find_latest_checkpoint(tmp_path).parent.name == "run_b"
    assert ck.find_latest_checkpoint(tmp_path / "run_a").name == "step_000500"
    (tmp_path / "run_c").mkdir()
    assert ck.find_latest_checkpoint(tmp_path / "run_c") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.find_latest_checkpoint(tmp_path / "nope")


def test_plain_hf_folder_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert ck.find_latest_checkpoint(tmp_path) == tmp_path


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step_000002").iterdir()}
    with pytest.raises(OSError, match="No space left"):
        ck.save_checkpoint(tmp_path, 3, FakeModel(3, fail=True), FakeTokenizer(), {}, {"step": 3})
    # the failure also must not replace an existing folder of the same name
    with pytest.raises(OSError, match="No space left"):
        ck.save_checkpoint(tmp_path, 2, FakeModel(9, fail=True), FakeTokenizer(), {}, {"step": 2}, best=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "step_000002").iterdir()} == before
    assert not (tmp_path / "step_000003").exists() and not list(tmp_path.glob(".tmp-*"))
    assert ck.find_latest_checkpoint(tmp_path).name == "step_000002"
    assert ck.is_complete(tmp_path / "step_000001")


def test_failing_fsync_or_rename_leaves_previous_intact(tmp_path, monkeypatch):
    save(tmp_path, 1)
    save(tmp_path, 2)
    real_rename = os.rename

    def broken_rename(src, dst):
        if str(src).endswith(f"-{os.getpid()}") and ".tmp-" in str(src):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", broken_rename)
    with pytest.raises(OSError):
        save(tmp_path, 2, value=77)      # replacing step 2: the old folder is put back
    monkeypatch.undo()
    found = ck.find_latest_checkpoint(tmp_path)
    assert found.name == "step_000002" and json.loads((found / "config.json").read_text())["value"] == 2
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    state = ck.capture_rng_state()
    torch.save(state, tmp_path / "s.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    ck.restore_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_crash_between_renames_restores_best(tmp_path):
    save(tmp_path, 1, best=True)
    # a crash after best/ was moved aside and before the new one was renamed in (another process id)
    os.rename(tmp_path / "best", tmp_path / ".old-best-999999")
    save(tmp_path, 2)
    assert ck.is_complete(tmp_path / "best") and ck.load_training_state(tmp_path / "best")["step"] == 1
    assert not list(tmp_path.glob(".old-*"))
