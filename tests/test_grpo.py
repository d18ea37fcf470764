"""GRPO: advantages and loss against a hand computation, the one-pass gradient against the plain policy gradient,
and a LoRA run with a KL penalty, accumulation and two passes per batch that resumes exactly (sampler RNG and the
reused batch included)."""
import contextlib
import json
import math

import pytest
import torch

from models import MambaConfig, LanguageModel
from training.grpo import GRPOObjective, group_advantages, grpo_loss, token_logps
from training.launch import main
from training.rewards import parse_rewards
from utils.chat import add_chat_tokens
from utils.prompt_data import PromptData, PromptExample
from utils.tokenizer import Tokenizer


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    adv, std = group_advantages(rewards, 4)
    s1 = math.sqrt((4 * 0.25) / 3)                           # unbiased std of 1, 0, 0, 1
    s3 = math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 3)         # of 3, 0, 0, 0 (mean 0.75)
    want = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), 0, 0, 0, 0,
            2.25 / (s3 + 1e-4), -0.75 / (s3 + 1e-4), -0.75 / (s3 + 1e-4), -0.75 / (s3 + 1e-4)]
    assert adv.tolist() == pytest.approx(want, rel=1e-6)
    assert std.tolist() == pytest.approx([s1] * 4 + [0] * 4 + [s3] * 4, rel=1e-6)


def test_grpo_loss_by_hand():
    logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -3.0, 0.0]])
    old = torch.tensor([[-1.5, -0.5, -1.0], [-0.1, -2.0, 0.0]])
    ref = torch.tensor([[-1.2, -0.4, -2.0], [-0.3, -3.5, 0.0]])
    adv = torch.tensor([1.5, -0.7])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    eps, beta = 0.2, 0.1
    loss, kl, clip = grpo_loss(logps, old, ref, adv, mask, eps, beta)
    want_loss, want_kl, want_clip = [], [], []
    for i in range(2):
        terms, kls, clipped = [], [], []
        for t in range(3):
            if not mask[i, t]:
                continue
            ratio = math.exp(logps[i, t] - old[i, t])
            a = float(adv[i])
            surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            d = float(ref[i, t] - logps[i, t])
            k = math.exp(d) - d - 1
            terms.append(-surrogate + beta * k)
            kls.append(k)
            clipped.append(float((ratio < 1 - eps and a < 0) or (ratio > 1 + eps and a > 0)))
        want_loss.append(sum(terms) / len(terms))
        want_kl.append(sum(kls) / len(kls))
        want_clip.append(sum(clipped) / len(clipped))
    assert loss.tolist() == pytest.approx(want_loss, rel=1e-5)
    assert kl.tolist() == pytest.approx(want_kl, rel=1e-5)
    assert clip.tolist() == pytest.approx(want_clip) and 0 < sum(want_clip) < 5    # some, not all, clipped


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer.train([" ".join(f"{a}+{b}={a + b}" for a in range(10) for b in range(10)) * 3], vocab_size=280)
    add_chat_tokens(tok)
    return tok


def _objective(model, tok, beta=0.0, num_iterations=1):
    prompts = [PromptExample(tok.encode(f"{a}+2="), f"{a}+2=", {"answer": str(a + 2)}) for a in range(4)]
    return GRPOObjective(PromptData(prompts, [], None, ("answer",)), model, tok, parse_rewards("exact_match"), None,
                         rows=4, group_size=2, max_new_tokens=4, temperature=0.7, top_p=None, stop=(),
                         beta=beta, clip_epsilon=0.2, num_iterations=num_iterations, grad_accum_steps=1, seed=0,
                         device="cpu", autocast=contextlib.nullcontext, run_dir=None)


def test_one_pass_without_kl_is_the_plain_policy_gradient(tokenizer):
    torch.manual_seed(0)
    model = LanguageModel(MambaConfig(d_model=16, n_layer=2, vocab_size=tokenizer.vocab_size))
    objective = _objective(model, tokenizer)
    x, y, advantages, old, ref, stats = objective.next_batch()      # sampled by the decoder
    assert x.shape[0] == 4 and (y != -100).any(dim=1).all()
    advantages = torch.tensor([1.3, -0.4, 0.0, -0.9])             # any advantages: the identity is per row

    loss, metrics = objective.loss(model, (x, y, advantages, old, ref, stats))
    assert metrics["kl"] == 0 and metrics["clip_ratio"] == 0      # ratio 1: nothing clipped
    grads = torch.autograd.grad(loss, list(model.parameters()))

    logps = token_logps(model, x, y, 0.7)
    n = (y != -100).sum(dim=1)
    pg = -(advantages * logps.sum(dim=1) / n).sum()               # sum_i A_i grad mean_t log pi(o_it)
    want = torch.autograd.grad(pg, list(model.parameters()))
    for g, w in zip(grads, want):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-5)
    assert loss.item() == pytest.approx(-advantages.sum().item(), abs=1e-5)    # its value: ratio 1 times -A


def test_samples_follow_the_generator_state(tokenizer):
    torch.manual_seed(0)
    model = LanguageModel(MambaConfig(d_model=16, n_layer=2, vocab_size=tokenizer.vocab_size))
    objective = _objective(model, tokenizer, num_iterations=2)
    state = objective.sampler.state_dict()
    first = objective.next_batch()
    assert objective.next_batch() is first                        # the second pass reuses the sampled batch
    assert (first[3] != 0).any()                                  # old log-probs taken at sampling
    third = objective.next_batch()
    objective.sampler.load_state_dict(state)
    again = objective.next_batch()
    timing = objective.stat_names.index("sample_tokens_per_s")   # the one value that is not deterministic
    for a, b in zip(first[:5] + (first[5][:, :timing],), again[:5] + (again[5][:, :timing],)):
        assert torch.equal(a, b)
    assert not torch.equal(third[0], first[0]) or not torch.equal(third[1], first[1])


def rows(run_dir, *keys):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [tuple(r.get(k) for k in ("step",) + keys) for r in map(json.loads, lines) if "loss" in r]


def test_lora_grpo_run_resumes_exactly(tmp_path):
    root = tmp_path / "base"
    tok = Tokenizer.train([" ".join(f"{a}+{b}={a + b}" for a in range(10) for b in range(10)) * 3], vocab_size=280)
    torch.manual_seed(0)
    LanguageModel(MambaConfig(d_model=16, n_layer=2, vocab_size=tok.vocab_size)).save_pretrained(
        root, eos_token_id=tok.eot_id)
    tok.save(root)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(3)))
    args = ["--init_from", str(root), "--task", "grpo", "--data", str(data), "--vram", "cpu", "--seq_len", "32",
            "--micro_batch_size", "4", "--num_generations", "2", "--grad_accum_steps", "2", "--num_iterations", "2",
            "--max_new_tokens", "4", "--reward", "exact_match,length", "--reward_weights", "1,0.1",
            "--stop_strings", "=", "--lora", "all", "--lora_rank", "4", "--kl_beta", "0.1", "--lr", "3e-2",
            "--warmup_steps", "1", "--max_steps", "3", "--eval_interval", "3", "--checkpoint_interval", "10",
            "--log_interval", "1", "--sample_every", "1", "--val_fraction", "0.25", "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args + ["--out_dir", str(straight)]) == 0
    assert main(args + ["--out_dir", str(split), "--stop_at_step", "1"]) == 0      # mid-way through a reused batch
    assert main(["--resume", str(split), "--no-progress"]) == 0
    keys = ("loss", "grad_norm", "reward", "kl", "clip_ratio", "completion_length", "rewards/length/mean")
    got, want = rows(split, *keys), rows(straight, *keys)
    assert got == want and len(want) == 3
    assert want[1][4] > 0                                        # the second pass sees a moved policy: a KL
    evals = [json.loads(r) for r in (straight / "metrics.jsonl").read_text().splitlines() if "val_loss" in r]
    assert evals[-1]["val_loss"] == -evals[-1]["eval_reward"]
    samples = [json.loads(r) for r in (straight / "completions.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 3} and all(s["completion"].count("=") <= 1 for s in samples)
    assert (split / "completions.jsonl").read_text() == (straight / "completions.jsonl").read_text()
    assert (straight / "loss.png").is_file() and (straight / "step_000003" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("family", ["mamba2", "hybrid"])
def test_other_families_sample_and_train(tmp_path, family):
    """GRPO on a Mamba-2 and a hybrid (attention: a KV cache in the decoder) with LoRA, and its reference."""
    from models import HybridConfig, Mamba2Config, build_model
    tok = Tokenizer.train([" ".join(f"{a}+{b}={a + b}" for a in range(10) for b in range(10)) * 3], vocab_size=280)
    torch.manual_seed(0)
    config = (Mamba2Config(d_model=32, n_layer=1, vocab_size=tok.vocab_size, headdim=16, d_state=8)
              if family == "mamba2" else
              HybridConfig(d_model=32, n_layer=2, vocab_size=tok.vocab_size, pattern="MA", n_heads=4, n_kv_heads=2))
    build_model(config).save_pretrained(tmp_path / "base", eos_token_id=tok.eot_id)
    tok.save(tmp_path / "base")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(4)))
    out = tmp_path / "run"
    assert main(["--init_from", str(tmp_path / "base"), "--family", family, "--task", "grpo", "--data", str(data),
                 "--reward", "exact_match", "--lora", "all", "--out_dir", str(out), "--vram", "cpu",
                 "--max_new_tokens", "3", "--num_generations", "2", "--micro_batch_size", "4", "--max_steps", "1",
                 "--eval_interval", "1", "--eval_batches", "1", "--log_interval", "1", "--val_fraction", "0.25",
                 "--no-progress"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kl"] == 0 and 1 <= row["completion_length"] <= 3 and math.isfinite(row["loss"])
