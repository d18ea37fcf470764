"""metrics.jsonl, loss.png and the optional experiment trackers (rank 0 only).

metrics.jsonl holds one JSON object per line:
    train rows: {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "skipped"}
    eval rows:  {"step", "tokens", "val_loss", "val_ppl", "best_val_loss"}, and with eval_data / eval_tasks
                {"eval_loss", "eval_ppl", "eval_bits_per_byte", "<task>/<metric>"} (training/extra_eval.py)
A resumed run first drops the rows after its checkpoint's step, so the file reads as one continuous run.
A write that fails (full disk, a folder made read-only) is reported once and training goes on.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import matplotlib

from .config import ConfigError

matplotlib.use("Agg")   # files only: no display needed, on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: int | None = None, wandb: bool = False,
                 tensorboard: bool = False, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self._failed: set[str] = set()      # files whose write failed (reported once each)
        if self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if resume_step is not None and r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._wandb = self._tb = None
        if wandb:
            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("--wandb needs the wandb package, which is not installed: pip install wandb")
            import wandb as wandb_mod
            self._wandb = wandb_mod.init(project="mamba-trainer", name=self.run_dir.name, config=config,
                                         resume="allow")
        if tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError("--tensorboard needs the tensorboard package, which is not installed: "
                                  "pip install tensorboard")
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as err:
            self._report(self.path, err)
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)

    def plot(self) -> Path:
        """Write loss.png: train loss per logged step and validation loss per eval; eval_data's bits per byte on
        an axis of its own (right), and the harness tasks' fractions (accuracies) in a panel below, when the run has
        them; the reward (sampled, and held-out greedy) in a panel on the right when learning from rewards."""
        train = self._series("loss")
        val = self._series("val_loss")
        bpb = self._series("eval_bits_per_byte")
        # task metrics that are fractions (accuracies, exact match) share a panel; a perplexity has no place on it
        # (an objective's own metrics, DPO's rewards/accuracies and their eval_ twins, are not tasks)
        task_keys = sorted(k for k in {k for r in self.rows for k in r if "/" in k}
                           if not k.startswith(("rewards/", "eval_")) and all(0 <= v <= 1 for _, v in self._series(k)))
        reward, eval_reward = self._series("reward"), self._series("eval_reward")
        columns = 2 if reward or eval_reward else 1
        fig, axes = plt.subplots(2 if task_keys else 1, columns, figsize=(7 * columns, 6.5 if task_keys else 4),
                                 sharex=True, squeeze=False, height_ratios=[2, 1] if task_keys else None)
        ax = axes[0, 0]
        if columns == 2:
            self._plot_reward(axes[0, 1], reward, eval_reward)
            if task_keys:
                axes[1, 1].set_visible(False)
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if bpb:     # another unit (bits per byte of another corpus): its own axis, not the loss's
            right = ax.twinx()
            line, = right.plot(*zip(*bpb), "s--", color="tab:green", label="eval_data bits per byte", linewidth=1.2)
            right.set_ylabel("eval_data bits per byte")
            handles, labels = handles + [line], labels + [line.get_label()]
        ax.legend(handles, labels)
        if task_keys:
            tasks_ax = axes[1, 0]
            for key in task_keys:
                tasks_ax.plot(*zip(*self._series(key)), "o-", label=key, linewidth=1)
            tasks_ax.set_ylabel("harness tasks")
            tasks_ax.grid(alpha=0.3)
            tasks_ax.legend(fontsize=8)
        axes[-1, 0].set_xlabel("optimizer step")
        fig.tight_layout()
        out = self.run_dir / "loss.png"
        tmp = self.run_dir / ".loss.png.tmp"
        try:
            fig.savefig(tmp, format="png", dpi=100)
            tmp.replace(out)
        except OSError as err:
            self._report(out, err)
        finally:
            plt.close(fig)
        return out

    @staticmethod
    def _plot_reward(ax, reward, eval_reward) -> None:
        if reward:
            ax.plot(*zip(*reward), label="reward (sampled)", linewidth=1)
        if eval_reward:
            ax.plot(*zip(*eval_reward), "o-", label="eval_reward (held-out, greedy)", linewidth=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
        ax.legend()

    def _series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every row with a finite `key`."""
        return [(r["step"], r[key]) for r in self.rows
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    def _report(self, path: Path, err: OSError) -> None:
        if path.name not in self._failed:
            self._failed.add(path.name)
            print(f"\nwarning: could not write {path} ({err.strerror or err}); training goes on (reported once)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
