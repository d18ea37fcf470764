"""TrainConfig: every setting of a training run, and how presets, a JSON file and the command line combine.

Resolution order (later wins):
    TrainConfig defaults  <  training preset (configs/training.py)  <  VRAM preset for the model size
    (configs/vram.py)  <  JSON file (--config run.json)  <  command line.
A resumed run starts from the config saved in its checkpoint instead of the presets; the file and the command
line still override it (e.g. --max_steps to train longer).

Every mistake a user can make here raises ConfigError naming the key, the value and what is allowed;
train.py turns it into a message and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from configs.lora import lora_targets
from configs.training import FINETUNE_PRESETS, TASKS, TRAINING_PRESETS, default_training
from configs.vram import CPU_PRESET, DEFAULT_MODEL_SIZE, VRAM_CHOICES, VRAM_PRESETS_BY_FAMILY

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCAN_BACKENDS = ("auto", "ref", "chunked", "triton")
FAMILIES = ("mamba1", "mamba2", "hybrid")  # models/registry.py
CUDA_GRAPH_MODES = ("auto", "on", "off")     # training/graph_step.py
TASK_DATA = {"sft": "messages or prompt/completion", "dpo": "prompt/chosen/rejected", "reward": "prompt/chosen/rejected",
             "grpo": "prompt, and the fields the rewards read", "ppo": "prompt, and the fields the rewards read"}    # what a --data line holds, per task


class ConfigError(ValueError):
    """A setting the user gave is wrong; the message says which and what is allowed."""


@dataclass
class TrainConfig:
    # --- what to train
    family: str = "mamba1"                 # model family: mamba1 (Mamba-1), mamba2 (Mamba-2, SSD), hybrid (--pattern)
    pattern: str | None = None             # --family hybrid: layer pattern, a preset (mamba mamba2 transformer alternating hybrid hybrid2; default hybrid) or symbols (M Mamba-1, 2 Mamba-2, A attention, F MLP, T attention+MLP)
    model_size: str | None = None          # tiny / small / medium / large (configs/model_sizes.py); None = per device
    vram: str = "auto"                     # 8gb 12gb 16gb 24gb 32gb 48gb, cpu, or auto (read the GPU's memory)
    training: str = "default"              # default / fast / careful (configs/training.py)
    init_from: str | None = None           # start from these weights (HF-format Mamba dir or our checkpoint)
    task: str = "lm"                       # lm (next token on documents), sft (chat: loss on answers), dpo (preferences), reward (a reward model on preferences), grpo / ppo (learning from rewards)
    data: str | None = None                # the JSONL file of task sft / dpo / reward / grpo (conversations / preference pairs / prompts)
    lora: str | None = None                # LoRA adapters: a preset (minimal, attention_only, all, all_x_proj) or names a,b
    lora_rank: int = 8                     # LoRA rank r
    lora_alpha: float = 16.0               # LoRA scaling alpha / r (alpha / sqrt(r) with --rslora)
    lora_dropout: float = 0.0              # dropout on the adapters' input
    rslora: bool = False                   # rank-stabilised LoRA scaling alpha / sqrt(r)
    dpo_beta: float = 0.1                  # DPO: strength of the pull towards the reference model
    pack: bool = False                     # SFT / DPO: pack several examples (pairs) into each row (first-fit decreasing; the model restarts at each example)
    reset_at_doc_boundaries: bool = False  # task lm: the model restarts at each document of a window (after each end-of-text token); off as the published Mamba checkpoints were trained
    # --- learning from rewards (--task grpo / ppo; training/grpo.py, training/ppo.py, training/rewards.py)
    reward: str | None = None              # rewards, comma-separated, summed: exact_match, regex, length, module:function, model:PATH
    reward_weights: str | None = None      # one weight per reward, comma-separated (default 1 each)
    reward_regex: str | None = None        # the pattern of reward regex (re.search on the completion)
    num_generations: int = 8               # completions sampled per prompt (GRPO's group G, >= 2); micro_batch_size must be a multiple
    max_new_tokens: int = 64               # longest completion sampled
    temperature: float = 1.0               # sampling temperature (> 0)
    top_p: float = 1.0                     # nucleus sampling (1 = off)
    stop_strings: str | None = None        # completions end at any of these strings, comma-separated (they always end at <|end|>)
    kl_beta: float = 0.04                  # strength of the KL penalty to the reference model (0 = none, no reference kept)
    clip_epsilon: float = 0.2              # the policy ratio is clipped to [1 - eps, 1 + eps]
    num_iterations: int = 1                # optimizer steps on each sampled batch (1 = plain policy gradient)
    sample_every: int = 10                 # write one prompt's sampled completions to completions.jsonl every N steps (0 = never)
    # --- data (utils/dataset.py)
    data_dir: str | None = None            # a folder of documents; None = the embedded default corpus
    hf_dataset: str | None = None          # a HF dataset name or local path instead of data_dir
    text_field: str = "text"               # the text column of hf_dataset
    tokenizer: str | None = None           # a HF tokenizer name/path; None = train a BPE on the corpus
    vocab_size: int = 16384                # BPE vocabulary when training one
    val_fraction: float = 0.01             # share of tokens held out for evaluation
    cache_dir: str = "cache/prepared"      # tokenised shards are written here once and reused
    # --- batch layout (set by the VRAM preset)
    micro_batch_size: int = 8              # sequences per forward/backward pass (per GPU)
    grad_accum_steps: int = 1              # micro-batches per optimizer step (per GPU)
    seq_len: int = 256                     # tokens per training sequence
    gradient_checkpointing: bool = False   # recompute each block in backward: less memory, ~30% more compute
    # --- device and numerics
    device: str = "auto"                   # auto / cpu / cuda / cuda:N (under torchrun: the local rank's GPU)
    precision: str = "auto"                # auto (bf16 if the GPU has it, else fp16 + GradScaler; fp32 on CPU)
    scan_backend: str = "auto"             # scan backend: selective scan (mamba1) or SSD scan (mamba2), kernels/
    compile: bool = False                  # torch.compile the model
    cuda_graph: str = "auto"               # each step as CUDA graph replays: auto (where the run allows; else eager, saying why), on, off
    # --- optimisation (set by the training preset)
    lr: float = 6e-4                       # peak learning rate
    min_lr_ratio: float = 0.1              # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 200                # linear warmup from 0 to lr
    max_steps: int = 5000                  # optimizer steps in the whole run (the schedule's length)
    weight_decay: float = 0.1              # AdamW decay on matrices and embeddings (never norms, biases, A_log, D)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                 # max global grad norm; 0 = no clipping
    # --- evaluation, logging, checkpoints
    eval_interval: int = 250               # evaluate every N steps (and at the end): the validation split, and eval_data / eval_tasks when given
    eval_batches: int = 20                 # micro-batches per evaluation
    eval_data: str | None = None           # a second corpus scored at each evaluation (loss, perplexity, bits per byte, as evaluate.py): a folder or file, builtin, or hf:NAME_OR_PATH (its text_field)
    eval_tokens: int = 32768               # tokens of eval_data scored per evaluation at most (long documents cut to an equal share)
    eval_tasks: str | None = None          # lm-evaluation-harness tasks run at each evaluation, comma-separated (pip install lm-eval; evaluation/tasks/ included)
    eval_task_limit: int = 500             # examples per eval_tasks task at each evaluation; 0 = all of them
    log_interval: int = 10                 # a metrics.jsonl row every N steps
    checkpoint_interval: int = 500         # a step_XXXXXX checkpoint every N steps (and at the end)
    keep_last: int = 2                     # complete step checkpoints kept (>= 2), besides best/
    max_nonfinite_steps: int = 10          # this many non-finite steps in a row stop the run
    stop_at_step: int | None = None        # end this session at this step (a later --resume goes on)
    seed: int = 1337
    # --- run directory
    run_name: str | None = None            # checkpoints/<run_name>; None = "<model_size>-<date>-<time>"
    out_dir: str | None = None             # the run directory itself (instead of checkpoints/<run_name>)
    resume: str | None = None              # "latest" or a checkpoint path: continue that run exactly
    # --- optional loggers (only when installed)
    wandb: bool = False
    tensorboard: bool = False
    progress: bool = True                  # the tqdm bar; --no-progress hides only the bar, not the evaluation lines
    allow_cpu: bool = False                # train a GPU --vram preset on the CPU anyway (otherwise refused with what a step would cost)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one process (multiply by the world size under DDP)."""
        return self.micro_batch_size * self.grad_accum_steps * self.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Check ranges and choices; raise ConfigError naming the first bad key."""
        _check_choice("training", self.training, TRAINING_PRESETS)
        _check_choice("family", self.family, FAMILIES)
        _check_choice("vram", self.vram, ("auto", "cpu") + VRAM_CHOICES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("scan_backend", self.scan_backend, SCAN_BACKENDS)
        _check_choice("cuda_graph", self.cuda_graph, CUDA_GRAPH_MODES)
        if self.model_size is not None:
            _check_choice("model_size", self.model_size, _model_sizes())
        if self.pattern is not None:
            _check_pattern(self.family, self.pattern)
        for key in ("micro_batch_size", "grad_accum_steps", "seq_len", "max_steps", "eval_interval",
                    "eval_batches", "eval_tokens", "log_interval", "checkpoint_interval", "max_nonfinite_steps",
                    "vocab_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)}")
        for key in ("warmup_steps", "seed", "eval_task_limit"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.keep_last < 2:
            raise ConfigError(f"keep_last must be at least 2 (so a crash mid-save always leaves one), "
                              f"got {self.keep_last}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for key in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ConfigError(f"stop_at_step must be a positive integer, got {self.stop_at_step}")
        if not (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:")
                                                          and self.device[5:].isdigit())):
            raise ConfigError(f"device {self.device!r} is not allowed; use auto, cpu, cuda or cuda:N")
        if self.data_dir is not None and self.hf_dataset is not None:
            raise ConfigError("give data_dir or hf_dataset, not both")
        if self.eval_data is not None and not self.eval_data.strip():
            raise ConfigError("eval_data is empty; give a folder or file of documents, builtin, or hf:NAME_OR_PATH")
        if self.eval_tasks is not None and not eval_task_names(self.eval_tasks):
            raise ConfigError("eval_tasks is empty; give comma-separated harness task names, e.g. "
                              "lambada_openai,hellaswag")
        self._validate_finetune()
        return self

    def _validate_finetune(self) -> None:
        _check_choice("task", self.task, TASKS)
        if self.task == "lm" and self.data is not None:
            raise ConfigError("data is the JSONL file of --task sft, dpo, reward or grpo; for documents use --data_dir")
        if self.task != "lm":
            if self.data is None:
                raise ConfigError(f"task {self.task} needs --data FILE.jsonl "
                                  f"({TASK_DATA[self.task]} per line)")
            if self.data_dir is not None or self.hf_dataset is not None:
                raise ConfigError(f"task {self.task} reads --data FILE.jsonl, not data_dir / hf_dataset")
        if (self.task != "lm" or self.lora) and not self.init_from:
            raise ConfigError(f"{'--lora' if self.task == 'lm' else 'task ' + self.task} fine-tunes a trained model: "
                              f"give --init_from DIR (an HF-format Mamba folder or one of our checkpoints)")
        if self.lora is not None:
            try:
                lora_targets(self.lora)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be a positive integer, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.dpo_beta > 0:
            raise ConfigError(f"dpo_beta must be > 0, got {self.dpo_beta}")
        if self.pack and self.task not in ("sft", "dpo"):
            raise ConfigError(f"pack is a setting of --task sft or dpo (this run's task is {self.task}); packing "
                              f"the other tasks' examples is not built yet")
        if self.reset_at_doc_boundaries and self.task != "lm":
            raise ConfigError(f"reset_at_doc_boundaries is a setting of --task lm (this run's task is {self.task}); "
                              f"for sft / dpo use --pack, which restarts the model at each example")
        self._validate_rl()

    def _validate_rl(self) -> None:
        """The settings of --task grpo / ppo (training/rl_setup.py checks that the rewards load)."""
        if self.task not in ("grpo", "ppo"):
            if self.reward is not None:
                raise ConfigError(f"reward is a setting of --task grpo or ppo (this run's task is {self.task})")
            return
        if self.reward is None:
            raise ConfigError(f"task {self.task} needs --reward: exact_match, regex, length, module:function or model:PATH "
                              "(several comma-separated)")
        for key in ("num_generations", "max_new_tokens", "num_iterations"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.task == "grpo" and self.num_generations < 2:
            raise ConfigError(f"num_generations must be at least 2 (advantages compare a completion with the "
                              f"others of its group), got {self.num_generations}")
        if self.micro_batch_size % self.num_generations:
            raise ConfigError(f"micro_batch_size ({self.micro_batch_size}) counts completions and must be a "
                              f"multiple of num_generations ({self.num_generations}), e.g. --micro_batch_size "
                              f"{self.num_generations * max(1, self.micro_batch_size // self.num_generations)}")
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise ConfigError(f"temperature must be a finite number > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.kl_beta >= 0:
            raise ConfigError(f"kl_beta must be >= 0, got {self.kl_beta}")
        if not 0 < self.clip_epsilon < 1:
            raise ConfigError(f"clip_epsilon must be in (0, 1), got {self.clip_epsilon}")
        if self.sample_every < 0:
            raise ConfigError(f"sample_every must be >= 0, got {self.sample_every}")


def eval_task_names(eval_tasks: str | None) -> list[str]:
    """The task names of an eval_tasks value ("a, b" -> ["a", "b"]); [] for None."""
    return [t.strip() for t in (eval_tasks or "").split(",") if t.strip()]


def _model_sizes() -> tuple[str, ...]:
    from configs.model_sizes import MODEL_SIZES
    return tuple(MODEL_SIZES)


def _check_pattern(family: str, pattern: str) -> None:
    if family != "hybrid":
        raise ConfigError(f"pattern {pattern!r} is for --family hybrid only (this run's family is {family!r})")
    from configs.hybrid import resolve_pattern
    try:
        resolve_pattern(pattern, depth=24)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        hint = ""
        if key == "vram" and isinstance(value, str) and value.strip().isdigit():
            hint = f" (did you mean '{value.strip()}gb'?)"
        raise ConfigError(f"{key} {value!r} is not allowed{hint}; choose one of: {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------------------
# Types: one table, used by the JSON reader and the command line alike.

def field_types() -> dict[str, tuple[type, bool]]:
    """key -> (base type, may be None), from TrainConfig's annotations."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            base = next(a for a in args if a is not type(None))
            out[f.name] = (base, True)
        else:
            out[f.name] = (hint, False)
    return out


def check_value(key: str, value, source: str):
    """Type-check one value from a JSON file (no coercion from strings: a wrong type is an error)."""
    types_ = field_types()
    if key not in types_:
        raise ConfigError(f"unknown config key {key!r} in {source}; allowed keys: {', '.join(sorted(types_))}")
    base, optional = types_[key]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} in {source} may not be null (expected {base.__name__})")
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, int) and not isinstance(value, bool) if base is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, base))
    if not ok:
        raise ConfigError(f"config key {key!r} in {source} must be {base.__name__}, "
                          f"got {type(value).__name__} {value!r}")
    return float(value) if base is float else value


def load_config_file(path: str | Path) -> dict:
    """Read a JSON object of TrainConfig fields; every key and type checked."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object of settings, "
                          f"got {type(data).__name__}")
    if isinstance(data.get("resume"), bool):     # "resume": true = the newest checkpoint, as --resume without a value
        data["resume"] = "latest" if data["resume"] else None
    return {k: check_value(k, v, str(path)) for k, v in data.items()}


# ----------------------------------------------------------------------------------------------------------
# Presets

def detect_vram(device_type: str, total_memory_bytes: int | None = None) -> str:
    """The VRAM preset for a device: "cpu" without a GPU, else the largest preset the card holds."""
    if device_type != "cuda":
        return "cpu"
    gib = total_memory_bytes / 2**30
    # Cards are sold in decimal-ish GB and report a little less than the label (an "8 GB" card: ~7.8 GiB).
    fitting = [v for v in VRAM_CHOICES if gib >= 0.93 * int(v[:-2])]
    return fitting[-1] if fitting else VRAM_CHOICES[0]


def resolve_config(overrides: dict, config_file: str | None = None, *, device_type: str = "cpu",
                   total_memory_bytes: int | None = None, base: dict | None = None) -> TrainConfig:
    """Merge defaults, presets, a JSON file and explicit overrides into one checked TrainConfig.

    Args:
        overrides: keys the user gave on the command line (only those; already typed)
        config_file: path of a JSON object of settings, or None
        device_type: "cpu" or "cuda", for vram "auto" and the default model size
        total_memory_bytes: the GPU's memory, for vram "auto"
        base: a saved, fully resolved config (resume): presets are not applied again
    Returns:
        TrainConfig with vram and model_size resolved to concrete names
    """
    types_ = field_types()
    for key in overrides:
        if key not in types_:
            raise ConfigError(f"unknown config key {key!r}; allowed keys: {', '.join(sorted(types_))}")
    user = dict(load_config_file(config_file)) if config_file else {}
    user.update(overrides)

    if base is not None:
        values = {k: v for k, v in base.items() if k in types_}
        values.update(user)
        return TrainConfig(**values).validate()

    training = user.get("training") or default_training(user.get("task", TrainConfig.task), bool(user.get("lora")))
    _check_choice("training", training, TRAINING_PRESETS)
    family = user.get("family", TrainConfig.family)
    _check_choice("family", family, FAMILIES)
    vram = user.get("vram", TrainConfig.vram)
    _check_choice("vram", vram, ("auto", "cpu") + VRAM_CHOICES)
    if vram == "auto":
        vram = detect_vram(device_type, total_memory_bytes)
    model_size = user.get("model_size") or DEFAULT_MODEL_SIZE["cpu" if vram == "cpu" else "gpu"]
    _check_choice("model_size", model_size, _model_sizes())

    values = dict(TRAINING_PRESETS[training])
    if vram == "cpu":
        values.update(CPU_PRESET["layout"])
        if training not in FINETUNE_PRESETS:     # a fine-tuning recipe keeps its own small lr and schedule
            values.update(CPU_PRESET["schedule"])
        values.update(CPU_PRESET["data"])
    else:
        presets = VRAM_PRESETS_BY_FAMILY[family][vram]
        if model_size not in presets:
            raise ConfigError(f"no {vram} layout for model_size {model_size!r}"
                              f"{' of family ' + family if family != 'mamba1' else ''}; "
                              f"presets exist for: {', '.join(presets)}")
        values.update(presets[model_size])
    values.update(user)
    values.update(training=training, vram=vram, model_size=model_size)
    return TrainConfig(**values).validate()


# ----------------------------------------------------------------------------------------------------------
# Command line: one --flag per TrainConfig field, plus --config. Only flags the user typed are returned.

def field_comments() -> dict[str, str]:
    """key -> the comment beside the field in TrainConfig (the --help text)."""
    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a Mamba language model. Settings combine: training preset < VRAM preset < "
                    "--config JSON < these flags. Presets may change the defaults shown here.")
    p.add_argument("--config", default=None, help="JSON file of settings (keys as the flags below)")
    defaults = TrainConfig()
    comments = field_comments()
    for name, (base, optional) in field_types().items():
        flag = f"--{name}"
        help_ = f"{comments.get(name, '')} (default: {getattr(defaults, name)!r})".replace("%", "%%").strip()
        if name == "resume":
            p.add_argument(flag, nargs="?", const="latest", default=argparse.SUPPRESS,
                           help="resume the newest complete checkpoint (of --run_name/--out_dir if given, "
                                "else under checkpoints/), or the one at this path")
        elif base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
            # --no_progress as well as --no-progress: prepare_data.py and evaluate.py spell flags with "_"
            p.add_argument(f"--no_{name}", dest=name, action="store_false", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, type=base, default=argparse.SUPPRESS, metavar=base.__name__.upper(), help=help_)
    return p


def parse_args(argv=None) -> tuple[dict, str | None]:
    """Returns (explicit overrides, config file path)."""
    ns = vars(build_arg_parser().parse_args(argv))
    config_file = ns.pop("config", None)
    return ns, config_file
