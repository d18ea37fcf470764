"""Set-up of the reward tasks, called by launch.py: --task reward (a reward model), grpo and ppo.

    load_data      the preference pairs (reward) or the prompts (grpo, ppo), bad lines counted, nothing usable: exit 2
    wrap_model     reward / ppo: the LM gets a scalar head (training/scalar_head.py), saved beside its weights/adapter
    build_objective  RewardObjective, or GRPOObjective / PPOObjective with their rewards, sampler and reference
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from models import lora
from models.vocab import resize_vocab

from .config import ConfigError, TrainConfig

RL_TASKS = ("reward", "grpo", "ppo")


def load_data(cfg: TrainConfig, tokenizer, log):
    from . import finetune
    if cfg.task == "reward":        # the preference pairs of DPO
        return finetune.load_task_data(dataclasses.replace(cfg, task="dpo"), tokenizer, log)
    from utils.chat import add_chat_tokens
    from utils.errors import DataError
    from utils.prompt_data import load_prompts
    added = add_chat_tokens(tokenizer)
    if added:
        log(f"tokenizer    added the chat tokens {' '.join(added)} (vocabulary now {tokenizer.vocab_size})")
    try:
        data = load_prompts(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction)
    except DataError as err:
        raise ConfigError(str(err)) from None
    log(f"data         {data.report.describe()}; fields for the rewards: "
        f"{', '.join(data.column_names) or '(none)'}")
    if not data.val:
        log(f"warning: too few prompts to hold out a validation share ({cfg.val_fraction}): no evaluation")
    return data


def wrap_model(cfg: TrainConfig, model, resume_from: Path | None, save_weights):
    """--task reward: (ScalarHeadModel, its save_weights); ppo: (PolicyWithValue, ...); other tasks: unchanged."""
    if cfg.task not in ("reward", "ppo"):
        return model, save_weights
    from .scalar_head import PolicyWithValue, ScalarHeadModel
    wrapped = ScalarHeadModel(model) if cfg.task == "reward" else PolicyWithValue(model)
    if resume_from is not None:
        try:
            wrapped.load_head(resume_from)
        except ValueError as err:
            raise ConfigError(f"--resume: {err}") from None
    save_lm = save_weights or model.save_pretrained

    def save(folder: Path) -> None:
        save_lm(folder)
        wrapped.save_head(folder)
    return wrapped, save


def needs_reference_copy(cfg: TrainConfig) -> bool:
    """A full-weight GRPO run with a KL penalty holds a frozen copy of the starting model."""
    return cfg.task in ("grpo", "ppo") and cfg.kl_beta > 0 and not cfg.lora


def build_objective(cfg: TrainConfig, data, model, tokenizer, base_dir: Path, dist, device, precision, run_dir,
                    log):
    if cfg.task == "reward":
        from .reward_model import RewardObjective
        return RewardObjective(data, batch_size=cfg.micro_batch_size, pad_id=tokenizer.eot_id, seed=cfg.seed,
                               rank=dist.rank, world_size=dist.world_size)
    from .grpo import GRPOObjective
    from .ppo import PPOObjective
    from .rewards import parse_rewards
    rewards = parse_rewards(cfg.reward, cfg.reward_weights, cfg.reward_regex,
                            load_model=lambda path: reward_model_function(path, device))
    stop = tuple(s for s in (cfg.stop_strings or "").split(",") if s)
    log(f"rewards      {' + '.join(f'{r.weight:g} x {r.name}' for r in rewards)}; {cfg.num_generations} "
        f"completions per prompt, up to {cfg.max_new_tokens} new tokens, temperature {cfg.temperature:g}"
        f"{f', top-p {cfg.top_p:g}' if cfg.top_p < 1 else ''}; kl_beta {cfg.kl_beta:g}, clip {cfg.clip_epsilon:g}, "
        f"{cfg.num_iterations} pass(es) per sampled batch")
    policy = model.lm if cfg.task == "ppo" else model          # ppo: model is PolicyWithValue (scalar_head.py)
    extra = dict(value_model=model) if cfg.task == "ppo" else {}
    objective = PPOObjective if cfg.task == "ppo" else GRPOObjective
    return objective(
        data, policy, tokenizer, rewards, reference_logps(cfg, policy, tokenizer, base_dir, device), **extra,
        rows=cfg.micro_batch_size, group_size=cfg.num_generations, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p if cfg.top_p < 1 else None, stop=stop, beta=cfg.kl_beta,
        clip_epsilon=cfg.clip_epsilon, num_iterations=cfg.num_iterations, grad_accum_steps=cfg.grad_accum_steps,
        seed=cfg.seed, device=device, autocast=precision.autocast, run_dir=run_dir, sample_every=cfg.sample_every,
        rank=dist.rank, world_size=dist.world_size, log=log)


def reference_logps(cfg: TrainConfig, model, tokenizer, base_dir: Path, device):
    """reference(x, y) -> (b, L) token log-probs of the frozen reference: the model with its adapters disabled
    (LoRA), else a frozen copy of the starting weights (loaded from base_dir, so a resumed run keeps the original
    reference); None when kl_beta is 0 (no reference is needed)."""
    from .grpo import token_logps
    if cfg.kl_beta == 0:
        return None
    if cfg.lora:
        def reference(x, y):
            with lora.adapters_disabled(model):
                return token_logps(model, x, y, cfg.temperature)
        return reference
    from models import load_pretrained
    ref_model = load_pretrained(base_dir, device="cpu", dtype=torch.float32, scan_backend=cfg.scan_backend,
                                family=model.config.family)
    resize_vocab(ref_model, tokenizer.vocab_size)
    ref_model = ref_model.to(device).eval().requires_grad_(False)

    def reference(x, y):
        return token_logps(ref_model, x, y, cfg.temperature)
    return reference


def reward_model_function(path: str, device):
    """reward model:PATH -> a reward function: the reward model's score of prompt + completion (chat template)."""
    from utils.chat import add_chat_tokens, encode_chat

    from .reward_model import collate_scored
    from .rewards import RewardError
    from .scalar_head import load_reward_model
    from utils.finetune_data import SFTExample
    try:
        scorer, tokenizer = load_reward_model(path, device)
    except (FileNotFoundError, ValueError) as err:
        raise RewardError(f"reward model:{path}: {err}") from None
    add_chat_tokens(tokenizer)

    @torch.no_grad()
    def reward_model(prompts, completions, **_):
        examples = []
        for prompt, completion in zip(prompts, completions):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids, labels = encode_chat(tokenizer, messages + [{"role": "assistant", "content": completion}])
            examples.append(SFTExample(ids, labels))
        ids, lengths = collate_scored(examples, tokenizer.eot_id)
        return scorer(ids.to(device), lengths.to(device)).tolist()
    reward_model.__name__ = f"model:{path}"
    return reward_model
