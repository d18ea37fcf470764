"""BatchSampler: windows, determinism, exact resume, DDP rank sharding; eval_batches."""
import json

import numpy as np
import pytest
import torch

from utils.sampler import BatchSampler, eval_batches


def tokens(n=10_000, dtype=np.uint16):
    return (np.arange(n) % 50_000).astype(dtype)    # token value = position: windows are easy to read back


def test_batches_are_shifted_windows():
    t = tokens()
    s = BatchSampler(t, seq_len=17, batch_size=5, seed=3)
    for _ in range(10):
        x, y = s.next_batch()
        assert x.shape == y.shape == (5, 17) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y[:, -1], x[:, -1] + 1)           # consecutive positions: one contiguous window
        assert torch.equal(x, x[:, :1] + torch.arange(17))
        assert int(y.max()) < len(t)


def test_one_epoch_visits_every_window_once():
    t = tokens(2_000)
    s = BatchSampler(t, seq_len=16, batch_size=4, seed=0)
    starts = np.concatenate([s.window_starts(i, 1) for i in range(s.n_windows)])
    offset = starts.min() % 16
    assert len(set(starts.tolist())) == s.n_windows == (2000 - 16) // 16
    assert np.all((starts - offset) % 16 == 0) and starts.max() + 17 <= len(t)
    # The next epoch re-shuffles with a new offset.
    nxt = s.window_starts(s.n_windows, s.n_windows)
    assert not np.array_equal(nxt, starts)


def test_deterministic_from_seed():
    t = tokens()
    a, b, c = (BatchSampler(t, 32, 8, seed=s) for s in (1, 1, 2))
    for _ in range(5):
        xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
        assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_gives_exactly_the_same_batches(world_size):
    t = tokens(3_000)         # ~93 windows of 32: several epochs in 40 steps
    for rank in range(world_size):
        ref = BatchSampler(t, 32, 4, seed=7, rank=rank, world_size=world_size)
        expected = [ref.next_batch() for _ in range(40)]
        run = BatchSampler(t, 32, 4, seed=7, rank=rank, world_size=world_size)
        for _ in range(13):
            run.next_batch()
        state = json.loads(json.dumps(run.state_dict()))      # what a checkpoint stores
        resumed = BatchSampler(t, 32, 4, seed=0, rank=rank, world_size=world_size)
        resumed.load_state_dict(state)
        assert resumed.seed == 7 and resumed.position == 13 * 4 * world_size
        for x_exp, y_exp in expected[13:]:
            x, y = resumed.next_batch()
            assert torch.equal(x, x_exp) and torch.equal(y, y_exp)
        assert resumed.epoch > 0


def test_ranks_get_disjoint_slices_of_each_global_batch():
    t = tokens(20_000)
    world, bs = 4, 3
    samplers = [BatchSampler(t, 16, bs, seed=5, rank=r, world_size=world) for r in range(world)]
    seen = []
    steps = samplers[0].n_windows // (world * bs)          # within the first epoch
    for _ in range(steps):
        for s in samplers:
            x, _ = s.next_batch()
            seen.extend(x[:, 0].tolist())
    assert len(seen) == len(set(seen)) == steps * world * bs
    # Together the ranks see what one process with the global batch sees.
    single = BatchSampler(t, 16, world * bs, seed=5)
    together = [single.next_batch()[0][:, 0].tolist() for _ in range(steps)]
    assert sum(together, []) == seen


def test_state_mismatch_and_bad_arguments():
    t = tokens()
    s = BatchSampler(t, 32, 2)
    with pytest.raises(ValueError, match="seq_len"):
        BatchSampler(t, 64, 2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="n_tokens"):
        BatchSampler(t[:5000], 32, 2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="seq_len \\+ 1"):
        BatchSampler(t[:10], 32, 2)
    with pytest.raises(ValueError, match="rank"):
        BatchSampler(t, 32, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(t, 32, 0)
    # A corpus of exactly one window still works (and keeps giving it).
    one = BatchSampler(t[:33], 32, 2)
    x, y = one.next_batch()
    assert torch.equal(x[0], x[1]) and torch.equal(y[0], torch.arange(1, 33))


def test_eval_batches_are_deterministic_and_spread():
    t = tokens(5_000, np.uint32)
    a = list(eval_batches(t, 32, 4, max_batches=5))
    b = list(eval_batches(t, 32, 4, max_batches=5))
    assert len(a) == 5 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    starts = torch.cat([x[:, 0] for x, _ in a])
    assert len(set(starts.tolist())) == 20 and int(starts.max()) > 4000       # spread over the whole split
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in a)
    full = list(eval_batches(t, 32, 50))
    assert sum(len(x) for x, _ in full) == (5000 - 1) // 32 and len(full[-1][0]) == (4999 // 32) % 50
    with pytest.raises(ValueError, match="validation split"):
        eval_batches(t[:20], 32, 4, 1)
