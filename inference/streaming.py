"""From tokens to text while they are produced: incremental detokenisation, stop strings, and the text-level loop.

A token is not always a whole character (byte-level BPE splits multi-byte characters across tokens) and decoding
one token alone can lose the space or join that its neighbours imply. So, as in HF's TextStreamer and vLLM,
each new token is decoded together with a few tokens before it, and text is released only once it ends in a
complete character. Text that could be the start of a stop string is held back until it is clear it is not.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from models.sampling import SamplingParams

from .decoder import Decoder, pad_left

CONTEXT_TOKENS = 6           # prompt tokens decoded with the first new ones (spacing of the first word)
INCOMPLETE = "\ufffd"        # what the decoder yields for a partial UTF-8 sequence


class TextStream:
    """The text of one sequence, built up token by token; cut before the first stop string.

    Args:
        tokenizer: has decode(list[int]) -> str
        stop: strings that end the text (the stop string itself is not part of it)
        prompt_ids: the prompt's tokens (context for decoding the first new tokens; not part of the text)
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.ids = list(prompt_ids)[-CONTEXT_TOKENS:]
        self.prefix_offset = 0                 # ids[prefix_offset:read_offset] were decoded already ...
        self.read_offset = len(self.ids)       # ... and ids[read_offset:] not yet
        self.text = ""                         # complete text so far (after a stop: up to the stop string)
        self.released = 0                      # characters of text already handed out
        self.stopped = False                   # a stop string appeared

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that became final (possibly "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(INCOMPLETE):
            return ""                          # a character is still incomplete: wait for the next token
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        searched = max(0, len(self.text) - self.max_stop + 1)
        self.text += new
        if self.stop:
            hits = [i for i in (self.text.find(s, searched) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(self.text) - self._partial_stop())

    def finish(self) -> str:
        """No more tokens: release everything still held back (an unfinished character is decoded as it is)."""
        if not self.stopped and self.read_offset < len(self.ids):
            full = self.tokenizer.decode(self.ids[self.prefix_offset:])
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += full[len(prefix):]
            self.read_offset = len(self.ids)
        return self._release(len(self.text))

    def _partial_stop(self) -> int:
        """Length of the longest end of text that is a proper prefix of a stop string."""
        for k in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out, self.released = self.text[self.released:upto], upto
        return out


def generate_text(decoder: Decoder, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                  stop: Sequence[str] = (), on_text: Callable[[int, str], None] | None = None,
                  on_step: Callable[[], None] | None = None) -> tuple[list[str], int]:
    """Continue a batch of token prompts; stop each at end-of-text, a stop string or max_new_tokens.

    Args:
        decoder: a Decoder built for len(prompts) sequences
        tokenizer: utils.tokenizer.Tokenizer (decode, eot_id)
        prompts: b lists of token ids, each non-empty (lengths may differ: they are left-padded)
        max_new_tokens: tokens to produce at most per sequence
        params: SamplingParams
        generator: torch.Generator on the model's device
        stop: strings that end a sequence (not included in its text)
        on_text: called as on_text(row, text) whenever text of a row becomes final (for streaming)
        on_step: called once per decoding step (progress bars)
    Returns:
        (the new text of each row, the number of tokens produced over all rows, end-of-text excluded)
    """
    input_ids, mask = pad_left(prompts, pad_id=tokenizer.eot_id, device=decoder.device)
    streams = [TextStream(tokenizer, stop, p) for p in prompts]
    texts = [""] * len(prompts)
    done = [False] * len(prompts)
    produced = 0

    def emit(row: int, piece: str) -> None:
        if piece:
            texts[row] += piece
            if on_text is not None:
                on_text(row, piece)

    for next_ids in decoder.generate(input_ids, max_new_tokens, params, mask, tokenizer.eot_id, generator):
        newly_stopped = []
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token == tokenizer.eot_id:
                done[row] = True
                continue
            produced += 1
            emit(row, streams[row].push(token))
            if streams[row].stopped:
                done[row] = True
                newly_stopped.append(row)
        if newly_stopped:
            decoder.stop_rows(newly_stopped)
        if on_step is not None:
            on_step()
    for row, s in enumerate(streams):
        emit(row, s.finish())
    return texts, produced
