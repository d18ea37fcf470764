"""The training step replayed as CUDA graphs: the GPU runs a whole step's kernels back to back.

Eager, the CPU launches every kernel of a step one by one: on the H200 the mamba-130m step at 8 x 2048 is 139 ms
of wall time for 118 ms of GPU time, the GPU waiting ~21 ms for 24 layers x a dozen launches (issue 16). Captured
once, a step is two launches:

    copy the step's batches into the static input buffers (the addresses the graphs read)
    fill the learning-rate tensor (the captured AdamW reads lr from it: a float would be frozen into the graph)
    replay graph 1: forward + backward of every micro-batch (gradients accumulated) + clipping
                    -> the static loss and gradient norm
    the Trainer reads loss and grad norm (its one host sync per step, as when eager) and, only if both are finite,
    replay graph 2: the fused AdamW step

so a non-finite step skips the optimizer exactly as the eager step does. Capture needs what CUDA graphs need:
fixed shapes, no host sync inside the step, the same tensors at every replay (parameters, optimizer state and
.grad are never replaced: the Trainer stops calling zero_grad, each replay's first backward overwrites .grad), and
every lazy initialisation done before (Triton compiles, AdamW state, cuBLAS workspaces). So the Trainer runs its
first WARMUP_STEPS steps eagerly on the side stream the capture will use, then captures. `capture_blocker` names
the runs this cannot hold for; --cuda_graph auto steps eagerly there and says why, --cuda_graph on refuses them.
"""
from __future__ import annotations

import contextlib

import torch

from .config import ConfigError

WARMUP_STEPS = 3            # eager steps before the capture (PyTorch's whole-network capture example uses 3)


class CaptureFailed(RuntimeError):
    """The step cannot be captured or replayed (the message says why); the Trainer steps eagerly from then on."""


def capture_blocker(device: torch.device, precision: str, distributed: bool, gradient_checkpointing: bool,
                    compiled: bool, objective_blocker: str | None, model: torch.nn.Module) -> str | None:
    """Why this run's step cannot be a CUDA graph, or None when it can.

    Args:
        precision: "fp32", "bf16" or "fp16" (training.precision)
        objective_blocker: the objective's own reason (training.objectives: variable shapes, host-side counts)
    """
    if device.type != "cuda":
        return f"the device is {device.type} (CUDA graphs need a CUDA GPU)"
    if gradient_checkpointing:
        return "gradient checkpointing recomputes each block in backward, stashing RNG states on the host"
    if compiled:
        return "--compile: torch.compile's kernels are not captured by this step"
    if distributed:
        return "DDP: its gradient all-reduce hooks and bucket rebuilds are not captured by this step"
    if precision == "fp16":
        return "fp16: the GradScaler decides on the host whether to step and how to rescale"
    if objective_blocker is not None:
        return objective_blocker
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return "dropout (e.g. --lora_dropout) draws random numbers inside the step"
    return None


def use_cuda_graph(mode: str, blocker: str | None) -> bool:
    """--cuda_graph auto: capture where nothing blocks it; on: capture or refuse (ConfigError); off: never."""
    if mode == "off":
        return False
    if blocker is None:
        return True
    if mode == "on":
        raise ConfigError(f"--cuda_graph on cannot be honoured: {blocker}; use --cuda_graph auto (steps eagerly "
                          f"and says why) or off")
    return False


@contextlib.contextmanager
def _lr_from_tensor(optimizer: torch.optim.Optimizer, lr: torch.Tensor):
    """While capturing optimizer.step(): every group reads lr from the tensor `lr` and is marked capturable
    (torch.optim refuses a capture otherwise). Restored afterwards, so the optimizer's state_dict (the checkpoint)
    stays that of an eager run; the graph keeps reading the tensor."""
    saved = [(group["lr"], group.get("capturable", False)) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"], group["capturable"] = lr, True
    try:
        yield
    finally:
        for group, (value, capturable) in zip(optimizer.param_groups, saved):
            group["lr"], group["capturable"] = value, capturable


def _flat(batches) -> list[torch.Tensor]:
    return [t for batch in batches for t in batch]


class CapturedStep:
    """One optimizer step as two CUDA graphs: `compute` (everything before the optimizer) and optimizer.step().

    Args:
        compute: compute(batches) -> tuple of tensors (e.g. loss and grad norm): forward + backward (+ clipping) of
            batches already on the device, a list of tuples of tensors with rows in dim 0. It must reach the data only
            through its argument (it is called once, on the static buffers, while capturing) and must not sync.
        optimizer: steps every parameter that compute gives a gradient; its state must exist (one eager step)
        device: the CUDA device
    The outputs of forward_backward are the same tensors at every call, overwritten by the next replay.
    """

    def __init__(self, compute, optimizer: torch.optim.Optimizer, device: torch.device):
        self.compute, self.optimizer, self.device = compute, optimizer, device
        self.stream = torch.cuda.Stream(device)       # eager warm-up and capture both run here
        self.graph = self.optimizer_graph = None
        self.inputs = self.outputs = self.lr = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    @contextlib.contextmanager
    def warmup(self):
        """Run an eager step inside this on the capture's side stream, so that what initialises lazily per stream
        (cuBLAS workspaces, autograd's stream bookkeeping) is ready for it."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)

    def forward_backward(self, batches, lr: float) -> tuple:
        """Replay compute on `batches` (captured at the first call). Returns compute's outputs (static tensors).

        Raises CaptureFailed when the capture fails or the batches do not match the captured shapes; the step has
        not run then, and the caller may run it eagerly after release()."""
        if self.graph is None:
            self._capture(batches, lr)
        self._load(batches, lr)
        self.graph.replay()
        return self.outputs

    def optimizer_step(self) -> None:
        """Replay the captured optimizer step (after forward_backward)."""
        self.optimizer_graph.replay()

    def release(self) -> None:
        """Drop the graphs and their memory; the parameters' .grad are set to None, as an eager step expects."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.graph = self.optimizer_graph = None
        self.inputs = self.outputs = self.lr = None
        torch.cuda.empty_cache()

    def _load(self, batches, lr: float) -> None:
        new, static = _flat(batches), _flat(self.inputs)
        shapes = [(tuple(t.shape), t.dtype) for t in new]
        captured = [(tuple(t.shape), t.dtype) for t in static]
        if shapes != captured:
            raise CaptureFailed(f"the batches changed shape from {captured} to {shapes}; a CUDA graph replays "
                                f"fixed shapes")
        for dst, src in zip(static, new):
            dst.copy_(src, non_blocking=True)
        self.lr.fill_(lr)

    def _capture(self, batches, lr: float) -> None:
        self.inputs = [tuple(t.to(self.device, copy=True) for t in batch) for batch in batches]
        self.lr = torch.tensor(lr, dtype=torch.float32, device=self.device)
        # backward then creates each .grad inside the capture, in the graph's memory pool: static from then on
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream):
                self.outputs = tuple(self.compute(self.inputs))
            self.optimizer_graph = torch.cuda.CUDAGraph()
            with _lr_from_tensor(self.optimizer, self.lr), \
                    torch.cuda.graph(self.optimizer_graph, pool=self.graph.pool(), stream=self.stream):
                self.optimizer.step()
        except Exception as err:        # any failure (out of memory, an op that cannot be captured): step eagerly
            self.release()
            raise CaptureFailed(f"capture failed ({type(err).__name__}: {err})") from err
