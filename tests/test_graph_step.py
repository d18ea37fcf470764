"""The training step as CUDA graph replays (training/graph_step.py): which runs may capture and what they say, the
--cuda_graph flag, the Trainer's warm-up / replay / fall-back control flow (on the CPU, with a stand-in for the
graphs), and on a GPU the captured step against the eager one, loss by loss and weight by weight."""
import contextlib
import math
import types

import numpy as np
import pytest
import torch

from configs.model_sizes import model_config
from models import build_model
from models.lora import LoRAConfig, apply_lora
from training.config import ConfigError, TrainConfig, resolve_config
from training.distributed import DistInfo
from training.graph_step import WARMUP_STEPS, CaptureFailed, _lr_from_tensor, capture_blocker, use_cuda_graph
from training.launch import main
from training.objectives import DPOObjective, LMObjective, SFTObjective
from training.precision import resolve_precision
from training.trainer import Trainer

VOCAB = 256
CUDA = torch.device("cuda")


class _Tok:
    vocab_size = VOCAB

    def save(self, path):
        pass


def make_trainer(run_dir, device, log=None, model_size="tiny", family="mamba1", lora=False, **settings):
    """A Trainer on random tokens, built the same way from the same seed every time (so two of them can be compared
    step by step); with lora, rank-4 adapters on the projections train and the base is frozen."""
    values = dict(model_size=model_size, family=family, vram="cpu", seq_len=64, micro_batch_size=4,
                  grad_accum_steps=2, lr=3e-3, warmup_steps=0, progress=False, device=device.type)
    values.update(settings)
    cfg = TrainConfig(**values).validate()
    rng = np.random.default_rng(0)
    data = types.SimpleNamespace(train_tokens=rng.integers(0, VOCAB, 50_000, dtype=np.uint16),
                                 val_tokens=rng.integers(0, VOCAB, 5_000, dtype=np.uint16))
    torch.manual_seed(0)
    model = build_model(model_config(model_size, VOCAB, family=family))
    if lora:
        apply_lora(model, LoRAConfig(targets=["in_proj", "dt_proj", "out_proj"], rank=4))
    precision = resolve_precision(cfg.precision, device)
    return Trainer(cfg, model, _Tok(), data, device, precision, DistInfo(), run_dir,
                   log=log if log is not None else (lambda *a, **k: None))


def blocker(**changes):
    args = dict(device=CUDA, precision="bf16", distributed=False, gradient_checkpointing=False, compiled=False,
                objective_blocker=None, model=torch.nn.Linear(2, 2))
    args.update(changes)
    return capture_blocker(**args)


# ---- which runs capture (CPU) ---------------------------------------------------------------------------------

def test_capture_blocker_names_each_reason():
    assert blocker() is None                                   # a bf16 LM step on a GPU: captured
    assert blocker(precision="fp32") is None
    assert "cpu" in blocker(device=torch.device("cpu"))
    assert "gradient checkpointing" in blocker(gradient_checkpointing=True)
    assert "compile" in blocker(compiled=True)
    assert "DDP" in blocker(distributed=True)
    assert "fp16" in blocker(precision="fp16")
    assert "dropout" in blocker(model=torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    assert blocker(model=torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0))) is None
    # the objectives: fixed LM windows capture; SFT and DPO batches vary in length
    assert LMObjective.capture_blocker is None
    assert "sft" in blocker(objective_blocker=SFTObjective.capture_blocker)
    assert "dpo" in blocker(objective_blocker=DPOObjective.capture_blocker)


def test_use_cuda_graph_modes():
    assert use_cuda_graph("auto", None) and use_cuda_graph("on", None)
    assert not use_cuda_graph("off", None)
    assert not use_cuda_graph("auto", "the device is cpu")
    assert not use_cuda_graph("off", "the device is cpu")
    with pytest.raises(ConfigError, match="--cuda_graph on cannot be honoured: the device is cpu"):
        use_cuda_graph("on", "the device is cpu")


def test_cuda_graph_setting():
    assert TrainConfig().cuda_graph == "auto"
    assert resolve_config({"cuda_graph": "off"}).cuda_graph == "off"
    with pytest.raises(ConfigError, match="cuda_graph 'sometimes' is not allowed; choose one of: auto, on, off"):
        resolve_config({"cuda_graph": "sometimes"})


def test_bad_cuda_graph_flag_exits_2(capsys):
    assert main(["--cuda_graph", "maybe", "--vram", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cuda_graph 'maybe' is not allowed" in err and "Traceback" not in err


def test_auto_on_the_cpu_steps_eagerly_and_says_why(tmp_path):
    trainer = make_trainer(tmp_path, torch.device("cpu"))
    assert trainer.captured is None
    assert trainer.step_kind == "eager, no CUDA graph: the device is cpu (CUDA graphs need a CUDA GPU)"
    assert make_trainer(tmp_path, torch.device("cpu"), cuda_graph="off").step_kind == "eager (--cuda_graph off)"
    with pytest.raises(ConfigError, match="--cuda_graph on cannot be honoured: the device is cpu"):
        make_trainer(tmp_path, torch.device("cpu"), cuda_graph="on")


def test_lr_from_tensor_is_undone_after_the_capture():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "weight_decay": 0.0}], lr=1e-3)
    lr = torch.tensor(5e-4)
    with _lr_from_tensor(opt, lr):
        assert all(g["lr"] is lr and g["capturable"] for g in opt.param_groups)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    assert not any(g["capturable"] for g in opt.param_groups)
    with contextlib.suppress(RuntimeError), _lr_from_tensor(opt, lr):
        raise RuntimeError("capture failed")
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]


# ---- the Trainer's control flow (CPU, graphs stood in for) -------------------------------------------------------

class EagerStandIn:
    """CapturedStep's interface, run op by op on the CPU: each "replay" recomputes compute on the batches (from
    fresh gradients, as a replay's first backward overwrites .grad), and optimizer_step steps. Lets the Trainer's
    warm-up / replay / skip / fall-back logic run where no GPU is."""

    captured = True

    def __init__(self, compute, optimizer, fail_at_replay=None):
        self.compute, self.optimizer, self.fail_at_replay = compute, optimizer, fail_at_replay
        self.warmups = self.replays = 0
        self.released = False

    @contextlib.contextmanager
    def warmup(self):
        self.warmups += 1
        yield

    def forward_backward(self, batches, lr):
        self.replays += 1
        if self.replays == self.fail_at_replay:
            raise CaptureFailed("capture failed (simulated)")
        assert all(g["lr"] == lr for g in self.optimizer.param_groups)
        self.optimizer.zero_grad(set_to_none=True)
        return self.compute(batches)

    def optimizer_step(self):
        self.optimizer.step()

    def release(self):
        self.released = True


def _weights(trainer):
    return [p.detach().clone() for p in trainer.raw_model.parameters()]


def test_replayed_steps_equal_eager_steps_and_fall_back_loudly(tmp_path):
    cpu = torch.device("cpu")
    lrs = [3e-3, 2e-3, 1e-3]
    eager = make_trainer(tmp_path / "eager", cpu, seq_len=32)
    eager_losses = [eager.train_step(lr) for lr in lrs]

    replayed = make_trainer(tmp_path / "replayed", cpu, seq_len=32)
    stand_in = replayed.captured = EagerStandIn(replayed._accumulate_and_clip, replayed.optimizer)
    replayed.warmup_left = 1            # (WARMUP_STEPS in a real run; one keeps this test short)
    losses = [replayed.train_step(lr) for lr in lrs]
    assert stand_in.warmups == 1 and stand_in.replays == 2
    for (a, na, fa), (b, nb, fb) in zip(eager_losses, losses):
        assert fa and fb and a == pytest.approx(b, rel=1e-6) and na == pytest.approx(nb, rel=1e-5)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(_weights(eager), _weights(replayed)))

    # a capture that fails: one line saying why, this step and the rest eagerly, the same numbers
    lines = []
    failing = make_trainer(tmp_path / "failing", cpu, log=lines.append, seq_len=32)
    stand_in = failing.captured = EagerStandIn(failing._accumulate_and_clip, failing.optimizer, fail_at_replay=1)
    failing.warmup_left = 0
    losses = [failing.train_step(lr) for lr in lrs[:2]]
    assert stand_in.released and failing.captured is None and stand_in.replays == 1
    assert [line.strip() for line in lines] == ["CUDA graph off from step 1: capture failed (simulated); the steps "
                                                "run eagerly"]
    assert failing.step_kind == "eager, no CUDA graph: capture failed (simulated)"
    assert [v for v, _, _ in losses] == pytest.approx([v for v, _, _ in eager_losses[:2]], rel=1e-6)


def test_non_finite_replay_skips_the_optimizer(tmp_path):
    trainer = make_trainer(tmp_path, torch.device("cpu"), seq_len=32)
    trainer.warmup_left = 0
    stand_in = trainer.captured = EagerStandIn(trainer._accumulate_and_clip, trainer.optimizer)
    stepped = []
    stand_in.optimizer_step = lambda: stepped.append(True)
    compute = stand_in.compute
    stand_in.compute = lambda batches: tuple(t * math.nan for t in compute(batches))
    before = _weights(trainer)
    loss, norm, finite = trainer.train_step(1e-3)
    assert not finite and math.isnan(loss) and not stepped
    assert all(torch.equal(x, y) for x, y in zip(before, _weights(trainer)))


def test_evaluation_out_of_memory_drops_the_graphs(tmp_path):
    lines = []
    trainer = make_trainer(tmp_path, torch.device("cpu"), log=lines.append, seq_len=32, eval_batches=1)
    stand_in = trainer.captured = EagerStandIn(trainer._accumulate_and_clip, trainer.optimizer)
    forward, calls = trainer.raw_model.forward, []

    def short_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    trainer.raw_model.forward = short_of_memory
    assert math.isfinite(trainer.evaluate()) and len(calls) == 2
    assert stand_in.released and trainer.captured is None and trainer.raw_model.training
    assert [line.strip() for line in lines] == ["CUDA graph off from step 1: evaluation ran out of GPU memory beside "
                                                "the graphs' memory; the steps run eagerly"]


# ---- the captured step on a GPU ---------------------------------------------------------------------------------

def _run(trainer, lrs):
    out = [trainer.train_step(lr) for lr in lrs]
    torch.cuda.synchronize()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("precision,family,lora", [("fp32", "mamba1", False), ("bf16", "mamba1", False),
                                                   ("bf16", "mamba2", False), ("bf16", "hybrid", False),
                                                   ("bf16", "mamba1", True)])
def test_gpu_captured_step_matches_eager(tmp_path, precision, family, lora):
    """3 eager warm-up steps, then 5 replays (2 micro-batches each, a new lr each step), against 8 eager steps and,
    as the measure of run-to-run noise (the scan's backward adds with atomics), against a second eager run. With
    LoRA only the adapters train (the frozen base gets no .grad, in or out of the graph)."""
    lrs = [3e-3, 2.5e-3, 2e-3, 3e-3, 1e-3, 2e-3, 1.5e-3, 1e-3]
    runs = {}
    for name, mode in (("eager", "off"), ("eager again", "off"), ("graph", "on")):
        trainer = make_trainer(tmp_path / name.replace(" ", "_"), CUDA, family=family, precision=precision,
                               cuda_graph=mode, lora=lora)
        start = _weights(trainer)
        losses = _run(trainer, lrs)
        assert (trainer.captured is not None and trainer.captured.captured) == (mode == "on")
        runs[name] = (losses, [w - w0 for w, w0 in zip(_weights(trainer), start)])
        if mode == "on":   # the checkpoint's optimizer state is that of an eager run
            groups = trainer.training_state()["optimizer"]["param_groups"]
            assert all(g["lr"] == lrs[-1] and not g["capturable"] for g in groups)
    (eager, w_eager), (again, w_again), (graph, w_graph) = runs["eager"], runs["eager again"], runs["graph"]
    assert all(f for _, _, f in graph)
    loss_tol = 1e-5 if precision == "fp32" else 2e-3
    for (a, na, _), (b, nb, _), (c, nc, _) in zip(eager, again, graph):
        assert c == pytest.approx(a, rel=loss_tol) and nc == pytest.approx(na, rel=10 * loss_tol)
    # The 8 steps' whole update (weights after minus before), compared as one vector: a skipped step is ~1/8 of it, a
    # lost micro-batch or a stale lr more. Not weight by weight: Adam turns a rounding-size change in a near-zero
    # gradient into an lr-size move of that one weight (seen in bf16 with attention, whose backward is not
    # deterministic either), so single weights differ between two eager runs by chance.
    def relative_change(updates):
        num = sum((x - y).float().pow(2).sum() for x, y in zip(updates, w_eager))
        return (num / sum(x.float().pow(2).sum() for x in w_eager)).sqrt().item()
    noise, diff = relative_change(w_again), relative_change(w_graph)
    assert diff <= 4 * noise + (1e-4 if precision == "fp32" else 2e-2), (diff, noise)


@pytest.mark.gpu
def test_gpu_changed_shape_or_halved_micro_batch_falls_back(tmp_path):
    lines = []
    trainer = make_trainer(tmp_path, CUDA, log=lines.append, precision="bf16")
    _run(trainer, [1e-3] * (WARMUP_STEPS + 1))
    assert trainer.captured.captured
    with pytest.raises(CaptureFailed, match="changed shape"):
        x, y = trainer.objective.next_batch()
        trainer.captured.forward_backward([(x[:, :32], y[:, :32])] * 2, 1e-3)
    trainer.micro_split = 2                       # as after an out-of-memory in a warm-up step
    loss, _, finite = trainer.train_step(1e-3)
    assert finite and math.isfinite(loss) and trainer.captured is None
    assert any("CUDA graph off from step" in line and "halved to 2" in line for line in lines)
    assert all(p.grad is None for p in trainer.raw_model.parameters())     # released, and eager zeroed them
