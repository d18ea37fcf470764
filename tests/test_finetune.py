"""Fine-tuning on the CPU with a tiny model: the chat template and its loss mask, right padding, bad data, DPO at
step 0 and learning, an exact LoRA resume, merging, and the CLI end to end (train --task sft --lora, generate
--chat)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import MambaConfig, LanguageModel, lora
from models.vocab import resize_vocab
from training import checkpoint as ck
from training.launch import main
from training.objectives import LN2, DPOObjective, sequence_logps
from utils.chat import CHAT_TOKENS, END_TOKEN, IGNORE, add_chat_tokens, encode_chat
from utils.errors import DataError
from utils.finetune_data import TaskData, collate, load_task_data
from utils.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("the cat sat on the mat and the dog ran to the park where birds sing songs of the sea "
        "hello how are you today I am fine thank you what is your name my name is mamba ") * 20
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "hi there"}],
    [{"role": "user", "content": "what is your name"}, {"role": "assistant", "content": "my name is mamba"},
     {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "I am fine"}],
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny trained-looking base on disk: HF-format weights + a BPE tokenizer without chat tokens."""
    root = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train([TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = LanguageModel(MambaConfig(d_model=32, n_layer=2, vocab_size=tok.vocab_size))
    model.save_pretrained(root, eos_token_id=tok.eot_id)
    tok.save(root)
    return root


def chat_tokenizer(base):
    tok = Tokenizer.load(base)
    add_chat_tokens(tok)
    return tok


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_template_mask_covers_exactly_the_assistant_turns(base, tmp_path):
    tok = chat_tokenizer(base)
    assert all(len(tok.encode(t)) > 1 for t in CHAT_TOKENS)          # typed as text they are NOT the markers
    ids, labels = encode_chat(tok, CHATS[1])
    assert len(ids) == len(labels)
    spans, current = [], []
    for i, label in zip(ids + [-1], labels + [IGNORE]):
        if label != IGNORE:
            assert label == i
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    assert [tok.decode(s) for s in spans] == ["my name is mamba" + END_TOKEN, "I am fine" + END_TOKEN]
    # transformers renders and tokenises the same conversation identically from the saved files
    tok.save(tmp_path)
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tmp_path)
    hf_ids = hf.apply_chat_template(CHATS[1], tokenize=True, add_generation_prompt=False)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert list(hf_ids) == ids
    assert Tokenizer.load(tmp_path).vocab_size == tok.vocab_size


def test_vocab_grows_for_the_chat_tokens_and_keeps_the_padding_rule(base):
    model = LanguageModel.from_pretrained(base, family="mamba1")
    tok = chat_tokenizer(base)
    x = torch.tensor([Tokenizer.load(base).encode("the cat sat")])
    before = model(x)[0]
    assert resize_vocab(model, tok.vocab_size)
    assert model.config.vocab_size == tok.vocab_size and model.config.padded_vocab_size % 8 == 0
    assert model.spec.vocab_size == tok.vocab_size                      # the ModelConfig it stands for follows
    assert model.lm_head.weight is model.backbone.embeddings.weight
    after = model(x)[0]
    assert torch.allclose(after[..., :before.shape[-1] - 8], before[..., :before.shape[-1] - 8])


def test_right_padding_does_not_change_summed_logprobs(base):
    tok = chat_tokenizer(base)
    torch.manual_seed(1)
    model = LanguageModel(MambaConfig(d_model=32, n_layer=2, vocab_size=tok.vocab_size)).eval()
    from utils.finetune_data import SFTExample
    examples = [SFTExample(*encode_chat(tok, c)) for c in CHATS]
    alone = [sequence_logps(model, *collate([e], tok.eot_id)) for e in examples]
    together = sequence_logps(model, *collate(examples, tok.eot_id))
    assert torch.allclose(torch.cat(alone), together, atol=1e-4)
    longer = sequence_logps(model, *collate(examples, tok.eot_id, length=len(examples[1].ids) + 20))
    assert torch.allclose(longer, together, atol=1e-4)


def test_bad_lines_are_counted_per_reason(base, tmp_path, capsys):
    tok = chat_tokenizer(base)
    good = {"messages": CHATS[0]}
    sft = write_jsonl(tmp_path / "sft.jsonl", [
        good, "{not json", {"text": "no fields"}, {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "x"}]}, {"prompt": "hello"}, {"prompt": "hi", "completion": "yo"},
        "[1, 2]"])
    data = load_task_data(sft, "sft", tok, seq_len=64, val_fraction=0.1)
    skipped = {k: len(v) for k, v in data.report.skipped.items()}
    assert data.report.used == 2 and sum(skipped.values()) == 6
    assert skipped["not JSON"] == 1 and skipped["no assistant turn"] == 1 and skipped["not a JSON object"] == 1
    assert skipped["missing field completion"] == 1 and skipped["missing field messages (or prompt/completion)"] == 1
    assert "not JSON 1 (line 2)" in data.report.describe()
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": "hello", "chosen": "hi", "rejected": "go away"}, {"prompt": "hello", "chosen": "hi"},
        {"prompt": "hello", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "a"}])
    data = load_task_data(dpo, "dpo", tok, seq_len=64, val_fraction=0.1)
    assert data.report.used == 1 and {k: len(v) for k, v in data.report.skipped.items()} == {
        "missing field rejected": 1, "identical completions": 1, "no assistant turn": 1}
    # nothing usable: DataError; through train.py exit 2 with one line
    empty = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"prompt": "p"}])
    with pytest.raises(DataError, match="no usable sft example.*not JSON 1"):
        load_task_data(empty, "sft", tok, seq_len=64, val_fraction=0.1)
    assert main(["--init_from", str(base), "--task", "sft", "--data", str(empty), "--out_dir",
                 str(tmp_path / "run"), "--no-progress", "--vram", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no usable sft example") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["--task", "sft", "--data", str(sft), "--no-progress"]) == 2
    assert "give --init_from" in capsys.readouterr().err


def _pairs(tok, n):
    """Synthetic preferences: 'yes' is always preferred to 'no'."""
    from utils.finetune_data import PairExample, SFTExample
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"the cat {i % 5}"}]
        c = encode_chat(tok, prompt + [{"role": "assistant", "content": "the dog ran to the park"}], train_from=1)
        r = encode_chat(tok, prompt + [{"role": "assistant", "content": "birds sing songs of the sea"}],
                        train_from=1)
        out.append(PairExample(SFTExample(*c), SFTExample(*r)))
    return out


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_dpo_starts_at_ln2_and_learns(base, use_lora):
    tok = chat_tokenizer(base)
    model = LanguageModel.from_pretrained(base, family="mamba1")
    resize_vocab(model, tok.vocab_size)
    if use_lora:
        lora.apply_lora(model, lora.LoRAConfig(targets=["in_proj", "x_proj", "dt_proj"], rank=4))

        def reference(x, y):
            with lora.adapters_disabled(model):
                return sequence_logps(model, x, y)
    else:
        import copy
        frozen = copy.deepcopy(model).requires_grad_(False)

        def reference(x, y):
            return sequence_logps(frozen, x, y)
    data = TaskData("dpo", _pairs(tok, 8), [], None)
    objective = DPOObjective(data, batch_size=8, pad_id=tok.eot_id, seed=0, reference=reference, beta=0.1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2 if use_lora else 1e-3)
    history = []
    for step in range(8):
        batch = objective.next_batch()
        loss, m = objective.loss(model.train(), batch)
        loss = loss / objective.count(batch)
        history.append((loss.item(), (m["rewards/accuracies"] / 8).item()))
        if step == 0:
            assert loss.item() == pytest.approx(LN2, abs=1e-6)
            assert all(abs(m[k].item()) < 1e-6 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1][0] < 0.6 * LN2 and history[-1][1] == 1.0 and history[0][1] < 1.0


def sft_args(base, data, out, *extra):
    return ["--init_from", str(base), "--task", "sft", "--data", str(data), "--out_dir", str(out),
            "--vram", "cpu", "--seq_len", "64", "--micro_batch_size", "2", "--grad_accum_steps", "2",
            "--warmup_steps", "1", "--eval_interval", "2", "--eval_batches", "2", "--checkpoint_interval", "2",
            "--log_interval", "1", "--no-progress", "--val_fraction", "0.25", *extra]


def chat_file(tmp_path):
    records = [{"messages": CHATS[i % 2]} for i in range(6)] + [
        {"prompt": "hello", "completion": "hi there"}, {"prompt": "how are you", "completion": "I am fine"}]
    return write_jsonl(tmp_path / "chat.jsonl", records)


def rows(run_dir, key):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def test_lora_sft_run_resumes_exactly_and_merges(base, tmp_path):
    data = chat_file(tmp_path)
    extra = ("--lora", "all", "--lora_rank", "4", "--lora_dropout", "0.1", "--max_steps", "4", "--lr", "1e-2")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(sft_args(base, data, straight, *extra)) == 0
    assert main(sft_args(base, data, split, *extra, "--stop_at_step", "2")) == 0
    assert main(sft_args(base, data, split, "--resume")) == 0
    for key in ("loss", "grad_norm", "val_loss"):
        assert rows(straight, key) == rows(split, key), key
    step = straight / "step_000004"
    names = {p.name for p in step.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_state.pt"} <= names
    assert "model.safetensors" not in names                        # the base is not copied
    cfg = json.loads((step / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve()) and cfg["r"] == 4
    assert sorted(cfg["target_modules"]) == ["dt_proj", "in_proj", "out_proj"]
    # only the adapters were optimised
    state = ck.load_training_state(step)
    n_opt = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert n_opt == 2 * 3 * 2                                       # A and B x 3 targets x 2 layers

    # generate.py's loader (base + adapter, merged) == the training model; the merge command writes a plain HF dir
    from training.finetune import load_lora_checkpoint
    from training.merge_lora import merge_to
    tuned, tok = load_lora_checkpoint(step, merge=False)
    merged, _, _ = ck.load_model_and_tokenizer(straight)
    x = torch.tensor([encode_chat(tok, CHATS[0], add_generation_prompt=True)[0]])
    with torch.no_grad():
        want = tuned.eval()(x)[0]
        assert torch.allclose(merged(x)[0], want, atol=1e-5)
    merge_to(straight, tmp_path / "merged")
    from transformers import MambaForCausalLM
    hf = MambaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, want, atol=1e-4)


def test_cli_sft_lora_then_chat(base, tmp_path):
    data = chat_file(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", *sft_args(base, data, out, "--lora", "minimal",
                                                                 "--max_steps", "3")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "added the chat tokens" in proc.stdout and "lora         rank 8" in proc.stdout
    assert "8 example(s) from 8 line(s)" in proc.stdout
    proc = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(out), "--chat", "--max_new_tokens",
                           "5", "--seed", "0", "--system", "Be brief."], input="hello\n\nhow are you\n",
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 2                      # one reply per user line, blank lines skipped
    assert END_TOKEN not in proc.stdout and "Traceback" not in proc.stderr
    # a model without chat tokens: one line, exit 2
    proc = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(base), "--chat"], input="hi\n",
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "no chat tokens" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("family", ["mamba2", "hybrid"])
def test_other_families_fine_tune_load_and_merge(base, tmp_path, family):
    """Mamba-2 and hybrid bases: SFT with LoRA (the vocabulary grows on every layer kind), the adapter checkpoint
    opens as base + adapter (generate.py's loader) and merges; full DPO builds its reference of the same family."""
    from models import HybridConfig, Mamba2Config, build_model
    from training.merge_lora import merge_to
    tok = Tokenizer.load(base)
    torch.manual_seed(0)
    config = (Mamba2Config(d_model=32, n_layer=2, vocab_size=tok.vocab_size, headdim=16, d_state=8)
              if family == "mamba2" else
              HybridConfig(d_model=32, n_layer=3, vocab_size=tok.vocab_size, pattern="MAF", n_heads=4, n_kv_heads=2))
    fbase = tmp_path / "base"
    build_model(config).save_pretrained(fbase, eos_token_id=tok.eot_id)
    tok.save(fbase)
    data = chat_file(tmp_path)
    out = tmp_path / "lora"
    assert main(sft_args(fbase, data, out, "--family", family, "--lora", "all", "--max_steps", "2")) == 0
    model, tok2, _ = ck.load_model_and_tokenizer(out)
    assert model.config.family == family and model.config.vocab_size == tok2.vocab_size > tok.vocab_size
    merge_to(out, tmp_path / "merged")
    merged, _, _ = ck.load_model_and_tokenizer(tmp_path / "merged")
    x = torch.tensor([encode_chat(tok2, CHATS[0], add_generation_prompt=True)[0]])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x)[0], model.eval()(x)[0], atol=1e-5, rtol=1e-5)
    prefs = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "hello", "chosen": "hi there", "rejected": "go away"},
                                                   {"prompt": "how are you", "chosen": "fine", "rejected": "bad"}] * 2)
    args = sft_args(fbase, prefs, tmp_path / "dpo", "--family", family, "--max_steps", "1")
    args[args.index("sft")] = "dpo"
    assert main(args) == 0
