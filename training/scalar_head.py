"""A language model with a scalar head: one number per sequence (a reward model's score) or per position (a value).

The head is a Linear(d_model, 1) on the model's final-normed hidden states (the LM head's input, read through the
model's public `hidden_states`); the language model itself is left as it is, with or without LoRA adapters. The
wrapper passes through the few methods the Trainer calls on a model, so it trains like any other.

A checkpoint of it is the language model's usual files (full weights or the adapter) plus the head's file
(score_head.safetensors for a reward model, value_head.safetensors for PPO's value head).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_FILE = "score_head.safetensors"
VALUE_HEAD_FILE = "value_head.safetensors"


class ScalarHeadModel(nn.Module):
    """lm + Linear(d_model, 1).

    Args:
        lm: a language model of any family (models/), possibly with LoRA adapters
    """

    head_file = HEAD_FILE

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.head = nn.Linear(lm.config.d_model, 1)
        nn.init.normal_(self.head.weight, std=1 / (lm.config.d_model + 1))
        nn.init.zeros_(self.head.bias)

    def values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The head at every position: (b, l) long -> (b, l) fp32."""
        hidden = self.lm.hidden_states(input_ids)                              # (b, l, d)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One score per right-padded row, read at its last real token: (b, l), (b,) -> (b,) fp32."""
        values = self.values(input_ids)                                        # (b, l)
        return values.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.score(input_ids, lengths)

    # ---- what the Trainer and the start-up summary call on a model ---------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool = True):
        self.lm.set_gradient_checkpointing(enabled)

    def kernels_for(self, device):
        return self.lm.kernels_for(device)

    def scan_backend_for(self, device) -> str:
        return self.lm.scan_backend_for(device)

    def num_parameters(self) -> int:
        return self.lm.num_parameters() + sum(p.numel() for p in self.head.parameters())

    # ---- the head on disk ----------------------------------------------------------------------------------------

    def save_head(self, folder) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(Path(folder) / self.head_file))

    def load_head(self, folder) -> None:
        path = Path(folder) / self.head_file
        if not path.is_file():
            raise ValueError(f"{str(folder)!r} has no {self.head_file}: it is not a checkpoint of this head "
                             f"(a reward model comes from --task reward, a value head from --task ppo)")
        try:
            state = load_file(str(path))
        except Exception as err:       # a damaged file: say which
            raise ValueError(f"{str(path)!r} cannot be read ({err})") from None
        self.head.load_state_dict({k: v.to(self.head.weight.device) for k, v in state.items()})


class PolicyWithValue(ScalarHeadModel):
    """PPO's model: the policy's logits and a value per position. forward(x) -> (logits (b, l, v), values (b, l)).

    Two passes through the language model (its forward for the logits, hidden_states for the values): the public
    API gives one or the other, and the value head's cost is small beside the sampling."""

    head_file = VALUE_HEAD_FILE

    def forward(self, input_ids: torch.Tensor):
        logits, _ = self.lm(input_ids)
        return logits, self.values(input_ids)


def load_reward_model(path, device=None) -> tuple[ScalarHeadModel, object]:
    """(reward model, tokenizer) from a --task reward checkpoint (a run folder or a step folder), in eval mode."""
    from .checkpoint import load_model_and_tokenizer
    lm, tokenizer, folder = load_model_and_tokenizer(path)
    model = ScalarHeadModel(lm)
    model.load_head(folder)
    return model.to(device or "cpu").eval(), tokenizer
