"""Training: settings, the loop, checkpoints. One job per module:

    config.py      TrainConfig and how presets, a JSON file and flags combine (ConfigError for bad input)
    launch.py      what `python train.py` does: set-up, start-up summary, exit codes
    trainer.py     the loop: accumulation, clipping, non-finite skips, OOM fallback, eval, checkpoints
    objectives.py  what a step optimises: next-token LM, SFT (answers only), DPO
    finetune.py    fine-tuning set-up: chat tokens, LoRA adapters, the SFT/DPO objective, adapter checkpoints
    merge_lora.py  python -m training.merge_lora: an adapter folded into a plain HF checkpoint
    optim.py       AdamW parameter groups and the warmup + cosine schedule
    precision.py   device, autocast dtype and GradScaler
    memory.py      the peak-memory estimate and the fit check
    step_cost.py   what a step would cost on this CPU (a GPU preset asked for without a GPU is refused with it)
    checkpoint.py  atomic checkpoint folders, finding and loading them
    extra_eval.py  at each evaluation: a second corpus (eval_data) and harness tasks (eval_tasks)
    metrics.py     metrics.jsonl, loss.png, optional wandb / tensorboard
    distributed.py DDP under torchrun
"""
