"""VRAM presets: how a model size is laid out on a card of a given memory, as data.

VRAM_PRESETS[vram][model_size] sets micro_batch_size, grad_accum_steps, seq_len and gradient_checkpointing.
Every GPU preset keeps the same tokens per optimizer step (TOKENS_PER_STEP) so a recipe behaves the same on
any card; smaller cards get there with smaller micro-batches, more accumulation and checkpointing.
The figures are measured, not guessed: BENCHMARKS.md (section memory) has the peak memory of real training
steps for every entry, with each card's budget imposed by torch.cuda.set_per_process_memory_fraction.

"cpu" is what "auto" picks on a machine without a GPU: a short demonstration run that finishes in minutes
(it also sets the run length; a training preset's longer schedule is meant for a GPU; the fine-tuning presets
keep their own rate and schedule). A model size given
explicitly always wins; with none given the CPU trains "tiny".
"""

VRAM_CHOICES = ("8gb", "12gb", "16gb", "24gb", "32gb", "48gb")
TOKENS_PER_STEP = 64 * 2048   # 131,072 tokens per optimizer step on every GPU preset

# The default model size per preset when none is given (a GPU trains "small", the CPU "tiny").
DEFAULT_MODEL_SIZE = {"gpu": "small", "cpu": "tiny"}


def _layout(micro_batch_size, seq_len, gradient_checkpointing):
    """One entry: accumulation is derived so that micro * accum * seq_len == TOKENS_PER_STEP."""
    accum = TOKENS_PER_STEP // (micro_batch_size * seq_len)
    assert accum * micro_batch_size * seq_len == TOKENS_PER_STEP, (micro_batch_size, seq_len)
    return {"micro_batch_size": micro_batch_size, "grad_accum_steps": accum, "seq_len": seq_len,
            "gradient_checkpointing": gradient_checkpointing}


# Chosen from measured peaks (BENCHMARKS.md, memory): the largest micro-batch that fits (passes of many tokens
# keep the GPU busy), up to 16 sequences; checkpointing only where that is the price of a usable micro-batch.
VRAM_PRESETS = {
    #            size:   micro, seq_len, checkpointing
    "8gb": {
        "tiny":   _layout(8, 2048, False),
        "small":  _layout(8, 2048, True),
        "medium": _layout(8, 2048, True),
        "large":  _layout(1, 2048, True),
    },
    "12gb": {
        "tiny":   _layout(16, 2048, False),
        "small":  _layout(16, 2048, True),
        "medium": _layout(8, 2048, True),
        "large":  _layout(4, 2048, True),
    },
    "16gb": {
        "tiny":   _layout(16, 2048, False),
        "small":  _layout(16, 2048, True),
        "medium": _layout(16, 2048, True),
        "large":  _layout(8, 2048, True),
    },
    "24gb": {
        "tiny":   _layout(32, 2048, False),
        "small":  _layout(16, 2048, True),
        "medium": _layout(16, 2048, True),
        "large":  _layout(16, 2048, True),
    },
    "32gb": {
        "tiny":   _layout(32, 2048, False),
        "small":  _layout(16, 2048, False),
        "medium": _layout(16, 2048, True),
        "large":  _layout(16, 2048, True),
    },
    "48gb": {
        "tiny":   _layout(64, 2048, False),
        "small":  _layout(16, 2048, False),
        "medium": _layout(16, 2048, False),
        "large":  _layout(16, 2048, True),
    },
}

# The CPU: a first run that convinces in under two minutes of training on 2 cores (~95 s on a quiet machine,
# plus about a minute of data preparation the first time): validation loss below 4.9 and samples that read like
# Python. A tiny model learns fast at a high rate: lr 3e-3 for 500 steps reaches ~4.8 where 6e-4 for 200 steps
# stopped at 6.4 (README, first run). A 4096-token vocabulary: for a 0.3M-parameter model the 16384 default
# would spend most of each step in the output layer.
CPU_PRESET = {
    "layout": {"micro_batch_size": 8, "grad_accum_steps": 1, "seq_len": 256, "gradient_checkpointing": False},
    "schedule": {"lr": 3e-3, "max_steps": 500, "warmup_steps": 30, "eval_interval": 100, "eval_batches": 4,
                 "checkpoint_interval": 250},
    "data": {"vocab_size": 4096},
}

# Mamba-2 (--family mamba2), same tokens per step. NOT measured (no GPU when the family was added): each entry is
# the largest micro-batch (up to 16; 64 for tiny) that training/memory_mamba2.py's activation count fits into the
# card's budget at bf16 on the PyTorch paths (chunked SSD), checkpointing where that count asks for it. The
# chunked SSD keeps its (Q, Q) decay matrices, so Mamba-2 needs more activation memory per token than Mamba-1's
# fused scan. large has no 8gb layout: even one sequence of 2048 does not fit the estimate.
MAMBA2_VRAM_PRESETS = {
    "8gb": {
        "tiny":   _layout(8, 2048, True),
        "small":  _layout(4, 2048, True),
        "medium": _layout(4, 2048, True),
    },
    "12gb": {
        "tiny":   _layout(16, 2048, True),
        "small":  _layout(8, 2048, True),
        "medium": _layout(8, 2048, True),
        "large":  _layout(2, 2048, True),
    },
    "16gb": {
        "tiny":   _layout(16, 2048, True),
        "small":  _layout(16, 2048, True),
        "medium": _layout(8, 2048, True),
        "large":  _layout(4, 2048, True),
    },
    "24gb": {
        "tiny":   _layout(32, 2048, True),
        "small":  _layout(16, 2048, True),
        "medium": _layout(16, 2048, True),
        "large":  _layout(8, 2048, True),
    },
    "32gb": {
        "tiny":   _layout(32, 2048, True),
        "small":  _layout(16, 2048, True),
        "medium": _layout(16, 2048, True),
        "large":  _layout(16, 2048, True),
    },
    "48gb": {
        "tiny":   _layout(64, 2048, False),
        "small":  _layout(16, 2048, True),
        "medium": _layout(16, 2048, True),
        "large":  _layout(16, 2048, True),
    },
}
# Hybrids and the transformer (--family hybrid, any pattern), same tokens per step. NOT measured: each entry is the
# largest micro-batch (up to 16; 64 for tiny) without checkpointing; at start-up training/memory_hybrid.py's
# estimate for the actual pattern then turns on checkpointing and halves the micro-batch until the step fits.
HYBRID_VRAM_PRESETS = {vram: {"tiny": _layout(64 if vram == "48gb" else 32, 2048, False),
                              **{size: _layout(16, 2048, False) for size in ("small", "medium", "large")}}
                       for vram in VRAM_CHOICES}
VRAM_PRESETS_BY_FAMILY = {"mamba1": VRAM_PRESETS, "mamba2": MAMBA2_VRAM_PRESETS, "hybrid": HYBRID_VRAM_PRESETS}
