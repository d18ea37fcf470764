"""Generation: sampling filters, the recurrent decoder (against model.generate), left-padded batches, seeds,
text streaming and stop strings, and generate.py end to end (output and exit codes)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from inference import Decoder, TextStream, generate_text, pad_left
from models import HybridConfig, Mamba2Config, MambaConfig, LanguageModel, build_model
from models.sampling import SamplingParams, apply_repetition_penalty, sample, top_k_filter, top_p_filter
from training.checkpoint import write_atomic_dir
from tests.helpers import SAMPLE_TEXTS, randomize_parameters, sample_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = SAMPLE_TEXTS


@pytest.fixture(scope="module")
def tokenizer():
    return sample_tokenizer()


def make_model(vocab_size, seed=0, **overrides):
    torch.manual_seed(seed)
    config = MambaConfig(**{**dict(d_model=24, n_layer=2, vocab_size=vocab_size, d_state=4, d_conv=3), **overrides})
    model = LanguageModel(config)
    # random (not initial) weights, large enough that logits are far from ties: greedy tokens are then stable
    # across batch shapes, so equality tests test the code and not rounding luck
    return randomize_parameters(model, scale=0.3)


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer.vocab_size, bias=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, model, tokenizer):
    """A plain HF-format folder: save_pretrained weights + the tokenizer files."""
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    tokenizer.save(path)
    return path


# ---- sampling filters -----------------------------------------------------------------------------------------------

def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0], [0.0, 2.0, 2.0, 1.0, -1.0]])
    kept = top_k_filter(logits, 2) > float("-inf")
    assert kept.tolist() == [[False, True, False, False, True], [False, True, True, False, False]]
    assert torch.equal(top_k_filter(logits, 5), logits)
    kept_ties = top_k_filter(torch.tensor([[3.0, 3.0, 3.0, 1.0]]), 1) > float("-inf")   # ties with the k-th stay
    assert kept_ties.tolist() == [[True, True, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.9, 0.04, 0.03, 0.03]])
    logits = probs.log()
    # sorted 0.5, 0.25, 0.15, 0.1: reaching 0.7 needs 0.5 + 0.25; reaching 0.75 exactly also stops there
    assert (top_p_filter(logits, 0.7) > float("-inf")).tolist() == [[False, True, False, True],
                                                                     [True, False, False, False]]
    assert (top_p_filter(logits, 0.8)[0] > float("-inf")).tolist() == [False, True, True, True]
    assert (top_p_filter(logits, 1e-6) > float("-inf")).sum(-1).tolist() == [1, 1]   # the top token always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sample_greedy_filters_and_generator():
    torch.manual_seed(0)
    logits = torch.randn(64, 40)
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    ids = sample(logits, SamplingParams(temperature=1.0, top_k=3), generator=torch.Generator().manual_seed(1))
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == ids[:, None]).any(-1).all()
    again = sample(logits, SamplingParams(temperature=1.0, top_k=3), generator=torch.Generator().manual_seed(1))
    assert torch.equal(ids, again)
    # a low temperature concentrates the draw on the argmax, a high one spreads it
    low = sample(logits.repeat(20, 1), SamplingParams(temperature=1e-4), generator=torch.Generator().manual_seed(2))
    assert torch.equal(low, logits.argmax(-1).repeat(20))
    high = sample(logits.repeat(20, 1), SamplingParams(temperature=100.0), generator=torch.Generator().manual_seed(2))
    assert (high != logits.argmax(-1).repeat(20)).float().mean() > 0.5


def test_padded_vocab_rows_are_never_sampled():
    logits = torch.zeros(8, 16)
    logits[:, 10:] = 100.0                    # the padding rows beyond vocab_size 10 look most likely
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=2.0)):
        ids = sample(logits, params, vocab_size=10, generator=torch.Generator().manual_seed(0))
        assert (ids < 10).all()


def test_repetition_penalty_math():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 3.0, -1.0, 0.25]]))   # positive / 2, negative * 2
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    # greedy with a penalty picks the best unseen token once the seen one drops below it
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(torch.tensor([[3.0, 2.0, 0.1]]), params, seen=torch.tensor([[True, False, False]])).item() == 1
    with pytest.raises(ValueError, match="seen"):
        sample(logits, params)


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("temperature", float("nan")), ("top_k", 0),
                                          ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0)])
def test_sampling_params_reject_out_of_range(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


# ---- decoder --------------------------------------------------------------------------------------------------------

def test_decoder_matches_model_generate(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    decoder = Decoder(model, 3)
    assert not decoder.cuda_graph
    greedy = decoder.decode(ids, 12, SamplingParams(temperature=0))
    assert torch.equal(greedy, model.generate(ids, 12, temperature=0))
    params = dict(temperature=0.9, top_k=50, top_p=0.95)
    sampled = decoder.decode(ids, 12, SamplingParams(**params), generator=torch.Generator().manual_seed(5))
    assert torch.equal(sampled, model.generate(ids, 12, **params, generator=torch.Generator().manual_seed(5)))
    # eos: a finished row repeats eos, as in model.generate
    eos = int(greedy[0, 12])
    with_eos = decoder.decode(ids, 12, SamplingParams(temperature=0), eos_token_id=eos)
    assert torch.equal(with_eos, model.generate(ids, 12, temperature=0, eos_token_id=eos))
    assert (with_eos[0, 12:] == eos).all()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batch_of_different_length_prompts_equals_each_alone(model, penalty):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 290, (n,), generator=g).tolist() for n in (1, 7, 3, 12)]
    params = SamplingParams(temperature=0, repetition_penalty=penalty)
    ids, mask = pad_left(prompts, pad_id=5)
    assert mask.tolist()[0] == [0] * 11 + [1]
    batched = Decoder(model, 4).decode(ids, 10, params, attention_mask=mask)[:, -10:]
    alone = Decoder(model, 1)
    for row, p in enumerate(prompts):
        single = alone.decode(torch.tensor([p]), 10, params)[0, -10:]
        assert single.tolist() == batched[row].tolist(), f"prompt {row} (length {len(p)}) differs in the batch"


def test_pad_left_rejects_empty_prompts():
    with pytest.raises(ValueError, match="at least one token"):
        pad_left([[1, 2], []])


# ---- text -----------------------------------------------------------------------------------------------------------

def test_text_stream_pieces_join_to_the_decoded_text(tokenizer):
    text = "Grüße aus Köln — naïve café, 東京 ✓. The quick brown fox"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == text == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)                     # split characters are never shown half


def test_text_stream_stop_strings(tokenizer):
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, stop=["return", "zzz"])
    pieces = [stream.push(t) for t in ids]
    assert stream.stopped
    assert "".join(pieces) + stream.finish() == "def add(a, b):\n    "
    # a possible start of a stop string is held back, then released once it cannot be one
    stream = TextStream(tokenizer, stop=["fox!"])
    out = "".join(stream.push(t) for t in tokenizer.encode("The quick brown fox"))
    assert out == "The quick brown " and stream.finish() == "fox" and not stream.stopped


def test_generate_text_seed_stop_and_eot(model, tokenizer):
    decoder = Decoder(model, 2)
    prompts = [tokenizer.encode("The quick"), [tokenizer.eot_id]]
    params = SamplingParams(temperature=1.0)

    def run(seed, stop=()):
        return generate_text(decoder, tokenizer, prompts, 20, params, torch.Generator().manual_seed(seed), stop)

    (a, na), (b, _), (c, _) = run(0), run(0), run(1)
    assert a == b and a != c and na > 0                      # same seed, same text; another seed, another
    stop = a[0][3:6]                                         # a string from the middle of the first sample
    stopped, _ = run(0, stop=[stop])
    assert stopped[0] == a[0][:a[0].index(stop)]            # cut before the stop string
    assert stopped[1] == a[1][:len(stopped[1])] and (stop in a[1] or stopped[1] == a[1])   # the other row runs on
    # end of text ends a row: greedy text never contains it
    eot_first = make_model(tokenizer.vocab_size, seed=3)
    with torch.no_grad():
        eot_first.lm_head.weight[tokenizer.eot_id] *= 50     # tied: eot becomes the likeliest next token
    texts, produced = generate_text(Decoder(eot_first, 2), tokenizer, prompts, 20, SamplingParams(temperature=0))
    assert "<|endoftext|>" not in "".join(texts)
    assert produced < 40


# ---- generate.py ----------------------------------------------------------------------------------------------------

def expected_greedy(model, tokenizer, prompt, n):
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    out = model.generate(torch.tensor([ids]), n, temperature=0, eos_token_id=tokenizer.eot_id)[0, len(ids):]
    out = [t for t in out.tolist() if t != tokenizer.eot_id]
    return prompt + tokenizer.decode(out)


def test_cli_greedy_subprocess(hf_dir, model, tokenizer):
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(hf_dir), "--prompt", "The quick",
                             "--temperature", "0", "--max_new_tokens", "12", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_greedy(model, tokenizer, "The quick", 12) + "\n"
    assert "tokens/s" in result.stderr


def test_cli_no_checkpoint_subprocess(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(tmp_path), "--prompt", "x"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no checkpoint found" in result.stderr and "notes.txt" in result.stderr and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


def run_main(capsys, *argv):
    code = generate.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_newest_complete_step_empty_prompt_and_stream(tmp_path, capsys, model, tokenizer):
    run = tmp_path / "run1"
    newer = make_model(tokenizer.vocab_size, seed=7)
    for step, m in ((100, make_model(tokenizer.vocab_size, seed=6)), (200, newer)):
        write_atomic_dir(run / f"step_{step:06d}", lambda d, m=m: (m.save_pretrained(d), tokenizer.save(d)))
    (run / "step_000300").mkdir()                           # an interrupted save: no COMPLETE marker
    args = ["--checkpoint", str(tmp_path), "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu"]
    code, out, err = run_main(capsys, *args, "--prompt", "")
    assert code == 0 and "step_000200" in err and "step_000300" in err   # the skipped one is named
    assert out == expected_greedy(newer, tokenizer, "", 8) + "\n"
    code, streamed, _ = run_main(capsys, *args, "--prompt", "", "--stream")
    assert code == 0 and streamed == out


def test_cli_prompt_file_batch_and_samples(tmp_path, capsys, hf_dir, model, tokenizer):
    prompts = ["The quick", "A", "def add(a, b):"]
    (tmp_path / "p.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    code, out, _ = run_main(capsys, "--checkpoint", str(hf_dir), "--prompt_file", str(tmp_path / "p.txt"),
                            "--temperature", "0", "--max_new_tokens", "6", "--num_samples", "2", "--device", "cpu")
    assert code == 0
    expected = "".join(f"--- prompt {i + 1}, sample {s + 1} ---\n" + expected_greedy(model, tokenizer, p, 6) + "\n"
                       for i, p in enumerate(prompts) for s in range(2))
    assert out == expected


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top_k", "0"], "--top_k must be an integer >= 1"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--repetition_penalty", "0"], "--repetition_penalty must be a finite number > 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--num_samples", "0"], "--num_samples must be >= 1"),
    (["--prompt_file", "/nonexistent/prompts.txt"], "cannot read --prompt_file"),
    (["--stop", ""], "--stop strings must not be empty"),
    (["--device", "tpu"], "--device"),
])
def test_cli_bad_input_exits_2(capsys, hf_dir, argv, message):
    if "--prompt_file" not in argv:
        argv = ["--prompt", "x", *argv]
    code, out, err = run_main(capsys, "--checkpoint", str(hf_dir), *argv)
    assert code == 2 and message in err and out == ""


def test_cli_incomplete_step_and_missing_tokenizer_exit_2(tmp_path, capsys, model):
    step = tmp_path / "run" / "step_000100"
    step.mkdir(parents=True)
    code, _, err = run_main(capsys, "--checkpoint", str(step), "--prompt", "x", "--device", "cpu")
    assert code == 2 and "incomplete" in err
    model.save_pretrained(tmp_path / "no_tok")
    code, _, err = run_main(capsys, "--checkpoint", str(tmp_path / "no_tok"), "--prompt", "x", "--device", "cpu")
    assert code == 2 and "tokenizer" in err


# ---- the compiled step ----------------------------------------------------------------------------------------------

TINY_CONFIGS = {
    "mamba1": lambda: MambaConfig(d_model=24, n_layer=2, vocab_size=61, d_state=4, d_conv=3),
    "mamba2": lambda: Mamba2Config(d_model=24, n_layer=2, vocab_size=61, d_state=8, headdim=12, chunk_size=4),
    "hybrid": lambda: HybridConfig(d_model=32, n_layer=3, vocab_size=61, pattern="M2A", n_heads=4, n_kv_heads=2,
                                   mamba1=dict(d_state=8), mamba2=dict(d_state=16, headdim=16, chunk_size=8)),
}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_compiled_step_is_one_graph_and_matches_eager(family, monkeypatch):
    """generate.py --compile: torch.compile(fullgraph=True) traces the decoding step of a model that has not chosen
    its kernels yet, as the CUDA-graph capture does before any prefill (the Decoder chooses them before the trace:
    choosing logs, which Dynamo refuses inside a graph), and decodes the tokens the eager step decodes. Dynamo only
    (backend "eager"): the trace is what is checked here, Inductor is slow on the CPU; the GPU test below runs the
    default backend."""
    torch.manual_seed(0)
    model = randomize_parameters(build_model(TINY_CONFIGS[family]()), scale=0.3)
    compile_with_inductor = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_with_inductor(fn, **{**kw, "backend": "eager"}))
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0)
    decoder = Decoder(model, 2, compile=True, max_length=16)
    with torch.no_grad():
        decoder.step(ids[:, 0].contiguous())   # traced before any forward (prefill overwrites the state it leaves)
    assert torch.equal(decoder.decode(ids, 6, greedy), Decoder(model, 2, max_length=16).decode(ids, 6, greedy))


# ---- GPU: the CUDA-graph step ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decoder_matches_eager(compile):
    model = make_model(300, d_model=64, n_layer=3).cuda()
    ids = torch.randint(0, 300, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    eager = Decoder(model, 4, cuda_graph=False).decode(ids, 40, SamplingParams(temperature=0))
    graphed = Decoder(model, 4, cuda_graph=True, compile=compile)
    assert graphed.cuda_graph
    assert torch.equal(graphed.decode(ids, 40, SamplingParams(temperature=0)), eager)
    assert torch.equal(graphed.decode(ids, 40, SamplingParams(temperature=0)), eager)   # replays reuse the graph
    assert torch.equal(eager, model.generate(ids, 40, temperature=0))


def test_cli_interactive_loop(monkeypatch, capsys, hf_dir, model, tokenizer):
    answers = iter(["The quick", ""])

    def fake_input(prompt=""):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    code, out, _ = run_main(capsys, "--checkpoint", str(hf_dir), "--temperature", "0", "--max_new_tokens", "5",
                            "--device", "cpu", "--no-stream")
    assert code == 0
    expected = [expected_greedy(model, tokenizer, p, 5) + "\n" for p in ("The quick", "")]
    assert out == "".join(expected)
