"""Prompts for learning from rewards (--task grpo), from JSONL, with every unusable line counted by reason.

One object per line: {"prompt": "..." | [messages], ...any other fields}. A string prompt is one user turn; the
prompt is encoded with the chat template and ends with the assistant marker, so the model answers it as in SFT.
The other fields (e.g. "answer") travel with the prompt and reach the reward functions as keyword lists.
Skipped and counted: not JSON, not an object, no prompt, a malformed prompt, a prompt longer than the limit.
A file with nothing usable raises DataError.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from utils.chat import encode_chat
from utils.errors import DataError
from utils.finetune_data import Report, _messages, _Skip, _split, json_object, read_data_file


@dataclass
class PromptExample:
    ids: list[int]            # the prompt in the chat template, ending with the assistant marker
    prompt: object            # the prompt as written in the file (a string or a message list)
    columns: dict             # every other field of the line


@dataclass
class PromptData:
    train: list[PromptExample]
    val: list[PromptExample]
    report: Report
    column_names: tuple[str, ...]     # fields every line has (what the reward functions receive)


def load_prompts(path, tokenizer, max_prompt_tokens: int, val_fraction: float) -> PromptData:
    """Read a prompts JSONL file.

    Args:
        tokenizer: utils.tokenizer.Tokenizer with the chat tokens
        max_prompt_tokens: longer prompts are skipped (counted as "too long")
        val_fraction: every round(1 / val_fraction)-th prompt is held out, when both splits keep one
    Raises:
        DataError: the file cannot be read, or no line is usable
    """
    path = Path(path)
    text = read_data_file(path)
    report = Report(str(path))
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        report.lines += 1
        try:
            examples.append(_prompt_example(line, tokenizer, max_prompt_tokens))
        except _Skip as why:
            report.skip(str(why), number)
    report.used = len(examples)
    if not examples:
        raise DataError(f"no usable prompt in {report.describe()} (each line: {{\"prompt\": \"...\", ...}})")
    common = set(examples[0].columns)
    for e in examples[1:]:
        common &= set(e.columns)
    for e in examples:          # a reward function gets aligned lists: only the fields every prompt has
        e.columns = {k: e.columns[k] for k in sorted(common)}
    train, val = _split(examples, val_fraction)
    return PromptData(train, val, report, tuple(sorted(common)))


def _prompt_example(line: str, tokenizer, max_prompt_tokens: int) -> PromptExample:
    record = json_object(line)
    if "prompt" not in record:
        raise _Skip("missing field prompt")
    messages = _messages(record["prompt"], "prompt", "user")
    ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
    if len(ids) > max_prompt_tokens:
        raise _Skip(f"too long (prompt over {max_prompt_tokens} tokens)")
    columns = {k: v for k, v in record.items() if k != "prompt"}
    return PromptExample(ids, record["prompt"], columns)
