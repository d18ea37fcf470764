"""EleutherAI's lm-evaluation-harness (`pip install lm-eval`, optional) on this project's models.

HarnessAdapter answers the harness's three request types on a model and tokenizer of any family, with no
lm_eval import (tests drive it directly):

    loglikelihood          (context, continuation) -> (log p(continuation | context), whether it is the greedy one)
    loglikelihood_rolling  (text,)                  -> log p(text), every token scored after an end-of-text token
    generate_until         (context, gen_kwargs)    -> the continuation, cut before the first of gen_kwargs["until"]

Likelihoods are full-context scores (evaluation/scoring.py: a parallel pass, then the recurrent state carried);
generation is the project's decoder (batched, left-padded prompts, a CUDA graph per step on a GPU). Context and
continuation are tokenised as the harness's own HF backend does (the whole string, then split where the context's
tokens end, trailing spaces of the context moved to the continuation), so that the same weights give the same
numbers.

`harness_lm_class()` imports lm_eval and registers the adapter as the harness model "mamba_trainer", so that

    python -m evaluation.harness --model mamba_trainer --model_args checkpoint=DIR --tasks lambada_openai

is the harness's own command line with our models in it (evaluate.py --tasks calls the harness the same way).
"""
from __future__ import annotations

import functools
import json
import sys
from typing import Sequence

import torch
from tqdm import tqdm

from inference import Decoder, generate_text
from models.sampling import SamplingParams

from .scoring import Scorer

MODEL_NAME = "mamba_trainer"
DEFAULT_MAX_GEN_TOKS = 256          # the harness's default for generate_until
LENGTH_STEP = 256                   # decoders are built for lengths rounded up to this, to be reused
INSTALL_HINT = "pip install lm-eval"


class HarnessMissing(RuntimeError):
    """lm_eval cannot be imported; the message says how to install it."""


class HarnessAdapter:
    """The harness's request types on a model (eval mode) and its tokenizer (utils.tokenizer.Tokenizer).

    Args:
        window: tokens per parallel pass when scoring (longer inputs continue step by step, full context)
        batch_size: rows per pass and prompts per generation batch
        seed: for generate_until requests that sample (do_sample)
    """

    def __init__(self, model, tokenizer, window: int = 2048, batch_size: int = 8, seed: int = 1234,
                 show_progress: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.show_progress = batch_size, show_progress
        self.scorer = Scorer(model, window=window, batch_size=batch_size, show_progress=show_progress)
        self.device = model.lm_head.weight.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._decoders: dict[int, Decoder] = {}

    # ---- tokenisation ----------------------------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) as the harness's HF backend splits them; an empty context is the
        end-of-text token."""
        if context == "":
            return [self.tokenizer.eot_id], self.tokenizer.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return ctx, whole[len(ctx):]

    # ---- the three request types -----------------------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*r.args) for r in requests]
        scored = [i for i, (ctx, cont) in enumerate(pairs) if cont]
        scores = self.scorer.score([pairs[i][0] + pairs[i][1] for i in scored])
        out = [(0.0, True)] * len(pairs)                        # an empty continuation: probability 1
        for i, s in zip(scored, scores):
            n = len(pairs[i][1])
            out[i] = (-float(s.nll[-n:].sum()), bool(s.greedy[-n:].all()))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        docs = [[self.tokenizer.eot_id, *self.tokenizer.encode(r.args[0])] for r in requests]
        scored = [i for i, d in enumerate(docs) if len(d) > 1]
        scores = self.scorer.score([docs[i] for i in scored])
        out = [0.0] * len(docs)
        for i, s in zip(scored, scores):
            out[i] = -float(s.nll.sum())
        return out

    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}                       # requests with the same settings share batches
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="generating", unit="req", file=sys.stderr, leave=False,
                   disable=not self.show_progress)
        for key, idx in groups.items():
            kwargs = dict(requests[idx[0]].args[1])
            until, max_new, params = self._generation_settings(kwargs)
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start:start + self.batch_size]
                prompts = [self.tokenizer.encode(requests[i].args[0]) or [self.tokenizer.eot_id] for i in batch]
                decoder = self._decoder(len(batch), max(map(len, prompts)) + max_new)
                texts, _ = generate_text(decoder, self.tokenizer, prompts, max_new, params, self.generator, until)
                for i, text in zip(batch, texts):
                    out[i] = text
                bar.update(len(batch))
        bar.close()
        return out

    # ---- helpers ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _generation_settings(kwargs: dict) -> tuple[list[str], int, SamplingParams]:
        """(stop strings, max new tokens, sampling) from a request's gen_kwargs; ValueError on a bad one."""
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        top_p, top_k = kwargs.pop("top_p", None), kwargs.pop("top_k", None)
        if not do_sample:
            temperature, top_p, top_k = 0.0, None, None
        return [s for s in until if s], max_new, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)

    def _decoder(self, batch_size: int, length: int) -> Decoder:
        held = self._decoders.get(batch_size)
        if held is None or held.max_length < length:
            self._decoders.clear()                              # one captured graph at a time
            self._decoders[batch_size] = Decoder(self.model, batch_size,
                                                 max_length=-(-length // LENGTH_STEP) * LENGTH_STEP)
        return self._decoders[batch_size]


# ---- lm_eval ---------------------------------------------------------------------------------------------------------

def import_lm_eval():
    """The lm_eval package; HarnessMissing (with the install command) when it is not installed."""
    try:
        import lm_eval
    except ImportError as err:
        raise HarnessMissing(f"the lm-evaluation-harness is not installed ({err}); install it with "
                             f"`{INSTALL_HINT}`") from None
    return lm_eval


@functools.cache
def harness_lm_class():
    """The lm_eval model class "mamba_trainer" (registered once): HarnessAdapter behind the harness's LM interface.
    Its model_args: checkpoint (a folder, as evaluate.py --checkpoint), dtype (float32), window (2048)."""
    import_lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    @register_model(MODEL_NAME)
    class MambaTrainerLM(LM):
        def __init__(self, checkpoint: str = "checkpoints", device: str | None = None, batch_size=8,
                     max_batch_size=None, dtype: str = "float32", window=2048, adapter: HarnessAdapter | None = None):
            super().__init__()
            if adapter is None:
                from inference.loading import DTYPES, load_for_inference, resolve_device
                dev, _ = resolve_device(device or "auto")
                model, tokenizer, _ = load_for_inference(checkpoint, dev, DTYPES[dtype])
                size = int(batch_size) if str(batch_size).isdigit() else 8       # "auto": a fixed 8
                adapter = HarnessAdapter(model, tokenizer, window=int(window), batch_size=size, show_progress=True)
            self.adapter = adapter

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.adapter.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.adapter.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.adapter.generate_until(requests)

    return MambaTrainerLM


def task_manager(tasks: Sequence[str], include_path: str | None = None, include_label: str = "--include_path"):
    """The harness's TaskManager (its own tasks and those under include_path), once it is known to hold every one of
    `tasks`: built once, it indexes thousands of task files.

    Raises:
        HarnessMissing: lm_eval is not installed
        ValueError: a task the harness does not know (the message names it)
    """
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"the harness does not know the task(s) {', '.join(unknown)}"
                         + (f" (nor does {include_label} {include_path!r})" if include_path else "")
                         + "; `lm_eval ls tasks` lists them")
    return manager


def run_tasks(adapter: HarnessAdapter, tasks: Sequence[str], num_fewshot: int | None = None, limit: float | None = None,
              include_path: str | None = None, manager=None) -> dict:
    """Run harness tasks on an adapter; returns the harness's results dict (its "results" key: metrics per task).
    `manager`: a task_manager(tasks, ...) built before (else one is built here, from include_path).

    Raises:
        HarnessMissing: lm_eval is not installed
        ValueError: a task the harness does not know (the message names it)
    """
    if manager is None:
        manager = task_manager(tasks, include_path)
    from lm_eval import simple_evaluate

    lm = harness_lm_class()(adapter=adapter)
    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager)


def main(argv=None) -> int:
    """The harness's command line with the model "mamba_trainer" registered."""
    try:
        harness_lm_class()
    except HarnessMissing as err:
        print(f"evaluation.harness: error: {err}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
