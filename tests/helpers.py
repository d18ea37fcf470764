"""Shared test helpers."""
import functools

import torch

# a few short texts with code, punctuation and multi-byte characters: the tokenizer tests of inference share
SAMPLE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "A Mamba model reads text one token at a time.",
                "def add(a, b):\n    return a + b\n", "Grüße aus Köln — naïve café, 東京 ✓."] * 4


# the words of the small training corpora that the trainer's end-to-end tests write
WORDS = ("state space models scan the sequence once and carry a fixed size state forward through time "
         "the selective scan makes the step size depend on the input so the model can choose what to keep ").split()


def write_word_corpus(root, n_docs: int = 6, words_per_doc: int = 1500):
    """root/docs/doc{i}.txt: n_docs documents of WORDS in varied orders. Returns root/docs."""
    data = root / "docs"
    data.mkdir()
    for i in range(n_docs):
        words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(words_per_doc)]
        (data / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    return data


@functools.cache
def sample_tokenizer():
    """A byte-level BPE of 300 ids trained on SAMPLE_TEXTS (trained once per test process)."""
    from utils.tokenizer import Tokenizer
    return Tokenizer.train(SAMPLE_TEXTS, 300)


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Random (not initial) values in every parameter of a Mamba model (ours or transformers'), so that no term of
    the math hides behind a 0 or a 1: A_log, D, the norms and the dt bias included. Returns the model in eval mode."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.randn_like(p) * 0.5)
        elif name.endswith(("norm.weight", "norm_f.weight", ".D")):
            p.copy_(1 + 0.3 * torch.randn_like(p))
        elif name.endswith("dt_proj.bias"):
            p.copy_(torch.randn_like(p) - 2)
        else:
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


def run_interpreter_suite(test_file: str) -> None:
    """Run the `interp_` tests of `test_file` in a fresh Python with TRITON_INTERPRET=1 and assert they all passed.

    Triton reads the variable when it is imported, so the interpreter cannot be switched on inside this process:
    each kernel test module has one launcher test that calls this, and its `interp_` tests (skipped in a plain run)
    run in the subprocess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp_",
                           "-m", "not gpu", str(Path(test_file).resolve().relative_to(root))],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-3000:]
