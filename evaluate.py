"""Evaluate trained models: perplexity and bits per byte on a corpus, loss by position, and harness benchmarks.

    python evaluate.py                                              # newest checkpoint, on the built-in corpus
    python evaluate.py --checkpoint checkpoints/run1 --data_dir docs/ --json
    python evaluate.py --checkpoint runs/mamba runs/gpt --by_position --length 8192   # two models, one picture
    python evaluate.py --checkpoint checkpoints/run1 --tasks lambada_openai,hellaswag # needs `pip install lm-eval`

Bits per byte (the summed loss over the UTF-8 bytes of the text) compares models whatever their tokenizers. Each
document is scored whole: its first --window tokens in one parallel pass, every later token as a decoding step on
the carried state (recurrent state and KV cache), so every token sees the whole document before it; --stride S
scores sliding windows instead. Bad input (no checkpoint, nothing readable, an unknown task, --tasks without
lm-eval) is one line with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils import cpu_threads

cpu_threads.configure()             # before torch is imported: threads that sleep when idle, no more than the CPUs

import torch  # noqa: E402

from evaluation.corpus import read_corpus
from evaluation.harness import HarnessAdapter, HarnessMissing, import_lm_eval, run_tasks
from evaluation.perplexity import (FULL_CONTEXT_PASS, cap_tokens, evaluate_corpus, long_documents, loss_by_position,
                                   plot_by_position)
from evaluation.scoring import Scorer
from inference.loading import DTYPES, UsageError, load_for_inference, resolve_device
from training.checkpoint import TRAIN_CONFIG_FILE, load_train_config
from utils.cli import positive_int
from utils.errors import DataError

DEFAULT_CHECKPOINTS = "checkpoints"
FALLBACK_TRAINED_LENGTH = 2048     # a checkpoint without train_config.json (an HF folder): mamba_ssm's length
LENGTH_FACTOR = 4                  # --by_position scores up to this many training lengths by default


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate trained models: perplexity, bits per byte, loss by position, "
                                            "lm-evaluation-harness tasks.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=[DEFAULT_CHECKPOINTS], metavar="DIR",
                   help="one or more checkpoints, each evaluated on the same texts: a folder of runs (its newest "
                        "complete checkpoint), a run, a step folder, an HF-format folder with a tokenizer, or a "
                        "LoRA checkpoint")
    src = p.add_argument_group("corpus (default: the built-in corpus, no download)")
    src.add_argument("--data_dir", default=None, help="a folder (walked recursively) or a single file of documents")
    src.add_argument("--hf_dataset", default=None, metavar="NAME_OR_PATH",
                     help="an HF dataset: a save_to_disk folder, local json/jsonl/csv/parquet/txt, or a cached name")
    src.add_argument("--text_field", default="text", help="the dataset column holding the text")
    src.add_argument("--max_documents", type=positive_int, default=100,
                     help="documents to evaluate on at most, spread evenly over the corpus")
    src.add_argument("--max_tokens", type=positive_int, default=None,
                     help="tokens to score at most, in all: the longest documents are cut to an equal share of "
                          "them (train.py --eval_tokens scores its --eval_data the same way)")
    sc = p.add_argument_group("scoring")
    sc.add_argument("--window", type=positive_int, default=None,
                    help=f"tokens per parallel pass. Full context (no --stride): default {FULL_CONTEXT_PASS}; a "
                         "document longer than this goes on one decoding step per token on the carried state "
                         "(the same scores, slower). With --stride: the sliding window, default the checkpoint's "
                         f"training length (else {FALLBACK_TRAINED_LENGTH})")
    sc.add_argument("--stride", type=positive_int, default=None,
                    help="score sliding windows advancing by this many tokens (each token with at least window - "
                         "stride + 1 tokens of context) instead of full context")
    sc.add_argument("--batch_size", type=positive_int, default=8, help="rows per pass")
    pos = p.add_argument_group("loss by position (length generalisation)")
    pos.add_argument("--by_position", action="store_true",
                     help="also the mean loss per position bucket over documents at least --length tokens long")
    pos.add_argument("--length", type=positive_int, default=None,
                     help=f"positions scored per document (default {LENGTH_FACTOR}x the training length)")
    pos.add_argument("--buckets", type=positive_int, default=32, help="position buckets")
    pos.add_argument("--plot", default="loss_by_position.png", help="where the picture goes (PNG)")
    hx = p.add_argument_group("lm-evaluation-harness (pip install lm-eval)")
    hx.add_argument("--tasks", default=None, help="comma-separated harness tasks, e.g. lambada_openai,hellaswag")
    hx.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per task (task default)")
    hx.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    hx.add_argument("--include_path", default=None, help="a folder of extra task YAMLs (your own tasks)")
    hx.add_argument("--skip_corpus", action="store_true", help="only the harness tasks (no perplexity)")
    p.add_argument("--device", default="auto", help='"auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1"')
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and activations")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    p.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """Checks the parser cannot do; returns the task names (empty without --tasks). Raises UsageError."""
    if args.data_dir is not None and args.hf_dataset is not None:
        raise UsageError("give --data_dir or --hf_dataset, not both")
    if args.stride is not None and args.window is not None and args.stride > args.window:
        raise UsageError(f"--stride {args.stride} is larger than --window {args.window}: windows would skip tokens")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else []
    if args.tasks is not None and not tasks:
        raise UsageError("--tasks is empty; give comma-separated harness task names, e.g. lambada_openai,hellaswag")
    if args.skip_corpus and not tasks:
        raise UsageError("--skip_corpus leaves nothing to do without --tasks")
    if args.skip_corpus and args.by_position:
        raise UsageError("--by_position scores the corpus; leave out --skip_corpus")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be > 0, got {args.limit}")
    if tasks:
        try:
            import_lm_eval()                  # the harness is optional: say so before any work is done
        except HarnessMissing as err:
            raise UsageError(f"--tasks: {err} (or leave out --tasks)") from None
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UsageError(f"--include_path {args.include_path!r} is not a folder of task YAMLs")
    if args.by_position and Path(args.plot).is_dir():
        raise UsageError(f"--plot {args.plot!r} is a folder; give a file path ending in .png")
    return tasks


def trained_length(ckpt: Path) -> int | None:
    """The sequence length the checkpoint was trained at (its train_config.json), or None when it has none."""
    if not (ckpt / TRAIN_CONFIG_FILE).is_file():
        return None
    try:
        value = load_train_config(ckpt).get("seq_len")
    except ValueError:                       # damaged; inference never reads it (training/checkpoint.py)
        return None
    return value if isinstance(value, int) and value > 0 else None


def describe(ckpt: Path, model) -> str:
    return f"{ckpt} ({model.config.family}, {model.num_parameters() / 1e6:.2f}M parameters)"


def evaluate_one(path: str, args, tasks: list[str], corpus, device, dtype, curves: dict) -> dict:
    """Every asked-for evaluation of one checkpoint; the result as a dict (what --json prints per checkpoint)."""
    model, tokenizer, ckpt = load_for_inference(path, device, dtype)
    trained = trained_length(ckpt)
    stride = args.stride
    window = args.window or (FULL_CONTEXT_PASS if stride is None else trained or FALLBACK_TRAINED_LENGTH)
    if stride is not None and stride > window:
        raise UsageError(f"--stride {stride} is larger than the window {window} (set --window)")
    result = {"checkpoint": str(ckpt), "family": model.config.family, "parameters": model.num_parameters(),
              "trained_length": trained, "window": window, "stride": stride,
              "context": "full" if stride is None else "sliding"}
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    log(f"{describe(ckpt, model)} on {device}, {str(dtype).split('.')[-1]}")
    if corpus is not None:
        scorer = Scorer(model, window, stride, args.batch_size, show_progress=not args.no_progress)
        texts = corpus.documents if args.max_tokens is None else cap_tokens(tokenizer, corpus.documents,
                                                                            args.max_tokens)
        score = evaluate_corpus(scorer, tokenizer, texts)
        result["corpus"] = score.to_dict()
    if args.by_position:
        length = args.length or LENGTH_FACTOR * (trained or FALLBACK_TRAINED_LENGTH)
        docs = long_documents(tokenizer, corpus.documents, length)
        if not docs:
            longest = max(len(d) for d in tokenizer.encode_batch(corpus.documents))
            raise UsageError(f"--by_position --length {length}: no document of the corpus has that many tokens "
                             f"(the longest has {longest:,}); give a smaller --length, longer documents, or more "
                             f"of them (--max_documents)")
        scorer = Scorer(model, max(window, length) if stride is None else window, stride, args.batch_size,
                        show_progress=not args.no_progress)
        curve = loss_by_position(scorer, docs, length, args.buckets)
        result["by_position"] = curve.to_dict()
        curves[f"{ckpt.parent.name}/{ckpt.name} ({model.config.family})"] = (curve, trained)
    if tasks:
        adapter = HarnessAdapter(model, tokenizer, window=window, batch_size=args.batch_size,
                                 show_progress=not args.no_progress)
        try:
            out = run_tasks(adapter, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                            include_path=args.include_path)
        except ValueError as err:                 # an unknown task
            raise UsageError(str(err)) from None
        result["tasks"] = json.loads(json.dumps(out["results"], default=str))
    del model
    return result


def print_result(result: dict, corpus, out=None) -> None:
    out = sys.stdout if out is None else out
    print(f"{result['checkpoint']} ({result['family']}, {result['parameters'] / 1e6:.2f}M parameters)", file=out)
    how = (f"full context, passes of {result['window']} tokens" if result["stride"] is None else
           f"sliding windows of {result['window']} tokens, stride {result['stride']}")
    if "corpus" in result:
        c = result["corpus"]
        print(f"  {corpus.label}: {c['documents']} documents, {c['tokens']:,} tokens, {c['bytes']:,} bytes ({how})",
              file=out)
        print(f"  loss {c['loss']:.4f}   perplexity {c['perplexity']:.2f}   bits per byte {c['bits_per_byte']:.4f}"
              f"   bits per token {c['bits_per_token']:.4f}", file=out)
    if "by_position" in result:
        b = result["by_position"]
        cells = ", ".join(f"{lo}-{hi - 1}: {v:.3f}" for lo, hi, v in zip(b["edges"][:-1], b["edges"][1:], b["loss"]))
        print(f"  loss by position over {b['documents']} documents of >= {b['length']:,} tokens: {cells}", file=out)
    for task, metrics in result.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"  {task}: {shown}", file=out)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tasks = check_args(args)
        device, _ = resolve_device(args.device)
        dtype = DTYPES[args.dtype]
        corpus = None
        if not args.skip_corpus:
            try:
                corpus = read_corpus(args.data_dir, args.hf_dataset, args.text_field, args.max_documents,
                                     show_progress=not args.no_progress)
            except DataError as err:
                raise UsageError(str(err)) from None
        results, curves = [], {}
        for path in args.checkpoint:
            results.append(evaluate_one(path, args, tasks, corpus, device, dtype, curves))
            if not args.json:
                print_result(results[-1], corpus)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except UsageError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    if curves:
        trained = next((t for _, t in curves.values() if t is not None), None)
        plot_by_position({name: c for name, (c, _) in curves.items()}, args.plot, trained_length=trained,
                         title=f"Loss by position, {corpus.label} corpus")
        if not args.json:
            print(f"loss by position: {args.plot}")
    if args.json:
        summary = {"corpus": None if corpus is None else {"source": corpus.label, "documents": len(corpus.documents),
                                                          "skipped": corpus.skipped},
                   "results": results}
        if curves:
            summary["plot"] = str(args.plot)
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
