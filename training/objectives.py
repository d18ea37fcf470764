"""What a training step optimises: next-token LM, SFT (loss on the answers only) or DPO (chosen vs rejected).

Each objective hands the Trainer batches (tuples of tensors with rows in dim 0, which the Trainer may split into
smaller pieces when memory runs out) and turns a piece into a loss SUM and a count, so that the mean over a step
is exact however the rows were split:
    next_batch()                    -> batch on the CPU
    count(batch)                    -> how many units the loss averages over (target tokens, or pairs for DPO)
    loss(model, batch)              -> (sum of the loss over the piece's units, {metric: sum})
    eval_batches(batch_size, n)     -> deterministic validation batches
    sampler                         -> state_dict / load_state_dict for an exact resume
    capture_blocker                 -> why a step of it cannot be a CUDA graph (training/graph_step.py), or None
    progress_metrics                -> names of its metrics the progress bar shows (GRPO: reward, kl)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from kernels.documents import seq_idx_from_separators
from utils.finetune_data import collate, collate_pairs
from utils.packing import collate_packed, collate_packed_pairs, pack_examples, pack_pairs
from utils.sampler import BatchSampler, ExampleSampler, eval_batches

IGNORE = -100


def sequence_logps(model, x, y) -> torch.Tensor:
    """Sum over each row of log p(y_t | x_<=t) where y_t != -100. x, y: (b, L) -> (b,) fp32."""
    logits, _ = model(x)                                                        # (b, L, v)
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = y != IGNORE
    picked = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)             # (b, L)
    return (picked * mask).sum(-1)


def document_logps(model, x, y, seq_idx) -> torch.Tensor:
    """Packed rows: the sum of log p(y_t | x_<=t) over each document's targets. x, y, seq_idx: (b, L) ->
    (b, D) fp32, column d the row's document d (D = the largest index + 1; 0 where a row has no document d)."""
    logits, _ = model(x, seq_idx=seq_idx)                                       # (b, L, v)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != IGNORE)          # (b, L)
    sums = torch.zeros(x.shape[0], int(seq_idx.max()) + 1, device=picked.device, dtype=picked.dtype)
    return sums.scatter_add(1, seq_idx.long(), picked)


def pairs_of(doc_logps: torch.Tensor, seq_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows packed as chosen, rejected, chosen, rejected, ... (then padding): (chosen, rejected) log-probs, (pairs,)
    each, row by row. A row of p pairs has documents 0 .. 2p - 1, and its padding (if any) is document 2p."""
    pairs = doc_logps.shape[1] // 2
    in_row = (seq_idx.max(dim=1).values.long() + 1) // 2                         # (b,) pairs per row
    valid = torch.arange(pairs, device=seq_idx.device) < in_row[:, None]        # (b, pairs)
    return doc_logps[:, 0:2 * pairs:2][valid], doc_logps[:, 1:2 * pairs:2][valid]


class LMObjective:
    """Next-token prediction on packed windows of a token corpus (utils.dataset.PreparedData).

    reset_at: None (the default, as the published Mamba checkpoints were trained) lets the state flow from one
    document into the next; the end-of-text id makes the model restart at each document of a window instead. The
    boundaries are read from x inside `loss` (not carried in the batch), so a captured CUDA graph computes them
    too, and training and validation alike see them."""

    capture_blocker = None      # fixed (batch, seq_len) windows, a fixed token count: a step replays as a CUDA graph
    progress_metrics = ()       # the objective's metrics the progress bar shows (besides loss, lr, tokens/s)

    def __init__(self, data, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 reset_at: int | None = None):
        self.val_tokens, self.seq_len, self.reset_at = data.val_tokens, seq_len, reset_at
        self.sampler = BatchSampler(data.train_tokens, seq_len, batch_size, seed=seed, rank=rank,
                                    world_size=world_size)

    def next_batch(self):
        return self.sampler.next_batch()                                        # x, y: (b, seq_len)

    def count(self, batch) -> int:
        return batch[1].numel()

    def loss(self, model, batch):
        x, y = batch
        seq_idx = None if self.reset_at is None else seq_idx_from_separators(x, self.reset_at)
        _, loss = model(x, targets=y, seq_idx=seq_idx, return_logits=False)   # chunked: no (b, L, v) fp32 logits
        return loss * y.numel(), {}

    def can_evaluate(self) -> bool:
        # a small corpus can leave the validation split shorter than one sequence: nothing to evaluate
        return len(self.val_tokens) > self.seq_len

    def eval_batches(self, batch_size: int, n: int):
        return eval_batches(self.val_tokens, self.seq_len, batch_size, n)


class _ExampleObjective:
    """Shared by SFT and DPO: random batches of examples, fixed validation batches."""

    progress_metrics = ()

    def __init__(self, data, batch_size: int, pad_id: int, seed: int, rank: int = 0, world_size: int = 1,
                 unit: str = "examples"):
        self.train, self.val, self.pad_id = data.train, data.val, pad_id
        self.sampler = ExampleSampler(len(self.train), batch_size, seed=seed, rank=rank, world_size=world_size,
                                      unit=unit)

    def next_batch(self):
        return self.collate([self.train[i] for i in self.sampler.next_indices()])

    def can_evaluate(self) -> bool:
        return len(self.val) > 0

    def eval_batches(self, batch_size: int, n: int):
        for i in range(0, min(len(self.val), batch_size * n), batch_size):
            yield self.collate(self.val[i:i + batch_size])


class SFTObjective(_ExampleObjective):
    """Cross-entropy on the assistant tokens only (labels elsewhere are -100); rows right-padded."""

    capture_blocker = ("task sft: batches are padded to their longest example (shapes vary) and the loss is scaled "
                       "by a token count read on the host")

    def collate(self, examples):
        return collate(examples, self.pad_id)                                   # x, y: (b, L)

    def count(self, batch) -> int:
        return int((batch[1] != IGNORE).sum())

    def loss(self, model, batch):
        x, y = batch
        _, loss = model(x, targets=y, return_logits=False)         # mean over the assistant tokens, chunked
        return _summed(loss, self.count(batch)), {}


class PackedSFTObjective(SFTObjective):
    """SFT with several examples per row (utils/packing.py): rows planned by first-fit decreasing, train and
    validation alike, then sampled like examples (so the sampler's state resumes exactly). The model restarts its
    state at each example (seq_idx), so the loss is the one the unpacked rows give, on far fewer padding tokens."""

    capture_blocker = ("task sft: batches are cut to their fullest row (shapes vary) and the loss is scaled by a "
                       "token count read on the host")

    def __init__(self, data, batch_size: int, pad_id: int, seed: int, seq_len: int, rank: int = 0,
                 world_size: int = 1):
        self.seq_len = seq_len
        rows = dataclasses.replace(data, train=pack_examples(data.train, seq_len),
                                   val=pack_examples(data.val, seq_len))
        super().__init__(rows, batch_size, pad_id, seed, rank, world_size, unit=f"packed rows of {seq_len}")

    def collate(self, rows):
        return collate_packed(rows, self.pad_id, self.seq_len)                 # x, y, seq_idx: (b, L) each

    def loss(self, model, batch):
        x, y, seq_idx = batch
        _, loss = model(x, targets=y, seq_idx=seq_idx, return_logits=False)
        return _summed(loss, self.count(batch)), {}


def _summed(mean_loss, n: int):
    # a piece with no assistant token (rows split after an out-of-memory) adds 0; its mean would be 0/0
    return mean_loss * n if n else mean_loss.nan_to_num(0.0) * 0


class DPOObjective(_ExampleObjective):
    """Direct preference optimisation (Rafailov et al. 2023):
        loss = -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))])
    on log-probabilities summed over the completion tokens. `reference(x, y)` returns the reference model's
    summed log-probs (b,) without gradients: the base with adapters disabled (LoRA) or a frozen copy.
    Metrics as TRL names them: rewards/chosen = beta (log pi(c) - log ref(c)), rewards/rejected likewise,
    rewards/margins = their difference, rewards/accuracies = share of pairs with chosen reward > rejected.
    """

    capture_blocker = "task dpo: batches are padded to their longest pair (shapes vary)"

    def __init__(self, data, batch_size, pad_id, seed, reference, beta: float = 0.1, rank=0, world_size=1,
                 unit: str = "examples"):
        super().__init__(data, batch_size, pad_id, seed, rank, world_size, unit=unit)
        self.reference, self.beta = reference, beta

    def collate(self, pairs):
        return collate_pairs(pairs, self.pad_id)                                # xc, yc, xr, yr: (b, L) each

    def count(self, batch) -> int:
        return batch[0].shape[0]

    def loss(self, model, batch):
        xc, yc, xr, yr = batch
        b = xc.shape[0]
        x, y = torch.cat([xc, xr]), torch.cat([yc, yr])                         # (2b, L): one forward pass
        policy = sequence_logps(model, x, y)
        with torch.no_grad():
            ref = self.reference(x, y).float()
        return self.pair_losses(policy[:b], policy[b:], ref[:b], ref[b:])

    def pair_losses(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        """The summed loss and metrics of pairs from their log-probs, (pairs,) each."""
        chosen = self.beta * (policy_chosen - ref_chosen)                       # (pairs,)
        rejected = self.beta * (policy_rejected - ref_rejected)
        losses = -F.logsigmoid(chosen - rejected)
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
                   "rewards/margins": (chosen - rejected).sum(),
                   "rewards/accuracies": (chosen > rejected).float().sum()}
        return losses.sum(), metrics


class PackedDPOObjective(DPOObjective):
    """DPO with several pairs per row (utils/packing.py): each pair's chosen and rejected side by side as two
    documents, rows of 2 * seq_len (what the padded layout's chosen and rejected rows of seq_len hold), planned by
    first-fit decreasing. `reference(x, y, seq_idx)` returns the reference's document_logps. The per-pair log-probs
    are the ones unpacked rows give, so is the loss."""

    capture_blocker = ("task dpo: batches are cut to their fullest row (shapes vary) and the pair count is read on "
                       "the host")

    def __init__(self, data, batch_size, pad_id, seed, reference, seq_len: int, beta: float = 0.1, rank=0,
                 world_size=1):
        self.seq_len = seq_len
        rows = dataclasses.replace(data, train=pack_pairs(data.train, seq_len), val=pack_pairs(data.val, seq_len))
        super().__init__(rows, batch_size, pad_id, seed, reference, beta, rank, world_size,
                         unit=f"packed rows of pairs, {2 * seq_len}")

    def collate(self, rows):
        return collate_packed_pairs(rows, self.pad_id, self.seq_len)            # x, y, seq_idx: (b, L) each

    def count(self, batch) -> int:
        return int(((batch[2].max(dim=1).values.long() + 1) // 2).sum())

    def loss(self, model, batch):
        x, y, seq_idx = batch
        policy = pairs_of(document_logps(model, x, y, seq_idx), seq_idx)
        with torch.no_grad():
            ref = pairs_of(self.reference(x, y, seq_idx).float(), seq_idx)
        return self.pair_losses(*policy, *ref)


LN2 = math.log(2)   # the DPO loss when policy == reference
