"""Tokenizer: BPE training, lossless round trip, save/load, HF tokenizers from disk, clear errors; dtypes."""
import numpy as np
import pytest

from utils.errors import DataError
from utils.shards import TokenWriter, open_tokens, token_dtype
from utils.tokenizer import EOT_TOKEN, Tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 20,
         "Unicode: caf\u00e9, \u4e2d\u6587, emoji \U0001F600, tabs\tand\r\nCRLF", "x = [i ** 2 for i in range(10)]\n"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS * 5, vocab_size=400)


def test_trained_bpe_round_trips_any_text(tok):
    assert tok.eot_token == EOT_TOKEN and tok.decode([tok.eot_id]) == EOT_TOKEN
    assert 257 <= tok.vocab_size <= 400
    for text in TEXTS + ["never seen: \u0416\u0436 \x00\x7f \ufffd \U0001F680 " * 3, ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    # The end-of-text string inside a document is plain text, never a document boundary.
    text = f"a file that mentions {EOT_TOKEN} in its text"
    assert tok.eot_id not in tok.encode(text) and tok.decode(tok.encode(text)) == text
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox")     # merges were learned


def test_training_is_deterministic():
    a = Tokenizer.train(TEXTS * 5, vocab_size=400)
    b = Tokenizer.train(iter(TEXTS * 5), vocab_size=400)
    assert a.fingerprint() == b.fingerprint()


def test_save_load_and_hf_loading(tok, tmp_path):
    tok.save(tmp_path / "t")
    assert {p.name for p in (tmp_path / "t").iterdir()} == {"tokenizer.json", "tokenizer_meta.json",
                                                             "tokenizer_config.json"}
    for loaded in (Tokenizer.load(tmp_path / "t"), Tokenizer.from_pretrained(str(tmp_path / "t")),
                   Tokenizer.from_pretrained(str(tmp_path / "t" / "tokenizer.json"))):
        assert loaded.fingerprint() == tok.fingerprint() and loaded.eot_id == tok.eot_id
        assert loaded.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    assert Tokenizer.load(tmp_path / "t").source == "bpe:trained"
    # transformers loads the same folder (so checkpoints carry a standard tokenizer).
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert hf(TEXTS[1], add_special_tokens=False)["input_ids"] == tok.encode(TEXTS[1])
    assert hf.eos_token_id == tok.eot_id


def test_hf_tokenizer_without_eot_gets_one(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    backend = HFTokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.eot_id == 3 and tok.vocab_size == 4 and tok.encode("hello world") == [0, 1]


def test_unknown_tokenizer_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not be loaded.*HF_HUB_OFFLINE"):
        Tokenizer.from_pretrained("no-such-org/no-such-tokenizer")
    with pytest.raises(DataError, match="no such file"):
        Tokenizer.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path / "bad.json"))
    for bad in (0, 256, 10**9, 3.5, True):
        with pytest.raises(DataError, match="vocab_size"):
            Tokenizer.train(TEXTS, vocab_size=bad)


def test_token_dtypes(tmp_path):
    assert token_dtype(16384) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151_000) == np.uint32
    w = TokenWriter(tmp_path / "t.bin", np.uint32)
    w.write([0, 70_000, 2**32 - 1])
    w.write([5, 6])
    w.truncate(3)
    w.close()
    assert open_tokens(tmp_path / "t.bin", "uint32", 3).tolist() == [0, 70_000, 2**32 - 1]
    w16 = TokenWriter(tmp_path / "s.bin", np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        w16.write([70_000])
    w16.close()
    with pytest.raises(ValueError, match="manifest says"):
        open_tokens(tmp_path / "t.bin", "uint32", 4)
