"""Training presets: the optimisation recipe, as data.

The fine-tuning presets (sft, lora, dpo, dpo_lora) are picked by the task when --training is not given
(default_training). Each preset sets learning rate, warmup, schedule length, weight decay, clipping and how often to evaluate.
They combine with a model size (configs/model_sizes.py) and a VRAM preset (configs/vram.py); any field can
still be overridden in a JSON file (--config) or on the command line. training/config.py does the merging.
"""

# The schedule the fine-tuning presets share (a trained model: no decay, a short warmup, Adam's usual beta2); each
# preset below sets its own learning rate on top.
_FINETUNE = {
    "min_lr_ratio": 0.1,
    "warmup_steps": 30,
    "max_steps": 1000,
    "weight_decay": 0.0,
    "beta1": 0.9,
    "beta2": 0.999,
    "grad_clip": 1.0,
    "eval_interval": 100,
    "eval_batches": 20,
    "checkpoint_interval": 200,
}

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
    # Full supervised fine-tuning of a trained model on conversations: a small lr (the weights are already good),
    # no decay away from them, a short warmup.
    "sft": {**_FINETUNE, "lr": 2e-5},
    # LoRA adapters (any task but DPO): only the small adapter matrices train, starting from B = 0, so a lr about
    # ten times that of full fine-tuning (1e-4; PEFT/TRL examples use 1e-4 .. 2e-4).
    "lora": {**_FINETUNE, "lr": 1e-4},
    # DPO of the full model: a very small lr (the DPO paper and TRL use 5e-7 .. 1e-6); beta is dpo_beta (0.1).
    "dpo": {**_FINETUNE, "lr": 1e-6},
    # DPO with LoRA adapters: adapters need a larger step than full weights (TRL's LoRA DPO examples: 5e-6 .. 5e-5).
    "dpo_lora": {**_FINETUNE, "lr": 5e-6},
    # A reward model (--task reward): the LM and a fresh scalar head, Bradley-Terry on preference pairs (TRL's
    # RewardConfig examples: 1e-5 full, 1e-4 with LoRA).
    "reward": {**_FINETUNE, "lr": 1e-5},
    "reward_lora": {**_FINETUNE, "lr": 1e-4},
    # GRPO (--task grpo): TRL's GRPOConfig default lr 1e-6 for full weights; adapters take ~10x (1e-5).
    "grpo": {**_FINETUNE, "lr": 1e-6},
    "grpo_lora": {**_FINETUNE, "lr": 1e-5},
    # PPO (--task ppo): TRL's PPOConfig default lr 3e-6; adapters ~10x.
    "ppo": {**_FINETUNE, "lr": 3e-6},
    "ppo_lora": {**_FINETUNE, "lr": 3e-5},
}

TASKS = ("lm", "sft", "dpo", "reward", "grpo", "ppo")

# (task, LoRA?) -> the preset used when --training is not given
TASK_PRESETS = {("lm", False): "default", ("lm", True): "lora", ("sft", False): "sft", ("sft", True): "lora",
                ("dpo", False): "dpo", ("dpo", True): "dpo_lora", ("reward", False): "reward",
                ("reward", True): "reward_lora", ("grpo", False): "grpo", ("grpo", True): "grpo_lora",
                ("ppo", False): "ppo", ("ppo", True): "ppo_lora"}


# The fine-tuning recipes: on the CPU their learning rate and schedule are kept (the CPU preset's lr 3e-3 is for a
# tiny model trained from scratch, and would wreck a trained model in SFT or DPO).
FINETUNE_PRESETS = frozenset(TASK_PRESETS.values()) - {"default"}


def default_training(task: str, lora: bool) -> str:
    """The training preset for a task when none is given (an unknown task falls back to "default"; the config
    check then names it)."""
    return TASK_PRESETS.get((task, lora), "default")
