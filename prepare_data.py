"""Tokenise a corpus into memory-mapped shards (reused by train.py) and report what was read.

    python prepare_data.py                                   # the built-in corpus (Python's standard library)
    python prepare_data.py --data_dir data/ --show_stats     # your documents, with a summary
    python prepare_data.py --hf_dataset data.jsonl --text_field text --stats_json stats.json
"""
import argparse
import json
import sys
from pathlib import Path

from utils import cpu_threads

cpu_threads.configure()             # before torch is imported: threads that sleep when idle, no more than the CPUs

from configs.vram import VRAM_CHOICES  # noqa: E402
from utils.cli import positive_int  # noqa: E402
from utils.dataset import DEFAULT_VAL_FRACTION, prepare_dataset
from utils.errors import DataError
from utils.stats import stats_json, summary


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def train_defaults(vram: str) -> tuple[int, int]:
    """(vocab_size, seq_len) that `train.py --vram VRAM` uses on this machine, resolved by the same code, so that the
    data prepared here is the data the run reuses."""
    import torch

    from training.config import resolve_config
    gpu = torch.cuda.is_available()
    cfg = resolve_config({"vram": vram}, device_type="cuda" if gpu else "cpu",
                         total_memory_bytes=torch.cuda.get_device_properties(0).total_memory if gpu else None)
    return cfg.vocab_size, cfg.seq_len


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("corpus (default: the built-in corpus, no download)")
    src.add_argument("--data_dir", help="folder of documents, walked recursively (PDF, text, markup, code, "
                     "JSON/YAML/TOML/XML/CSV); an empty folder means the built-in corpus")
    src.add_argument("--hf_dataset", metavar="NAME_OR_PATH", help="HF dataset: a save_to_disk folder, local "
                     "json/jsonl/csv/parquet/txt file(s), or a hub name that is cached or reachable")
    src.add_argument("--text_field", default="text", help="dataset column holding the text (default: text)")
    tok = p.add_argument_group("tokenizer (default: a byte-level BPE trained on the corpus)")
    tok.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="an HF tokenizer: folder, tokenizer.json, "
                     "or hub name (local cache first)")
    tok.add_argument("--vocab_size", type=positive_int, default=None,
                     help="vocabulary of the trained BPE (default: train.py's for --vram: 4096 on the CPU, "
                          "16384 on a GPU)")
    p.add_argument("--vram", choices=("auto", "cpu") + VRAM_CHOICES, default="auto",
                   help="the train.py preset whose vocabulary and sequence length are the defaults here "
                        "(default auto: the CPU preset without a GPU)")
    p.add_argument("--seq_len", type=positive_int, default=None, help="sequence length, for the statistics "
                   "(default: train.py's for --vram)")
    p.add_argument("--val_fraction", type=fraction, default=DEFAULT_VAL_FRACTION,
                   help=f"share of tokens held out for validation (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--cache_dir", default="cache/prepared", help="where prepared data goes (default cache/prepared)")
    p.add_argument("--streaming", choices=("auto", "on", "off"), default="auto", help="read a file at a time "
                   "(on), all in memory (off), or stream when the corpus exceeds 1 GiB (auto)")
    p.add_argument("--force", action="store_true", help="prepare again even if the corpus is unchanged")
    p.add_argument("--show_stats", action="store_true", help="print a summary of what was read and skipped")
    p.add_argument("--stats_json", metavar="PATH", help="write the per-file statistics as JSON")
    p.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true",
                   help="no progress bars")
    args = p.parse_args(argv)

    if args.tokenizer and args.vocab_size:
        p.error("--vocab_size sets the size of a BPE trained here; it cannot be combined with --tokenizer")
    if args.data_dir and args.hf_dataset:
        p.error("give --data_dir or --hf_dataset, not both")
    if args.data_dir and not Path(args.data_dir).exists():
        p.error(f"--data_dir {args.data_dir!r} does not exist (put your documents in a folder, or leave "
                "--data_dir out to use the built-in corpus)")
    if args.stats_json and Path(args.stats_json).is_dir():
        p.error(f"--stats_json {args.stats_json!r} is a folder; give a file path")
    vocab_size, seq_len = train_defaults(args.vram)
    args.vocab_size = args.vocab_size or vocab_size
    args.seq_len = args.seq_len or seq_len
    try:
        data = prepare_dataset(data_dir=args.data_dir, hf_dataset=args.hf_dataset, text_field=args.text_field,
                               tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                               val_fraction=args.val_fraction, cache_dir=args.cache_dir,
                               streaming={"auto": None, "on": True, "off": False}[args.streaming],
                               show_progress=not args.no_progress, force=args.force)
    except DataError as e:
        p.error(str(e))
    if args.show_stats:
        print()
        print(summary(data.stats, data.totals, args.seq_len, {**data.manifest, "dir": str(data.dir)}))
    if args.stats_json:
        path = Path(args.stats_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stats_json(data.stats, data.totals, args.seq_len), indent=1,
                                   ensure_ascii=False) + "\n")
        print(f"Statistics written to {path}")
    print(f"Ready: {data.dir} ({data.totals['train_tokens']:,} train / {data.totals['val_tokens']:,} validation "
          f"tokens, vocab {data.tokenizer.vocab_size:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
