"""What a new user meets in the first hour (issue 23): resumes that reuse the prepared data, a GPU preset asked for on
a CPU, a stop in the middle of a long step, empty folders, piped prompts, damaged checkpoints, flag spellings, the
start-up lines. Tiny CPU runs on a small corpus."""
import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from training import checkpoint as ck
from training.config import TrainConfig, load_config_file, parse_args
from training.launch import main, warmup_warning

from helpers import WORDS, write_word_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_hour")
    write_word_corpus(root)
    return root


def args(corpus, out, *extra, cache="cache"):
    return ["--data_dir", str(corpus / "docs"), "--cache_dir", str(corpus / cache), "--out_dir", str(out),
            "--model_size", "tiny", "--vram", "cpu", "--vocab_size", "300", "--seq_len", "32",
            "--micro_batch_size", "4", "--grad_accum_steps", "2", "--warmup_steps", "2", "--eval_interval", "3",
            "--eval_batches", "2", "--checkpoint_interval", "3", "--log_interval", "1", "--no-progress",
            "--val_fraction", "0.1", *extra]


def prepared(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


# -- items 1 and 10: the corpus is prepared once ------------------------------------------------------------------

def test_resume_and_init_from_reuse_the_prepared_data(corpus, tmp_path, capsys):
    """The checkpoint's tokenizer is the BPE the first run trained: same content, same prepared folder."""
    assert main(args(corpus, tmp_path / "run", "--max_steps", "2", cache="cache_resume")) == 0
    capsys.readouterr()
    assert len(prepared(corpus / "cache_resume")) == 1
    assert main(args(corpus, tmp_path / "run", "--resume", "--max_steps", "3", cache="cache_resume")) == 0
    out = capsys.readouterr().out
    assert "Reusing prepared data" in out and "Preparing" not in out
    assert main(args(corpus, tmp_path / "tuned", "--init_from", str(tmp_path / "run"), "--max_steps", "1",
                     cache="cache_resume")) == 0
    assert "Reusing prepared data" in capsys.readouterr().out
    assert len(prepared(corpus / "cache_resume")) == 1


def test_prepare_data_uses_the_vocabulary_of_the_run_that_follows(corpus, tmp_path, capsys):
    """prepare_data.py without --vocab_size prepares what `train.py --vram cpu` (the CPU default) then reuses."""
    import prepare_data
    cache = tmp_path / "cache"
    assert prepare_data.main(["--data_dir", str(corpus / "docs"), "--cache_dir", str(cache), "--no-progress",
                              "--val_fraction", "0.1"]) == 0
    capsys.readouterr()
    flags = ["--data_dir", str(corpus / "docs"), "--cache_dir", str(cache), "--out_dir", str(tmp_path / "run"),
             "--vram", "cpu", "--max_steps", "1", "--seq_len", "32", "--eval_batches", "1", "--no-progress",
             "--val_fraction", "0.1"]
    assert main(flags) == 0
    assert "Reusing prepared data" in capsys.readouterr().out
    assert len(prepared(cache)) == 1


# -- item 2: --init_from and an explicit --model_size of another shape ---------------------------------------------

def test_init_from_refuses_a_contradicting_model_size(corpus, tmp_path, capsys):
    assert main(args(corpus, tmp_path / "base", "--max_steps", "1")) == 0
    capsys.readouterr()
    assert main(args(corpus, tmp_path / "ft", "--init_from", str(tmp_path / "base"), "--model_size", "small",
                     "--max_steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --init_from") and "d_model 64 (model_size 'small': 512)" in err
    assert "leave out --model_size" in err and err.count("\n") == 1
    assert not (tmp_path / "ft").exists()


# -- items 3 and 14: a warmup the run never finishes ---------------------------------------------------------------

def test_a_warmup_longer_than_the_run_is_flagged():
    line = warmup_warning(TrainConfig(lr=1e-3, warmup_steps=200, max_steps=3))
    assert line.startswith("warning: warmup_steps 200 >= max_steps 3") and "1.5e-05" in line
    assert warmup_warning(TrainConfig(warmup_steps=200, max_steps=201)) is None
    assert warmup_warning(TrainConfig(warmup_steps=0, max_steps=1)) is None


# -- item 4: "resume": true in a JSON file ---------------------------------------------------------------------------

def test_resume_true_in_a_config_file_means_the_newest_checkpoint(corpus, tmp_path, capsys):
    yes, no = tmp_path / "yes.json", tmp_path / "no.json"
    yes.write_text('{"resume": true}')
    no.write_text('{"resume": false}')
    assert load_config_file(yes) == {"resume": "latest"} and load_config_file(no) == {"resume": None}
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max_steps", "1", "--config", str(no))) == 0   # false: a new run
    capsys.readouterr()
    assert main(args(corpus, out, "--max_steps", "2", "--config", str(yes))) == 0
    assert "resuming step 1 from" in capsys.readouterr().out
    assert ck.load_training_state(ck.find_latest_checkpoint(out))["step"] == 2


# -- item 7: a GPU budget on a machine without a GPU -------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_a_gpu_preset_on_the_cpu_is_refused_with_its_cost(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model_size", "medium", "--vram", "16gb", "--out_dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --vram 16gb is a GPU budget") and err.count("\n") == 1
    assert "one optimizer step of 131,072 tokens" in err and "103.1M-parameter medium model" in err
    assert "use --vram cpu" in err and "--allow_cpu" in err
    assert not out.exists()                       # refused before any work: no run folder
    # insisting runs it (a tiny layout here, to stay fast)
    assert main(args(corpus, out, "--vram", "8gb", "--seq_len", "32", "--micro_batch_size", "2",
                     "--grad_accum_steps", "1", "--max_steps", "1", "--allow_cpu")) == 0


def _signal_after_pieces(trainer, n_pieces, monkeypatch):
    """Send this process a real SIGINT after `n_pieces` micro-batch passes; returns the pass counter."""
    calls = []
    loss = trainer.objective.loss

    def counting(model, piece):
        calls.append(piece[0].shape[0])
        if len(calls) == n_pieces:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(model, piece)

    monkeypatch.setattr(trainer.objective, "loss", counting)
    return calls


def test_a_signal_stops_at_the_next_micro_batch_and_resumes_exactly(corpus, tmp_path, monkeypatch, capsys):
    """SIGINT in the middle of step 3 (4 micro-batches a step): no further pass runs, step 2 is saved, and the resumed
    run reaches the same weights as a run that was never stopped."""
    from training.launch import setup
    from training.stop import StopRequested
    flags = ["--max_steps", "4", "--grad_accum_steps", "4", "--checkpoint_interval", "10", "--eval_interval", "10"]
    trainer = setup(parse_args(args(corpus, tmp_path / "stopped", *flags))[0])
    calls = _signal_after_pieces(trainer, 2 * 4 + 1, monkeypatch)
    with pytest.raises(StopRequested) as stop:
        trainer.train()
    assert len(calls) == 2 * 4 + 1 and stop.value.step == 2 and stop.value.signum == signal.SIGINT
    assert "stopping after this micro-batch" in capsys.readouterr().out
    assert main(args(corpus, tmp_path / "stopped", "--resume", *flags)) == 0
    assert main(args(corpus, tmp_path / "straight", *flags)) == 0
    a = ck.find_latest_checkpoint(tmp_path / "stopped")
    b = ck.find_latest_checkpoint(tmp_path / "straight")
    assert a.name == b.name == "step_000004"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_a_stop_in_the_first_step_leaves_no_run_folder(corpus, tmp_path, monkeypatch, capsys):
    import training.launch as launch
    out = tmp_path / "run"
    real_setup = launch.setup

    def signalled_setup(*a, **k):
        trainer = real_setup(*a, **k)
        _signal_after_pieces(trainer, 1, monkeypatch)
        return trainer

    monkeypatch.setattr(launch, "setup", signalled_setup)
    assert main(args(corpus, out, "--max_steps", "3")) == 130
    assert "SIGINT: stopped during the first step, before anything was trained" in capsys.readouterr().err
    assert not out.exists()


# -- item 9: an empty --data_dir ---------------------------------------------------------------------------------------

def test_an_empty_data_dir_is_an_error_not_the_builtin_corpus(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "README.md").write_text("# your documents go here\n")
    assert main(["--data_dir", str(empty), "--out_dir", str(tmp_path / "run"), "--vram", "cpu",
                 "--cache_dir", str(tmp_path / "cache"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data_dir") and "holds no documents" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# -- items 5 and 11: generate.py -----------------------------------------------------------------------------------

def test_a_piped_prompt_loses_the_newline_the_shell_added(monkeypatch):
    import generate
    for piped, prompt in (("def f(\n", "def f("), ("a\r\n", "a"), ("two\nlines\n\n", "two\nlines\n"), ("x", "x")):
        monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
        assert generate.read_prompts(generate.parse_args([])) == [prompt]


def test_generate_names_the_damaged_file_when_no_checkpoint_is_intact(corpus, tmp_path, capsys):
    import generate
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max_steps", "2", "--eval_interval", "5")) == 0
    for folder in ("step_000002", "best"):          # the run's only checkpoint, and its copy
        weights = out / folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-8] ^= 0xFF
        weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert generate.main(["--checkpoint", str(out), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint found" not in err
    assert "damaged" in err and "model.safetensors" in err and "checksum" in err


# -- item 12: loss.png without evaluation ------------------------------------------------------------------------------

def test_a_run_without_evaluation_still_writes_the_loss_plot(corpus, tmp_path):
    from training.launch import setup
    out = tmp_path / "run"
    trainer = setup(parse_args(args(corpus, out, "--max_steps", "2"))[0])
    trainer.can_evaluate = False          # what a fine-tuning run too small for a validation share does
    trainer.train()
    assert (out / "loss.png").stat().st_size > 1000


# -- item 13: flag spellings; --no-progress hides only the bar ---------------------------------------------------------

def test_both_flag_spellings_and_evaluation_lines_without_the_bar(corpus, tmp_path, capsys):
    assert parse_args(["--no_progress"])[0] == {"progress": False} == parse_args(["--no-progress"])[0]
    assert parse_args(["--no_allow_cpu"])[0] == {"allow_cpu": False}
    import prepare_data
    assert prepare_data.main(["--data_dir", str(corpus / "docs"), "--cache_dir", str(tmp_path / "c"),
                              "--vocab_size", "300", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(args(corpus, tmp_path / "run", "--max_steps", "3")) == 0      # args() passes --no-progress
    assert "step 3: val_loss" in capsys.readouterr().out


# -- item 14: run names, the start-up file counts ------------------------------------------------------------------

def test_the_default_run_name_carries_a_non_default_family(corpus, tmp_path, monkeypatch, capsys):
    import training.launch as launch
    monkeypatch.setattr(launch, "CHECKPOINTS", tmp_path / "checkpoints")
    flags = [a for a in args(corpus, tmp_path / "unused", "--family", "mamba2", "--max_steps", "1")]
    i = flags.index("--out_dir")
    del flags[i:i + 2]
    assert main(flags) == 0
    [run] = list((tmp_path / "checkpoints").iterdir())
    assert run.name.startswith("mamba2-tiny-")


def test_the_start_up_file_count_agrees_with_the_statistics(tmp_path):
    from utils.dataset import prepare_dataset
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text(" ".join(WORDS) * 20)
    (docs / "b.bin").write_bytes(b"\x00\x01" * 50)
    (docs / "empty.md").write_text("")
    (docs / ".hidden.txt").write_text("x")
    (docs / "sub" / "c.py").write_text("def f():\n    return 1\n" * 30)
    said = []
    data = prepare_dataset(docs, cache_dir=tmp_path / "cache", vocab_size=300, show_progress=False,
                           log=said.append)
    totals = data.totals
    line = next(s for s in said if s.startswith("Corpus:"))
    assert f"{totals['files']:,} files found" in line, (line, totals)


# -- item 8: CPU threads ------------------------------------------------------------------------------------------------

def test_thread_settings_follow_the_cgroup_quota_and_never_override_the_user(tmp_path):
    from utils import cpu_threads
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert cpu_threads.cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_threads.cgroup_cpu_limit(tmp_path) == 2           # 1.5 CPUs of time: 2 threads
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_threads.cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_threads.cgroup_cpu_limit(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert cpu_threads.cgroup_cpu_limit(v1) == 1
    assert cpu_threads.cgroup_cpu_limit(tmp_path / "none") is None
    # a quota of one CPU on this machine: one thread for OpenMP and the tokenizer's pool; what the user set stays
    env = {"OMP_NUM_THREADS": "3"}
    changed = cpu_threads.configure(env, root=v1)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "3"
    if (os.cpu_count() or 1) > 1:
        assert env["RAYON_NUM_THREADS"] == "1" and "OMP_NUM_THREADS" not in changed


def test_the_scripts_set_the_threads_before_torch_loads():
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import sys, train; assert 'torch' in sys.modules; import os; print(os.environ['OMP_WAIT_POLICY'])")
    # torch is imported by train.py's own imports, after cpu_threads.configure(): the variable is there for libgomp
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "PASSIVE", proc.stderr[-2000:]
    source = (ROOT / "train.py").read_text()
    assert source.index("cpu_threads.configure()") < source.index("from training")


# -- item 6: PEFT on a base whose vocabulary SFT grew -------------------------------------------------------------------

def test_peft_opens_a_chat_adapter_after_the_base_embedding_is_grown(tmp_path, capsys):
    """The README's flow: grow the base's embedding to the tokenizer (new rows at the mean of the old ones, as
    training did), then PeftModel.from_pretrained gives the logits of our adapter checkpoint, chat tokens included."""
    peft = pytest.importorskip("peft")
    from transformers import AutoTokenizer, MambaForCausalLM

    from models import MambaConfig, LanguageModel
    from training.finetune import load_lora_checkpoint
    from utils.chat import CHAT_TOKENS, encode_chat
    from utils.tokenizer import Tokenizer
    tok = Tokenizer.train([" ".join(WORDS) * 30], vocab_size=296)
    assert tok.vocab_size % 8 == 0             # so that the chat tokens need new embedding rows
    torch.manual_seed(0)
    LanguageModel(MambaConfig(d_model=32, n_layer=2, vocab_size=tok.vocab_size)).save_pretrained(
        tmp_path / "base", eos_token_id=tok.eot_id)
    tok.save(tmp_path / "base")
    chat = {"messages": [{"role": "user", "content": "the scan"}, {"role": "assistant", "content": "carry state"}]}
    (tmp_path / "chat.jsonl").write_text((json.dumps(chat) + "\n") * 8)
    assert main(["--init_from", str(tmp_path / "base"), "--task", "sft", "--data", str(tmp_path / "chat.jsonl"),
                 "--out_dir", str(tmp_path / "run"), "--vram", "cpu", "--seq_len", "32", "--micro_batch_size", "2",
                 "--max_steps", "2", "--warmup_steps", "1", "--lora", "minimal", "--lr", "1e-2",
                 "--no-progress"]) == 0
    adapter = tmp_path / "run" / "step_000002"

    hf_tok = AutoTokenizer.from_pretrained(adapter)
    base = MambaForCausalLM.from_pretrained(tmp_path / "base")
    old = len(AutoTokenizer.from_pretrained(tmp_path / "base"))
    assert old == base.get_input_embeddings().weight.shape[0] == tok.vocab_size
    base.resize_token_embeddings(len(hf_tok), pad_to_multiple_of=8, mean_resizing=False)
    with torch.no_grad():
        rows = base.get_input_embeddings().weight
        rows[old:] = rows[:old].mean(0)
    tuned = peft.PeftModel.from_pretrained(base, adapter).eval()

    ours, our_tok = load_lora_checkpoint(adapter, merge=False)
    ids = encode_chat(our_tok, chat["messages"][:1], add_generation_prompt=True)[0]
    assert any(i >= old for i in ids) and len(hf_tok) == tok.vocab_size + len(CHAT_TOKENS)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(tuned(x).logits, ours.eval()(x)[0], atol=1e-5)
