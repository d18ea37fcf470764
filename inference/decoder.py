"""Fast recurrent decoding: one parallel prefill fills the cache, then one O(1) step per new token.

A Mamba decoder carries a fixed-size state (per layer: the last d_conv conv inputs and the (d_in, n) SSM state), so
the time and memory of a step do not depend on how long the context is. At small batch a step is a chain of tiny
kernels (three per Mamba-1 layer with the fused block step, kernels/decode_step.py) and the GPU would wait on their
launches, so on CUDA the step is captured once in a CUDA graph over static buffers (the cache, the input tokens,
the logits) and each token replays it: one launch per token. Optionally the step is first compiled with
torch.compile, which traces the per-op step and fuses its elementwise work itself.
On the CPU the same step runs eagerly.

Shape letters as in models/lm.py: b batch, l prompt length, v padded vocabulary.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from models import LanguageModel
from models.sampling import SamplingParams, sample


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into one batch: a recurrent model must see each prompt's last token last.

    Args:
        prompts: b lists of token ids, each of length >= 1
        pad_id: id written into padding positions (never read by the model: the mask keeps it out)
    Returns:
        input_ids (b, l) long, attention_mask (b, l) long with 0 at padding; l = longest prompt
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start an empty prompt with the end-of-text token)")
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, length - len(p):] = 1
    return ids.to(device), mask.to(device)


class Decoder:
    """Decodes a fixed-size batch from a LanguageModel; build once, reuse for many prompts of that batch size.

    Args:
        model: a LanguageModel in eval mode (any device and dtype)
        batch_size: sequences per batch (the CUDA graph is captured for this size)
        cuda_graph: capture the step in a CUDA graph; None = yes on CUDA, no elsewhere
        compile: torch.compile the step first (fuses elementwise ops; compiling takes a while on first use)
        max_length: prompt + new tokens the decoder can hold; only models with attention layers (a KV cache,
            pre-allocated to this many slots) have such a limit, a pure Mamba model's state does not grow
    """

    def __init__(self, model: LanguageModel, batch_size: int, cuda_graph: bool | None = None,
                 compile: bool = False, max_length: int = 2048):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model = model
        self.batch_size = batch_size
        self.device = model.backbone.embeddings.weight.device
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {self.device}")
        self.cuda_graph = cuda_graph
        self.max_length = max_length
        self.cache = model.init_decode_cache(batch_size, max_length)
        self._step_fn = model.step_states
        # choose (and log) the kernels here, outside the traced and captured step, which then only reads the choice
        model.kernels_for(self.device)
        if compile:
            self._step_fn = torch.compile(model.step_states, fullgraph=True, dynamic=False)
        self._tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)   # static input of the graph
        self._graph = None
        self._logits = None                                                    # static output of the graph (b, v)
        self._finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        if cuda_graph:
            self._capture()

    @torch.no_grad()
    def _capture(self):
        # Warm up on a side stream (lazy init, cuBLAS handles, compilation happen outside the capture), then record
        # one step. Both write garbage into the cache; prefill() overwrites all of it before any real use.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step_fn(self._tokens, *self.cache.step_args())
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._step_fn(self._tokens, *self.cache.step_args())

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompts through the model in one parallel pass, leaving their final state in the cache.

        Args:
            input_ids: (b, l) long, left-padded if lengths differ
            attention_mask: (b, l) 1 = token, 0 = left padding; or None
        Returns:
            logits of the last position (b, v)
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"this decoder was built for batch size {self.batch_size}; "
                             f"got input_ids of shape {tuple(input_ids.shape)}")
        self.cache.seqlen_offset = 0        # forward(cache=...) overwrites every state tensor in place
        return self.model.prefill(input_ids, self.cache, attention_mask)      # (b, v)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence. token_ids (b,) -> logits (b, v).

        With a CUDA graph the logits live in a static buffer that the next step overwrites: use them before then.
        """
        if self._graph is not None:
            self._tokens.copy_(token_ids)
            self._graph.replay()
            logits = self._logits
        else:
            logits = self._step_fn(token_ids, *self.cache.step_args())
        self.cache.seqlen_offset += 1
        return logits

    def stop_rows(self, rows: Sequence[int]) -> None:
        """Mark sequences as done during generate() (e.g. a stop string appeared): from the next token on they
        produce only eos_token_id, and generation ends once every row is done."""
        self._finished[list(rows)] = True

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every sequence, one (b,) long tensor per step.

        Same semantics as model.generate: a row that produces eos_token_id (or is passed to stop_rows) is done
        and yields eos_token_id from then on; it ends early once every row is done (only when eos_token_id is
        given). The repetition penalty counts the prompt's tokens (not its padding) and every token produced.

        Args:
            input_ids: (b, l) long prompts, left-padded (see pad_left) if their lengths differ
            max_new_tokens: at most this many steps
            params: SamplingParams
            attention_mask: (b, l) 1 = token, 0 = left padding; or None
            eos_token_id: end-of-text id, or None
            generator: torch.Generator on the model's device, for reproducible sampling
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        capacity = self.cache.capacity
        if capacity is not None and input_ids.shape[1] + max_new_tokens - 1 > capacity:
            raise ValueError(f"this decoder's KV cache holds {capacity} tokens; a prompt of {input_ids.shape[1]} "
                             f"plus {max_new_tokens} new tokens needs {input_ids.shape[1] + max_new_tokens - 1}: "
                             f"build the Decoder with a larger max_length")
        vocab = self.model.config.vocab_size
        b = input_ids.shape[0]
        logits = self.prefill(input_ids, attention_mask)
        self._finished.zero_()
        seen = None
        if params.repetition_penalty != 1.0:
            # one extra column takes the padding positions, so they mark nothing
            real = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, vocab)
            seen = torch.zeros(b, vocab + 1, dtype=torch.bool, device=self.device)
            seen.scatter_(1, real.clamp(max=vocab), True)
            seen = seen[:, :vocab]                                             # (b, vocab) view
        rows = torch.arange(b, device=self.device)
        for i in range(max_new_tokens):
            next_ids = sample(logits, params, vocab, seen, generator)          # (b,)
            if eos_token_id is not None:
                next_ids = torch.where(self._finished, eos_token_id, next_ids)
                self._finished |= next_ids == eos_token_id
            if seen is not None:
                seen[rows, next_ids] = True
            yield next_ids
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(self._finished.all())):
                break
            logits = self.step(next_ids)

    def decode(self, input_ids: torch.Tensor, max_new_tokens: int, params: SamplingParams = SamplingParams(),
               attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """generate() collected: (b, l + new) prompt followed by the new tokens, as model.generate returns."""
        new = list(self.generate(input_ids, max_new_tokens, params, attention_mask, eos_token_id, generator))
        return torch.cat([input_ids] + [t[:, None] for t in new], dim=1)
