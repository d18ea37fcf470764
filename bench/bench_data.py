"""Data pipeline benchmarks: tokenisation throughput, preparing the built-in corpus, streaming memory.

    python bench/bench_data.py throughput     # tokens/s on plain text (the built-in corpus), three ways
    python bench/bench_data.py prepare        # time to prepare the built-in corpus (in memory and streaming)
    python bench/bench_data.py memory         # peak RSS, streaming vs in-memory, on a corpus > the memory budget

throughput: a BPE of DEFAULT_VOCAB_SIZE is trained on the built-in corpus, then the same pieces are tokenised
  with Tokenizer.encode_batch (what the pipeline uses: tokenizers' encode_batch_fast, all cores), with
  tokenizers' encode_batch (offsets computed too), and one text at a time; median of --repeat runs, side by side.
prepare: prepare_dataset(force=True) on the built-in corpus, wall time (BPE training included), each loader.
memory: writes --corpus_mb of text files, then runs each loader in a fresh process with memory_budget
  --budget_mb and reports its peak RSS (ru_maxrss) next to the RSS of the same process before preparing.
  A tokenizer trained beforehand is passed in, so the figures are about reading and tokenising.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.model_sizes import DEFAULT_VOCAB_SIZE  # noqa: E402
from utils.dataset import DirSource, builtin_corpus_root, prepare_dataset  # noqa: E402
from utils.tokenizer import Tokenizer  # noqa: E402


def builtin_pieces() -> list[str]:
    src = DirSource(builtin_corpus_root(), builtin=True)
    pieces = []
    for rec, it, _ in src.documents():
        if it is not None:
            pieces.extend(it)
    return pieces


def throughput(args):
    pieces = builtin_pieces()
    chars = sum(map(len, pieces))
    t0 = time.perf_counter()
    tok = Tokenizer.train(pieces, DEFAULT_VOCAB_SIZE)
    train_s = time.perf_counter() - t0
    n_tokens = sum(map(len, tok.encode_batch(pieces)))
    ways = {
        "Tokenizer.encode_batch (encode_batch_fast)": lambda: tok.encode_batch(pieces),
        "tokenizers encode_batch (with offsets)": lambda: tok.backend.encode_batch(pieces, add_special_tokens=False),
        "one text at a time (Tokenizer.encode)": lambda: [tok.encode(p) for p in pieces],
    }
    print(f"load average (1/5/15 min) at the start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"built-in corpus: {len(pieces)} pieces, {chars / 1e6:.1f} M chars, {n_tokens / 1e6:.2f} M tokens; "
          f"BPE training ({DEFAULT_VOCAB_SIZE}) {train_s:.1f} s; {os.cpu_count()} CPUs")
    # Rounds interleave the three ways, so a burst of load from other processes hits them alike.
    times = {name: [] for name in ways}
    cpu = {name: [] for name in ways}
    for _ in range(args.repeat):
        for name, fn in ways.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    base = None
    for name in ways:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        base = base or med
        print(f"{name:<45} {med:7.2f} s  {n_tokens / med / 1e6:6.2f} M tokens/s  {med / base:5.2f}x the time  "
              f"(CPU {med_cpu:.2f} s: {n_tokens / med_cpu / 1e6:.2f} M tokens per CPU-second)")
    print(f"load average (1/5/15 min) at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def prepare(args):
    print(f"load average (1/5/15 min) at the start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        for streaming in (False, True):
            t = time.perf_counter()
            data = prepare_dataset(cache_dir=tmp, streaming=streaming, force=True, show_progress=False,
                                   log=lambda s: None)
            dt = time.perf_counter() - t
            tot = data.totals
            again = time.perf_counter()
            assert prepare_dataset(cache_dir=tmp, streaming=streaming, show_progress=False, log=lambda s: None).reused
            again = time.perf_counter() - again
            print(f"built-in corpus, {'streaming' if streaming else 'in-memory'}: {dt:.1f} s (reused: {again:.2f} s) for "
                  f"{tot['loaded']} files, {tot['chars'] / 1e6:.1f} M chars, {tot['tokens'] / 1e6:.2f} M tokens "
                  f"({tot['tokens'] / dt / 1e6:.2f} M tokens/s end to end, BPE training included)")


def _status_kb(field: str) -> int:
    """VmRSS / VmHWM (peak RSS) of this process in kB. Not ru_maxrss: on Linux that survives fork+exec and
    would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _child(corpus: str, cache: str, tok_dir: str, streaming: bool, budget: int):
    """Runs in a fresh process: prepares and prints JSON with RSS before and peak RSS."""
    tok = Tokenizer.load(tok_dir)
    before = _status_kb("VmRSS")
    t = time.perf_counter()
    data = prepare_dataset(corpus, tokenizer=tok, cache_dir=cache, streaming=streaming, force=True,
                           memory_budget=budget, show_progress=False, log=lambda s: None)
    print(json.dumps({"seconds": time.perf_counter() - t, "rss_before_kb": before, "tokens": data.totals["tokens"],
                      "peak_kb": _status_kb("VmHWM")}))


def memory(args):
    src_pieces = builtin_pieces()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        text = "".join(src_pieces)
        written, i = 0, 0
        while written < args.corpus_mb * 2**20:       # copies of the built-in corpus text, 8 MB per file
            start = (i * 7_919_000) % max(1, len(text) - 8_000_000)
            chunk = text[start:start + 8_000_000]
            (corpus / f"part{i:03d}.txt").write_text(chunk)
            written += len(chunk.encode())
            i += 1
        tok = Tokenizer.train(src_pieces, DEFAULT_VOCAB_SIZE)
        tok.save(Path(tmp) / "tok")
        del text, src_pieces
        print(f"corpus: {i} files, {written / 2**20:.0f} MiB; memory budget {args.budget_mb} MiB "
              "(larger corpora stream)")
        runs = [(True, corpus), (False, corpus)]
        if args.small_too:       # the same streaming run on a quarter of the files: the peak should not move
            small = Path(tmp) / "small"
            small.mkdir()
            for f in sorted(corpus.iterdir())[: max(1, i // 4)]:
                shutil.copy(f, small / f.name)
            runs.insert(0, (True, small))
        for streaming, folder in runs:
            cmd = [sys.executable, __file__, "_child", str(folder), str(Path(tmp) / "cache"), str(Path(tmp) / "tok"),
                   "1" if streaming else "0", str(args.budget_mb * 2**20)]
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            mib = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            print(f"{'streaming' if streaming else 'in-memory':<10} {mib:5.0f} MiB corpus: "
                  f"peak RSS {out['peak_kb'] / 1024:6.0f} MiB "
                  f"(process before preparing: {out['rss_before_kb'] / 1024:.0f} MiB; "
                  f"+{(out['peak_kb'] - out['rss_before_kb']) / 1024:.0f} MiB), {out['seconds']:.1f} s, "
                  f"{out['tokens'] / 1e6:.1f} M tokens, {out['tokens'] / out['seconds'] / 1e6:.2f} M tokens/s")
            shutil.rmtree(Path(tmp) / "cache", ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1", int(sys.argv[6]))
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("throughput", "prepare", "memory"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--corpus_mb", type=int, default=256)
    p.add_argument("--budget_mb", type=int, default=64)
    p.add_argument("--small_too", action="store_true", help="also stream a quarter of the corpus (memory)")
    args = p.parse_args()
    {"throughput": throughput, "prepare": prepare, "memory": memory}[args.what](args)
