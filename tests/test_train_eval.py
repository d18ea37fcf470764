"""The Trainer's extra evaluations (training/extra_eval.py): a second corpus (--eval_data) scored as evaluate.py
scores it, harness tasks (--eval_tasks) through a fake lm_eval package (lm-eval itself is optional and not
installed in CI; the fake stands in for the harness's four entry points and, like the real one, seeds every RNG),
an exact resume with both on, every family and LoRA, and bad input (one line, exit code 2, before any training)."""
import json
import math
import random
import sys
import types

import numpy as np
import pytest
import torch

import evaluate
from evaluation import harness
from evaluation.corpus import Corpus
from evaluation.perplexity import cap_tokens, evaluate_corpus
from evaluation.scoring import Scorer
from models import lora
from training import checkpoint as ck
from training.config import ConfigError, TrainConfig
from training.distributed import DistInfo
from training.extra_eval import EvalSources, ExtraEvaluation, read_sources, task_metrics
from training.launch import main
from tests.helpers import SAMPLE_TEXTS, sample_tokenizer
from tests.test_evaluate import hybrid, mamba1, mamba2
from tests.test_train import args, corpus, rows, weights  # noqa: F401  (corpus: the fixture)

EVAL_KEYS = ("eval_loss", "eval_ppl", "eval_bits_per_byte")
PROSE = ("a recurrent model reads one token at a time and keeps a state of fixed size, while attention looks back "
         "at every token it has seen; the selective scan lets the state forget what does not matter. ")


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """A second corpus: three documents of other text than the training corpus, one short."""
    root = tmp_path_factory.mktemp("evaldocs")
    for i, n in enumerate((12, 3, 1)):
        (root / f"text{i}.txt").write_text(PROSE * n + f"document {i}\n")
    return root


# ---- a fake lm_eval: the four entry points evaluation/harness.py uses --------------------------------------------

FAKE_TASK = "fake_choice"
QUESTIONS = [("the selective", [" scan", " dog", " café"]), ("a recurrent", [" model", " state", " the"])]


def fake_simple_evaluate(model, tasks, num_fewshot=None, limit=None, task_manager=None):
    """Seeds the RNGs as lm_eval.simple_evaluate does, then scores QUESTIONS through the model's loglikelihood."""
    random.seed(0)
    np.random.seed(1234)
    torch.manual_seed(1234)
    requests = [types.SimpleNamespace(args=(q, c)) for q, choices in QUESTIONS for c in choices]
    lls = [ll for ll, _ in model.loglikelihood(requests)]
    hits = [max(range(3), key=lambda k: lls[3 * i + k]) == 0 for i in range(len(QUESTIONS))]
    return {"results": {t: {"alias": t, "acc,none": sum(hits) / len(hits), "acc_stderr,none": 0.5,
                            "ll,none": sum(lls) / len(lls), "limit_seen,none": float(limit or 0)} for t in tasks}}


@pytest.fixture
def fake_lm_eval(monkeypatch):
    root = types.ModuleType("lm_eval")
    root.simple_evaluate = fake_simple_evaluate
    tasks = types.ModuleType("lm_eval.tasks")

    class TaskManager:
        def __init__(self, include_path=None):
            self.all_tasks = [FAKE_TASK, "python_choice"]

    def get_task_dict(names, manager):
        return {n: object() for n in names}

    tasks.TaskManager, tasks.get_task_dict = TaskManager, get_task_dict
    api, api_model, api_registry = (types.ModuleType(n) for n in ("lm_eval.api", "lm_eval.api.model",
                                                                    "lm_eval.api.registry"))
    api_model.LM = type("LM", (), {})
    api_registry.register_model = lambda name: (lambda cls: cls)
    for name, module in {"lm_eval": root, "lm_eval.tasks": tasks, "lm_eval.api": api,
                         "lm_eval.api.model": api_model, "lm_eval.api.registry": api_registry}.items():
        monkeypatch.setitem(sys.modules, name, module)
    harness.harness_lm_class.cache_clear()
    yield
    harness.harness_lm_class.cache_clear()


# ---- the trainer ------------------------------------------------------------------------------------------------

def test_rows_equal_evaluate_py_and_resume_is_exact(corpus, eval_dir, tmp_path, capsys, fake_lm_eval):
    """--eval_data, --eval_tokens and --eval_tasks (the fake harness) at every 2nd step: metrics.jsonl's eval rows
    (beside val_loss) hold what evaluate.py gives for the same checkpoint, corpus and token budget, and are shown
    on the log line; loss.png has its axes. 4 steps straight == 2, a restart, 2 more: the weights and every
    logged figure bit for bit (the fake harness seeds the RNGs as the real one does; the run restores them)."""
    extra = ("--max_steps", "4", "--eval_interval", "2", "--eval_data", str(eval_dir), "--eval_tokens", "200",
             "--eval_tasks", FAKE_TASK, "--eval_task_limit", "7")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args(corpus, straight, *extra, "--progress")) == 0
    logged = capsys.readouterr().out
    assert "eval data    evaldocs" in logged and "--max_tokens 200 --batch_size 4`" in logged
    assert f"eval tasks   {FAKE_TASK} (lm-evaluation-harness, 7 examples each)" in logged
    assert "; eval bpb " in logged and f", {FAKE_TASK}/acc " in logged         # the log line at an evaluation
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in metrics if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all("val_loss" in r for r in evals)
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in evals for k in EVAL_KEYS)
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]   # the model changed between them
    assert evals[1][f"{FAKE_TASK}/limit_seen"] == 7.0 and not any("stderr" in k for k in evals[1])
    assert (straight / "loss.png").stat().st_size > 1000

    assert evaluate.main(["--checkpoint", str(straight / "step_000004"), "--data_dir", str(eval_dir),
                          "--max_tokens", "200", "--batch_size", "4", "--json", "--no_progress"]) == 0
    score = json.loads(capsys.readouterr().out)["results"][0]["corpus"]
    assert score["tokens"] <= 200 and score["documents"] == 3
    assert (evals[1]["eval_loss"], evals[1]["eval_ppl"], evals[1]["eval_bits_per_byte"]) == \
        (score["loss"], score["perplexity"], score["bits_per_byte"])

    assert main(args(corpus, split, *extra, "--stop_at_step", "2")) == 0
    assert main(args(corpus, split, "--eval_interval", "2", "--resume")) == 0     # the rest from its checkpoint
    a, b = weights(straight / "step_000004"), weights(split / "step_000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("loss", "val_loss") + EVAL_KEYS + (f"{FAKE_TASK}/acc", f"{FAKE_TASK}/ll"):
        assert rows(straight, key) == rows(split, key), key


def test_bad_input_exits_2_before_training(corpus, eval_dir, tmp_path, capsys, monkeypatch):
    """A missing corpus, lm-eval not installed, an unknown task, empty values: one line, exit code 2, and no step
    trained (nothing written to the run directory)."""
    cases = [
        (["--eval_data", str(tmp_path / "nowhere")], "eval_data"),
        (["--eval_data", "  "], "eval_data is empty"),
        (["--eval_tasks", " , "], "eval_tasks is empty"),
        (["--eval_tokens", "0"], "eval_tokens must be a positive integer"),
        (["--eval_task_limit", "-1"], "eval_task_limit must be >= 0"),
        (["--eval_tasks", "lambada_openai"], "pip install lm-eval"),
    ]
    monkeypatch.setitem(sys.modules, "lm_eval", None)         # as if not installed: `import lm_eval` fails
    for i, (extra, expected) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        assert main(args(corpus, out, "--max_steps", "2", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (out / "metrics.jsonl").exists()


def test_unknown_or_unloadable_task_exits_2(corpus, tmp_path, capsys, monkeypatch, fake_lm_eval):
    assert main(args(corpus, tmp_path / "run", "--max_steps", "2", "--eval_tasks", f"{FAKE_TASK},no_such")) == 2
    err = capsys.readouterr().err
    assert "does not know the task(s) no_such" in err and len(err.strip().splitlines()) == 1

    def offline(names, manager):
        raise ConnectionError("Couldn't reach 'EleutherAI/lambada_openai' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(sys.modules["lm_eval.tasks"], "get_task_dict", offline)
    assert main(args(corpus, tmp_path / "run", "--max_steps", "2", "--eval_tasks", FAKE_TASK)) == 2
    err = capsys.readouterr().err
    assert "could not load fake_choice (ConnectionError: Couldn't reach" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_evaluate_py_max_tokens_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.parse_args(["--max_tokens", "0"])
    assert exit_.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


# ---- the evaluation itself, on every family and LoRA ------------------------------------------------------------

def sources(tasks=()):
    texts = SAMPLE_TEXTS[:4] * 2
    return EvalSources(Corpus("sample", texts, 0), "", list(tasks), object() if tasks else None)


@pytest.mark.parametrize("make", [mamba1, mamba2, hybrid], ids=["mamba1", "mamba2", "hybrid-M2T"])
def test_scores_as_evaluate_corpus_and_leaves_the_run_untouched(make):
    tokenizer = sample_tokenizer()
    model = make(vocab=tokenizer.vocab_size).train()
    extra = ExtraEvaluation(sources(), tokenizer, max_tokens=40, batch_size=3, task_limit=0)
    assert extra.tokens <= 40
    rng = torch.get_rng_state()
    row = extra.run(model, DistInfo())
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    want = evaluate_corpus(Scorer(model.eval(), 16384, None, 3), tokenizer,
                           cap_tokens(tokenizer, sources().corpus.documents, 40))
    assert (row["eval_loss"], row["eval_bits_per_byte"]) == (want.loss, want.bits_per_byte)


def test_lora_model_in_train_mode_with_dropout(fake_lm_eval):
    """A LoRA model with adapter dropout, in train mode: scored in eval mode (deterministic), left in train mode;
    the harness path on it runs (through the fake lm_eval) and its seeding does not leak out."""
    tokenizer = sample_tokenizer()
    model = mamba1(vocab=tokenizer.vocab_size)
    lora.apply_lora(model, lora.LoRAConfig(targets=["in_proj", "out_proj"], rank=4, dropout=0.5))
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    model.train()
    extra = ExtraEvaluation(sources([FAKE_TASK]), tokenizer, max_tokens=60, batch_size=4, task_limit=0)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first, second = extra.run(model, DistInfo()), extra.run(model, DistInfo())
    assert first == second and model.training
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert (np.random.get_state()[1] == state[2]).all()
    assert set(first) == {*EVAL_KEYS, f"{FAKE_TASK}/acc", f"{FAKE_TASK}/ll", f"{FAKE_TASK}/limit_seen"}


def test_task_metrics_names():
    results = {"lambada_openai": {"alias": "lambada_openai", "acc,none": 0.5, "acc_stderr,none": 0.01,
                                  "perplexity,none": 12.0, "perplexity_stderr,none": 1.0},
               "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01,
                         "sample_len": 3, "flag": True}}
    assert task_metrics(results) == {"lambada_openai/acc": 0.5, "lambada_openai/perplexity": 12.0,
                                     "gsm8k/exact_match_strict-match": 0.1, "gsm8k/sample_len": 3.0}


def test_read_sources_builtin_and_none(tmp_path):
    assert read_sources(TrainConfig()) is None
    found = read_sources(TrainConfig(eval_data="builtin"))
    assert found.corpus.label == "builtin" and found.corpus_flags == ""
    assert len(found.corpus.documents) + found.corpus.skipped == 100
    with pytest.raises(ConfigError, match="eval_data .* does not exist"):
        read_sources(TrainConfig(eval_data=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="eval_data: "):
        read_sources(TrainConfig(eval_data=str(tmp_path / "empty")))
