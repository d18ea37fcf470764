"""LoRA: low-rank adapters on named linear modules (Hu et al. 2021), saved in PEFT's format.

A wrapped linear computes
    y = x W^T + b + scaling * dropout(x) A^T B^T        A: (r, in) kaiming-uniform, B: (out, r) zero
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)
so a fresh adapter changes nothing. W and b stay where they were (same parameter names, frozen, fp32 in
training); only A and B are trainable. The wrapper is the module itself (`mixer.in_proj` becomes a LoRALinear in
place), so every path that calls the projection as a module (the parallel forward, any scan backend, the
one-token decoding step, torch.compile) goes through the adapter.

On disk (PEFT, so `peft.PeftModel.from_pretrained(MambaForCausalLM..., dir)` opens it):
    adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules, use_rslora, ...
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight / .lora_B.weight
Our module names are transformers' (backbone.layers.0.mixer.in_proj), so the keys are the ones PEFT writes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    targets: list[str]                   # last parts of module names to wrap (in_proj, x_proj, dt_proj, out_proj)
    rank: int = 8                        # r: the adapter's inner width
    alpha: float = 16.0                  # scaling = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0                 # dropout on the adapter's input (training only)
    rslora: bool = False                 # rank-stabilised scaling alpha / sqrt(r)
    base_model: str | None = None        # where the base weights are (recorded in adapter_config.json)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module name")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_peft(self) -> dict:
        """adapter_config.json as PEFT writes it for a LoraConfig."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model,
                "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": sorted(self.targets), "use_rslora": self.rslora, "bias": "none",
                "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "use_dora": False, **self.extra}

    @classmethod
    def from_peft(cls, d: dict, source: str = ADAPTER_CONFIG) -> "LoRAConfig":
        if d.get("peft_type") != "LORA":
            raise ValueError(f"{source}: peft_type is {d.get('peft_type')!r}; only LORA adapters load here")
        unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern",
                                   "layers_to_transform") if d.get(k)]
        if d.get("bias", "none") != "none":
            unsupported.append("bias")
        if unsupported:
            raise ValueError(f"{source}: adapter options {unsupported} are not supported (plain LoRA only)")
        targets = d.get("target_modules")
        targets = [targets] if isinstance(targets, str) else list(targets or [])
        return cls(targets=targets, rank=d["r"], alpha=float(d["lora_alpha"]),
                   dropout=float(d.get("lora_dropout", 0.0)), rslora=bool(d.get("use_rslora", False)),
                   base_model=d.get("base_model_name_or_path"))


class LoRALinear(nn.Linear):
    """An nn.Linear that keeps the wrapped layer's weight and bias (same names, frozen) and adds B A x * scaling.

    Attributes:
        lora_A: nn.Linear(in, r, bias=False), lora_B: nn.Linear(r, out, bias=False), both fp32 and trainable
        merged: B A * scaling has been added into weight (the adapter branch is then skipped)
        disabled: the adapter branch is skipped (the base model's output), e.g. for a DPO reference
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as PEFT: A random, B zero
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)                        # (..., out)
        if self.merged or self.disabled:
            return out
        h = self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype))   # (..., r)
        return out + (self.lora_B(h) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A: (out, in) fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, rank={self.lora_A.out_features}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


# ---- a model's adapters ---------------------------------------------------------------------------------------------

def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last parts of the names of the model's linear layers (what a target can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(model: nn.Module, config: LoRAConfig, strict: bool = True) -> list[str]:
    """Wrap every nn.Linear whose last name part is in config.targets in a LoRALinear, in place, and freeze all
    other parameters. Returns the wrapped module names.

    strict: every target must match some module (a preset passes False: names the model lacks are skipped,
    e.g. attention projections in a pure Mamba model; at least one must still match).
    Raises ValueError for a target that names no linear module (conv1d, a typo), or a model already wrapped.
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")
    all_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    linear = set(linear_module_names(model))
    not_linear = [t for t in config.targets if t in all_names and t not in linear]
    if not_linear:
        raise ValueError(f"LoRA wraps linear layers; {not_linear} are not linear (linear modules: "
                         f"{', '.join(sorted(linear))})")
    missing = [t for t in config.targets if t not in all_names]
    if (strict and missing) or not set(config.targets) & linear:
        raise ValueError(f"LoRA target(s) {missing} match no module of this model; its linear modules are: "
                         f"{', '.join(sorted(linear))}")
    targets = set(config.targets)
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(m, config.rank, config.alpha, config.dropout, config.rslora))
    return [name for name, _ in chosen]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{<module>.lora_A.weight, <module>.lora_B.weight} for every adapter."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{name}.lora_B.weight"] = m.lora_B.weight
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes as its base (adapters skipped); restored afterwards."""
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise ValueError("adapters are merged into the weights; unmerge them before disabling")
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(modules, previous):
            m.disabled = d


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (the adapter branch is then skipped): same outputs, faster."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain nn.Linear layers back (same weight tensors): the model is then an
    ordinary one that save_pretrained writes as a plain HF checkpoint. All parameters become trainable again."""
    for name, m in lora_modules(model).items():
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---- PEFT files -----------------------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, config: LoRAConfig, path) -> Path:
    """Write path/adapter_config.json and path/adapter_model.safetensors (PEFT's layout and key names)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save")
    if any(m.merged for m in modules.values()):
        raise ValueError("adapters are merged into the weights; unmerge them before saving the adapter")
    tensors = {PEFT_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    wrapped = sorted({name.rsplit(".", 1)[-1] for name in modules})
    saved = LoRAConfig(targets=wrapped, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                       rslora=config.rslora, base_model=config.base_model, extra=config.extra)
    tmp = path / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / ADAPTER_WEIGHTS)
    (path / ADAPTER_CONFIG).write_text(json.dumps(saved.to_peft(), indent=2) + "\n")
    return path


def is_adapter_dir(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path) -> LoRAConfig:
    file = Path(path) / ADAPTER_CONFIG
    try:
        d = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no {ADAPTER_CONFIG}: not an adapter folder") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    try:
        return LoRAConfig.from_peft(d, str(file))
    except KeyError as err:
        raise ValueError(f"{file} lacks {err}") from None


def load_adapter(model: nn.Module, path) -> LoRAConfig:
    """Wrap `model` as path/adapter_config.json says and load path/adapter_model.safetensors strictly.
    Returns the adapter's LoRAConfig."""
    path = Path(path)
    config = read_adapter_config(path)
    apply_lora(model, config, strict=True)
    tensors = load_file(str(path / ADAPTER_WEIGHTS), device="cpu")
    tensors = {k.removeprefix(PEFT_PREFIX).replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path / ADAPTER_WEIGHTS} does not match the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shapes {sorted(wrong)[:4]}")
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v)
    return config
