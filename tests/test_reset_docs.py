"""Pre-training with --reset_at_doc_boundaries: a window of the token stream holding several documents (each closed
by its end-of-text token) scores each document as if it were alone; without the flag the state flows across. The
flag runs through train.py and is refused for the other tasks."""
import types

import numpy as np
import pytest
import torch

from kernels.documents import seq_idx_from_separators
from models import HybridConfig, MambaConfig, build_model
from training.config import ConfigError, TrainConfig
from training.launch import main, setup
from training.objectives import LMObjective
from tests.helpers import randomize_parameters, write_word_corpus

VOCAB = 61
EOT = VOCAB - 1
CONFIGS = {
    "mamba1": lambda: MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4, d_conv=4),
    "hybrid": lambda: HybridConfig(d_model=16, n_layer=3, vocab_size=VOCAB, pattern="MTA", n_heads=4, n_kv_heads=2,
                                   mamba1=dict(d_state=4)),
}
# documents of each stream (tokens before its end-of-text); the window of 14 cuts the last one short. Row 2 opens
# with an end-of-text (a one-token document at position 0) and has a document shorter than the conv window.
STREAMS = [[4, 2, 9], [0, 2, 13]]
SEQ_LEN = 14


def window(doc_lengths, generator):
    """(seq_len + 1,) tokens: documents of random tokens, each followed by EOT, cut to a window."""
    pieces = [torch.cat([torch.randint(0, EOT, (n,), generator=generator), torch.tensor([EOT])])
              for n in doc_lengths]
    stream = torch.cat(pieces)
    assert len(stream) >= SEQ_LEN + 1
    return stream[:SEQ_LEN + 1]


def lm_objective(reset_at):
    data = types.SimpleNamespace(train_tokens=np.zeros(64, dtype=np.int64), val_tokens=np.zeros(64, dtype=np.int64))
    return LMObjective(data, SEQ_LEN, batch_size=2, seed=0, reset_at=reset_at)


def make_model(family):
    torch.manual_seed(0)
    return randomize_parameters(build_model(CONFIGS[family]()), scale=0.3).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    rows = torch.stack([window(lengths, g) for lengths in STREAMS])
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def one_by_one(model, x, y):
    """The summed loss of every document of every row, each run through the model on its own."""
    total = torch.zeros(())
    seq_idx = seq_idx_from_separators(x, EOT)
    for row in range(x.shape[0]):
        for d in seq_idx[row].unique():
            keep = seq_idx[row] == d
            _, loss = model(x[row, keep][None], targets=y[row, keep][None], return_logits=False)
            total = total + loss * int(keep.sum())
    return total


def test_seq_idx_counts_the_end_of_text_tokens_before_each_token():
    x = torch.tensor([[5, 6, EOT, 7, EOT, 8], [EOT, EOT, 1, 2, 3, EOT]])
    assert seq_idx_from_separators(x, EOT).tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    assert seq_idx_from_separators(x, EOT).dtype == torch.int32


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_a_window_of_documents_scores_each_document_alone(family):
    model, (x, y) = make_model(family), batch()
    assert seq_idx_from_separators(x, EOT)[:, -1].tolist() == [2, 2]        # 3 documents in each row
    with torch.no_grad():
        alone = one_by_one(model, x, y)
        reset, _ = lm_objective(EOT).loss(model, (x, y))
        across, _ = lm_objective(None).loss(model, (x, y))
    assert reset.item() == pytest.approx(alone.item(), abs=1e-5, rel=0)
    assert abs(across.item() - alone.item()) > 1e-2      # off: one document's state flows into the next


def tiny_run(root, out, *extra):
    return ["--data_dir", str(root / "docs"), "--cache_dir", str(root / "cache"), "--out_dir", str(out),
            "--model_size", "tiny", "--vram", "cpu", "--vocab_size", "300", "--seq_len", "32",
            "--micro_batch_size", "2", "--grad_accum_steps", "1", "--warmup_steps", "1", "--eval_interval", "2",
            "--eval_batches", "1", "--checkpoint_interval", "2", "--log_interval", "1", "--no-progress",
            "--val_fraction", "0.1", *extra]


def test_train_py_runs_with_the_flag_and_refuses_it_for_other_tasks(tmp_path, capsys):
    write_word_corpus(tmp_path, n_docs=40, words_per_doc=12)          # short documents: windows cross boundaries
    trainer = setup(_as_overrides(tiny_run(tmp_path, tmp_path / "probe", "--reset_at_doc_boundaries")))
    eot = trainer.tokenizer.eot_id
    assert trainer.objective.reset_at == eot
    assert bool((trainer.objective.next_batch()[0] == eot).any())
    assert main(tiny_run(tmp_path, tmp_path / "run", "--reset_at_doc_boundaries", "--max_steps", "2")) == 0
    assert (tmp_path / "run" / "step_000002").is_dir()

    capsys.readouterr()
    assert main(["--task", "sft", "--data", str(tmp_path / "chat.jsonl"), "--init_from", str(tmp_path),
                 "--reset_at_doc_boundaries", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: reset_at_doc_boundaries is a setting of --task lm") and "Traceback" not in err
    assert err.count("\n") == 1, err


def test_the_flag_is_off_by_default_and_for_lm_only():
    assert TrainConfig().reset_at_doc_boundaries is False
    TrainConfig(reset_at_doc_boundaries=True).validate()
    with pytest.raises(ConfigError, match="reset_at_doc_boundaries is a setting of --task lm"):
        TrainConfig(task="dpo", init_from="base", data="pairs.jsonl", reset_at_doc_boundaries=True).validate()


def _as_overrides(argv):
    """train.py flags as setup()'s overrides."""
    from training.config import parse_args
    overrides, _ = parse_args(argv)
    return overrides
