"""Rewards: the built-ins, loading a user's function, and every way a reward can be unusable (one line, exit 2,
the last checkpoint intact)."""
import json
import math

import pytest
import torch

from training import checkpoint as ck
from training.config import ConfigError
from training.launch import main
from training.rewards import (Reward, RewardError, call_reward, exact_match, final_answer, import_function,
                              parse_rewards, score)


def test_final_answer_and_exact_match():
    assert final_answer("3 plus 4 is 7") == "7"
    assert final_answer("so #### 12") == "12"
    assert final_answer("Answer: blue") == "blue"
    assert final_answer("no number here ") == "no number here"
    got = exact_match(["q"] * 5, ["it is 12.0", "13", "answer: Blue.", "1,000", ""],
                      answer=["12", "12", "blue", "1000", "0"])
    assert got == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_builtins_combine_with_weights():
    rewards = parse_rewards("exact_match,regex,length", "1,0.5,-0.1", pattern=r"^\d+$")
    total, each = score(rewards, ["p", "p"], ["7", "x 7"], {"answer": ["7", "8"]})
    assert each == {"exact_match": [1.0, 0.0], "regex": [1.0, 0.0], "length": [1.0, 3.0]}
    assert total == pytest.approx([1 + 0.5 - 0.1, -0.3])


@pytest.mark.parametrize("spec, weights, pattern, message", [
    ("exact_match,", None, None, "empty name"),
    ("exact_match", "1,2", None, "must be 1 finite number"),
    ("regex", None, None, "needs --reward_regex"),
    ("regex", None, "(", "not a valid regular expression"),
    ("exact_match", None, "x", "does not name regex"),
    ("nosuchmodule_xyz:f", None, None, "cannot be imported"),
    ("json:no_such_function", None, None, "has no attribute"),
    ("math:pi", None, None, "not a function"),
    ("justaname", None, None, "module:function"),
])
def test_unusable_reward_specs(spec, weights, pattern, message):
    with pytest.raises(ConfigError, match=message):
        parse_rewards(spec, weights, pattern)


def _reward(fn):
    return Reward("mine", fn, 1.0)


@pytest.mark.parametrize("fn, message", [
    (lambda p, c, **k: 1 / 0, "raised ZeroDivisionError: division by zero"),
    (lambda p, c, **k: [1.0], "returned 1 value"),
    (lambda p, c, **k: [1.0, math.nan], "returned nan for completion 1"),
    (lambda p, c, **k: [1.0, math.inf], "returned inf"),
    (lambda p, c, **k: ["a", 1.0], "must return a list of numbers"),
    (lambda p, c, **k: None, "must return a list of numbers"),
])
def test_bad_reward_outputs_are_one_clear_error(fn, message):
    with pytest.raises(RewardError, match=message) as info:
        call_reward(_reward(fn), ["p", "q"], ["a", "b"], {})
    assert "\n" not in str(info.value)


def test_exact_match_needs_an_answer_field():
    with pytest.raises(RewardError, match='needs an "answer" field'):
        call_reward(parse_rewards("exact_match")[0], ["p"], ["1"], {})


def test_user_function_is_imported_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_ok.py").write_text("def score(prompts, completions, **cols):\n"
                                               "    return [float(len(c) == 2) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    fn = import_function("my_rewards_ok:score")
    assert fn(["p"], ["ab"]) == [1.0]


# ---- end to end: bad input stops a run with one line and exit 2, the last checkpoint intact --------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from models import MambaConfig, LanguageModel
    from utils.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train([" ".join(f"{a}+{b}={a + b}" for a in range(10) for b in range(10)) * 3], vocab_size=280)
    torch.manual_seed(0)
    LanguageModel(MambaConfig(d_model=16, n_layer=1, vocab_size=tok.vocab_size)).save_pretrained(
        root, eos_token_id=tok.eot_id)
    tok.save(root)
    return root


def grpo_args(base, data, out, *extra):
    return ["--init_from", str(base), "--task", "grpo", "--data", str(data), "--out_dir", str(out),
            "--vram", "cpu", "--seq_len", "32", "--micro_batch_size", "4", "--num_generations", "2",
            "--max_new_tokens", "3", "--warmup_steps", "1", "--eval_interval", "100", "--checkpoint_interval", "2",
            "--log_interval", "1", "--no-progress", "--val_fraction", "0.5", "--lr", "1e-3", *extra]


def test_a_failing_reward_stops_the_run_with_exit_2_and_keeps_the_checkpoint(base, tmp_path, monkeypatch, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(6)))
    (tmp_path / "exploding_reward.py").write_text("def explode(prompts, completions, **cols):\n"
                                                  "    raise ValueError('the grader is down')\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(grpo_args(base, data, out, "--reward", "exact_match", "--max_steps", "2")) == 0
    step = out / "step_000002"
    before = (step / "training_state.pt").read_bytes()
    capsys.readouterr()
    code = main(grpo_args(base, data, out, "--resume", "--max_steps", "4", "--reward", "exploding_reward:explode"))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "error: reward 'exploding_reward:explode' raised ValueError: the grader is down"
    assert ck.find_latest_checkpoint(out) == step and (step / "training_state.pt").read_bytes() == before
    # a reward that cannot be imported is refused before any work
    assert main(grpo_args(base, data, tmp_path / "r2", "--reward", "no_such_module_q:f", "--max_steps", "2")) == 2
    assert "cannot be imported" in capsys.readouterr().err
    # a prompt file with nothing usable
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json\n{"question": "1+1="}\n[1, 2]\n')
    assert main(grpo_args(base, bad, tmp_path / "r3", "--reward", "exact_match", "--max_steps", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no usable prompt" in err and "missing field prompt 1 (line 2)" in err


@pytest.mark.parametrize("overrides, message", [
    ({"task": "grpo"}, "task grpo needs --reward"),
    ({"task": "grpo", "reward": "length", "micro_batch_size": 6, "num_generations": 4}, "multiple of num_generations"),
    ({"task": "grpo", "reward": "length", "num_generations": 1, "micro_batch_size": 4}, "at least 2"),
    ({"task": "grpo", "reward": "length", "temperature": 0.0}, "temperature must be"),
    ({"task": "ppo", "reward": "length", "clip_epsilon": 1.5}, "clip_epsilon must be"),
    ({"task": "sft", "reward": "length"}, "reward is a setting of --task grpo or ppo"),
    ({"task": "reward"}, "prompt/chosen/rejected"),
])
def test_bad_rl_settings_name_the_key(overrides, message):
    from training.config import resolve_config
    base = {"init_from": "somewhere", "data": "x.jsonl", "micro_batch_size": 8, "num_generations": 8}
    base.update(overrides)
    if overrides == {"task": "reward"}:
        del base["data"]
    with pytest.raises(ConfigError, match=message):
        resolve_config(base)
