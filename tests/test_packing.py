"""Packing SFT examples into full rows (utils/packing.py, --pack): the first-fit-decreasing plan, the packed batch
against each example's own padded row (tokens, masked targets, seq_idx), the efficiency figures, truncation, an
exact resume of the packed sampler, and (once the model reads seq_idx) the loss of a packed batch against the
examples run one by one."""
import random

import pytest
import torch

from models import LanguageModel, MambaConfig
from training.config import ConfigError, TrainConfig
from training.finetune import describe_packing
from training.objectives import DPOObjective, PackedDPOObjective, PackedSFTObjective, SFTObjective, sequence_logps, document_logps
from utils.finetune_data import PairExample, SFTExample, TaskData, collate, collate_pairs
from utils.packing import (IGNORE, collate_packed, collate_packed_pairs, example_length, first_fit_decreasing,
                           pack_examples, pack_pairs,
                           packing_efficiency, padded_positions)
from utils.sampler import ResumeMismatch

PAD = 0


def make_example(rng: random.Random, n_tokens: int, vocab: int = 50) -> SFTExample:
    """A conversation of n_tokens ids: a prompt (labels -100) then an answer (labels = ids)."""
    ids = [rng.randrange(1, vocab) for _ in range(n_tokens)]
    prompt = rng.randrange(1, n_tokens)
    return SFTExample(ids, [IGNORE] * prompt + ids[prompt:])


def make_examples(n: int, seed: int = 0, low: int = 2, high: int = 30) -> list[SFTExample]:
    rng = random.Random(seed)
    return [make_example(rng, rng.randint(low, high)) for _ in range(n)]


def naive_first_fit_decreasing(lengths, capacity):
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def test_first_fit_decreasing_by_hand():
    # sorted: 7(#2) 6(#5) 5(#0) 4(#4) 3(#1) 2(#3) 1(#6). 7 opens row 0 (3 left); 6 opens row 1 (4 left); 5 opens
    # row 2 (5 left); 4 fills row 1; 3 fills row 0; 2 and 1 go to row 2 (2 left)
    assert first_fit_decreasing([5, 3, 7, 2, 4, 6, 1], 10) == [[2, 1], [5, 4], [0, 3, 6]]
    assert first_fit_decreasing([3, 3], 4) == [[0], [1]]                 # ties: the earlier example first
    assert first_fit_decreasing([4, 4, 2], 4) == [[0], [1], [2]]         # full rows take nothing more
    assert first_fit_decreasing([], 4) == []
    with pytest.raises(ValueError, match="outside"):
        first_fit_decreasing([5], 4)


def test_first_fit_decreasing_matches_the_plain_algorithm():
    rng = random.Random(1)
    for capacity in (1, 7, 64):
        for n in (1, 2, 5, 33, 200):
            lengths = [rng.randint(1, capacity) for _ in range(n)]
            bins = first_fit_decreasing(lengths, capacity)
            assert bins == naive_first_fit_decreasing(lengths, capacity)
            assert sorted(i for b in bins for i in b) == list(range(n))            # each example in one row
            assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def split_row(x_row, y_row, idx_row):
    """The runs of equal seq_idx along a row: [(x, y, index)]."""
    runs, start = [], 0
    for t in range(1, len(idx_row) + 1):
        if t == len(idx_row) or idx_row[t] != idx_row[start]:
            runs.append((x_row[start:t], y_row[start:t], int(idx_row[start])))
            start = t
    return runs


def test_every_example_appears_once_in_order_with_its_own_targets():
    seq_len = 40
    examples = make_examples(60, high=41)
    rows = pack_examples(examples, seq_len)
    x, y, seq_idx = collate_packed(rows, PAD, seq_len)
    assert x.shape == y.shape == seq_idx.shape == (len(rows), seq_len) and seq_idx.dtype == torch.int32
    assert bool((seq_idx[:, 1:] >= seq_idx[:, :-1]).all())
    found = []
    for r, row in enumerate(rows):
        runs = split_row(x[r], y[r], seq_idx[r])
        assert [i for _, _, i in runs[:len(row)]] == list(range(len(row)))
        for (xs, ys, _), example in zip(runs, row):
            ex, ey = collate([example], PAD)                 # the example in its own padded row
            assert torch.equal(xs, ex[0]) and torch.equal(ys, ey[0])
            found.append(id(example))
        for xs, ys, i in runs[len(row):]:                   # the rest of the row: padding, one index of its own
            assert i == len(row) and bool((xs == PAD).all()) and bool((ys == IGNORE).all())
    assert sorted(found) == sorted(id(e) for e in examples)      # each exactly once, never split across rows
    assert int((y != IGNORE).sum()) == sum(int((collate([e], PAD)[1] != IGNORE).sum()) for e in examples)


def test_seq_idx_and_padding_by_hand():
    a = SFTExample([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])     # 3 positions
    b = SFTExample([5, 6, 7], [IGNORE, 6, 7])                # 2
    c = SFTExample([8, 9], [IGNORE, 9])                      # 1
    x, y, seq_idx = collate_packed([[a, b], [c]], PAD, seq_len=6)
    assert seq_idx.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert x.tolist() == [[1, 2, 3, 5, 6], [8, PAD, PAD, PAD, PAD]]
    # a's last input (3) predicts its own last token (4); b's first input predicts 6, never a's tokens
    assert y.tolist() == [[IGNORE, 3, 4, 6, 7], [9, IGNORE, IGNORE, IGNORE, IGNORE]]


def test_an_example_longer_than_seq_len_keeps_the_unpacked_cut():
    seq_len = 8
    rng = random.Random(2)
    long, short = make_example(rng, 20), make_example(rng, 4)
    rows = pack_examples([short, long], seq_len)
    assert [len(r) for r in rows] == [1, 1] and rows[0][0] is long
    x, y, seq_idx = collate_packed(rows, PAD, seq_len)
    cut = SFTExample(long.ids[:seq_len + 1], long.labels[:seq_len + 1])     # the loader's rule: seq_len + 1 tokens
    ex, ey = collate([cut], PAD)
    assert torch.equal(x[0], ex[0]) and torch.equal(y[0], ey[0]) and seq_idx[0].tolist() == [0] * seq_len
    assert example_length(long, seq_len) == seq_len


def test_efficiency_figures():
    assert packing_efficiency([5, 3, 7, 2, 4, 6, 1], n_rows=3, seq_len=10) == pytest.approx(28 / 30)
    # batches [2, 4] and [3, 1], each padded to its widest: 2*4 + 2*3 = 14 positions
    assert padded_positions([2, 4, 3, 1], batch_size=2) == 14
    assert padded_positions([2, 4, 3], batch_size=2) == 11                  # a last, short batch
    examples = make_examples(50, high=41)
    line = describe_packing("sft", examples, pack_examples(examples, 40), 40, 4, seed=0)
    assert "50 train examples into" in line and "packed" in line and "padded" in line
    # two examples of 3 and 1 positions in one row of 8: half full; padded batches of 2 hold 4 tokens in 6
    two = [SFTExample([1, 2, 3, 4], [IGNORE, 2, 3, 4]), SFTExample([5, 6], [IGNORE, 6])]
    line = describe_packing("sft", two, pack_examples(two, 8), 8, 2, seed=0)
    assert "into 1 rows of 8 (50.0% full)" in line and "100.0% packed, 66.7% padded" in line
    # one pair (3 + 1 positions) in a row of 2 * 8: a quarter full; padded, two rows as wide as the chosen (3)
    pair = PairExample(*two)
    line = describe_packing("dpo", [pair], pack_pairs([pair], 8), 8, 2, seed=0)
    assert "1 train pairs into 1 rows of 16 (25.0% full)" in line and "100.0% packed, 66.7% padded" in line


def objective(examples, seed=0, batch_size=3, seq_len=40):
    data = TaskData("sft", examples[:40], examples[40:], report=None)
    return PackedSFTObjective(data, batch_size=batch_size, pad_id=PAD, seed=seed, seq_len=seq_len)


def test_packed_objective_is_deterministic_and_resumes_exactly():
    examples = make_examples(60, high=41)
    first, again = objective(examples), objective(examples)
    stream = [first.next_batch() for _ in range(5)]
    assert all(torch.equal(s, t) for b, c in zip(stream, (again.next_batch() for _ in range(5))) for s, t in zip(b, c))
    state = first.sampler.state_dict()
    ahead = [first.next_batch() for _ in range(9)]          # past the end of the first epoch of rows
    resumed = objective(examples)
    resumed.sampler.load_state_dict(state)
    assert all(torch.equal(s, t) for b in ahead for s, t in zip(b, resumed.next_batch()))
    other_seed = objective(examples, seed=1)
    assert not all(torch.equal(s, t) for s, t in zip(stream[0], other_seed.next_batch()))
    assert first.can_evaluate() and len(list(first.eval_batches(2, 10))) >= 1


def test_a_state_resumes_only_over_the_same_unit():
    examples = make_examples(60, high=41)
    data = TaskData("sft", examples[:40], examples[40:], report=None)
    unpacked = SFTObjective(data, batch_size=3, pad_id=PAD, seed=0)
    with pytest.raises(ResumeMismatch, match="saved over examples, this run samples packed rows of 40"):
        objective(examples).sampler.load_state_dict(unpacked.sampler.state_dict())
    with pytest.raises(ResumeMismatch, match="saved over packed rows of 40, this run samples packed rows of 30"):
        objective(examples, seq_len=30).sampler.load_state_dict(objective(examples).sampler.state_dict())
    old_state = {k: v for k, v in unpacked.sampler.state_dict().items() if k != "unit"}    # saved before --pack
    unpacked.sampler.load_state_dict(old_state)


def test_packed_objective_hands_the_model_seq_idx():
    seen = {}

    def model(x, targets=None, seq_idx=None, return_logits=True):
        seen.update(x=x, targets=targets, seq_idx=seq_idx, return_logits=return_logits)
        return None, torch.tensor(2.0)

    obj = objective(make_examples(60, high=41))
    batch = obj.next_batch()
    total, _ = obj.loss(model, batch)
    assert seen["seq_idx"] is batch[2] and seen["return_logits"] is False
    assert total.item() == pytest.approx(2.0 * obj.count(batch))


def test_pack_is_a_setting_of_sft_and_dpo():
    common = dict(init_from="base", data="pairs.jsonl", pack=True)
    TrainConfig(task="sft", **common).validate()
    TrainConfig(task="dpo", **common).validate()
    with pytest.raises(ConfigError, match="pack is a setting of --task sft or dpo"):
        TrainConfig(task="reward", **common).validate()


class DocumentByDocument(torch.nn.Module):
    """A stand-in for a model that reads seq_idx: each run of one index goes through `model` on its own, so the
    documents of a row cannot see each other (what the kernels' reset gives). Returns the mean loss like the model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, targets=None, seq_idx=None, return_logits=True):
        if targets is None:                                 # the logits, (b, L, v)
            return torch.stack([torch.cat([self.model(xs[None])[0][0] for xs, _, _ in split_row(x[r], x[r], seq_idx[r])])
                                for r in range(x.shape[0])]), None
        losses = []
        for r in range(x.shape[0]):
            for xs, ys, _ in split_row(x[r], targets[r], seq_idx[r]):
                logits, _ = self.model(xs[None])
                losses.append(torch.nn.functional.cross_entropy(logits[0].float(), ys, ignore_index=IGNORE,
                                                                reduction="sum"))
        return None, torch.stack(losses).sum() / (targets != IGNORE).sum()


def test_packed_loss_with_a_stand_in_that_runs_each_document_alone():
    torch.manual_seed(0)
    model = LanguageModel(MambaConfig(d_model=16, n_layer=1, vocab_size=64)).float().eval()
    examples = make_examples(10, seed=4, high=13)
    data = TaskData("sft", examples, [], report=None)
    packed = PackedSFTObjective(data, batch_size=len(examples), pad_id=PAD, seed=0, seq_len=12)
    alone = SFTObjective(data, batch_size=1, pad_id=PAD, seed=0)
    with torch.no_grad():
        packed_sum, _ = packed.loss(DocumentByDocument(model), packed.collate(packed.train))
        one_by_one = sum(alone.loss(model, alone.collate([e]))[0] for e in examples)
    assert len(packed.train) < len(examples)
    torch.testing.assert_close(packed_sum, one_by_one, rtol=1e-5, atol=1e-5)


def test_packed_loss_equals_the_examples_one_by_one():
    torch.manual_seed(0)
    model = LanguageModel(MambaConfig(d_model=32, n_layer=2, vocab_size=64)).float().eval()
    examples = make_examples(12, seed=3, high=17)
    data = TaskData("sft", examples, [], report=None)
    packed = PackedSFTObjective(data, batch_size=len(examples), pad_id=PAD, seed=0, seq_len=16)
    alone = SFTObjective(data, batch_size=1, pad_id=PAD, seed=0)
    with torch.no_grad():
        packed_sum, _ = packed.loss(model, packed.collate(packed.train))
        one_by_one = sum(alone.loss(model, alone.collate([e]))[0] for e in examples)
    assert len(packed.train) < len(examples)
    torch.testing.assert_close(packed_sum, one_by_one, rtol=1e-5, atol=1e-5)


def make_pairs(n: int, seed: int, high: int) -> list[PairExample]:
    rng = random.Random(seed)
    return [PairExample(make_example(rng, rng.randint(2, high)), make_example(rng, rng.randint(2, high)))
            for _ in range(n)]


def test_pairs_pack_side_by_side_in_rows_of_twice_seq_len():
    seq_len = 16
    pairs = make_pairs(30, seed=5, high=20)                 # some sides longer than seq_len + 1: cut as unpacked
    rows = pack_pairs(pairs, seq_len)
    assert sorted(id(p) for row in rows for p in row) == sorted(id(p) for p in pairs)
    x, y, seq_idx = collate_packed_pairs(rows, PAD, seq_len)
    assert x.shape[1] <= 2 * seq_len
    for r, row in enumerate(rows):
        runs = split_row(x[r], y[r], seq_idx[r])
        for j, pair in enumerate(row):
            cut = [SFTExample(e.ids[:seq_len + 1], e.labels[:seq_len + 1]) for e in (pair.chosen, pair.rejected)]
            xc, yc, xr, yr = collate_pairs([PairExample(*cut)], PAD)        # the loader's cut, then padded rows
            for (xs, ys, _), ex, ey in ((runs[2 * j], xc, yc), (runs[2 * j + 1], xr, yr)):
                n = len(xs)
                assert torch.equal(xs, ex[0, :n]) and torch.equal(ys, ey[0, :n]) and bool((ey[0, n:] == IGNORE).all())


def test_packed_dpo_equals_unpacked_with_a_stand_in_that_runs_each_document_alone():
    torch.manual_seed(0)
    policy = LanguageModel(MambaConfig(d_model=16, n_layer=1, vocab_size=64)).float().eval()
    ref = LanguageModel(MambaConfig(d_model=16, n_layer=1, vocab_size=64)).float().eval()
    pairs = make_pairs(9, seed=6, high=12)
    data = TaskData("dpo", pairs, [], report=None)
    packed = PackedDPOObjective(data, batch_size=len(pairs), pad_id=PAD, seed=0, seq_len=12, beta=0.5,
                                reference=lambda x, y, seq_idx: document_logps(DocumentByDocument(ref), x, y, seq_idx))
    unpacked = DPOObjective(data, batch_size=len(pairs), pad_id=PAD, seed=0, beta=0.5,
                            reference=lambda x, y: sequence_logps(ref, x, y))
    assert len(packed.train) < len(pairs)
    with torch.no_grad():
        batch = packed.collate(packed.train)
        assert packed.count(batch) == len(pairs)
        got, got_metrics = packed.loss(DocumentByDocument(policy), batch)
        want, want_metrics = unpacked.loss(policy, unpacked.collate(pairs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, value in want_metrics.items():
        torch.testing.assert_close(got_metrics[name], value, rtol=1e-5, atol=1e-5)


def test_packed_dpo_equals_unpacked():
    torch.manual_seed(0)
    policy = LanguageModel(MambaConfig(d_model=32, n_layer=2, vocab_size=64)).float().eval()
    ref = LanguageModel(MambaConfig(d_model=32, n_layer=2, vocab_size=64)).float().eval()
    pairs = make_pairs(9, seed=7, high=17)
    data = TaskData("dpo", pairs, [], report=None)
    packed = PackedDPOObjective(data, batch_size=len(pairs), pad_id=PAD, seed=0, seq_len=16, beta=0.5,
                                reference=lambda x, y, seq_idx: document_logps(ref, x, y, seq_idx))
    unpacked = DPOObjective(data, batch_size=len(pairs), pad_id=PAD, seed=0, beta=0.5,
                            reference=lambda x, y: sequence_logps(ref, x, y))
    with torch.no_grad():
        got, _ = packed.loss(policy, packed.collate(packed.train))
        want, _ = unpacked.loss(policy, unpacked.collate(pairs))
    assert len(packed.train) < len(pairs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
