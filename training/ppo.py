"""--task ppo: Proximal Policy Optimization with a learned value head (Ouyang et al. 2022; TRL's PPOTrainer).

The same sampling and rewards as GRPO (training/grpo.py). A value head on the policy's hidden states
(training/scalar_head.py, PolicyWithValue) estimates, before each completion token, the return still to come.
Per completion token t the reward is the KL penalty to the frozen reference, with the sequence's score added at
its last token:

    r_t = -beta (logp_old_t - ref_t)   (+ score at the last token)

then generalised advantage estimation (Schulman et al. 2016), over the completion tokens, terminal after the last:

    delta_t = r_t + gamma V_{t+1} - V_t          A_t = delta_t + gamma lambda A_{t+1}          R_t = A_t + V_t

the advantages whitened over the batch's completion tokens, and per completion (means over its tokens)

    policy loss  max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))
    value loss   1/2 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - R_t)^2)
    loss         policy loss + vf_coef value loss

The values and log-probs "old" are the ones taken at sampling; num_iterations passes reuse the sampled batch.
Metrics under TRL's names: objective/scores, objective/kl, policy/clipfrac_avg, val/clipfrac_avg, loss/policy_avg,
loss/value_avg, plus reward and completion_length as in GRPO.
"""
from __future__ import annotations

import torch

from .grpo import IGNORE, GRPOObjective

VF_COEF = 0.1           # TRL's PPOConfig defaults
CLIP_RANGE_VALUE = 0.2
GAMMA = 1.0
LAMBDA = 0.95


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = GAMMA,
        lam: float = LAMBDA) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns over each row's masked (completion) positions.

    Args:
        rewards, values: (b, L) per position; only positions where mask is True count
        mask: (b, L) bool, True on completion tokens (one contiguous run per row); the value after a row's last
            completion token is 0 (the episode ends)
    Returns:
        advantages, returns: (b, L), 0 outside the mask
    """
    b, L = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    running = torch.zeros_like(next_value)
    for t in reversed(range(L)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        here = delta + gamma * lam * running
        advantages[:, t] = torch.where(m, here, torch.zeros_like(here))
        running = torch.where(m, here, running)
        next_value = torch.where(m, values[:, t], next_value)
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries; 0 elsewhere."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo_loss(logps, old_logps, values, old_values, advantages, returns, mask, clip_epsilon: float,
             clip_value: float = CLIP_RANGE_VALUE, vf_coef: float = VF_COEF):
    """PPO's loss per completion and its parts: (loss, policy loss, value loss, policy clip share, value clip share),
    each (b,), means over each completion's tokens. All (b, L) inputs; mask bool."""
    maskf = mask.float()
    n = maskf.sum(dim=1).clamp(min=1)
    per_row = lambda t: (t * maskf).sum(dim=1) / n                            # noqa: E731
    ratio = torch.exp(logps - old_logps)
    pg = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_epsilon, 1 + clip_epsilon))
    clipped_values = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    pg_clipped = (-advantages * torch.clamp(ratio, 1 - clip_epsilon, 1 + clip_epsilon) > -advantages * ratio).float()
    vf_clipped = ((clipped_values - returns) ** 2 > (values - returns) ** 2).float()
    policy, value = per_row(pg), per_row(vf)
    return policy + vf_coef * value, policy.detach(), value.detach(), per_row(pg_clipped), per_row(vf_clipped)


class PPOObjective(GRPOObjective):
    """GRPO's sampling, rewards, evaluation and resume; PPO's advantages and loss. The model the Trainer hands to
    loss() is a PolicyWithValue (logits and values); `policy` (what samples) is its language model."""

    progress_metrics = ("reward", "objective/kl")

    def __init__(self, data, policy, tokenizer, rewards, reference, *, value_model, **kwargs):
        super().__init__(data, policy, tokenizer, rewards, reference, **kwargs)
        self.value_model = value_model
        self.stat_names = self.stat_names + ["objective/scores", "objective/kl"]

    def _sample_batch(self, step: int, write_samples: bool):
        """x, y (b, L); advantages, returns, old_logps, old_values (b, L); stats (b, S)."""
        rows, x, y, scores, each, texts, lengths, rate = self._rollout()
        mask = y != IGNORE
        old_logps = self._logps_at_sampling(self.policy, x, y)
        ref_logps = self._reference_logps(x, y) if self.beta else old_logps
        with torch.no_grad(), self.autocast():
            was_training = self.value_model.training
            self.value_model.eval()
            old_values = self.value_model.values(x.to(self.device)).float().cpu() * mask
            self.value_model.train(was_training)
        kl = (old_logps - ref_logps) * mask
        rewards = -self.beta * kl
        last = mask.float().cumsum(dim=1).argmax(dim=1)                          # each row's last completion token
        rewards[torch.arange(len(rows)), last] += scores
        advantages, returns = gae(rewards, old_values, mask)
        advantages = whiten(advantages, mask)
        stats = torch.cat([self._stats(scores, torch.zeros_like(scores), lengths, rate, each),
                           torch.stack([scores, kl.sum(dim=1)], dim=1)], dim=1)
        if write_samples:
            self._maybe_write_samples(step, rows, texts, scores, advantages.sum(dim=1))
        return x, y, advantages, returns, old_logps, old_values, stats

    def loss(self, model, batch):
        if len(batch) == 1:                 # evaluation: held-out rewards (GRPOObjective.eval_batches)
            return super().loss(model, batch)
        x, y, advantages, returns, old_logps, old_values, stats = batch
        mask = y != IGNORE
        logits, values = model(x)
        logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        logps = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * mask
        old = logps.detach() if self.num_iterations == 1 else old_logps
        losses, policy, value, pg_clip, vf_clip = ppo_loss(logps, old, values * mask, old_values, advantages,
                                                           returns, mask, self.clip_epsilon)
        metrics = {name: stats[:, i].sum() for i, name in enumerate(self.stat_names)}
        del metrics["reward_std"], metrics["frac_reward_zero_std"]          # group statistics: GRPO's
        metrics.update({"loss/policy_avg": policy.sum(), "loss/value_avg": value.sum(),
                        "policy/clipfrac_avg": pg_clip.sum(), "val/clipfrac_avg": vf_clip.sum()})
        return losses.sum(), metrics

