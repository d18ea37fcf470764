"""Quality comparison at equal parameters and equal tokens: Mamba-1, a transformer, ~1:7 hybrids, Mamba-2.

Every arm gets the same tokenizer, data order (one BatchSampler seed), sequence length, batch, learning-rate schedule
and token budget; only the layer pattern (and the transformer's MLP width, to match parameters) differs. Arms
(d_model 512, all within 5% of each other in total and in non-embedding parameters; `--check` prints them):

    mamba1        "M" x 24                         Mamba-1 (models/layers/mamba1.py)
    transformer   "T" x 12, d_ff 1536              Transformer++ (RoPE, RMSNorm, SwiGLU), 8 heads of 64
    hybrid        25 layers, A at 4, 12, 20        ~1:7 attention : Mamba-1 (attention neither first nor last)
    mamba2        "2" x 24                         Mamba-2 (models/layers/mamba2.py), headdim 64, d_state 128
    hybrid2       25 layers, A at 4, 12, 20        ~1:7 attention : Mamba-2
    hybrid-seed2  hybrid with init seed 2          the spread between two seeds of one arm (same data order)

The corpus (`prepare`): every *.py file under the directories `python3 -m site` lists for the running interpreter
(site.getsitepackages() + site.getusersitepackages()), read as UTF-8 (files that are not are skipped), files over
1 MB skipped, duplicates by content (SHA-1) kept once, ordered by that SHA-1 (a fixed shuffle across packages) and
taken until --corpus_mb; written as ~8 MB text shards (each file preceded by a "# file: <path>" line) into
<out>/corpus/, with corpus.json listing the site directories, the file count, the bytes and a SHA-256 over the
sorted (path, sha1) list. The project's own pipeline (utils/dataset.py) then trains one byte-level BPE on it
(--vocab_size) and splits it 99:1 into train / validation.

Stages (each resumable; results go to <out>/; a stage that finds its output done skips it):
    python bench/compare_quality.py prepare            # corpus + tokenizer + shards (CPU work)
    python bench/compare_quality.py plan               # measures each arm's tokens/s, fixes the token budget
    python bench/compare_quality.py run [--arms a,b]   # trains the arms not done yet (stops before --deadline_min)
    python bench/compare_quality.py report             # results.json, val_loss.png, a Markdown table
    python bench/compare_quality.py all                # all four in one go
The plan sizes the run: tokens per arm = what the slowest arm trains in the time left of --minutes (default 20)
after preparation and planning, shared by all arms; the budget is then identical for every arm.
`--smoke` runs everything at toy sizes on the CPU (tests and a quick check of the script).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import site
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.hybrid import spaced  # noqa: E402
from models import HybridConfig, build_model  # noqa: E402

WIDTH, HEADS = 512, 8


def arms(depth: int = 24) -> dict:
    """The arms at `depth` Mamba layers (24; --smoke: 4)."""
    return {
        "mamba1":       dict(pattern="M" * depth),
        "transformer":  dict(pattern="T" * (depth // 2), d_ff=1536),
        "hybrid":       dict(pattern=spaced(depth + 1, "M")),
        "mamba2":       dict(pattern="2" * depth),
        "hybrid2":      dict(pattern=spaced(depth + 1, "2")),
        "hybrid-seed2": dict(pattern=spaced(depth + 1, "M"), seed=2),
    }


ARMS = arms()
MAMBA2 = dict(d_state=128, headdim=64)
SMOKE = dict(width=32, heads=4, depth=4, mamba2=dict(d_state=16, headdim=16, chunk_size=16))


def arm_config(name: str, vocab_size: int, smoke: bool = False) -> HybridConfig:
    spec = {k: v for k, v in (arms(SMOKE["depth"]) if smoke else ARMS)[name].items() if k != "seed"}
    width, heads, m2 = (SMOKE["width"], SMOKE["heads"], SMOKE["mamba2"]) if smoke else (WIDTH, HEADS, MAMBA2)
    if smoke and "d_ff" in spec:
        spec["d_ff"] = 96
    return HybridConfig(d_model=width, n_layer=len(spec["pattern"]), vocab_size=vocab_size, n_heads=heads,
                        mamba2=m2, **spec)


def counts(config: HybridConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters; the tied embedding/head counted once, as embedding."""
    with torch.device("meta"):
        total = build_model(config).num_parameters()
    return total, total - config.padded_vocab_size * config.d_model


def check_counts(vocab_size: int, smoke: bool = False, log=print) -> dict:
    rows = {name: counts(arm_config(name, vocab_size, smoke)) for name in ARMS}
    ref_total, ref_non = rows["mamba1"]
    for name, (total, non) in rows.items():
        log(f"{name:13s} {arm_config(name, vocab_size, smoke).pattern:26s} total {total:>12,}  non-embedding "
            f"{non:>12,}  ({100 * (non / ref_non - 1):+.1f}% non-emb, {100 * (total / ref_total - 1):+.1f}% total "
            f"vs mamba1)")
    spread = max(n for _, n in rows.values()) / min(n for _, n in rows.values()) - 1
    if not smoke and spread > 0.05:
        raise SystemExit(f"arms differ by {spread:.1%} in non-embedding parameters (> 5%)")
    return rows


# ---- stage 1: the corpus ---------------------------------------------------------------------------------------------

def gather_corpus(out: Path, corpus_mb: float, log=print) -> Path:
    corpus = out / "corpus"
    if (corpus / "corpus.json").is_file():
        log(f"corpus: reusing {corpus}")
        return corpus
    dirs = [d for d in dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()]) if Path(d).is_dir()]
    seen, files = set(), []
    for root in dirs:
        for path in sorted(Path(root).rglob("*.py")):
            try:
                if not path.is_file() or path.stat().st_size > 1 << 20:
                    continue
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha1(text.encode()).hexdigest()
            if digest not in seen and text.strip():
                seen.add(digest)
                files.append((digest, str(path), text))
    files.sort()
    corpus.mkdir(parents=True, exist_ok=True)
    limit, used, shard, chosen, buf = corpus_mb * 2**20, 0, 0, [], []
    for digest, path, text in files:
        if used >= limit:
            break
        buf.append(f"# file: {path}\n{text}\n")
        chosen.append((path, digest))
        used += len(text.encode())
        if sum(map(len, buf)) > 8 * 2**20:
            (corpus / f"shard_{shard:04d}.py.txt").write_text("".join(buf))
            shard, buf = shard + 1, []
    if buf:
        (corpus / f"shard_{shard:04d}.py.txt").write_text("".join(buf))
    listing = hashlib.sha256("\n".join(f"{p}\t{d}" for p, d in sorted(chosen)).encode()).hexdigest()
    info = {"site_dirs": dirs, "python": sys.version, "files_found": len(files), "files_used": len(chosen),
            "bytes_used": used, "sha256_of_sorted_path_sha1_list": listing, "max_file_bytes": 1 << 20,
            "order": "sha1 of content", "corpus_mb": corpus_mb}
    (corpus / "corpus.json").write_text(json.dumps(info, indent=2))
    log(f"corpus: {len(chosen):,} of {len(files):,} distinct .py files, {used / 2**20:.1f} MB from {dirs}")
    return corpus


def prepare(args, log=print):
    from utils.dataset import prepare_dataset
    corpus = gather_corpus(args.out, args.corpus_mb, log)
    return prepare_dataset(data_dir=corpus, vocab_size=args.vocab_size, val_fraction=0.01,
                           cache_dir=args.out / "prepared", show_progress=False, log=log)


# ---- training one arm -----------------------------------------------------------------------------------------------

def device_and_dtype(smoke: bool):
    if torch.cuda.is_available() and not smoke:
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None


@torch.no_grad()
def evaluate(model, data, args, device, dtype) -> float:
    from utils.sampler import eval_batches
    model.eval()
    total, n = 0.0, 0
    for x, y in eval_batches(data.val_tokens, args.seq_len, args.batch_size, args.eval_batches):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = model(x, targets=y, return_logits=False)
        total, n = total + loss.item() * y.numel(), n + y.numel()
    model.train()
    return total / n


def train_arm(name: str, data, args, steps: int, evals: int = 0, log=print) -> dict:
    """Train arm `name` for `steps` optimizer steps; evaluate `evals` times evenly (and at the end)."""
    from training.optim import build_optimizer, lr_at
    from utils.sampler import BatchSampler
    device, dtype = device_and_dtype(args.smoke)
    config = arm_config(name, data.tokenizer.vocab_size, args.smoke)
    torch.manual_seed(ARMS[name].get("seed", 1))
    model = build_model(config).to(device).train()
    optimizer, _ = build_optimizer(model, args.lr, 0.1, (0.9, 0.95), device)
    sampler = BatchSampler(data.train_tokens, args.seq_len, args.batch_size, seed=args.data_seed)
    warmup = max(1, steps // 20)
    eval_at = {round(steps * (i + 1) / evals) for i in range(evals)} if evals else set()
    curve, train_time, tokens = [], 0.0, 0
    start = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, warmup, steps, 0.1)
        x, y = sampler.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = model(x, targets=y, return_logits=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:                   # the first steps compile kernels: not counted in tokens/s
            train_time += time.perf_counter() - t0
        tokens += x.numel()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"{name}: non-finite loss at step {step}")
        if step + 1 in eval_at:
            val = evaluate(model, data, args, device, dtype)
            curve.append({"step": step + 1, "tokens": tokens, "val_loss": val, "train_loss": loss.item(),
                          "elapsed_s": time.perf_counter() - start})
            log(f"{name}: step {step + 1}/{steps}, {tokens:,} tokens, train {loss.item():.4f}, val {val:.4f}")
    total, non_emb = counts(config)
    counted = max(1, steps - 2) * args.batch_size * args.seq_len
    return {"arm": name, "pattern": config.pattern, "params_total": total, "params_non_embedding": non_emb,
            "seed": ARMS[name].get("seed", 1), "steps": steps, "tokens": tokens, "curve": curve,
            "final_val_loss": curve[-1]["val_loss"] if curve else None,
            "final_val_ppl": math.exp(curve[-1]["val_loss"]) if curve else None,
            "tokens_per_s": counted / max(train_time, 1e-9), "wall_s": time.perf_counter() - start,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


# ---- stages ---------------------------------------------------------------------------------------------------------

def plan(args, data, log=print) -> dict:
    file = args.out / "plan.json"
    if file.is_file():
        return json.loads(file.read_text())
    speeds = {}
    for name in ARMS:
        if name.endswith("seed2"):
            continue
        r = train_arm(name, data, args, steps=args.probe_steps, log=log)
        speeds[name] = r["tokens_per_s"]
        log(f"plan: {name} {speeds[name]:,.0f} tokens/s")
    left = args.minutes * 60 - (time.time() - args.started) - 60 * len(ARMS) * 0.1      # evals and start-ups
    seconds_per_token = sum(1 / speeds[n.removesuffix("-seed2")] for n in ARMS)
    tokens_per_step = args.batch_size * args.seq_len
    steps = max(10, int(left / seconds_per_token / tokens_per_step)) if args.steps is None else args.steps
    result = {"steps": steps, "tokens_per_arm": steps * tokens_per_step, "tokens_per_s": speeds,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "minutes": args.minutes}
    file.write_text(json.dumps(result, indent=2))
    log(f"plan: {steps} steps x {tokens_per_step:,} tokens = {steps * tokens_per_step:,} tokens per arm")
    return result


def run(args, data, the_plan, log=print):
    (args.out / "arms").mkdir(exist_ok=True)
    arms = args.arms.split(",") if args.arms else list(ARMS)
    for name in arms:
        file = args.out / "arms" / f"{name}.json"
        if file.is_file():
            continue
        expect = the_plan["steps"] * args.batch_size * args.seq_len / the_plan["tokens_per_s"][
            name.removesuffix("-seed2")]
        if args.deadline_min and time.time() - args.started + expect > args.deadline_min * 60:
            log(f"run: {name} (~{expect:.0f} s) would pass --deadline_min {args.deadline_min}; run again to go on")
            return False
        result = train_arm(name, data, args, the_plan["steps"], evals=args.evals, log=log)
        file.write_text(json.dumps(result, indent=2))
    return True


def report(args, log=print) -> dict:
    results = {name: json.loads((args.out / "arms" / f"{name}.json").read_text()) for name in ARMS
               if (args.out / "arms" / f"{name}.json").is_file()}
    corpus = json.loads((args.out / "corpus" / "corpus.json").read_text())
    summary = {"corpus": corpus, "plan": json.loads((args.out / "plan.json").read_text()), "arms": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    lines = ["| arm | pattern | params (total / non-emb) | tokens | val loss | ppl | tokens/s | wall |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | `{r['pattern']}` | {r['params_total'] / 1e6:.1f}M / "
                     f"{r['params_non_embedding'] / 1e6:.1f}M | {r['tokens'] / 1e6:.1f}M | {r['final_val_loss']:.4f} | "
                     f"{r['final_val_ppl']:.2f} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} s |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ax.plot([c["tokens"] / 1e6 for c in r["curve"]], [c["val_loss"] for c in r["curve"]], marker=".",
                label=f"{name} ({r['params_non_embedding'] / 1e6:.1f}M)")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("equal parameters, tokens, data order and schedule")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "val_loss.png", dpi=120)
    plt.close(fig)
    log(table)
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["check", "prepare", "plan", "run", "report", "all"])
    p.add_argument("--out", type=Path, default=Path("bench/results/compare_quality"))
    p.add_argument("--minutes", type=float, default=20.0, help="the whole comparison's time budget (plan)")
    p.add_argument("--deadline_min", type=float, default=None, help="`run` stops before an arm would pass this "
                   "many minutes since the command started (e.g. 9 under a 10-minute limit per command)")
    p.add_argument("--corpus_mb", type=float, default=300.0)
    p.add_argument("--vocab_size", type=int, default=16384)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--data_seed", type=int, default=1234)
    p.add_argument("--probe_steps", type=int, default=12)
    p.add_argument("--steps", type=int, default=None, help="fix the steps per arm instead of planning them")
    p.add_argument("--evals", type=int, default=10, help="validation points per arm")
    p.add_argument("--eval_batches", type=int, default=16)
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    args = p.parse_args(argv)
    args.started = time.time()
    if args.smoke:
        args.corpus_mb = min(args.corpus_mb, 1.0)
        args.vocab_size, args.seq_len, args.batch_size, args.probe_steps = 512, 64, 4, 3
        args.eval_batches = 2
        if args.steps is None:          # a quick check: not the 20-minute plan of --minutes
            args.steps = 20
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "check":
        check_counts(args.vocab_size, args.smoke)
        return 0
    data = prepare(args) if args.stage != "report" else None
    if args.stage in ("check", "prepare"):
        check_counts(data.tokenizer.vocab_size, args.smoke)
        return 0
    if args.stage in ("plan", "run", "all"):
        the_plan = plan(args, data)
        if args.stage == "plan":
            return 0
        if not run(args, data, the_plan):
            return 3                     # stopped before the deadline: run again
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
