"""--task grpo: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), as TRL's GRPOTrainer does it.

For each prompt, G completions are sampled from the current policy with the project's batched recurrent decoder
(inference/decoder.py: one parallel prefill, then one O(1) step per token; CUDA graphs on a GPU) and scored by the
rewards (training/rewards.py). Each completion's advantage is its reward relative to its group:

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)           (std unbiased, as TRL)

and every completion token t of completion i is pushed by the clipped surrogate, with a KL penalty to a frozen
reference (k3 estimator, Schulman 2020):

    ratio = exp(log pi(o_t) - log pi_old(o_t))
    l_t   = -min(ratio A_i, clip(ratio, 1 - eps, 1 + eps) A_i) + beta (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)
    loss  = mean over completions of (mean over that completion's tokens of l_t)       (GRPO's normalisation)

pi_old is the policy that sampled: with one pass per batch (num_iterations 1) it is the policy itself, detached,
so ratio = 1 and the gradient is the plain policy gradient A_i grad log pi; with num_iterations k the same sampled
batch serves k optimizer steps and pi_old's log-probs are taken once, at sampling. The reference is the model with
its LoRA adapters disabled, or a frozen copy of the starting weights (training/rl_setup.py).

Log-probs are of the sampling distribution: logits / temperature (top-p is not corrected for, as in TRL).
Metrics under TRL's names: reward, reward_std (mean within-group std), rewards/<name>/mean, kl, clip_ratio,
completion_length, frac_reward_zero_std; evaluation greedily decodes the held-out prompts and logs their mean
reward as eval_reward (val_loss is minus that, so best/ keeps the highest held-out reward).

Shape letters: b rows (prompts x G), L row length, P prompts, G group size, T new tokens.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from inference.decoder import Decoder, pad_left
from models.sampling import SamplingParams
from utils.chat import end_id
from utils.finetune_data import SFTExample, collate
from utils.sampler import ExampleSampler

from .rewards import score

IGNORE = -100
STD_EPS = 1e-4


# ---- the math, on tensors -------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of consecutive groups of G completions -> (advantages (b,), the group's std per row (b,)).

    rewards: (b,) with b = P * G, each prompt's G completions next to each other."""
    grouped = rewards.float().view(-1, group_size)                             # (P, G)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)                                     # unbiased, as TRL
    advantages = (grouped - mean) / (std + STD_EPS)
    return advantages.reshape(-1), std.expand_as(grouped).reshape(-1)


def token_logps(model, x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(y_t | x_<=t) of the sampling distribution (logits / temperature); 0 where y is -100. (b, L) -> (b, L)"""
    logits, _ = model(x)                                                       # (b, L, v)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)            # (b, L)
    return picked * (y != IGNORE)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_epsilon: float, beta: float):
    """GRPO's loss per completion, and its KL and clip share per completion.

    Args:
        logps, old_logps: (b, L) the policy's and the sampling policy's log-probs of the completion tokens
        ref_logps: (b, L) the reference's, or None when beta is 0
        advantages: (b,)
        mask: (b, L) bool, True on completion tokens
    Returns:
        loss (b,) (mean over each completion's tokens), kl (b,), clip_ratio (b,)
    """
    mask = mask.float()
    n = mask.sum(dim=1).clamp(min=1)                                           # (b,)
    adv = advantages[:, None]                                                  # (b, 1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - clip_epsilon, 1 + clip_epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)                         # (b, L)
    kl = torch.zeros_like(per_token)
    if beta != 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    is_clipped = ((ratio < 1 - clip_epsilon) & (adv < 0)) | ((ratio > 1 + clip_epsilon) & (adv > 0))
    per_row = lambda t: (t * mask).sum(dim=1) / n                              # noqa: E731
    return per_row(per_token), per_row(kl).detach(), per_row(is_clipped.float()).detach()


# ---- sampling -------------------------------------------------------------------------------------------------------

class Rollouts:
    """Which prompts come next, the sampling generator, and the sampled batches being reused: everything an exact
    resume needs (the Trainer saves state_dict() as the objective's sampler)."""

    def __init__(self, n_prompts: int, prompts_per_batch: int, seed: int, device, rank: int = 0,
                 world_size: int = 1, on_load=None):
        self.on_load = on_load          # on_load(calls) after a resume (the objective trims completions.jsonl)
        self.prompts = ExampleSampler(n_prompts, prompts_per_batch, seed=seed, rank=rank, world_size=world_size)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed * 1000 + rank + 1)
        self.calls = 0                  # next_batch calls so far
        self.buffer: list[tuple] = []   # the sampled batches of the current optimizer step(s), one per micro-batch

    def state_dict(self) -> dict:
        return {"prompts": self.prompts.state_dict(), "generator": self.generator.get_state(), "calls": self.calls,
                "buffer": [list(b) for b in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.generator.set_state(state["generator"])
        self.calls = int(state["calls"])
        self.buffer = [tuple(b) for b in state["buffer"]]
        if self.on_load is not None:
            self.on_load(self.calls)


class GRPOObjective:
    """What a GRPO step optimises; the Trainer's objective interface (training/objectives.py).

    Args:
        data: utils.prompt_data.PromptData
        policy: the language model being trained (not a DDP or compiled wrapper: it samples)
        tokenizer: with the chat tokens
        rewards: list of training.rewards.Reward
        reference: reference(x, y) -> (b, L) token log-probs of the frozen reference, or None (beta 0)
        rows: completions per micro-batch (micro_batch_size); a multiple of group_size
        grad_accum_steps: micro-batches per optimizer step (all sampled together, reused num_iterations times)
        device: where the policy runs (the Trainer moves it there); sampling happens there
        autocast: the Trainer's precision context, for the log-probs taken at sampling
        run_dir: where sample completions go (completions.jsonl), or None
        sample_every: write the completions of one prompt every this many optimizer steps (0 = never)
    """

    capture_blocker = "task grpo: every step samples completions of varying length"
    progress_metrics = ("reward", "kl")

    def __init__(self, data, policy, tokenizer, rewards, reference, *, rows: int, group_size: int,
                 max_new_tokens: int, temperature: float, top_p: float | None, stop: tuple[str, ...],
                 beta: float, clip_epsilon: float, num_iterations: int, grad_accum_steps: int, seed: int,
                 device, autocast, run_dir=None, sample_every: int = 0, rank: int = 0, world_size: int = 1, log=print):
        if rows % group_size:
            raise ValueError(f"rows ({rows}) must be a multiple of group_size ({group_size})")
        self.train, self.val = data.train, data.val
        self.policy, self.tokenizer, self.rewards, self.reference = policy, tokenizer, rewards, reference
        self.rows, self.group_size = rows, group_size
        self.max_new_tokens, self.stop = max_new_tokens, tuple(stop)
        self.params = SamplingParams(temperature=temperature, top_p=top_p)
        self.temperature = temperature
        self.beta, self.clip_epsilon, self.num_iterations = beta, clip_epsilon, num_iterations
        self.grad_accum_steps, self.autocast = grad_accum_steps, autocast
        self.sample_file = Path(run_dir) / "completions.jsonl" if run_dir is not None and rank == 0 else None
        self.sample_every, self.log = sample_every, log
        self.end_id, self.pad_id = end_id(tokenizer), tokenizer.eot_id
        self.device = torch.device(device)
        self.sampler = Rollouts(len(self.train), rows // group_size, seed, self.device, rank, world_size,
                                on_load=self._drop_later_samples)
        self.reward_names = [r.name for r in rewards]
        self.stat_names = ["reward", "reward_std", "completion_length", "frac_reward_zero_std",
                           "sample_tokens_per_s"] + [f"rewards/{n}/mean" for n in self.reward_names]
        self._decoder = None

    # ---- the Trainer's interface ----------------------------------------------------------------------------

    def next_batch(self):
        """The next micro-batch: freshly sampled at the first of num_iterations passes, else the stored one."""
        s = self.sampler
        slot = s.calls % self.grad_accum_steps
        step = s.calls // self.grad_accum_steps                  # optimizer steps before this one
        if step % self.num_iterations == 0:
            if slot == 0:
                s.buffer = []
            s.buffer.append(self._sample_batch(step + 1, write_samples=slot == 0))
        s.calls += 1
        return s.buffer[slot]

    def count(self, batch) -> int:
        return batch[0].shape[0]

    def loss(self, model, batch):
        """Training: the GRPO loss summed over the completions of the piece, and the metrics' sums.
        Evaluation (a 1-tuple of held-out rewards, from eval_batches): minus their sum."""
        if len(batch) == 1:
            rewards = batch[0]
            return -rewards.sum(), {"reward": rewards.sum()}
        x, y, advantages, old_logps, ref_logps, stats = batch
        logps = token_logps(model, x, y, self.temperature)
        old = logps.detach() if self.num_iterations == 1 else old_logps
        losses, kl, clip_ratio = grpo_loss(logps, old, ref_logps if self.beta else None, advantages, y != IGNORE,
                                           self.clip_epsilon, self.beta)
        metrics = {name: stats[:, i].sum() for i, name in enumerate(self.stat_names)}
        metrics.update(kl=kl.sum(), clip_ratio=clip_ratio.sum())
        return losses.sum(), metrics

    def can_evaluate(self) -> bool:
        return len(self.val) > 0

    def eval_batches(self, batch_size: int, n: int):
        """Held-out prompts, one greedy completion each, in batches of the decoder's size: yields (rewards,)."""
        prompts = self.val[:max(1, batch_size) * n]
        greedy = SamplingParams(temperature=0.0)
        for i in range(0, len(prompts), self.rows):
            chunk = prompts[i:i + self.rows]
            padded = chunk + [chunk[-1]] * (self.rows - len(chunk))      # the decoder's batch size is fixed
            tokens, lengths, texts, _ = self._generate([e.ids for e in padded], greedy)
            rewards, _ = score(self.rewards, [e.prompt for e in chunk], texts[:len(chunk)], _columns(chunk))
            yield (torch.tensor(rewards, dtype=torch.float32),)

    # ---- sampling and scoring ---------------------------------------------------------------------------------

    def decoder(self) -> Decoder:
        if self._decoder is None:       # built on first use, in eval mode (a CUDA graph is captured on a GPU)
            longest = max(len(e.ids) for e in self.train + self.val)
            self._decoder = Decoder(self.policy, self.rows, max_length=longest + self.max_new_tokens)
        return self._decoder

    @torch.no_grad()
    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams):
        """Sample one completion per prompt row. Returns new tokens (b, T) on the CPU, completion lengths (b,)
        (tokens up to and including <|end|> or the end of a stop string), their texts (without <|end|>), seconds."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            decoder = self.decoder()
            input_ids, mask = pad_left(prompt_ids, self.pad_id, self.device)
            b = len(prompt_ids)
            stopped_at = [None] * b                     # length at which a stop string completed
            start = time.perf_counter()
            new = []
            for tokens in decoder.generate(input_ids, self.max_new_tokens, params, mask, eos_token_id=self.end_id,
                                           generator=self.sampler.generator if not params.greedy else None):
                new.append(tokens)
                if self.stop:
                    self._check_stop(decoder, new, stopped_at)
            tokens = torch.stack(new, dim=1).cpu()                            # (b, T)
            seconds = time.perf_counter() - start
        finally:
            self.policy.train(was_training)
        lengths, texts = [], []
        for i in range(b):
            row = tokens[i].tolist()
            n = row.index(self.end_id) + 1 if self.end_id in row else len(row)
            if stopped_at[i] is not None:
                n = min(n, stopped_at[i])
            lengths.append(n)
            texts.append(self.tokenizer.decode([t for t in row[:n] if t != self.end_id]))
        return tokens, lengths, texts, seconds

    def _check_stop(self, decoder, new, stopped_at) -> None:
        t = len(new)
        for i in range(len(stopped_at)):
            if stopped_at[i] is None and int(new[-1][i]) != self.end_id:
                text = self.tokenizer.decode([int(step[i]) for step in new])
                if any(s in text for s in self.stop):
                    stopped_at[i] = t
                    decoder.stop_rows([i])

    def _rollout(self):
        """Sample G completions for each of the next prompts and score them. Returns the rows' examples (P * G),
        x, y (b, L): prompt + completion right-padded, y the completion tokens (-100 elsewhere), the rewards (b,)
        and each reward's values, the completions' texts and lengths, and the sampling rate (tokens/s)."""
        examples = [self.train[i] for i in self.sampler.prompts.next_indices()]
        rows = [e for e in examples for _ in range(self.group_size)]                      # (P * G)
        tokens, lengths, texts, seconds = self._generate([e.ids for e in rows], self.params)
        total, each = score(self.rewards, [e.prompt for e in rows], texts, _columns(rows))
        sequences = []
        for e, row, n in zip(rows, tokens.tolist(), lengths):
            completion = row[:n]
            sequences.append(SFTExample(e.ids + completion, [IGNORE] * len(e.ids) + completion))
        x, y = collate(sequences, self.pad_id)                                            # (b, L) each
        rate = float(sum(lengths)) / max(seconds, 1e-9)
        return rows, x, y, torch.tensor(total, dtype=torch.float32), each, texts, lengths, rate

    @torch.no_grad()
    def _logps_at_sampling(self, model, x, y) -> torch.Tensor:
        """Token log-probs (b, L) on the CPU, without dropout, under the run's precision (as the loss sees them)."""
        was_training = model.training
        model.eval()
        try:
            with self.autocast():
                return token_logps(model, x.to(self.device), y.to(self.device), self.temperature).float().cpu()
        finally:
            model.train(was_training)

    def _reference_logps(self, x, y) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.reference(x.to(self.device), y.to(self.device)).float().cpu()

    def _stats(self, rewards, group_std, lengths, rate, each) -> torch.Tensor:
        """The per-row values of stat_names (b, len(stat_names)); the Trainer averages them over the step."""
        return torch.stack([rewards, group_std, torch.tensor(lengths, dtype=torch.float32), (group_std == 0).float(),
                            torch.full_like(rewards, rate)]
                           + [torch.tensor(each[n], dtype=torch.float32) for n in self.reward_names], dim=1)

    def _sample_batch(self, step: int, write_samples: bool):
        """The training batch: x, y (b, L); advantages (b,); old_logps, ref_logps (b, L); stats (b, S)."""
        rows, x, y, rewards, each, texts, lengths, rate = self._rollout()
        advantages, group_std = group_advantages(rewards, self.group_size)
        old_logps = self._logps_at_sampling(self.policy, x, y) if self.num_iterations > 1 else torch.zeros(x.shape)
        ref_logps = self._reference_logps(x, y) if self.beta else torch.zeros(x.shape)
        stats = self._stats(rewards, group_std, lengths, rate, each)
        if write_samples:
            self._maybe_write_samples(step, rows, texts, rewards, advantages)
        return x, y, advantages, old_logps, ref_logps, stats

    def _maybe_write_samples(self, step, rows, texts, rewards, advantages) -> None:
        if self.sample_file is not None and self.sample_every and (step == 1 or step % self.sample_every == 0):
            self._write_samples(step, rows, texts, rewards, advantages)

    def _drop_later_samples(self, calls: int) -> None:
        """A resumed run first drops the samples written after its checkpoint, as metrics.jsonl does its rows."""
        if self.sample_file is None or not self.sample_file.is_file():
            return
        done = calls // self.grad_accum_steps
        try:
            lines = self.sample_file.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= done]
            self.sample_file.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        except (OSError, ValueError, KeyError) as err:
            self.log(f"\nwarning: could not trim {self.sample_file} to step {done} ({err}); it keeps later samples")

    def _write_samples(self, step, rows, texts, rewards, advantages) -> None:
        """The first prompt's group of completions, appended to completions.jsonl (a failed write is reported)."""
        lines = [json.dumps({"step": step, "prompt": rows[i].prompt, "completion": texts[i],
                             "reward": round(float(rewards[i]), 6), "advantage": round(float(advantages[i]), 6)})
                 for i in range(self.group_size)]
        try:
            with open(self.sample_file, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        except OSError as err:
            self.log(f"\nwarning: could not write {self.sample_file} ({err.strerror or err}); training goes on")


def _columns(examples) -> dict:
    """The prompts' other fields as aligned lists (what reward functions receive as keywords)."""
    names = examples[0].columns.keys() if examples else ()
    return {k: [e.columns[k] for e in examples] for k in names}
