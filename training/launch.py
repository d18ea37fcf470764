"""What `python train.py` does, as a function tests can call: resolve settings, set up, train, report.

    settings (training/config.py) -> device, precision, DDP -> data (utils/dataset.py) -> model (new, resumed,
    or --init_from) -> memory fit check -> start-up summary -> Trainer.train()

Bad input (ConfigError, the data pipeline's DataError, a checkpoint that does not match) is reported in one
line with exit code 2 and no traceback; a run that has to stop (TrainingStopped) exits with code 1; SIGINT /
SIGTERM stop after a checkpoint of the current step with 130 / 143 (training/stop.py).
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import extra_eval as extra
from . import finetune
from . import rl_setup
from configs.vram import VRAM_CHOICES
from utils.sampler import ResumeMismatch

from .config import ConfigError, TrainConfig, parse_args, resolve_config
from .memory import budget_bytes, estimate_for, fit_layout
from .precision import resolve_device, resolve_precision
from .stop import StopNow, StopRequested
from .trainer import Trainer, TrainingStopped

CHECKPOINTS = Path("checkpoints")
MAX_PASSES = 4          # more passes over the same training tokens than this: say so (and, for the built-in
                        # corpus with no step count given, train fewer steps)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _resume_search_path(overrides: dict, config_file: str | None) -> tuple[Path, str]:
    """Where --resume looks: the given path, else --out_dir / checkpoints/<run_name>, else checkpoints/."""
    from .config import load_config_file
    user = dict(load_config_file(config_file)) if config_file else {}
    user.update(overrides)
    where = user["resume"]
    if where != "latest":
        return Path(where), "the path given to --resume"
    if user.get("out_dir"):
        return Path(user["out_dir"]), "--out_dir"
    if user.get("run_name"):
        return CHECKPOINTS / user["run_name"], "--run_name"
    return CHECKPOINTS, "checkpoints/"


def _find_resume_checkpoint(overrides, config_file) -> Path:
    where, what = _resume_search_path(overrides, config_file)
    try:
        found = ckpt.find_latest_checkpoint(where)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--resume: {err}") from None
    if found is None:
        raise ConfigError(f"--resume: no complete, intact checkpoint under {str(where)!r} ({what}); "
                          f"start a new run without --resume")
    if not (found / ckpt.STATE_FILE).is_file() or not (found / ckpt.TRAIN_CONFIG_FILE).is_file():
        raise ConfigError(f"--resume: {str(found)!r} holds weights but no training state; use --init_from to "
                          f"start a new run from it")
    return found


def _check_shape(expected, found, source: str, cfg: TrainConfig) -> None:
    """Refuse to load weights of another family or model shape (a clear message, not a size-mismatch traceback)."""
    if found.family != expected.family:
        raise ConfigError(f"{source} is a {found.family} model, but this run asks for family {expected.family!r}; "
                          f"pass --family {found.family} (or \"family\": \"{found.family}\" in the JSON config)")
    a, b = expected.shape_dict(), found.shape_dict()
    diffs = [f"{k} {b[k]} (this run: {a[k]})" for k in a if a.get(k) != b.get(k)]
    if diffs:
        raise ConfigError(f"{source} is a model of another shape: {', '.join(diffs)}. This run asks for "
                          f"model_size {cfg.model_size!r}; resume with the settings the checkpoint was trained "
                          f"with (leave out --model_size), or start a new run with --run_name")


def _prepare_data(cfg: TrainConfig, tokenizer, show_progress: bool):
    from utils.dataset import prepare_dataset
    from utils.errors import DataError
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"data_dir {cfg.data_dir!r} does not exist or is not a directory; put your documents "
                          f"in a folder (e.g. data/) or leave --data_dir out to use the built-in corpus")
    try:
        return prepare_dataset(data_dir=cfg.data_dir, hf_dataset=cfg.hf_dataset, text_field=cfg.text_field,
                               tokenizer=tokenizer if tokenizer is not None else cfg.tokenizer,
                               vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction, cache_dir=cfg.cache_dir,
                               show_progress=show_progress)
    except DataError as err:
        raise ConfigError(str(err)) from None


def setup(overrides: dict, config_file: str | None = None, log=_say) -> Trainer:
    """Everything before the loop. Returns a ready Trainer (its run_dir, cfg, model set)."""
    from configs.model_sizes import model_config
    from models import build_model, load_pretrained
    from models.formats import read_config

    # -- settings: a resumed run starts from its saved config
    resume_from = None
    base = None
    if overrides.get("resume") or (config_file and _peek(config_file).get("resume")):
        resume_from = _find_resume_checkpoint(overrides, config_file)
        try:
            base = ckpt.load_train_config(resume_from)
        except ValueError as err:
            raise ConfigError(f"--resume: {err}") from None
        base.update(stop_at_step=None, resume=None)    # settings of the earlier session, not of the run
    req = dict(base or {})
    req.update(_peek(config_file) if config_file else {})
    req.update(overrides)
    device_type = dist_utils.device_type_requested(req.get("device", "auto"))
    dist = dist_utils.setup(device_type)
    device = resolve_device(req.get("device", "auto"), dist.local_rank)
    total_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    cfg = resolve_config(overrides, config_file, device_type=device.type, total_memory_bytes=total_mem, base=base)
    if resume_from is not None:
        cfg.resume = str(resume_from)
    if device.type == "cpu" and cfg.vram in VRAM_CHOICES and not cfg.allow_cpu:
        raise ConfigError(gpu_preset_on_cpu(cfg, torch.cuda.is_available()))
    precision = resolve_precision(cfg.precision, device)
    if not dist.is_main:
        log = lambda *a, **k: None  # noqa: E731
    torch.manual_seed(cfg.seed)
    eval_sources = extra.read_sources(cfg, show_progress=dist.is_main and cfg.progress)   # bad input: before work

    # -- run directory (rank 0 names it; the others follow)
    if resume_from is not None:
        run_dir = resume_from.parent
    elif cfg.out_dir:
        run_dir = Path(cfg.out_dir)
    else:
        family = "" if cfg.family == "mamba1" else f"{cfg.family}-"
        name = cfg.run_name or f"{family}{cfg.model_size}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = CHECKPOINTS / name
    run_dir = Path(dist_utils.broadcast_object(str(run_dir)))
    if resume_from is None and dist.is_main and ckpt.list_step_dirs(run_dir):
        raise ConfigError(f"run directory {str(run_dir)!r} already holds checkpoints; continue it with --resume, "
                          f"or choose another --run_name / --out_dir")
    cfg.run_name = run_dir.name

    # -- tokenizer and weights to start from
    tokenizer, init_dir = None, None
    if resume_from is not None:
        init_dir = resume_from
    elif cfg.init_from:
        try:
            init_dir = ckpt.find_latest_checkpoint(cfg.init_from, for_inference=True)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--init_from: {err}") from None
        if init_dir is None:
            raise ConfigError(f"--init_from: no model under {cfg.init_from!r}")
        cfg.init_from = str(init_dir)       # the exact folder: a resume (and a DPO reference) rebuilds from it
    if init_dir is not None:
        if not (init_dir / "tokenizer.json").is_file():
            raise ConfigError(f"{str(init_dir)!r} has no tokenizer.json; a checkpoint must carry the tokenizer its "
                              f"model was trained with")
        try:
            tokenizer = ckpt.load_tokenizer(init_dir)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    # a LoRA checkpoint holds the adapter; the weights under it are the base it names
    weights_dir = finetune.adapter_base(resume_from) if resume_from is not None and cfg.lora else init_dir

    if cfg.task in rl_setup.RL_TASKS:   # preference pairs (reward) / prompts (grpo, ppo), one JSONL file
        data = rl_setup.load_data(cfg, tokenizer, log)
        data_line = f"{len(data.train):,} train / {len(data.val):,} validation {cfg.task} examples"
    elif cfg.task != "lm":    # chat conversations / preference pairs from one JSONL file
        data = finetune.load_task_data(cfg, tokenizer, log)
        data_line = f"{len(data.train):,} train / {len(data.val):,} validation {cfg.task} examples"
    else:
        # -- data: rank 0 prepares (or reuses) the shards, the others then read them
        if dist.enabled and not dist.is_main:
            dist_utils.barrier()
        data = _prepare_data(cfg, tokenizer, show_progress=dist.is_main and cfg.progress)
        if dist.enabled and dist.is_main:
            dist_utils.barrier()
        tokenizer = data.tokenizer if tokenizer is None else tokenizer
        if len(data.train_tokens) <= cfg.seq_len:
            raise ConfigError(f"the training split has {len(data.train_tokens):,} tokens, fewer than one sequence "
                              f"of seq_len + 1 = {cfg.seq_len + 1}: add more documents or use a smaller --seq_len")
        if len(data.val_tokens) <= cfg.seq_len:
            log(f"warning: the validation split has {len(data.val_tokens):,} tokens, fewer than one sequence of "
                f"seq_len + 1 = {cfg.seq_len + 1}, so there will be no evaluation (and no best/ checkpoint). "
                f"Add documents, raise --val_fraction or lower --seq_len.")
        data_line = f"{len(data.train_tokens):,} train / {len(data.val_tokens):,} validation tokens"

    if cfg.task == "lm":    # passes over a token corpus (fine-tuning examples are counted by the objective)
        user_keys = _user_keys(overrides, config_file)
        builtin = data.manifest.get("identity", {}).get("source", {}).get("kind") == "builtin"
        cfg = plan_passes(cfg, len(data.train_tokens), dist.world_size, builtin,
                          steps_given="max_steps" in user_keys or resume_from is not None, log=log)

    warning = warmup_warning(cfg)
    if warning:
        log(warning)

    # -- the model
    try:
        expected = model_config(cfg.model_size, vocab_size=tokenizer.vocab_size, family=cfg.family,
                                scan_backend=cfg.scan_backend, **pattern_override(cfg))
        if weights_dir is not None:
            found, _ = read_config(weights_dir, scan_backend=cfg.scan_backend)
            if cfg.init_from and found.family == expected.family:
                if "model_size" in _user_keys(overrides, config_file):
                    _check_init_size(expected, found, cfg)
                expected = found              # fine-tuning: the loaded model's shape is the shape
            _check_shape(expected, found, f"checkpoint {str(weights_dir)!r}", cfg)
            model = load_pretrained(weights_dir, device="cpu", dtype=torch.float32, scan_backend=cfg.scan_backend,
                                    family=expected.family)
            finetune.grow_vocab(model, tokenizer, log)    # chat tokens the tokenizer gained
        else:
            model = build_model(expected)
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None
    save_weights = finetune.attach_lora(cfg, model, weights_dir, resume_from, log) if cfg.lora else None
    model, save_weights = rl_setup.wrap_model(cfg, model, resume_from, save_weights)     # reward, ppo: + a scalar head
    n_params = model.num_parameters()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # a full-weight DPO run also holds a frozen reference copy of the model
    n_held = n_params * 2 if (cfg.task == "dpo" and not cfg.lora) or rl_setup.needs_reference_copy(cfg) else n_params

    # -- will it fit? (checked before the first step, never an out-of-memory error an hour in)
    backend = model.scan_backend_for(device)
    est = estimate_for(model.config, n_held, cfg.micro_batch_size, cfg.seq_len, cfg.gradient_checkpointing,
                       precision.name, backend, n_trainable=n_trainable)
    if device.type == "cuda" and cfg.vram != "cpu":
        budget = budget_bytes(cfg.vram, total_mem)
        micro, accum, gc, est, notes = fit_layout(model.config, n_held, cfg.micro_batch_size,
                                                  cfg.grad_accum_steps, cfg.seq_len, cfg.gradient_checkpointing,
                                                  precision.name, budget, backend, n_trainable=n_trainable)
        if est.total > budget:
            raise ConfigError(
                f"model_size {cfg.model_size!r} at seq_len {cfg.seq_len} needs {est.describe()} even at "
                f"micro-batch {micro} with gradient checkpointing; the {cfg.vram} budget is "
                f"{budget / 2**30:.1f} GiB. Use a smaller --model_size or --seq_len, or a larger --vram")
        if notes:
            cfg = dataclasses.replace(cfg, micro_batch_size=micro, grad_accum_steps=accum, gradient_checkpointing=gc)
            for note in notes:
                log(f"memory: {note}")

    try:
        resume_state = ckpt.load_training_state(resume_from) if resume_from is not None else None
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--resume: {err}") from None
    if cfg.task in rl_setup.RL_TASKS:
        objective = rl_setup.build_objective(cfg, data, model, tokenizer, Path(cfg.init_from), dist, device,
                                             precision, run_dir, log)
    else:
        objective = None if cfg.task == "lm" else \
            finetune.build_objective(cfg, data, model, tokenizer, Path(cfg.init_from), dist, device, log)
    extra_eval = None if eval_sources is None else \
        extra.ExtraEvaluation(eval_sources, tokenizer, cfg.eval_tokens, cfg.micro_batch_size, cfg.eval_task_limit)
    try:
        trainer = Trainer(cfg, model, tokenizer, data, device, precision, dist, run_dir, resume_state=resume_state,
                          log=log, objective=objective, save_weights=save_weights, extra_eval=extra_eval)
    except ResumeMismatch as err:       # the checkpoint's sampler state does not fit this run's data
        raise ConfigError(f"--resume: {err}") from None
    except OSError as err:      # the run directory cannot be created or written
        raise ConfigError(f"cannot write to the run directory {str(run_dir)!r} ({err.strerror or err}); choose "
                          f"a writable --out_dir or --run_name") from None

    world = dist.world_size
    log("\n".join([
        f"run          {run_dir}" + (f"  (resuming step {trainer.step} from {resume_from})" if resume_from else ""),
        f"model        {model.config.family} {f'from {cfg.init_from}' if cfg.init_from else cfg.model_size}: "
        f"{n_params:,} parameters "
        f"(d_model {model.config.d_model}, "
        + (f"pattern {model.config.pattern}, " if cfg.family == "hybrid" else "") +
        f"n_layer {model.config.n_layer}, vocab {model.config.vocab_size})"
        + (f"; {n_trainable:,} trainable" if n_trainable != n_params else ""),
        f"data         {data_line}",
        f"batch        {cfg.micro_batch_size} x {cfg.seq_len} tokens x {cfg.grad_accum_steps} accumulation"
        f"{f' x {world} processes' if world > 1 else ''} = {cfg.tokens_per_step * world:,} tokens per optimizer step",
        f"device       {device} ({'DDP ' + str(world) + ' processes, ' if world > 1 else ''}"
        f"precision {precision.name}, scan backend {backend}, "
        f"{'gradient checkpointing, ' if cfg.gradient_checkpointing else ''}"
        f"{'fused ' if trainer.fused else ''}AdamW{', torch.compile' if cfg.compile else ''})",
        f"step         {trainer.step_kind}",
        f"memory       estimated peak {est.describe()}" + (f"; budget {cfg.vram}" if device.type == "cuda" else ""),
        f"schedule     {cfg.task} task, {cfg.training} preset: lr {cfg.lr:g}, warmup {cfg.warmup_steps}, {cfg.max_steps} steps "
        f"({cfg.max_steps * cfg.tokens_per_step * world:,} tokens), eval every {cfg.eval_interval}",
    ] + ([describe_passes(cfg, len(data.train_tokens), world)] if cfg.task == "lm" else [])
      + (extra_eval.describe() if extra_eval is not None else [])))
    return trainer


def _user_keys(overrides: dict, config_file: str | None) -> set:
    """The settings the user gave (flags and the JSON file), as opposed to preset values."""
    return set(overrides) | (set(_peek(config_file)) if config_file else set())


def _check_init_size(asked, found, cfg: TrainConfig) -> None:
    """--init_from takes its checkpoint's shape; an explicit --model_size of another shape is a contradiction."""
    a, b = asked.shape_dict(), found.shape_dict()
    diffs = [f"{k} {b[k]} (model_size {cfg.model_size!r}: {a[k]})" for k in a if k != "vocab_size" and a[k] != b[k]]
    if diffs:
        raise ConfigError(f"--init_from {cfg.init_from!r} is a model of another shape than --model_size "
                          f"{cfg.model_size!r}: {', '.join(diffs)}. Fine-tuning keeps the checkpoint's shape: "
                          f"leave out --model_size")


def warmup_warning(cfg: TrainConfig) -> str | None:
    """One line when the schedule never reaches its peak learning rate (a warmup as long as the run or longer)."""
    if cfg.warmup_steps <= 1 or cfg.warmup_steps < cfg.max_steps:
        return None
    top = cfg.lr * cfg.max_steps / cfg.warmup_steps
    return (f"warning: warmup_steps {cfg.warmup_steps:,} >= max_steps {cfg.max_steps:,}: the learning rate never "
            f"reaches its peak {cfg.lr:g} (it ends at {top:.3g}, still warming up). Give --warmup_steps below "
            f"--max_steps (e.g. {max(1, cfg.max_steps // 10):,})")


def gpu_preset_on_cpu(cfg: TrainConfig, has_gpu: bool) -> str:
    """The message refusing a GPU --vram preset on the CPU: what one step would cost here, and what to run."""
    from configs.model_sizes import count_parameters, model_config
    from .step_cost import describe_seconds, matmul_flops_per_s, step_seconds
    n_params = count_parameters(model_config(cfg.model_size, vocab_size=cfg.vocab_size, family=cfg.family,
                                             **pattern_override(cfg)))
    rate = matmul_flops_per_s()
    per_step = step_seconds(n_params, cfg.tokens_per_step, rate)
    where = "--device cpu" if has_gpu else "no GPU found"
    return (f"--vram {cfg.vram} is a GPU budget and this run is on the CPU ({where}): one optimizer step of "
            f"{cfg.tokens_per_step:,} tokens for the {n_params / 1e6:.1f}M-parameter {cfg.model_size} model would "
            f"take at least ~{describe_seconds(per_step)} here ({cfg.max_steps:,} steps: "
            f"~{describe_seconds(per_step * cfg.max_steps)}; 6 x parameters x tokens at the "
            f"{rate / 1e9:.0f} GFLOP/s this CPU's matrix products measured). On a CPU use --vram cpu "
            f"(8 x 256 tokens per step; the tiny model unless --model_size), or add --allow_cpu to run this "
            f"layout here anyway")


def pattern_override(cfg: TrainConfig) -> dict:
    """The hybrid family's layer pattern (configs/hybrid.py), as model_config's keyword."""
    return {"pattern": cfg.pattern} if cfg.family == "hybrid" else {}


def plan_passes(cfg: TrainConfig, train_tokens: int, world: int, builtin: bool, steps_given: bool,
                log=_say) -> TrainConfig:
    """Say how many passes over the training tokens the run makes; size a default run on the built-in corpus.

    On the built-in corpus with no step count given (flag, JSON file or resumed run), a schedule of more than
    MAX_PASSES passes is shortened to MAX_PASSES (warmup and intervals shortened with it), and said plainly.
    Any other run above MAX_PASSES gets a warning suggesting more data or fewer steps.
    """
    per_step = cfg.tokens_per_step * world
    passes = cfg.max_steps * per_step / max(1, train_tokens)
    if passes > MAX_PASSES and builtin and not steps_given:
        steps = max(1, int(MAX_PASSES * train_tokens // per_step))
        log(f"built-in corpus: {cfg.max_steps:,} steps of {per_step:,} tokens would be {passes:,.0f} passes over "
            f"its {train_tokens:,} training tokens, so this run trains {steps:,} steps ({MAX_PASSES} passes). "
            f"Give --max_steps to choose, or --data_dir with more documents")
        cfg = dataclasses.replace(cfg, max_steps=steps, warmup_steps=min(cfg.warmup_steps, max(1, steps // 10)),
                                  eval_interval=min(cfg.eval_interval, max(1, steps // 5)),
                                  checkpoint_interval=min(cfg.checkpoint_interval, steps))
    return cfg


def describe_passes(cfg: TrainConfig, train_tokens: int, world: int) -> str:
    """The start-up line on data repetition, with a warning line above MAX_PASSES."""
    per_step = cfg.tokens_per_step * world
    passes = cfg.max_steps * per_step / max(1, train_tokens)
    line = (f"passes       {cfg.max_steps:,} steps x {per_step:,} tokens = {cfg.max_steps * per_step:,} planned "
            f"tokens = {passes:.2f} passes (epochs) over the {train_tokens:,} training tokens")
    if passes > MAX_PASSES:
        line += (f"\nwarning: {passes:,.0f} passes over the same data: the model will memorise it rather than learn "
                 f"more from it. Add documents (--data_dir) or train fewer steps (--max_steps "
                 f"{max(1, int(MAX_PASSES * train_tokens // per_step)):,} is {MAX_PASSES} passes)")
    return line


def remove_unused_run_dir(trainer: Trainer | None) -> None:
    """Remove the run directory this run created if it ends before its first step: an empty folder (or one with an
    empty metrics.jsonl) would only look like a run. A folder that existed before is left alone."""
    if trainer is None or not trainer.created_run_dir or trainer.step > 0 or not trainer.dist.is_main:
        return
    run_dir = trainer.run_dir
    if not run_dir.is_dir() or ckpt.list_step_dirs(run_dir) or (run_dir / ckpt.BEST).exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def _peek(config_file: str) -> dict:
    from .config import load_config_file
    return load_config_file(config_file)


def main(argv=None) -> int:
    """python train.py [flags]. Returns the exit code."""
    overrides, config_file = parse_args(argv)
    trainer = None
    try:
        trainer = setup(overrides, config_file)
        summary = trainer.train()
    except ConfigError as err:
        remove_unused_run_dir(trainer)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        remove_unused_run_dir(trainer)
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    except StopRequested as stop:
        if stop.checkpoint is None:
            remove_unused_run_dir(trainer)
            if trainer.dist.is_main:
                print(f"\n{signal.Signals(stop.signum).name}: stopped during the first step, before anything was "
                      f"trained: nothing to save; start again with the same command", file=sys.stderr, flush=True)
        elif trainer.dist.is_main:
            print(f"\n{stop}: checkpoint {stop.checkpoint}\ncontinue exactly where it stopped with:  "
                  f"python train.py --resume {trainer.run_dir}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except (KeyboardInterrupt, StopNow) as err:
        remove_unused_run_dir(trainer)
        code = 128 + err.signum if isinstance(err, StopNow) else 130
        what = f"{err}: stopped at once" if isinstance(err, StopNow) else "interrupted"
        where = ""
        if trainer is not None:
            prev = ckpt.find_latest_checkpoint(trainer.run_dir, log=lambda m: None) \
                if trainer.run_dir.is_dir() else None
            where = (f"; the newest complete checkpoint ({prev}) is intact; continue with:  python train.py "
                     f"--resume {trainer.run_dir}" if prev else "; no checkpoint had been written yet")
        print(f"\n{what}{where}", file=sys.stderr, flush=True)
        return code
    finally:
        dist_utils.teardown()
    if trainer.dist.is_main:
        best = summary["best_val_loss"]
        best = f"{best:.4f}" if math.isfinite(best) else "n/a (no evaluation)"
        print(f"done: step {summary['step']}, train loss {summary['loss']:.4f}, best val loss {best}; "
              f"checkpoints, metrics.jsonl and loss.png in {trainer.run_dir}", flush=True)
    return 0
