"""Training presets: the optimisation recipe, as data.

Each preset sets learning rate, warmup, schedule length, weight decay, clipping and how often to evaluate.
They combine with a model size (configs/model_sizes.py) and a VRAM preset (configs/vram.py); any field can
still be overridden in a JSON file (--config) or on the command line. training/config.py does the merging.
"""

TRAINING_PRESETS = {
    # A sound recipe for small language models from scratch: peak lr 6e-4 (the GPT-3 small / mamba-130m
    # neighbourhood), a short warmup, cosine down to a tenth of the peak.
    "default": {
        "lr": 6e-4,
        "min_lr_ratio": 0.1,
        "warmup_steps": 200,
        "max_steps": 5000,
        "weight_decay": 0.1,
        "beta1": 0.9,
        "beta2": 0.95,
        "grad_clip": 1.0,
        "eval_interval": 250,
        "eval_batches": 20,
        "checkpoint_interval": 500,
    },
    # A quick look: higher lr, fewer steps, sparse evaluation. Good for checking a new dataset end to end.
    "fast": {
        "lr": 1e-3,
        "min_lr_ratio": 0.1,
        "warmup_steps": 50,
        "max_steps": 1000,
        "weight_decay": 0.1,
        "beta1": 0.9,
        "beta2": 0.95,
        "grad_clip": 1.0,
        "eval_interval": 200,
        "eval_batches": 10,
        "checkpoint_interval": 200,
    },
    # Long, gentle and closely watched: lower lr, long warmup, tighter clipping, frequent evaluation.
    # For larger models, fine-tuning, or a run that diverged with the default.
    "careful": {
        "lr": 3e-4,
        "min_lr_ratio": 0.1,
        "warmup_steps": 1000,
        "max_steps": 20000,
        "weight_decay": 0.1,
        "beta1": 0.9,
        "beta2": 0.95,
        "grad_clip": 0.5,
        "eval_interval": 250,
        "eval_batches": 40,
        "checkpoint_interval": 500,
    },
}
