"""Tokenise a corpus into memory-mapped shards (reused by train.py) and report what was read.

    python prepare_data.py                                   # the built-in corpus (Python's standard library)
    python prepare_data.py --data_dir data/ --show_stats     # your documents, with a summary
    python prepare_data.py --hf_dataset data.jsonl --text_field text --stats_json stats.json
"""
import argparse
import json
import sys
from pathlib import Path

from configs.model_sizes import DEFAULT_VOCAB_SIZE
from utils.cli import positive_int
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
                     help=f"vocabulary of the trained BPE (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--seq_len", type=positive_int, default=256, help="sequence length, for the statistics "
                   "(default 256)")
    p.add_argument("--val_fraction", type=fraction, default=DEFAULT_VAL_FRACTION,
                   help=f"share of tokens held out for validation (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--cache_dir", default="cache/prepared", help="where prepared data goes (default cache/prepared)")
    p.add_argument("--streaming", choices=("auto", "on", "off"), default="auto", help="read a file at a time "
                   "(on), all in memory (off), or stream when the corpus exceeds 1 GiB (auto)")
    p.add_argument("--force", action="store_true", help="prepare again even if the corpus is unchanged")
    p.add_argument("--show_stats", action="store_true", help="print a summary of what was read and skipped")
    p.add_argument("--stats_json", metavar="PATH", help="write the per-file statistics as JSON")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
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
    try:
        data = prepare_dataset(data_dir=args.data_dir, hf_dataset=args.hf_dataset, text_field=args.text_field,
                               tokenizer=args.tokenizer, vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE,
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
