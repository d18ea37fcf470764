"""--task reward: the Bradley-Terry loss by hand, a reward model that separates a synthetic preference set on held-out
pairs, and the CLI end to end (checkpoint with its head, eval_accuracy logged, the model used as a GRPO reward)."""
import json
import math

import pytest
import torch

from models import MambaConfig, LanguageModel
from training.launch import main
from training.reward_model import RewardObjective, bradley_terry
from training.rl_setup import reward_model_function
from training.scalar_head import HEAD_FILE, ScalarHeadModel
from utils.chat import add_chat_tokens, encode_chat
from utils.finetune_data import PairExample, SFTExample, TaskData
from utils.tokenizer import Tokenizer

TEXT = ("the cat sat on the mat and the dog ran to the park where birds sing songs of the sea "
        "hello how are you today I am fine thank you ") * 20
GOOD = ["the dog ran to the park", "I am fine thank you", "the cat sat on the mat"]
BAD = ["birds sing songs of the sea", "sea sea sea", "how are you today"]


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([0.5, 1.0, 0.0])
    want = [-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert bradley_terry(chosen, rejected).tolist() == pytest.approx(want, rel=1e-6)
    assert want[2] == pytest.approx(math.log(2))


def _pairs(tok, n, offset=0):
    """Separable preferences: a sentence of GOOD is always preferred to one of BAD."""
    out = []
    for i in range(offset, offset + n):
        prompt = [{"role": "user", "content": f"say something {i % 7}"}]
        c = encode_chat(tok, prompt + [{"role": "assistant", "content": GOOD[i % 3]}], train_from=1)
        r = encode_chat(tok, prompt + [{"role": "assistant", "content": BAD[(i // 3) % 3]}], train_from=1)
        out.append(PairExample(SFTExample(*c), SFTExample(*r)))
    return out


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer.train([TEXT], vocab_size=300)
    add_chat_tokens(t)
    return t


def test_reward_model_separates_held_out_pairs(tok):
    torch.manual_seed(0)
    model = ScalarHeadModel(LanguageModel(MambaConfig(d_model=16, n_layer=1, vocab_size=tok.vocab_size)))
    data = TaskData("dpo", _pairs(tok, 12), _pairs(tok, 9, offset=100), None)
    objective = RewardObjective(data, batch_size=6, pad_id=tok.eot_id, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def held_out():
        with torch.no_grad():
            batch = next(objective.eval_batches(9, 1))
            loss, m = objective.loss(model.eval(), batch)
        model.train()
        return loss.item() / 9, m["accuracy"].item() / 9

    loss0, _ = held_out()
    for _ in range(12):
        batch = objective.next_batch()
        loss, _ = objective.loss(model, batch)
        opt.zero_grad()
        (loss / objective.count(batch)).backward()
        opt.step()
    loss1, accuracy = held_out()
    assert accuracy == 1.0 and loss1 < 0.5 * loss0


def test_cli_reward_model_then_used_as_a_reward(tok, tmp_path):
    root = tmp_path / "base"
    base_tok = Tokenizer.train([TEXT], vocab_size=300)
    torch.manual_seed(0)
    LanguageModel(MambaConfig(d_model=16, n_layer=1, vocab_size=base_tok.vocab_size)).save_pretrained(
        root, eos_token_id=base_tok.eot_id)
    base_tok.save(root)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say something {i % 7}", "chosen": GOOD[i % 3],
                                        "rejected": BAD[(i // 3) % 3]}) + "\n" for i in range(24)))
    out = tmp_path / "rm"
    args = ["--init_from", str(root), "--task", "reward", "--data", str(data), "--out_dir", str(out), "--vram",
            "cpu", "--seq_len", "64", "--micro_batch_size", "6", "--lr", "1e-2", "--warmup_steps", "1",
            "--max_steps", "12", "--eval_interval", "12", "--eval_batches", "4", "--checkpoint_interval", "12",
            "--log_interval", "4", "--val_fraction", "0.25", "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy" in rows[0] and "margin" in rows[0]
    assert rows[-1]["eval_accuracy"] == 1.0 and rows[-1]["val_loss"] < 0.3
    assert (out / "step_000012" / HEAD_FILE).is_file() and (out / "best" / HEAD_FILE).is_file()

    reward = reward_model_function(str(out), "cpu")
    scores = reward(["say something 1"] * 2, [GOOD[0], BAD[0]])
    assert len(scores) == 2 and scores[0] > scores[1]
