"""Settings: presets combine, files and flags override, every mistake names its key."""
import json

import pytest

from configs.training import TRAINING_PRESETS
from configs.vram import CPU_PRESET, TOKENS_PER_STEP, VRAM_CHOICES, VRAM_PRESETS
from training.config import ConfigError, TrainConfig, detect_vram, parse_args, resolve_config
from training.memory import GIB, budget_bytes, estimate_for, fit_layout
from training.optim import lr_at, param_groups


def test_presets_combine_and_overrides_win(tmp_path):
    cfg = resolve_config({}, device_type="cpu")
    assert cfg.vram == "cpu" and cfg.model_size == "tiny" and cfg.training == "default"
    assert cfg.max_steps == CPU_PRESET["schedule"]["max_steps"]
    assert cfg.seq_len == CPU_PRESET["layout"]["seq_len"]
    assert cfg.lr == CPU_PRESET["schedule"]["lr"]      # the CPU preset sets its own rate (a tiny model, 500 steps)

    gb = 24 * GIB
    cfg = resolve_config({"training": "careful"}, device_type="cuda", total_memory_bytes=gb)
    assert cfg.vram == "24gb" and cfg.model_size == "small"
    assert cfg.micro_batch_size == VRAM_PRESETS["24gb"]["small"]["micro_batch_size"]
    assert cfg.lr == TRAINING_PRESETS["careful"]["lr"] and cfg.max_steps == TRAINING_PRESETS["careful"]["max_steps"]

    f = tmp_path / "run.json"
    f.write_text(json.dumps({"lr": 1e-3, "seq_len": 128, "gradient_checkpointing": True, "stop_at_step": None}))
    cfg = resolve_config({"lr": 2e-3, "model_size": "medium", "vram": "8gb"}, str(f), device_type="cuda",
                         total_memory_bytes=gb)
    assert cfg.lr == 2e-3 and cfg.seq_len == 128 and cfg.gradient_checkpointing and cfg.model_size == "medium"
    assert cfg.micro_batch_size == VRAM_PRESETS["8gb"]["medium"]["micro_batch_size"]
    # a resumed run starts from its saved config, not the presets
    base = cfg.to_dict()
    again = resolve_config({"max_steps": 9}, device_type="cpu", base=base)
    assert again.seq_len == 128 and again.max_steps == 9 and again.vram == "8gb"


def test_cpu_preset_keeps_a_finetuning_recipe():
    # the CPU preset's lr 3e-3 is for a tiny model from scratch; SFT / DPO / LoRA keep their presets' small rates
    for task, lora, preset in (("sft", None, "sft"), ("sft", "minimal", "lora"), ("dpo", None, "dpo"),
                               ("dpo", "all", "dpo_lora"), ("lm", "minimal", "lora")):
        given = {"task": task, "lora": lora, "init_from": "base", **({"data": "x.jsonl"} if task != "lm" else {})}
        cfg = resolve_config(given, device_type="cpu")
        assert cfg.vram == "cpu" and cfg.training == preset
        assert cfg.lr == TRAINING_PRESETS[preset]["lr"] and cfg.max_steps == TRAINING_PRESETS[preset]["max_steps"]
        assert cfg.seq_len == CPU_PRESET["layout"]["seq_len"]      # the CPU layout still applies
    given = {"task": "sft", "data": "x.jsonl", "init_from": "b", "lr": 3e-3}
    assert resolve_config(given, device_type="cpu").lr == 3e-3


def test_every_gpu_preset_keeps_tokens_per_step():
    from configs.model_sizes import MODEL_SIZES
    for vram in VRAM_CHOICES:
        assert set(VRAM_PRESETS[vram]) == set(MODEL_SIZES)
        for size, layout in VRAM_PRESETS[vram].items():
            tokens = layout["micro_batch_size"] * layout["grad_accum_steps"] * layout["seq_len"]
            assert tokens == TOKENS_PER_STEP, (vram, size)


def test_detect_vram():
    assert detect_vram("cpu") == "cpu"
    assert detect_vram("cuda", int(7.8 * GIB)) == "8gb"       # an "8 GB" card reports a bit less
    assert detect_vram("cuda", int(11.7 * GIB)) == "12gb"
    assert detect_vram("cuda", int(79.1 * GIB)) == "48gb"
    assert detect_vram("cuda", int(4 * GIB)) == "8gb"         # the fit check then decides


@pytest.mark.parametrize("overrides, match", [
    ({"vram": "16"}, "did you mean '16gb'"),
    ({"vram": "64gb"}, "vram '64gb' is not allowed"),
    ({"training": "turbo"}, "training 'turbo' is not allowed; choose one of: default, fast, careful"),
    ({"model_size": "huge"}, "model_size 'huge' is not allowed"),
    ({"keep_last": 1}, "keep_last must be at least 2"),
    ({"precision": "fp8"}, "precision 'fp8'"),
    ({"micro_batch_size": 0}, "micro_batch_size must be a positive integer"),
    ({"lrr": 1.0}, "unknown config key 'lrr'"),
])
def test_bad_settings_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(overrides, device_type="cpu")


@pytest.mark.parametrize("content, match", [
    ('{"lr": "fast"}', "config key 'lr' .* must be float, got str"),
    ('{"max_steps": 1.5}', "config key 'max_steps' .* must be int, got float"),
    ('{"compile": 1}', "config key 'compile' .* must be bool, got int"),
    ('{"learning_rate": 1e-3}', "unknown config key 'learning_rate'"),
    ('{"lr": 1e-3,', "is not valid JSON"),
    ('[1, 2]', "must hold a JSON object"),
    ('{"seq_len": null}', "may not be null"),
])
def test_bad_config_files(tmp_path, content, match):
    f = tmp_path / "run.json"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match):
        resolve_config({}, str(f), device_type="cpu")


def test_missing_or_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config({}, str(tmp_path / "nope.json"), device_type="cpu")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00\x81{")
    with pytest.raises(ConfigError, match="cannot be read"):
        resolve_config({}, str(binary), device_type="cpu")
    with pytest.raises(ConfigError, match="cannot be read"):
        resolve_config({}, str(tmp_path), device_type="cpu")      # a folder, not a file


def test_cli_parsing_returns_only_given_flags():
    overrides, config_file = parse_args(["--lr", "0.001", "--no-progress", "--resume", "--model_size", "tiny"])
    assert overrides == {"lr": 0.001, "progress": False, "resume": "latest", "model_size": "tiny"}
    assert config_file is None
    overrides, _ = parse_args(["--resume", "checkpoints/x", "--stop_at_step", "5"])
    assert overrides == {"resume": "checkpoints/x", "stop_at_step": 5}


def test_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))          # non-increasing after warmup
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_A_log_D():
    from configs.model_sizes import model_config
    from models import LanguageModel
    model = LanguageModel(model_config("tiny", vocab_size=64))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"A_log", "D", "weight", "bias"} >= no_decay_names and {"A_log", "D"} <= no_decay_names
    assert all(names[id(p)].endswith("bias") or "norm" in names[id(p)] or names[id(p)].endswith(("A_log", "D"))
               for p in no_decay["params"])
    assert "backbone.embeddings.weight" in decay_names and all(p.dim() >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_memory_fit_adjusts_or_refuses():
    from configs.model_sizes import count_parameters, model_config
    mc = model_config("medium")
    n = count_parameters(mc)
    budget = budget_bytes("8gb", None)
    micro, accum, gc, est, notes = fit_layout(mc, n, 64, 1, 2048, False, "bf16", budget)
    assert est.total <= budget and gc and micro * accum == 64 and micro < 64 and notes
    # far too small a card: the estimate stays above budget, the caller refuses
    *_, est, _ = fit_layout(mc, n, 1, 64, 2048, True, "bf16", 1 * GIB)
    assert est.total > 1 * GIB
    small = estimate_for(mc, n, 1, 2048, True, "bf16").total
    assert small < estimate_for(mc, n, 1, 2048, False, "bf16").total < estimate_for(mc, n, 2, 2048, False,
                                                                                   "bf16").total


def test_train_config_defaults_are_valid():
    TrainConfig(model_size="tiny").validate()


def test_every_gpu_preset_passes_its_own_fit_check():
    """The presets are chosen from measured peaks; the start-up check must accept them unchanged."""
    from configs.model_sizes import count_parameters, model_config
    for vram in VRAM_CHOICES:
        budget = budget_bytes(vram, None)
        for size, layout in VRAM_PRESETS[vram].items():
            mc = model_config(size)
            micro, accum, ckpt, est, notes = fit_layout(mc, count_parameters(mc), layout["micro_batch_size"],
                                                        layout["grad_accum_steps"], layout["seq_len"],
                                                        layout["gradient_checkpointing"], "bf16", budget)
            assert not notes and est.total <= budget, (vram, size, est.describe())


def test_passes_are_said_and_the_builtin_default_is_sized_to_the_corpus():
    from training.config import TrainConfig
    from training.launch import describe_passes, plan_passes
    gpu = TrainConfig(max_steps=5000, micro_batch_size=16, grad_accum_steps=4, seq_len=2048, warmup_steps=200,
                      eval_interval=250, checkpoint_interval=500)
    said = []
    # the case: medium on 16gb, the built-in corpus of a Python without its tests (2.6M tokens)
    sized = plan_passes(gpu, 2_600_000, 1, builtin=True, steps_given=False, log=said.append)
    assert sized.max_steps == 79 and sized.warmup_steps == 7 and sized.eval_interval == 15
    assert "would be 252 passes" in said[0] and "trains 79 steps (4 passes)" in said[0]
    assert "3.98 passes" in describe_passes(sized, 2_600_000, 1)
    # steps given explicitly, or your own data: kept, with a warning above 4 passes
    assert plan_passes(gpu, 2_600_000, 1, builtin=True, steps_given=True, log=said.append).max_steps == 5000
    assert plan_passes(gpu, 2_600_000, 1, builtin=False, steps_given=False, log=said.append).max_steps == 5000
    assert len(said) == 1
    line = describe_passes(gpu, 2_600_000, 1)
    assert "252.06 passes" in line and "warning: 252 passes" in line and "--max_steps 79 is 4 passes" in line
    assert "warning" not in describe_passes(TrainConfig(max_steps=200), 9_500_000, 1)
