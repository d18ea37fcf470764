"""Fine-tuning set-up, called by launch.py: chat tokens and a grown vocabulary, LoRA adapters, the SFT / DPO
objective; and loading a LoRA checkpoint (base + adapter) back for generation or merging.

A LoRA run's checkpoint folders hold the adapter (PEFT format), the tokenizer, train_config.json and
training_state.pt, not the base weights: adapter_config.json names the base folder (base_model_name_or_path).
The base is rebuilt exactly from it: the same weights, the vocabulary grown to the checkpoint's tokenizer by the
deterministic rule of models/vocab.py, then the adapter.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from configs.lora import NOT_HONOURED_BY_TRANSFORMERS, PEFT_REFUSED_ON_MAMBA, lora_targets
from models import lora
from models.vocab import resize_vocab
from utils import packing
from utils.sampler import ExampleSampler

from .config import ConfigError, TrainConfig
from .objectives import (DPOObjective, PackedDPOObjective, PackedSFTObjective, SFTObjective, document_logps,
                         sequence_logps)


def load_task_data(cfg: TrainConfig, tokenizer, log):
    """The SFT / DPO examples of cfg.data, tokenised with the chat template (its tokens are added to the tokenizer
    when missing). Bad lines are counted and reported; a file with nothing usable is a ConfigError (exit 2)."""
    from utils.chat import add_chat_tokens
    from utils.errors import DataError
    from utils.finetune_data import load_task_data as load
    added = add_chat_tokens(tokenizer)
    if added:
        log(f"tokenizer    added the chat tokens {' '.join(added)} (vocabulary now {tokenizer.vocab_size})")
    try:
        data = load(cfg.data, cfg.task, tokenizer, cfg.seq_len, cfg.val_fraction)
    except DataError as err:
        raise ConfigError(str(err)) from None
    log(f"data         {data.report.describe()}")
    if not data.val:
        log(f"warning: too few examples to hold out a validation share ({cfg.val_fraction}): no evaluation")
    return data


def grow_vocab(model, tokenizer, log) -> None:
    old = model.config.vocab_size
    if resize_vocab(model, tokenizer.vocab_size):
        log(f"model        vocabulary grown from {old} to {tokenizer.vocab_size} "
            f"(embedding rows {model.config.padded_vocab_size}; new rows start at the mean embedding)")


def lora_config(cfg: TrainConfig, base_dir: Path) -> tuple[lora.LoRAConfig, bool]:
    targets, strict = lora_targets(cfg.lora)
    return lora.LoRAConfig(targets=targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           rslora=cfg.rslora, base_model=str(Path(base_dir).resolve())), strict


def adapter_base(checkpoint: Path) -> Path:
    """The base model folder an adapter checkpoint names."""
    base = lora.read_adapter_config(checkpoint).base_model
    if not base or not Path(base).is_dir():
        raise ConfigError(f"{str(checkpoint)!r} is a LoRA adapter whose base model folder {base!r} "
                          f"(base_model_name_or_path in adapter_config.json) is not there")
    return Path(base)


def attach_lora(cfg: TrainConfig, model, base_dir: Path, resume_from: Path | None, log):
    """Wrap the model's target modules (fresh adapters, or the resumed checkpoint's). Returns save_weights for the
    Trainer: it writes the adapter into a checkpoint folder."""
    config, strict = lora_config(cfg, base_dir)
    try:
        if resume_from is not None:
            lora.load_adapter(model, resume_from)
        else:
            lora.apply_lora(model, config, strict=strict)
    except ValueError as err:
        raise ConfigError(f"--lora {cfg.lora}: {err}") from None
    wrapped = sorted({n.rsplit(".", 1)[-1] for n in lora.lora_modules(model)})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"lora         rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}{' (rsLoRA)' if cfg.rslora else ''} on "
        f"{', '.join(wrapped)}: {trainable:,} trainable parameters; checkpoints hold the adapter (PEFT format)")
    note = peft_note(wrapped)
    said = []

    def save_weights(folder: Path) -> None:
        lora.save_adapter(model, config, folder)
        if note and not said:
            log(f"\nnote: {note}")
            said.append(True)
    return save_weights


def peft_note(targets) -> str | None:
    """What to say when an adapter targets modules PEFT or transformers cannot use on a Mamba model."""
    refused = [t for t in targets if t in PEFT_REFUSED_ON_MAMBA]
    skipped = [t for t in targets if t in NOT_HONOURED_BY_TRANSFORMERS]
    if not refused and not skipped:
        return None
    why = []
    if refused:
        why.append(f"peft >= 0.16 refuses LoRA on {', '.join(refused)} of Mamba models")
    if skipped:
        why.append(f"transformers' Mamba multiplies {', '.join(skipped)}.weight directly, so PEFT's adapter on it "
                   f"would have no effect there")
    return ("; ".join(why) + ". This adapter loads here (generate.py, training.checkpoint); for transformers "
            "write a merged plain checkpoint: python -m training.merge_lora CHECKPOINT OUT_DIR")


def build_objective(cfg: TrainConfig, data, model, tokenizer, base_dir: Path, dist, device, log):
    """The SFT or DPO objective (packed with cfg.pack: the packing efficiency is logged). DPO's reference: the same
    model with adapters disabled (LoRA), else a frozen copy of the starting weights (loaded from base_dir, so a
    resumed run keeps the original reference)."""
    common = dict(batch_size=cfg.micro_batch_size, pad_id=tokenizer.eot_id, seed=cfg.seed, rank=dist.rank,
                  world_size=dist.world_size)
    if cfg.task == "sft":
        if not cfg.pack:
            return SFTObjective(data, **common)
        objective = PackedSFTObjective(data, seq_len=cfg.seq_len, **common)
        log(describe_packing("sft", data.train, objective.train, cfg.seq_len, cfg.micro_batch_size, cfg.seed))
        return objective

    def logps(m, x, y, seq_idx=None):
        """Summed log-probs per row (b,), or per document of packed rows (b, documents) when seq_idx is given."""
        return sequence_logps(m, x, y) if seq_idx is None else document_logps(m, x, y, seq_idx)

    if cfg.lora:
        def reference(x, y, seq_idx=None):
            with lora.adapters_disabled(model):
                return logps(model, x, y, seq_idx)
    else:
        from models import load_pretrained
        ref_model = load_pretrained(base_dir, device="cpu", dtype=torch.float32, scan_backend=cfg.scan_backend,
                                    family=model.config.family)
        resize_vocab(ref_model, tokenizer.vocab_size)
        ref_model = ref_model.to(device).eval().requires_grad_(False)

        def reference(x, y, seq_idx=None):
            return logps(ref_model, x, y, seq_idx)
    if not cfg.pack:
        return DPOObjective(data, reference=reference, beta=cfg.dpo_beta, **common)
    objective = PackedDPOObjective(data, reference=reference, beta=cfg.dpo_beta, seq_len=cfg.seq_len, **common)
    log(describe_packing("dpo", data.train, objective.train, cfg.seq_len, cfg.micro_batch_size, cfg.seed))
    return objective


def describe_packing(task: str, units, rows, seq_len: int, batch_size: int, seed: int) -> str:
    """The start-up line of --pack: how full the packed rows are, and the share of real tokens in the positions of
    one epoch of batches, packed against padded (the batches the same seed would draw without --pack). A batch is
    cut to its widest row either way, so a small set can lose less to padding than to half-empty packed rows.
    units: SFT examples, or DPO pairs (padded: a chosen and a rejected row each, as wide as the longer one)."""
    if task == "sft":
        tokens = widths = [packing.example_length(e, seq_len) for e in units]
        sides, capacity, fills = 1, seq_len, [sum(packing.example_length(e, seq_len) for e in row) for row in rows]
    else:
        tokens = [packing.pair_length(p, seq_len) for p in units]
        widths = [max(packing.example_length(e, seq_len) for e in (p.chosen, p.rejected)) for p in units]
        sides, capacity, fills = 2, 2 * seq_len, [sum(packing.pair_length(p, seq_len) for p in row) for row in rows]
    full = packing.packing_efficiency(tokens, len(rows), capacity)
    order, row_order = _one_epoch(len(units), batch_size, seed), _one_epoch(len(rows), batch_size, seed)
    padded = (sum(tokens[i] for i in order)
              / (sides * packing.padded_positions([widths[i] for i in order], batch_size)))
    packed = sum(fills[i] for i in row_order) / packing.padded_positions([fills[i] for i in row_order], batch_size)
    what = "examples" if task == "sft" else "pairs"
    return (f"packing      {len(units):,} train {what} into {len(rows):,} rows of {capacity} ({full:.1%} full); "
            f"real tokens per position in batches of {batch_size}: {packed:.1%} packed, {padded:.1%} padded")


def _one_epoch(n: int, batch_size: int, seed: int) -> list[int]:
    """The indices of the first ceil(n / batch_size) batches an ExampleSampler of this seed draws."""
    sampler = ExampleSampler(n, batch_size, seed=seed)
    return [i for _ in range(math.ceil(n / batch_size)) for i in sampler.next_indices()]


# ---- loading an adapter checkpoint -----------------------------------------------------------------------------------

def load_lora_checkpoint(path, base=None, merge: bool = True):
    """(model, tokenizer) from an adapter folder: its base (base or adapter_config.json's), grown to the folder's
    tokenizer (or the base's when the folder has none), with the adapter; merged into plain linears by default.
    On the CPU in fp32 (the caller moves it)."""
    from models import load_pretrained
    from utils.tokenizer import Tokenizer
    path = Path(path)
    base = Path(base) if base is not None else adapter_base(path)
    model = load_pretrained(base, device="cpu", dtype=torch.float32)     # any family
    tokenizer = Tokenizer.load(path if (path / "tokenizer.json").is_file() else base)
    resize_vocab(model, tokenizer.vocab_size)
    lora.load_adapter(model, path)
    if merge:
        lora.merge_and_unload(model)
    return model.eval(), tokenizer
