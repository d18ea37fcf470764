"""prepare_data.py end to end (exit codes, --show_stats, --stats_json) and HF datasets as a corpus."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from utils.dataset import prepare_dataset
from utils.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--no_progress", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd or ROOT, env=env)


@pytest.fixture
def small_corpus(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# Title\n\nSome markdown text. " * 30)
    (docs / "sub" / "b.py").write_text("def f():\n    return 1\n" * 40)
    (docs / "sub" / "c.json").write_text('{"broken": ')
    (docs / "bin.txt").write_bytes(b"\x00\x01\x02\x03" * 100)
    (docs / "empty.rst").write_text("")
    return docs


def test_cli_prepares_and_reports(small_corpus, tmp_path):
    out = tmp_path / "stats" / "s.json"
    r = run("--data_dir", small_corpus, "--vocab_size", 300, "--seq_len", 32, "--cache_dir", tmp_path / "cache",
            "--show_stats", "--stats_json", out, "--val_fraction", 0.1)
    assert r.returncode == 0, r.stderr
    for line in ("Files           5 (3 loaded, 2 skipped)", "Sequences", "bin.txt: binary",
                 "empty.rst: empty", "sub/c.json: invalid JSON", "Largest files", "Ready:"):
        assert line in r.stdout, (line, r.stdout)
    stats = json.loads(out.read_text())
    assert {"files", "totals"} <= set(stats)
    files = {f["path"]: f for f in stats["files"]}
    assert set(files) == {"a.md", "sub/b.py", "sub/c.json", "bin.txt", "empty.rst"}
    for f in files.values():
        assert {"path", "type", "status", "reason", "chars", "tokens"} <= set(f)
    assert files["bin.txt"]["status"] == "skipped" and files["a.md"]["status"] == "loaded"
    t = stats["totals"]
    assert t["tokens"] == t["train_tokens"] + t["val_tokens"] == sum(f["tokens"] for f in files.values())
    assert t["train_sequences"] == (t["train_tokens"] - 1) // 32 and t["seq_len"] == 32
    assert t["by_type"]["markdown"]["loaded"] == 1
    # Second run: reused.
    r2 = run("--data_dir", small_corpus, "--vocab_size", 300, "--cache_dir", tmp_path / "cache", "--val_fraction", 0.1)
    assert r2.returncode == 0 and "Reusing prepared data" in r2.stdout


@pytest.mark.parametrize("args, message", [
    (["--data_dir", "/no/such/dir"], "does not exist"),
    (["--vocab_size", "0"], "positive integer"),
    (["--vocab_size", "100"], "vocab_size must be an integer from 257"),
    (["--val_fraction", "1.5"], "[0, 1)"),
    (["--streaming", "maybe"], "invalid choice"),
    (["--tokenizer", "no-such-org/no-such-tok"], "could not be loaded"),
    (["--tokenizer", "gpt2", "--vocab_size", "500"], "cannot be combined"),
])
def test_cli_usage_errors_exit_2(args, message, small_corpus, tmp_path):
    r = run("--data_dir", small_corpus, "--cache_dir", tmp_path / "c", *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (small_corpus / "cache").exists()


def test_cli_nothing_usable_exits_2(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.py").write_bytes(b"\x00" * 64)
    r = run("--data_dir", d, "--cache_dir", tmp_path / "c")
    assert r.returncode == 2 and "no usable text" in r.stderr and "Traceback" not in r.stderr


def test_hf_datasets_as_corpus(tmp_path):
    import datasets
    rows = [{"text": f"row number {i}: " + "words " * (i % 7 + 1), "id": i} for i in range(200)]
    rows[5]["text"] = ""                                   # empty rows are counted, not tokenised
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(vocab_size=300, val_fraction=0.0, show_progress=False, log=lambda s: None)
    a = prepare_dataset(hf_dataset=str(jsonl), cache_dir=tmp_path / "c1", **kw)
    (rec,) = a.stats
    assert rec["status"] == "loaded" and rec["documents"] == 199 and "1 empty" in rec["note"]
    docs = a.tokenizer.decode(a.train_tokens.tolist()).split(a.tokenizer.eot_token)[:-1]
    assert docs == [r["text"] for r in rows if r["text"]]
    # The same rows from a save_to_disk folder give the same tokens, with a given tokenizer too.
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    tok_dir = tmp_path / "tok"
    a.tokenizer.save(tok_dir)
    b = prepare_dataset(hf_dataset=str(tmp_path / "saved"), tokenizer=str(tok_dir), cache_dir=tmp_path / "c2",
                        **kw)
    assert np.array_equal(a.train_tokens, b.train_tokens)
    assert prepare_dataset(hf_dataset=str(tmp_path / "saved"), tokenizer=str(tok_dir), cache_dir=tmp_path / "c2",
                           **kw).reused
    with pytest.raises(DataError, match="not a column.*'id', 'text'"):
        prepare_dataset(hf_dataset=str(jsonl), text_field="body", cache_dir=tmp_path / "c3", **kw)
    with pytest.raises(DataError, match="could not be loaded"):
        prepare_dataset(hf_dataset=str(tmp_path / "nothing-here" / "x.jsonl"), cache_dir=tmp_path / "c4", **kw)
