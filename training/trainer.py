"""The training loop: accumulation, clipping, mixed precision, non-finite skips, OOM fallback, eval, checkpoints.

One optimizer step:
    fetch grad_accum_steps micro-batches from the sampler (kept on the CPU until the step succeeds)
    for each micro-batch, split into pieces of `micro_split` rows (= micro_batch_size until memory runs out):
        forward under autocast, backward of loss * rows/total_rows (DDP syncs only on the last piece)
    unscale (fp16), clip, check loss and grad norm are finite, then step or skip
If the GPU runs out of memory mid-step the gradients are dropped, micro_split is halved (so twice as many
passes carry the same rows: the effective batch and the data stream do not change) and the step is redone.

On a GPU the same step is replayed as CUDA graphs after a few eager warm-up steps (training/graph_step.py,
--cuda_graph): the forward, backward and clipping of all micro-batches in one replay, the AdamW step in another.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import ConfigError, TrainConfig
from .distributed import DistInfo
from .graph_step import WARMUP_STEPS, CapturedStep, CaptureFailed, capture_blocker, use_cuda_graph
from .metrics import MetricsLogger
from .optim import build_optimizer, lr_at
from .precision import Precision
from .stop import GracefulStop, StopRequested


class TrainingStopped(RuntimeError):
    """Training cannot go on (a run of non-finite steps, out of memory at micro-batch 1); the message says why."""


class StepAbandoned(Exception):
    """A stop signal arrived between two micro-batches of an eager, single-process step: the step is dropped
    (gradients, data position and RNG back to its start) so that the stop need not wait for a long step."""


class Trainer:
    """Trains `model` on `data` as `cfg` says; writes checkpoints and metrics to `run_dir` (rank 0).

    Args:
        cfg: the resolved TrainConfig
        model: LanguageModel (fp32 parameters), on any device; moved to `device`
        tokenizer: saved into every checkpoint
        data: utils.dataset.PreparedData (train_tokens, val_tokens)
        device, precision: from training.precision
        dist: rank information (training.distributed.setup)
        run_dir: the run directory
        resume_state: a checkpoint's training state (checkpoint.load_training_state), or None
        log: where start-up and event messages go (rank 0 only)
        objective: what a step optimises (training.objectives); None = next-token LM on `data`
        save_weights: save_weights(folder) writes the weights of a checkpoint; None = model.save_pretrained
            (a LoRA run writes its adapter instead)
        extra_eval: training.extra_eval.ExtraEvaluation (eval_data, eval_tasks) run at each evaluation, or None
    """

    def __init__(self, cfg: TrainConfig, model, tokenizer, data, device: torch.device, precision: Precision,
                 dist: DistInfo, run_dir: Path, resume_state: dict | None = None, log=print, objective=None,
                 save_weights=None, extra_eval=None):
        from .objectives import LMObjective

        self.cfg, self.tokenizer, self.data = cfg, tokenizer, data
        self.device, self.precision, self.dist = device, precision, dist
        self.run_dir = Path(run_dir)
        self.created_run_dir = not self.run_dir.exists()   # so a run that ends before its first step leaves none
        self.log = log if dist.is_main else (lambda *a, **k: None)

        self.raw_model = model.to(device)
        self.raw_model.set_gradient_checkpointing(cfg.gradient_checkpointing)
        self.raw_model.train()
        self.model = self.raw_model
        self.raw_model.kernels_for(device)    # chosen and logged here, so the compiled forward only reads the choice
        if cfg.compile:
            self.model = torch.compile(self.model)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer, self.fused = build_optimizer(self.raw_model, cfg.lr, cfg.weight_decay,
                                                     (cfg.beta1, cfg.beta2), device)
        self.scaler = precision.make_scaler()
        if objective is None:
            objective = LMObjective(data, cfg.seq_len, cfg.micro_batch_size, cfg.seed, dist.rank, dist.world_size,
                                    reset_at=tokenizer.eot_id if cfg.reset_at_doc_boundaries else None)
        self.objective, self.sampler, self.save_weights = objective, objective.sampler, save_weights
        self.step_metrics: dict[str, float] = {}    # the objective's own metrics of the last step (DPO rewards)
        self.eval_metrics: dict[str, float] = {}    # the objective's own metrics of the last evaluation

        self.step = 0                       # optimizer steps done (skipped ones included)
        self.tokens_seen = 0                # training tokens consumed, all ranks
        self.best_val_loss = math.inf
        self.nonfinite_skipped = 0          # steps skipped in total
        self.nonfinite_in_a_row = 0
        self.micro_split = cfg.micro_batch_size   # rows per forward pass; halves on out-of-memory
        self.stopper = GracefulStop(log=self.log)   # SIGTERM / SIGINT: finish the step, save, stop
        self.stop_everywhere = False                # some rank was signalled (summed with the step's loss)
        self.can_evaluate = objective.can_evaluate()
        self.extra_eval = extra_eval
        if resume_state is not None:
            self.load_state(resume_state)
        self.captured, self.step_kind = self._choose_step()
        self.warmup_left = WARMUP_STEPS         # eager steps before the capture
        self.metrics = MetricsLogger(self.run_dir, resume_step=self.step if resume_state else None,
                                     wandb=cfg.wandb, tensorboard=cfg.tensorboard,
                                     config=cfg.to_dict()) if dist.is_main else None

    # ---- state -------------------------------------------------------------------------------------------------

    def training_state(self) -> dict:
        """Everything besides the weights that an exact resume needs; plain types and tensors only.

        Collective under DDP (every rank's sampler position and RNG state are gathered): call on all ranks.
        """
        from .checkpoint import capture_rng_state
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "nonfinite_skipped": self.nonfinite_skipped,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "micro_split": self.micro_split,
            "world_size": self.dist.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": dist_utils.all_gather_object(self.sampler.state_dict()),
            "rng": dist_utils.all_gather_object(capture_rng_state()),
        }

    def load_state(self, state: dict) -> None:
        from .checkpoint import restore_rng_state
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"the checkpoint was written by {state['world_size']} process(es) and this run has "
                f"{self.dist.world_size}; resume with the same number (torchrun --nproc_per_node) so every "
                f"rank continues its own data stream exactly")
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.best_val_loss = state["best_val_loss"]
        self.nonfinite_skipped = state["nonfinite_skipped"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.micro_split = min(state["micro_split"], self.cfg.micro_batch_size)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"][self.dist.rank])
        restore_rng_state(state["rng"][self.dist.rank])

    # ---- one optimizer step ------------------------------------------------------------------------------------

    def _choose_step(self) -> tuple[CapturedStep | None, str]:
        """The CUDA-graph step if this run allows it and --cuda_graph wants it; and the start-up line saying which
        step runs and, where it is eager under auto, why."""
        blocker = capture_blocker(self.device, self.precision.name, self.dist.enabled, self.cfg.gradient_checkpointing,
                                  self.cfg.compile, self.objective.capture_blocker, self.raw_model)
        if blocker is None and self.micro_split != self.cfg.micro_batch_size:
            blocker = f"the micro-batch was halved to {self.micro_split} after running out of memory"
        if not use_cuda_graph(self.cfg.cuda_graph, blocker):
            return None, ("eager (--cuda_graph off)" if self.cfg.cuda_graph == "off" else
                          f"eager, no CUDA graph: {blocker}")
        captured = CapturedStep(self._accumulate_and_clip, self.optimizer, self.device)
        return captured, (f"CUDA graphs (forward + backward + clip, then AdamW: two replays per step) after "
                          f"{WARMUP_STEPS} eager steps; --cuda_graph off for eager")

    def _stop_capturing(self, why: str) -> None:
        """Step eagerly from now on, saying why (one line)."""
        self.captured.release()
        self.captured = None
        self.step_kind = f"eager, no CUDA graph: {why}"
        self.log(f"\nCUDA graph off from step {self.step + 1}: {why}; the steps run eagerly")

    def _forward_backward(self, batches) -> torch.Tensor:
        """Accumulate gradients of the mean loss over `batches`; returns that loss (a 0-d tensor).

        A batch is a tuple of tensors with rows in dim 0 (x, y for the LM); the objective gives each piece's loss
        as a sum, divided here by the step's total count, so the mean is exact however the rows are split."""
        total = max(1, sum(self.objective.count(b) for b in batches))
        pieces = [tuple(t[i:i + self.micro_split] for t in b)
                  for b in batches for i in range(0, b[0].shape[0], self.micro_split)]
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        metrics = {}
        for j, piece in enumerate(pieces):
            piece = tuple(t.to(self.device, non_blocking=True) for t in piece)   # (rows, seq_len) each
            last = j == len(pieces) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync()
            with sync:
                with self.precision.autocast():
                    loss, extra = self.objective.loss(self.model, piece)
                self.scaler.scale(loss / total).backward()
            loss_sum += loss.detach().float() / total
            for k, v in extra.items():
                metrics[k] = metrics.get(k, 0.0) + v.detach().float() / total
            if not last and self.stopper.requested and self.captured is None and not self.dist.enabled:
                raise StepAbandoned     # DDP ranks (and a graph replay) can only stop together, at a step's end
        self.step_metrics = metrics
        return loss_sum

    def _unscale_and_clip(self) -> torch.Tensor:
        """Unscale (fp16) and clip the accumulated gradients; returns the norm before clipping (a 0-d tensor)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)

    def _accumulate_and_clip(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """What the first CUDA graph holds: the eager step's own forward/backward and clipping, on device batches."""
        loss = self._forward_backward(batches)
        return loss, self._unscale_and_clip()

    def _read_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float, bool]:
        """The step's mean loss over ranks, its grad norm and whether both are finite; the one device sync."""
        # the stop flag rides on the loss's all-reduce: every rank learns of a signal at the same step, for free
        flag = torch.tensor(1.0 if self.stopper.requested else 0.0, device=loss.device)
        summed = dist_utils.all_reduce_sum(torch.stack([loss.detach().float(), flag]))
        stats = torch.stack([summed[0] / self.dist.world_size, grad_norm.float(), summed[1]]).tolist()
        loss_value, norm_value, stop_flag = stats                      # one device sync per step
        self.stop_everywhere = stop_flag > 0
        return loss_value, norm_value, math.isfinite(loss_value) and math.isfinite(norm_value)

    def train_step(self, lr: float) -> tuple[float, float, bool]:
        """One optimizer step at learning rate `lr`. Returns (loss, grad_norm, finite).

        Raises StepAbandoned (nothing of the step kept) when a stop signal arrives between its micro-batches."""
        from .checkpoint import capture_rng_state, restore_rng_state
        if self.captured is not None or self.dist.enabled:     # these steps stop only at their end
            return self._train_step(lr)
        start = (self.sampler.state_dict(), capture_rng_state())
        try:
            return self._train_step(lr)
        except StepAbandoned:
            self.optimizer.zero_grad(set_to_none=True)
            self.sampler.load_state_dict(start[0])
            restore_rng_state(start[1])
            raise

    def _train_step(self, lr: float) -> tuple[float, float, bool]:
        batches = [self.objective.next_batch() for _ in range(self.cfg.grad_accum_steps)]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.captured is not None and self.warmup_left == 0:
            try:
                return self._replayed_step(batches, lr)
            except CaptureFailed as err:
                self._stop_capturing(str(err))      # nothing of this step ran: it runs eagerly below
        if self.captured is None:
            return self._eager_step(batches)
        with self.captured.warmup():
            result = self._eager_step(batches)
        self.warmup_left -= 1
        return result

    def _replayed_step(self, batches, lr: float) -> tuple[float, float, bool]:
        """train_step as two CUDA-graph replays (captured at the first call): the same computation as _eager_step."""
        if self.micro_split != self.cfg.micro_batch_size:
            raise CaptureFailed(f"the micro-batch was halved to {self.micro_split} after running out of memory")
        loss, grad_norm = self.captured.forward_backward(batches, lr)
        loss_value, norm_value, finite = self._read_step(loss, grad_norm)
        if finite:
            self.captured.optimizer_step()
        # no zero_grad: the graph's .grad tensors stay; the next replay's first backward overwrites them
        return loss_value, norm_value, finite

    def _eager_step(self, batches) -> tuple[float, float, bool]:
        """train_step op by op, halving the micro-batch and redoing the step when the GPU runs out of memory."""
        while True:
            try:
                loss = self._forward_backward(batches)
                break
            except torch.OutOfMemoryError:
                pass    # handled below, outside the except block, whose traceback still holds the failed pass
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.micro_split == 1:
                raise TrainingStopped(
                    f"out of GPU memory at micro-batch 1 (seq_len {self.cfg.seq_len}); use a smaller "
                    f"--seq_len or --model_size, --gradient_checkpointing, or a larger --vram card")
            self.micro_split = max(1, self.micro_split // 2)
            passes = self.cfg.grad_accum_steps * math.ceil(self.cfg.micro_batch_size / self.micro_split)
            self.log(f"\nout of GPU memory at step {self.step + 1}: micro-batch halved to {self.micro_split}, "
                     f"{passes} passes per step (same {self.cfg.tokens_per_step:,} tokens per step); "
                     f"redoing the step")

        loss_value, norm_value, finite = self._read_step(loss, self._unscale_and_clip())
        if self.scaler.is_enabled():
            if finite:
                self.scaler.step(self.optimizer)    # still skips by itself if fp16 grads overflowed
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, finite

    # ---- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self) -> float:
        """Mean validation loss over cfg.eval_batches deterministic batches (split across ranks)."""
        return self._beside_graphs(self._evaluate)

    def _beside_graphs(self, evaluation):
        """evaluation()'s result. Beside captured graphs, whose memory pool stays reserved, an evaluation needs its
        own memory: if that runs out, the graphs are dropped (one line says so) and the evaluation is redone."""
        if self.captured is None or not self.captured.captured:
            return evaluation()
        try:
            return evaluation()
        except torch.OutOfMemoryError:
            pass    # handled outside the except block, whose traceback still holds the failed pass
        self._stop_capturing("evaluation ran out of GPU memory beside the graphs' memory")
        return evaluation()

    @torch.no_grad()
    def _evaluate(self) -> float:
        self.raw_model.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)     # (loss sum, count)
        metric_sums: dict[str, torch.Tensor] = {}
        batches = self.objective.eval_batches(self.micro_split, self.cfg.eval_batches)
        for i, batch in enumerate(batches):
            if i % self.dist.world_size != self.dist.rank:
                continue
            with self.precision.autocast():
                loss, extra = self.objective.loss(self.raw_model, tuple(t.to(self.device) for t in batch))
            total[0] += loss.double()
            total[1] += self.objective.count(batch)
            for k, v in extra.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().double()
        self.raw_model.train()
        dist_utils.all_reduce_sum(total)
        if total[1] == 0:
            return math.nan
        # the objective's metrics over the held-out set, as TRL names them: eval_<name> (e.g. eval_accuracy)
        names = sorted(metric_sums)
        if names:
            sums = dist_utils.all_reduce_sum(torch.stack([metric_sums[k] for k in names]))
            self.eval_metrics = {f"eval_{k}": v for k, v in zip(names, (sums / total[1]).tolist())}
        return (total[0] / total[1]).item()

    def _evaluate_and_report(self, bar) -> bool:
        """The validation loss and the extra evaluations (eval_data, eval_tasks), in one metrics.jsonl row and one
        log line. Returns whether the validation loss is a new best."""
        row, new_best = {"step": self.step, "tokens": self.tokens_seen}, False
        if self.can_evaluate:
            val_loss = self.evaluate()
            new_best = val_loss < self.best_val_loss
            if new_best:
                self.best_val_loss = val_loss
            row.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 700)), best_val_loss=self.best_val_loss,
                       **{k: round(v, 6) for k, v in self.eval_metrics.items()})
        if self.extra_eval is not None:
            row.update(self._beside_graphs(lambda: self.extra_eval.run(self.raw_model, self.dist)))
        if len(row) == 2:
            return False        # no validation split and nothing else to evaluate
        if self.metrics is not None:
            self.metrics.log(row)
            self.metrics.plot()
        parts = [f"val_loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 700)):.1f})"
                 f"{' new best' if new_best else ''}"] if self.can_evaluate else []
        if self.extra_eval is not None:
            parts.append(self.extra_eval.summary(row))
        line = f"step {self.step}: " + "; ".join(parts)
        if self.dist.is_main and self.cfg.progress:
            bar.write(line)
        else:
            self.log(line)      # --no-progress hides the bar, not the run's figures
        return new_best

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def save(self, best: bool = False, write_step: bool = True, final: bool = False) -> None:
        """Write a checkpoint (rank 0), after gathering every rank's state. A failed write is reported and
        training goes on (the previous checkpoint is intact), except at the end of the run (or of a stop)."""
        state = self.training_state()
        if self.dist.is_main:
            try:
                ckpt.save_checkpoint(self.run_dir, self.step, self.raw_model, self.tokenizer, self.cfg.to_dict(),
                                     state, keep_last=self.cfg.keep_last, best=best, write_step=write_step,
                                     save_weights=self.save_weights)
            except OSError as err:
                msg = ckpt.describe_failed_save(self.run_dir, self.step, err, self.raw_model, state)
                if final:
                    raise TrainingStopped(msg) from None
                self.log(f"\nwarning: {msg}; training goes on and tries again at the next checkpoint")
        dist_utils.barrier()

    def _stop(self, saved: bool, bar) -> None:
        """A signal arrived during this step: make sure a checkpoint of it exists, then raise StopRequested.
        Stopped before the first step of a new run finished, there is nothing to save (checkpoint None)."""
        bar.close()
        if self.step == 0:
            raise StopRequested(self.stopper.signum or 15, 0, None)
        if not saved:
            self.save(final=True)          # a failure here fails loudly (TrainingStopped)
        signum = self.stopper.signum or 15  # a rank that was not signalled itself stops as for SIGTERM
        raise StopRequested(signum, self.step, self.run_dir / ckpt.step_dir_name(self.step))

    # ---- the loop ----------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Train until max_steps (or stop_at_step). Returns a summary dict."""
        cfg = self.cfg
        end = cfg.max_steps if cfg.stop_at_step is None else min(cfg.max_steps, cfg.stop_at_step)
        tokens_per_step = cfg.tokens_per_step * self.dist.world_size
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.dist.is_main and cfg.progress))
        last_loss = math.nan
        window_tokens, window_start = 0, time.perf_counter()
        tokens_per_s = 0.0
        try:
            self.stopper.__enter__()
            while self.step < end:
                lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
                try:
                    loss, grad_norm, finite = self.train_step(lr)
                except StepAbandoned:
                    self._stop(ckpt.is_complete(self.run_dir / ckpt.step_dir_name(self.step)), bar)
                self.step += 1
                self.tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed if elapsed > 0 else 0.0
                if finite:
                    self.nonfinite_in_a_row = 0
                    last_loss = loss
                else:
                    self.nonfinite_skipped += 1
                    self.nonfinite_in_a_row += 1
                    self.log(f"\nstep {self.step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                             f"step skipped ({self.nonfinite_skipped} so far, {self.nonfinite_in_a_row} in a row)")
                shown = {k: f"{float(self.step_metrics[k]):.4g}" for k in self.objective.progress_metrics
                         if k in self.step_metrics}     # the objective's own (GRPO: reward, kl)
                bar.set_postfix(loss=f"{last_loss:.4f}", **shown, lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                refresh=False)
                bar.update(1)

                stop = self.nonfinite_in_a_row >= cfg.max_nonfinite_steps
                if self.metrics is not None and (self.step % cfg.log_interval == 0 or self.step == end or stop):
                    self.metrics.log({"step": self.step, "tokens": self.tokens_seen, "loss": loss, "lr": lr,
                                      "grad_norm": grad_norm, "tokens_per_s": round(tokens_per_s, 1),
                                      "skipped": not finite,
                                      **{k: round(float(v), 6) for k, v in self.step_metrics.items()}})
                    window_tokens, window_start = 0, time.perf_counter()
                if stop:
                    raise TrainingStopped(
                        f"{self.nonfinite_in_a_row} non-finite steps in a row (up to step {self.step}): the "
                        f"run has diverged. The weights are those of the last finite step; the newest "
                        f"checkpoint is in {self.run_dir}. Try --training careful, a lower --lr, or "
                        f"--precision bf16/fp32.")

                new_best = False
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                    new_best = self._evaluate_and_report(bar)
                save_step = self.step % cfg.checkpoint_interval == 0 or self.step == end
                if save_step or new_best:
                    self.save(best=new_best, write_step=save_step, final=self.step == end)
                if save_step or new_best or self.step % cfg.eval_interval == 0:
                    window_tokens, window_start = 0, time.perf_counter()   # tokens/s counts training only
                if (self.stop_everywhere or (not self.dist.enabled and self.stopper.requested)) and self.step < end:
                    self._stop(save_step, bar)
        finally:
            self.stopper.__exit__()
            bar.close()
            if self.metrics is not None:
                if self.step > 0 and not self.can_evaluate:
                    self.metrics.plot()     # loss.png of the training loss alone (no evaluation drew it)
                self.metrics.close()
        return {"step": self.step, "loss": last_loss, "best_val_loss": self.best_val_loss,
                "nonfinite_skipped": self.nonfinite_skipped, "tokens_seen": self.tokens_seen}
