"""The worked example of learning from rewards (README, section "Learning from rewards"): small sums x+k.

    python examples/arithmetic.py data OUT        a tiny untrained base model + tokenizer (OUT/base), sft.jsonl,
                                                  prompts.jsonl (training prompts) and heldout.jsonl
    python examples/arithmetic.py eval CKPT FILE  greedy accuracy (exact match of the final answer) on FILE's prompts

The 300 sums x+k (x in 0..99, k in 1..3) are split 240 / 60 by a fixed shuffle; the 60 held-out sums are never
trained on (SFT or GRPO). Every digit is its own token (the BPE is trained on text without digits), so a model can
learn the rule (add k to the last digit, carry into the tens) rather than memorise each sum.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.model_sizes import model_config  # noqa: E402
from inference.decoder import Decoder, pad_left  # noqa: E402
from models import build_model  # noqa: E402
from models.sampling import SamplingParams  # noqa: E402
from training.checkpoint import load_model_and_tokenizer  # noqa: E402
from training.rewards import exact_match  # noqa: E402
from utils.chat import add_chat_tokens, encode_chat, end_id  # noqa: E402
from utils.tokenizer import Tokenizer  # noqa: E402


def sums() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(x, k) for x in range(100) for k in (1, 2, 3)]
    random.Random(0).shuffle(pairs)
    return pairs[:240], pairs[240:]


def write_data(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = sums()
    text = "what is the sum of these numbers plus one two three + = "      # no digits: no merged digit tokens
    tokenizer = Tokenizer.train([text] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = build_model(model_config("tiny", vocab_size=tokenizer.vocab_size))
    model.save_pretrained(out / "base", eos_token_id=tokenizer.eot_id)
    tokenizer.save(out / "base")

    def write(name, rows):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("sft.jsonl", [{"prompt": f"{a}+{b}", "completion": str(a + b)} for a, b in train])
    write("prompts.jsonl", [{"prompt": f"{a}+{b}", "answer": str(a + b)} for a, b in train])
    write("heldout.jsonl", [{"prompt": f"{a}+{b}", "answer": str(a + b)} for a, b in heldout])
    print(f"wrote {out}/base (tiny model, {model.num_parameters():,} parameters), sft.jsonl ({len(train)}), "
          f"prompts.jsonl ({len(train)}), heldout.jsonl ({len(heldout)})")


@torch.no_grad()
def accuracy(checkpoint: str, prompts_file: str, max_new_tokens: int = 4) -> float:
    model, tokenizer, folder = load_model_and_tokenizer(checkpoint)
    add_chat_tokens(tokenizer)
    records = [json.loads(line) for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0]
               for r in records]
    decoder = Decoder(model.eval(), len(prompts))
    ids, mask = pad_left(prompts, tokenizer.eot_id)
    new = decoder.decode(ids, max_new_tokens, SamplingParams(temperature=0.0), mask, eos_token_id=end_id(tokenizer))
    end = end_id(tokenizer)
    texts = [tokenizer.decode([t for t in row.tolist() if t != end]) for row in new[:, ids.shape[1]:]]
    scores = exact_match(None, texts, answer=[r["answer"] for r in records])
    print(f"{folder}: {sum(scores):.0f} / {len(scores)} correct = {sum(scores) / len(scores):.2f} "
          f"(greedy; e.g. {records[0]['prompt']} -> {texts[0]!r})")
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("data").add_argument("out", type=Path)
    ev = sub.add_parser("eval")
    ev.add_argument("checkpoint")
    ev.add_argument("prompts")
    args = parser.parse_args()
    if args.command == "data":
        write_data(args.out)
    else:
        accuracy(args.checkpoint, args.prompts)


if __name__ == "__main__":
    main()
