"""The evaluations the Trainer runs beside its validation loss, at every evaluation (eval_interval, and the end):

  eval_data   a second corpus, scored as evaluate.py scores one (evaluation/): loss, perplexity and bits per byte
              of whole documents with full context, at most eval_tokens tokens (the longest documents cut to an
              equal share). The same numbers as `python evaluate.py --checkpoint STEP_DIR --data_dir D --max_tokens N
              --batch_size B` on the checkpoint of that step (describe() prints the command).
  eval_tasks  lm-evaluation-harness tasks (evaluation/harness.py; `pip install lm-eval`), eval_task_limit examples
              of each; the project's own tasks in evaluation/tasks/ are known besides the harness's.

What a user can get wrong (a corpus that does not exist or holds no text, lm-eval not installed, a task the
harness does not know or cannot load) is found at start-up by read_sources, before the first step: ConfigError,
exit code 2.

An evaluation changes nothing of the run: the model is scored in fp32 without autocast (evaluate.py's default
--dtype float32), put back in train mode, and every random number generator is restored afterwards (the harness
seeds them), so an exact resume stays exact. Under DDP the corpus's documents are shared out between the ranks and
their losses summed; every rank runs the harness tasks itself (the same work at the same time, so no rank waits on
another past a collective's timeout) and rank 0 logs.

The metrics.jsonl keys, in the evaluation row beside val_loss:
    eval_loss, eval_ppl, eval_bits_per_byte     the corpus's mean loss per token (nats), perplexity, bits per byte
    <task>/<metric>                             each task's metrics as the harness names them (lambada_openai/acc,
                                                lambada_openai/perplexity; a filter other than "none" is appended:
                                                gsm8k/exact_match_strict-match); no stderr
"""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluation.corpus import Corpus, read_corpus
from evaluation.harness import HarnessAdapter, HarnessMissing, run_tasks, task_manager
from evaluation.perplexity import FULL_CONTEXT_PASS, cap_tokens, corpus_score, scorable
from evaluation.scoring import Scorer, total_nll
from utils.errors import DataError

from . import distributed as dist_utils
from .checkpoint import capture_rng_state, restore_rng_state
from .config import ConfigError, TrainConfig, eval_task_names
from .distributed import DistInfo

BUILTIN = "builtin"               # eval_data: the built-in corpus
HF_PREFIX = "hf:"                 # eval_data: an HF dataset (name or local path) after this
CORPUS_DOCUMENTS = 100            # documents read, spread evenly over the corpus (evaluate.py's --max_documents)
PROJECT_TASKS = Path(__file__).resolve().parents[1] / "evaluation" / "tasks"


@dataclass
class EvalSources:
    """What eval_data and eval_tasks name, read and checked (before the tokenizer is known)."""
    corpus: Corpus | None
    corpus_flags: str             # the corpus as evaluate.py's flags ("" for the built-in corpus)
    tasks: list[str]
    manager: object | None        # the harness's TaskManager, holding every task of `tasks`


def read_sources(cfg: TrainConfig, show_progress: bool = False) -> EvalSources | None:
    """The corpus and harness tasks cfg asks to evaluate at each evaluation, or None when it asks for neither.

    Raises:
        ConfigError: eval_data missing or without readable text; eval_tasks without lm-eval, or naming a task the
            harness does not know or cannot load
    """
    tasks = eval_task_names(cfg.eval_tasks)
    if cfg.eval_data is None and not tasks:
        return None
    corpus, flags = _read_corpus(cfg, show_progress) if cfg.eval_data is not None else (None, "")
    return EvalSources(corpus, flags, tasks, _task_manager(tasks) if tasks else None)


def _read_corpus(cfg: TrainConfig, show_progress: bool) -> tuple[Corpus, str]:
    value = cfg.eval_data.strip()
    data_dir = hf_dataset = None
    if value.startswith(HF_PREFIX):
        hf_dataset = value[len(HF_PREFIX):]
        flags = f"--hf_dataset {shlex.quote(hf_dataset)} --text_field {shlex.quote(cfg.text_field)}"
    elif value != BUILTIN:
        data_dir, flags = value, f"--data_dir {shlex.quote(value)}"
        if not Path(value).exists():
            raise ConfigError(f"eval_data {value!r} does not exist; give a folder or a file of documents, "
                              f"{BUILTIN} (the built-in corpus), or {HF_PREFIX}NAME_OR_PATH (an HF dataset)")
    else:
        flags = ""
    try:
        corpus = read_corpus(data_dir, hf_dataset, cfg.text_field, CORPUS_DOCUMENTS, show_progress=show_progress)
    except DataError as err:
        raise ConfigError(f"eval_data: {err}") from None
    return corpus, flags


def _task_manager(tasks: list[str]):
    """The harness's TaskManager once every task is known and its data loads: an unreachable dataset fails here,
    not at the first evaluation."""
    try:
        manager = task_manager(tasks, str(PROJECT_TASKS), include_label="evaluation/tasks/")
    except HarnessMissing as err:
        raise ConfigError(f"eval_tasks: {err} (or leave out --eval_tasks)") from None
    except ValueError as err:
        raise ConfigError(f"eval_tasks: {err}") from None
    from lm_eval.tasks import get_task_dict
    try:
        get_task_dict(tasks, manager)
    except Exception as err:    # the harness and HF datasets raise many types; all mean "this task cannot load"
        raise ConfigError(f"eval_tasks: the harness could not load {', '.join(tasks)} "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}); are "
                          f"its data sets reachable (downloaded once, or HF_DATASETS_OFFLINE unset)?") from None
    return manager


def task_metrics(results: dict) -> dict[str, float]:
    """{"<task>/<metric>": value} from the harness's results (its "results" key), without the stderrs."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or "_stderr" in key:
                continue
            metric, _, kind = key.partition(",")
            out[f"{task}/{metric if kind in ('', 'none') else metric + '_' + kind}"] = float(value)
    return out


class ExtraEvaluation:
    """The checked sources with the run's tokenizer: the corpus's documents cut and tokenised once.

    Args:
        sources: read_sources(cfg)
        tokenizer: the run's tokenizer
        max_tokens: cfg.eval_tokens
        batch_size: rows per pass (the run's micro_batch_size: a scored row holds no activations for backward,
            so a pass fits where a training pass fits)
        task_limit: examples per harness task (cfg.eval_task_limit; 0 = all)
    """

    def __init__(self, sources: EvalSources, tokenizer, max_tokens: int, batch_size: int, task_limit: int):
        self.sources, self.tokenizer = sources, tokenizer
        self.max_tokens, self.batch_size, self.task_limit = max_tokens, batch_size, task_limit
        self.docs: list[list[int]] = []
        if sources.corpus is not None:
            texts = cap_tokens(tokenizer, sources.corpus.documents, max_tokens)
            self.docs, texts = scorable(tokenizer, texts)
            if not self.docs:
                raise ConfigError(f"eval_data ({sources.corpus.label}) holds no text this run's tokenizer turns "
                                  f"into tokens; give another corpus")
            self.tokens = sum(len(d) - 1 for d in self.docs)
            self.bytes = sum(len(t.encode("utf-8")) for t in texts)

    def describe(self) -> list[str]:
        """The start-up lines."""
        lines = []
        if self.docs:
            lines.append(f"eval data    {self.sources.corpus.label}: {len(self.docs)} documents, {self.tokens:,} "
                         f"tokens ({self.bytes:,} bytes) scored at each evaluation; the same as `python evaluate.py "
                         f"--checkpoint STEP_DIR {self.sources.corpus_flags + ' ' if self.sources.corpus_flags else ''}"
                         f"--max_tokens {self.max_tokens} --batch_size {self.batch_size}`")
        if self.sources.tasks:
            lines.append(f"eval tasks   {', '.join(self.sources.tasks)} (lm-evaluation-harness, "
                         f"{self.task_limit or 'all'} examples each) at each evaluation")
        return lines

    def run(self, model, dist: DistInfo) -> dict[str, float]:
        """The metrics (see the module doc) of `model` (the unwrapped model, in train mode). Collective under DDP:
        call on every rank."""
        rng = capture_rng_state()
        was_training = model.training
        model.eval()
        try:
            row = self._score_corpus(model, dist) if self.docs else {}
            if self.sources.tasks:
                row.update(self._run_tasks(model))
        finally:
            model.train(was_training)
            restore_rng_state(rng)
        return row

    def _score_corpus(self, model, dist: DistInfo) -> dict[str, float]:
        scorer = Scorer(model, FULL_CONTEXT_PASS, None, self.batch_size)
        mine = self.docs[dist.rank::dist.world_size]                    # all of them in a single process
        nats = torch.tensor([total_nll(scorer.score(mine))], dtype=torch.float64, device=scorer.device)
        dist_utils.all_reduce_sum(nats)
        score = corpus_score(nats.item(), self.tokens, self.bytes, len(self.docs))
        return {"eval_loss": score.loss, "eval_ppl": score.perplexity, "eval_bits_per_byte": score.bits_per_byte}

    def _run_tasks(self, model) -> dict[str, float]:
        adapter = HarnessAdapter(model, self.tokenizer, window=FULL_CONTEXT_PASS, batch_size=self.batch_size)
        out = run_tasks(adapter, self.sources.tasks, limit=self.task_limit or None, manager=self.sources.manager)
        return task_metrics(out["results"])

    @staticmethod
    def summary(row: dict[str, float]) -> str:
        """A metrics row's figures for the log line: "eval bpb 1.9040 (loss 4.5290), lambada_openai/acc 0.3120"."""
        parts = []
        if "eval_bits_per_byte" in row:
            parts.append(f"eval bpb {row['eval_bits_per_byte']:.4f} (loss {row['eval_loss']:.4f})")
        parts += [f"{k} {v:.4f}" for k, v in row.items() if "/" in k and math.isfinite(v)]
        return ", ".join(parts)
