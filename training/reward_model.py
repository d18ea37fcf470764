"""--task reward: a reward model (training/scalar_head.py) trained on preference pairs with the Bradley-Terry loss.

    loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected))

on the same preference JSONL as DPO ({"prompt", "chosen", "rejected"}, utils/finetune_data.py). The score of a
conversation is the head at its last token (the completion's <|end|>). Metrics as TRL's RewardTrainer names them:
accuracy (share of pairs scored chosen > rejected), margin (mean score difference); evaluation logs them for the
held-out pairs as eval_accuracy and eval_margin beside val_loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .objectives import _ExampleObjective


def collate_scored(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole conversations right-padded: ids (b, L) long, lengths (b,) long."""
    L = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
    return ids, torch.tensor([len(e.ids) for e in examples])


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair loss -log sigmoid(chosen - rejected): (b,), (b,) -> (b,)."""
    return -F.logsigmoid(chosen - rejected)


class RewardObjective(_ExampleObjective):
    """Bradley-Terry on preference pairs; the model is a ScalarHeadModel."""

    capture_blocker = "task reward: batches are padded to their longest pair (shapes vary)"
    progress_metrics = ("accuracy",)

    def collate(self, pairs):
        chosen = collate_scored([p.chosen for p in pairs], self.pad_id)
        rejected = collate_scored([p.rejected for p in pairs], self.pad_id)
        L = max(chosen[0].shape[1], rejected[0].shape[1])
        pad = lambda ids: F.pad(ids, (0, L - ids.shape[1]), value=self.pad_id)   # noqa: E731
        return pad(chosen[0]), chosen[1], pad(rejected[0]), rejected[1]        # (b, L), (b,), (b, L), (b,)

    def count(self, batch) -> int:
        return batch[0].shape[0]

    def loss(self, model, batch):
        ids_c, len_c, ids_r, len_r = batch
        b = ids_c.shape[0]
        scores = model(torch.cat([ids_c, ids_r]), torch.cat([len_c, len_r]))     # (2b,): one forward pass
        chosen, rejected = scores[:b], scores[b:]
        losses = bradley_terry(chosen, rejected)
        margin = (chosen - rejected).detach()
        return losses.sum(), {"accuracy": (margin > 0).float().sum(), "margin": margin.sum()}
