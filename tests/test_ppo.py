"""PPO: GAE and the loss against a hand computation, and a run with its value head that resumes exactly."""
import json

import pytest
import torch

from models import MambaConfig, LanguageModel
from training.launch import main
from training.ppo import gae, ppo_loss, whiten
from training.scalar_head import VALUE_HEAD_FILE
from utils.tokenizer import Tokenizer


def test_gae_by_hand():
    # row 0: prompt at 0, completion at 1..3, padding at 4; row 1: completion at 2..4
    rewards = torch.tensor([[9.0, 0.1, -0.2, 1.0, 7.0], [5.0, 5.0, 0.0, 0.3, 2.0]])
    values = torch.tensor([[3.0, 0.5, 0.4, 0.2, 8.0], [1.0, 1.0, 0.1, 0.6, 0.9]])
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, True, True]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want = torch.zeros(2, 5)
    for i, span in ((0, (1, 2, 3)), (1, (2, 3, 4))):
        following = 0.0
        for j, t in enumerate(reversed(span)):
            next_v = 0.0 if j == 0 else float(values[i, t + 1])
            delta = float(rewards[i, t]) + gamma * next_v - float(values[i, t])
            following = delta + gamma * lam * following
            want[i, t] = following
    assert torch.allclose(adv, want, atol=1e-6)
    assert torch.allclose(ret, (want + values) * mask, atol=1e-6)
    # the last token: its delta alone; e.g. row 0: 1.0 - 0.2
    assert adv[0, 3].item() == pytest.approx(0.8)
    w = whiten(adv, mask)
    assert w[mask].mean().abs() < 1e-6 and w[mask].std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask] == 0).all()


def test_ppo_loss_by_hand():
    logps = torch.tensor([[-1.0, -0.3]])
    old = torch.tensor([[-1.4, -0.3]])
    values = torch.tensor([[0.9, 0.1]])
    old_values = torch.tensor([[0.5, 0.0]])
    adv = torch.tensor([[1.0, -2.0]])
    ret = torch.tensor([[0.2, 0.4]])
    mask = torch.tensor([[True, True]])
    loss, policy, value, pg_clip, vf_clip = ppo_loss(logps, old, values, old_values, adv, ret, mask, 0.2,
                                                     clip_value=0.2, vf_coef=0.1)
    r0 = torch.exp(torch.tensor(0.4)).item()                   # 1.49: clipped to 1.2 for A > 0
    pg = [max(-1.0 * r0, -1.0 * 1.2), max(2.0 * 1.0, 2.0 * 1.0)]
    v_clipped = [0.5 + 0.2, 0.0 + 0.1]
    vf = [0.5 * max((0.9 - 0.2) ** 2, (v_clipped[0] - 0.2) ** 2), 0.5 * max((0.1 - 0.4) ** 2, (v_clipped[1] - 0.4) ** 2)]
    assert policy.item() == pytest.approx(sum(pg) / 2, rel=1e-5)
    assert value.item() == pytest.approx(sum(vf) / 2, rel=1e-5)
    assert loss.item() == pytest.approx(sum(pg) / 2 + 0.1 * sum(vf) / 2, rel=1e-5)
    assert pg_clip.item() == pytest.approx(0.5) and vf_clip.item() == pytest.approx(0.0)


def test_ppo_run_resumes_exactly(tmp_path):
    root = tmp_path / "base"
    tok = Tokenizer.train([" ".join(f"{a}+{b}={a + b}" for a in range(10) for b in range(10)) * 3], vocab_size=280)
    torch.manual_seed(0)
    LanguageModel(MambaConfig(d_model=16, n_layer=1, vocab_size=tok.vocab_size)).save_pretrained(
        root, eos_token_id=tok.eot_id)
    tok.save(root)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+2=", "answer": str(a + 2)}) + "\n" for a in range(8)))
    args = ["--init_from", str(root), "--task", "ppo", "--data", str(data), "--vram", "cpu", "--seq_len", "32",
            "--micro_batch_size", "4", "--num_generations", "1", "--max_new_tokens", "3", "--reward", "length",
            "--kl_beta", "0.1", "--num_iterations", "2", "--lr", "1e-2", "--warmup_steps", "1", "--max_steps", "3",
            "--eval_interval", "10", "--checkpoint_interval", "10", "--log_interval", "1", "--val_fraction", "0.25",
            "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args + ["--out_dir", str(straight)]) == 0
    assert main(args + ["--out_dir", str(split), "--stop_at_step", "1"]) == 0
    assert main(["--resume", str(split), "--no-progress"]) == 0
    keys = ("loss", "grad_norm", "reward", "objective/kl", "loss/value_avg", "policy/clipfrac_avg")

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [tuple(r[k] for k in keys) for r in map(json.loads, lines) if "loss" in r]
    assert rows(split) == rows(straight) and len(rows(straight)) == 3
    assert rows(straight)[1][4] > 0 and (straight / "step_000003" / VALUE_HEAD_FILE).is_file()
