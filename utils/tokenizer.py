"""The tokenizer: a byte-level BPE trained offline on the corpus, or any HF tokenizer from disk or the cache.

Either way it is a `tokenizers.Tokenizer` underneath (fast, multi-threaded batches), plus an end-of-text token that
separates documents. `save(dir)` writes tokenizer.json (the complete tokenizer), tokenizer_meta.json (our few extra
fields) and tokenizer_config.json (so that transformers' AutoTokenizer loads the same folder).
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from utils.errors import DataError

EOT_TOKEN = "<|endoftext|>"
META_FILE = "tokenizer_meta.json"
MIN_VOCAB = 257            # 256 bytes + the end-of-text token
MAX_VOCAB = 1 << 24        # far beyond any real vocabulary; guards typos such as 163840000


class Tokenizer:
    """A `tokenizers.Tokenizer` with an end-of-text id.

    Attributes:
        backend: the tokenizers.Tokenizer doing the work.
        eot_token / eot_id: the end-of-text token appended after every document.
        source: where it came from ("bpe:trained", a hub name, a path), recorded in manifests and checkpoints.
    """

    def __init__(self, backend: HFTokenizer, eot_token: str = EOT_TOKEN, source: str = "bpe:trained"):
        if backend.token_to_id(eot_token) is None:
            backend.add_special_tokens([eot_token])
        # Special-token strings inside a document are encoded as plain text: a file that mentions
        # "<|endoftext|>" must not create a document boundary. Only we append eot_id, between documents.
        backend.encode_special_tokens = True
        self.backend, self.eot_token, self.source = backend, eot_token, source
        self.eot_id: int = backend.token_to_id(eot_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (added tokens included); the model's embedding needs this many."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------------------------------- making one
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, length: int | None = None,
              show_progress: bool = False) -> "Tokenizer":
        """Trains a byte-level BPE (GPT-2 style: any byte sequence round-trips) on an iterator of texts.

        Args:
            texts: documents or pieces of documents; consumed once.
            vocab_size: target size, end-of-text token included (a tiny corpus may give fewer merges).
            length: number of items in `texts`, for the progress bar only.
        """
        check_vocab_size(vocab_size)
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(texts, trainer, length=length)
        return cls(backend, EOT_TOKEN, "bpe:trained")

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "Tokenizer":
        """Any HF tokenizer: a folder or tokenizer.json on disk, or a hub name already in the local cache (then
        the hub itself, unless HF_HUB_OFFLINE=1). Raises DataError saying what was tried when none works."""
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return cls._from_tokenizer_json(path, str(name_or_path))
        if path.is_dir() and (path / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(path / "tokenizer.json", str(name_or_path))
        if path.is_dir() or name_or_path.startswith((".", "/", "~")):
            if not path.exists():
                raise DataError(f"--tokenizer {name_or_path!r}: no such file or folder")
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hf, errors = None, []
        for local_only in (True,) if offline else (True, False):  # the cache first: no network if we have it
            try:
                hf = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local_only)
                break
            except Exception as e:  # transformers/huggingface_hub raise many types; all mean "not loadable"
                where = "not in the local HF cache" if local_only else "the hub failed"
                errors.append(f"{where} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if hf is None:
            raise DataError(f"--tokenizer {name_or_path!r} could not be loaded: it is not a local folder or "
                            f"tokenizer.json; " + "; ".join(errors) + (" (HF_HUB_OFFLINE is set)" if offline else "")
                            + ". Pass a folder containing tokenizer.json, a hub name already downloaded, or leave "
                            "--tokenizer out to train a byte-level BPE on your corpus.")
        if not isinstance(hf, PreTrainedTokenizerFast):
            raise DataError(f"--tokenizer {name_or_path!r} has no fast (tokenizers) version; use one that ships a "
                            "tokenizer.json")
        eot = hf.eos_token or EOT_TOKEN
        return cls(hf.backend_tokenizer, eot, str(name_or_path))

    @classmethod
    def _from_tokenizer_json(cls, file: Path, source: str) -> "Tokenizer":
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"--tokenizer {source!r}: {file} is not a valid tokenizer.json ({e})") from e
        eot = EOT_TOKEN
        for meta_name, key in ((META_FILE, "eot_token"), ("tokenizer_config.json", "eos_token")):
            meta = file.parent / meta_name
            if meta.is_file():
                value = json.loads(meta.read_text()).get(key)
                if isinstance(value, dict):  # old transformers wrote AddedToken dicts
                    value = value.get("content")
                if value:
                    eot = value
                    break
        return cls(backend, eot, source)

    # ------------------------------------------------------------------------------------------- disk
    def save(self, directory: str | Path) -> None:
        """Writes tokenizer.json, tokenizer_meta.json and tokenizer_config.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        meta = {"eot_token": self.eot_token, "eot_id": self.eot_id, "vocab_size": self.vocab_size,
                "source": self.source}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        hf_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eot_token,
                     "bos_token": self.eot_token, "unk_token": self.eot_token, "model_max_length": 1 << 30}
        from utils.chat import CHAT_TEMPLATE, has_chat_tokens
        if has_chat_tokens(self):     # AutoTokenizer.apply_chat_template renders conversations as we do
            hf_config["chat_template"] = CHAT_TEMPLATE
        (directory / "tokenizer_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        """Loads what `save` wrote (the source recorded at save time is kept)."""
        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        tok = cls._from_tokenizer_json(file, str(directory))
        meta = directory / META_FILE
        if meta.is_file():
            tok.source = json.loads(meta.read_text()).get("source", tok.source)
        return tok

    def fingerprint(self) -> str:
        """sha256 of the complete tokenizer (vocabulary, merges, normalisation, special tokens)."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    # ------------------------------------------------------------------------------------------- use
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many texts at once on all cores (tokenizers' Rust thread pool)."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise DataError(f"vocab_size must be an integer from {MIN_VOCAB} to {MAX_VOCAB}, got {vocab_size!r}")
