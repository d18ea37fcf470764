"""Rewards for learning from a signal (--task grpo): built-in functions, a user's function, or a reward model.

A reward function scores a batch of completions:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]      (one float per completion)

where `columns` holds every other field of the prompts JSONL as a list aligned with the completions (e.g. the
"answer" of each prompt), as TRL's reward functions receive them. `--reward` names one or several, comma-separated,
summed with `--reward_weights` (default 1 each):

    exact_match        1.0 when the completion's final answer equals the prompt's "answer" field, else 0.0. The
                       final answer is the text after the last "####" or "answer:" if there is one, else the last
                       number in the completion, else the whole completion; compared stripped, case-insensitively,
                       numbers as numbers ("12.0" == "12")
    regex              1.0 when re.search(--reward_regex, completion) matches, else 0.0 (anchor with ^...$ to make
                       the whole completion match)
    length             the completion's length in characters (give it a negative weight to penalise rambling)
    module:function    a Python function imported from a module on the path (the working directory included)
    model:PATH         a reward model trained with --task reward (training/scalar_head.py): its score of the
                       prompt and completion in the chat template

Anything a user's function does wrong (raises, returns the wrong count, a non-number, NaN or inf) is a RewardError
naming the function and what it returned; train.py reports it in one line with exit code 2 (the last checkpoint
is left as it was).
"""
from __future__ import annotations

import importlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import ConfigError

BUILTINS = ("exact_match", "regex", "length")


class RewardError(ConfigError):
    """A reward cannot be loaded or returned something unusable; the message says which and what."""


# ---- built-in rewards ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*(?:\.\d+)?")
_MARKER = re.compile(r"(?:####|answer\s*:)", re.IGNORECASE)


def final_answer(text: str) -> str:
    """The answer a completion ends on: after the last '####' / 'answer:', else its last number, else all of it."""
    markers = list(_MARKER.finditer(text))
    if markers:
        return text[markers[-1].end():].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def _normalise(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip().lower()
    try:
        value = float(answer.replace(",", ""))
    except ValueError:
        return answer
    return repr(value) if math.isfinite(value) else answer


def exact_match(prompts, completions, answer=None, **_) -> list[float]:
    """1.0 where the completion's final answer equals the "answer" field (see final_answer), else 0.0."""
    if answer is None:
        raise RewardError("reward exact_match needs an \"answer\" field on every line of the prompts file")
    return [float(_normalise(final_answer(c)) == _normalise(str(a))) for c, a in zip(completions, answer)]


def regex_reward(pattern: str) -> Callable:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ConfigError(f"reward_regex {pattern!r} is not a valid regular expression: {err}") from None

    def regex(prompts, completions, **_) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]
    return regex


def length(prompts, completions, **_) -> list[float]:
    """The completion's length in characters."""
    return [float(len(c)) for c in completions]


# ---- naming and loading -------------------------------------------------------------------------------------------

@dataclass
class Reward:
    name: str            # as logged: rewards/<name>/mean
    fn: Callable
    weight: float


def import_function(spec: str) -> Callable:
    """`module:function` -> the function; the working directory is importable. ConfigError when it cannot be."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward {spec!r}: write a Python function as module:function (e.g. my_rewards:score), "
                          f"or use a built-in: {', '.join(BUILTINS)}, or model:PATH")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as err:        # any error while importing the user's module is theirs to fix
        raise RewardError(f"reward {spec!r}: module {module_name!r} cannot be imported "
                          f"({type(err).__name__}: {_first_line(err)})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def parse_rewards(spec: str, weights: str | None = None, pattern: str | None = None,
                  load_model: Callable[[str], Callable] | None = None) -> list[Reward]:
    """The rewards named by --reward (comma-separated) with their --reward_weights.

    Args:
        load_model: PATH -> a reward function scoring with that reward model (for model:PATH)
    Raises:
        ConfigError (RewardError) naming the first spec that cannot be used
    """
    names = [s.strip() for s in spec.split(",")]
    if not all(names):
        raise ConfigError(f"reward {spec!r} has an empty name; give names separated by commas, e.g. exact_match,length")
    if weights is None:
        values = [1.0] * len(names)
    else:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise ConfigError(f"reward_weights {weights!r} must be numbers separated by commas") from None
        if len(values) != len(names) or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"reward_weights {weights!r} must be {len(names)} finite number(s), one per reward "
                              f"in {spec!r}")
    rewards = []
    for name, weight in zip(names, values):
        if name == "exact_match":
            fn = exact_match
        elif name == "length":
            fn = length
        elif name == "regex":
            if pattern is None:
                raise ConfigError("reward regex needs --reward_regex PATTERN (the expression completions must match)")
            fn = regex_reward(pattern)
        elif name.startswith("model:"):
            if load_model is None:
                raise ConfigError(f"reward {name!r}: a reward model is not available here")
            fn = load_model(name[len("model:"):])
        else:
            fn = import_function(name)
        rewards.append(Reward(name, fn, weight))
    if pattern is not None and not any(r.name == "regex" for r in rewards):
        raise ConfigError("reward_regex is given but --reward does not name regex; add it, e.g. --reward exact_match,regex")
    return rewards


# ---- calling ------------------------------------------------------------------------------------------------------

def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def call_reward(reward: Reward, prompts: list[str], completions: list[str], columns: dict) -> list[float]:
    """reward.fn on one batch, its output checked: one finite number per completion. RewardError otherwise."""
    try:
        out = reward.fn(list(prompts), list(completions), **columns)
    except RewardError:
        raise
    except Exception as err:        # the user's code failed: say where, in one line
        raise RewardError(f"reward {reward.name!r} raised {type(err).__name__}: {_first_line(err)}") from None
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise RewardError(f"reward {reward.name!r} must return a list of numbers, one per completion; "
                          f"got {_describe(out)}") from None
    if len(values) != len(completions):
        raise RewardError(f"reward {reward.name!r} returned {len(values)} value(s) for {len(completions)} "
                          f"completions; it must return one number per completion")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RewardError(f"reward {reward.name!r} returned {values[bad[0]]} for completion {bad[0]} "
                          f"({completions[bad[0]][:40]!r}); rewards must be finite numbers")
    return values


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def score(rewards: list[Reward], prompts: list[str], completions: list[str],
          columns: dict) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum of every reward per completion, and each reward's own values (by name)."""
    each = {r.name: call_reward(r, prompts, completions, columns) for r in rewards}
    total = [sum(r.weight * each[r.name][i] for r in rewards) for i in range(len(completions))]
    return total, each
