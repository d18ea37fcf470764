"""Chat (SFT) and preference (DPO) examples from JSONL, with every unusable line counted by reason.

SFT, one object per line, either
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "..." | [messages], "completion": "..." | [messages]}      a string prompt is one user turn,
                                                                           a string completion one assistant turn
DPO, one object per line:
    {"prompt": "..." | [messages], "chosen": "..." | [messages], "rejected": "..." | [messages]}

Everything goes through the chat template (utils/chat.py). A line that is not JSON, misses a field, has a
malformed message, has no assistant turn to learn from, or (DPO) has identical completions is skipped and
counted under its reason; a conversation longer than seq_len + 1 tokens is cut to that length (counted as
truncated) and skipped only when no answer token is left. A file with nothing usable raises DataError.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.chat import IGNORE, ROLES, encode_chat
from utils.errors import DataError

TASKS = ("sft", "dpo")


@dataclass
class SFTExample:
    ids: list[int]            # the conversation, at most seq_len + 1 tokens
    labels: list[int]         # ids on trained answer tokens, else -100


@dataclass
class PairExample:
    chosen: SFTExample        # prompt + chosen completion (labels only on the completion)
    rejected: SFTExample


@dataclass
class Report:
    """What reading a file found: examples used, lines skipped per reason (with the first line numbers)."""
    path: str
    lines: int = 0
    used: int = 0
    truncated: int = 0
    skipped: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason].append(line)

    def describe(self) -> str:
        parts = [f"{self.path}: {self.used} example(s) from {self.lines} line(s)"]
        if self.skipped:
            total = sum(len(v) for v in self.skipped.values())
            reasons = ", ".join(f"{reason} {len(lines)} (line {', '.join(map(str, lines[:3]))}"
                                f"{', ...' if len(lines) > 3 else ''})" for reason, lines in self.skipped.items())
            parts.append(f"skipped {total}: {reasons}")
        if self.truncated:
            parts.append(f"{self.truncated} cut to seq_len + 1 tokens")
        return "; ".join(parts)


@dataclass
class TaskData:
    task: str
    train: list               # SFTExample or PairExample
    val: list
    report: Report


class _Skip(Exception):
    """One line cannot be used; the message is the reason."""


def json_object(line: str) -> dict:
    """One JSONL line as a dict; _Skip (the reason counted in the report) if it is not a JSON object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise _Skip("not JSON") from None
    if not isinstance(record, dict):
        raise _Skip("not a JSON object")
    return record


def read_data_file(path: Path) -> str:
    """The text of a --data file (JSONL of examples or prompts); a missing or unreadable file is a DataError."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--data {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--data {str(path)!r} cannot be read: {err}") from None

def load_task_data(path, task: str, tokenizer, seq_len: int, val_fraction: float) -> TaskData:
    """Read a JSONL file of `task` examples ("sft" or "dpo"), tokenised with the chat template.

    Args:
        tokenizer: utils.tokenizer.Tokenizer that has the chat tokens (utils.chat.add_chat_tokens)
        seq_len: a row holds at most seq_len + 1 tokens (input and shifted target)
        val_fraction: every round(1 / val_fraction)-th example is held out for evaluation, when that leaves
            at least one example for each split
    Raises:
        DataError: the file cannot be read, or no line is usable (the message has the per-reason counts)
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    path = Path(path)
    text = read_data_file(path)
    report = Report(str(path))
    examples = []
    parse = _sft_example if task == "sft" else _dpo_example
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        report.lines += 1
        try:
            example, truncated = parse(json_object(line), tokenizer, seq_len)
        except _Skip as why:
            report.skip(str(why), number)
            continue
        report.truncated += truncated
        examples.append(example)
    report.used = len(examples)
    if not examples:
        raise DataError(f"no usable {task} example in {report.describe()}")
    train, val = _split(examples, val_fraction)
    return TaskData(task, train, val, report)


def _split(examples: list, val_fraction: float) -> tuple[list, list]:
    every = max(2, round(1 / val_fraction))
    if len(examples) < every:
        return examples, []
    val = examples[every - 1::every]
    train = [e for i, e in enumerate(examples) if (i + 1) % every]
    return train, val


# ---- one line ---------------------------------------------------------------------------------------------------------

def _messages(value, field_name: str, default_role: str) -> list[dict]:
    """A string (one message of default_role) or a list of {"role", "content"} messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise _Skip(f"bad {field_name} (not a string or a list of messages)")
    out = []
    for m in value:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise _Skip(f"bad message in {field_name} (role must be one of {'/'.join(ROLES)}, content a string)")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _require(record: dict, *names: str) -> None:
    missing = [n for n in names if n not in record]
    if missing:
        raise _Skip(f"missing field {'/'.join(missing)}")


def _encode(tokenizer, messages, train_from, seq_len) -> tuple[SFTExample, int]:
    ids, labels = encode_chat(tokenizer, messages, train_from=train_from)
    truncated = len(ids) > seq_len + 1
    ids, labels = ids[:seq_len + 1], labels[:seq_len + 1]
    if all(label == IGNORE for label in labels[1:]):      # the first token is never a target
        raise _Skip("too long (no answer token within seq_len)")
    return SFTExample(ids, labels), int(truncated)


def _sft_example(record, tokenizer, seq_len):
    if "messages" in record:
        messages = _messages(record["messages"], "messages", "user")
    elif "prompt" in record or "completion" in record:
        _require(record, "prompt", "completion")
        messages = (_messages(record["prompt"], "prompt", "user")
                    + _messages(record["completion"], "completion", "assistant"))
    else:
        raise _Skip("missing field messages (or prompt/completion)")
    if not any(m["role"] == "assistant" for m in messages):
        raise _Skip("no assistant turn")
    return _encode(tokenizer, messages, 0, seq_len)


def _dpo_example(record, tokenizer, seq_len):
    _require(record, "prompt", "chosen", "rejected")
    prompt = _messages(record["prompt"], "prompt", "user")
    chosen = _messages(record["chosen"], "chosen", "assistant")
    rejected = _messages(record["rejected"], "rejected", "assistant")
    if not any(m["role"] == "assistant" for m in chosen) or not any(m["role"] == "assistant" for m in rejected):
        raise _Skip("no assistant turn")
    if chosen == rejected:
        raise _Skip("identical completions")
    c, tc = _encode(tokenizer, prompt + chosen, len(prompt), seq_len)
    r, tr = _encode(tokenizer, prompt + rejected, len(prompt), seq_len)
    return PairExample(c, r), max(tc, tr)


# ---- batches ----------------------------------------------------------------------------------------------------------

def collate(examples: list[SFTExample], pad_id: int, length: int | None = None):
    """x, y: (b, L) int64, RIGHT-padded (x with pad_id, y with -100); y is labels shifted by one.

    Right padding is safe for a causal recurrent model: tokens after a row's end cannot change its earlier
    positions, and their targets are -100. L = the longest row's length - 1 (or `length`).
    """
    L = length if length is not None else max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), L), pad_id, dtype=torch.long)
    y = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids) - 1
        x[i, :n] = torch.tensor(e.ids[:-1])
        y[i, :n] = torch.tensor(e.labels[1:])
    return x, y


def collate_pairs(pairs: list[PairExample], pad_id: int):
    """xc, yc, xr, yr: (b, L) each, chosen and rejected rows padded to one common length."""
    L = max(len(e.ids) for p in pairs for e in (p.chosen, p.rejected)) - 1
    return (*collate([p.chosen for p in pairs], pad_id, L), *collate([p.rejected for p in pairs], pad_id, L))
