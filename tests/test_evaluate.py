"""Evaluation: per-token scores (full context carried across windows == one pass; sliding windows' bookkeeping),
perplexity and bits per byte (a hand-computable uniform model), loss by position, the harness adapter's three
request types against the model directly and against transformers on the same weights, and evaluate.py's bad
input (one line, exit code 2)."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
from evaluation.harness import HarnessAdapter
from evaluation.perplexity import (bucket_edges, cap_tokens, document_tokens, evaluate_corpus, long_documents,
                                   loss_by_position, plot_by_position)
from evaluation.scoring import Scorer, sliding_pieces
from models import HybridConfig, LanguageModel, Mamba2Config, MambaConfig
from tests.helpers import SAMPLE_TEXTS, randomize_parameters, sample_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = SAMPLE_TEXTS


@pytest.fixture(scope="module")
def tokenizer():
    return sample_tokenizer()


def mamba1(vocab=50, seed=0):
    torch.manual_seed(seed)
    return randomize_parameters(LanguageModel(MambaConfig(d_model=16, n_layer=2, vocab_size=vocab, d_state=4)))


def mamba2(vocab=50, seed=0):
    torch.manual_seed(seed)
    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=vocab, d_state=8, headdim=16, chunk_size=8)
    return randomize_parameters(LanguageModel(cfg))


def hybrid(vocab=50, seed=0, pattern="M2T"):
    torch.manual_seed(seed)
    cfg = HybridConfig(d_model=32, n_layer=len(pattern), vocab_size=vocab, pattern=pattern, n_heads=4)
    return randomize_parameters(LanguageModel(cfg))


def random_sequences(vocab=50, lengths=(41, 7, 23, 2, 30), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def direct_nll(model, ids):
    """-log p(t_j | t_<j), j >= 1, from one forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0, :-1, :model.config.vocab_size].float()
    return -torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].double().numpy()


# ---- scoring ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [mamba1, mamba2, hybrid], ids=["mamba1", "mamba2", "hybrid-M2T"])
def test_full_context_carries_the_state_across_windows(make):
    """Windows of 5 tokens (then one decoding step per token, on the carried recurrent state and KV cache) score
    every token exactly as one pass over the whole sequence does."""
    model = make()
    seqs = random_sequences(lengths=(19, 6, 12, 2))
    one_pass = Scorer(model, 64, batch_size=3).score(seqs)
    for s, scores in zip(seqs, one_pass):
        np.testing.assert_allclose(scores.nll, direct_nll(model, s), atol=2e-5)
    carried = Scorer(model, 5, batch_size=3).score(seqs)
    for a, b in zip(carried, one_pass):
        np.testing.assert_allclose(a.nll, b.nll, atol=2e-5)
        assert a.greedy.tolist() == b.greedy.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("make", [mamba1, mamba2, hybrid], ids=["mamba1", "mamba2", "hybrid-M2T"])
def test_full_context_on_the_gpu(make):
    """On CUDA (the steps replay a CUDA graph): carried windows == one pass == the CPU's scores (fp32)."""
    model = make()
    seqs = random_sequences(lengths=(300, 40, 129, 2))
    cpu = Scorer(model, 512, batch_size=3).score(seqs)
    model.cuda()
    for window, stride in ((512, None), (64, None), (512, 512)):
        for a, b in zip(Scorer(model, window, stride, batch_size=3).score(seqs), cpu):
            np.testing.assert_allclose(a.nll, b.nll, atol=1e-4)


def test_sliding_pieces_cover_every_token_once():
    for n in (2, 3, 9, 10, 11, 40):
        for window, stride in ((4, 4), (4, 1), (4, 3), (8, 5), (50, 7)):
            pieces = sliding_pieces(n, window, stride)
            covered = [j for _, p, q in pieces for j in range(p, q)]
            assert covered == list(range(1, n)), (n, window, stride)
            for a, p, q in pieces:
                assert 0 <= a and q - 1 - a <= window                       # reads at most `window` tokens
                assert p == 1 or p - a >= window - stride + 1               # each scored token's context


def test_sliding_windows_equal_full_context_where_they_should():
    seqs = random_sequences()
    # a model that sees only the current token (MLP layers, no mixer): any window and stride give full context
    local = hybrid(pattern="FF")
    full = Scorer(local, 64).score(seqs)
    for window, stride in ((4, 4), (4, 1), (6, 5), (1, 1)):
        for a, b in zip(Scorer(local, window, stride, batch_size=4).score(seqs), full):
            np.testing.assert_allclose(a.nll, b.nll, atol=1e-5)
            assert a.greedy.tolist() == b.greedy.tolist()
    # a recurrent model: the same only while a sequence fits one window, and different once it does not
    model = mamba1()
    full = Scorer(model, 64).score(seqs)
    for a, b in zip(Scorer(model, 64, 16).score(seqs), full):
        np.testing.assert_allclose(a.nll, b.nll, atol=1e-5)
    cut = Scorer(model, 8, 8).score(seqs)[0]
    np.testing.assert_allclose(cut.nll[:8], full[0].nll[:8], atol=1e-5)          # the first window is the same
    assert np.abs(cut.nll[8:] - full[0].nll[8:]).max() > 1e-3                    # later tokens lost their context


def test_bad_scorer_arguments():
    model = mamba1()
    with pytest.raises(ValueError, match="stride"):
        Scorer(model, 4, 5)
    with pytest.raises(ValueError, match="window"):
        Scorer(model, 0)
    with pytest.raises(ValueError, match="a context token"):
        Scorer(model, 4).score([[1]])


# ---- perplexity and bits per byte -------------------------------------------------------------------------------

def uniform_model(vocab):
    """Logits all equal: the head (tied to the embedding) is zero."""
    model = mamba1(vocab)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_uniform_model_perplexity_is_the_vocabulary_and_bits_per_byte_by_hand(tokenizer):
    vocab = tokenizer.vocab_size
    model = uniform_model(vocab)
    assert model.config.padded_vocab_size > vocab                       # the padding rows are not tokens
    texts = TEXTS[:4]
    for stride in (None, 3):
        score = evaluate_corpus(Scorer(model, 5, stride), tokenizer, texts)
        tokens = sum(len(tokenizer.encode(t)) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        assert (score.tokens, score.bytes, score.documents) == (tokens, n_bytes, 4)
        assert n_bytes > sum(map(len, texts))                            # multi-byte characters counted as bytes
        assert score.loss == pytest.approx(math.log(vocab), rel=1e-6)
        assert score.perplexity == pytest.approx(vocab, rel=1e-5)
        assert score.bits_per_byte == pytest.approx(tokens * math.log2(vocab) / n_bytes, rel=1e-6)
        assert score.bits_per_token == pytest.approx(math.log2(vocab), rel=1e-6)


def test_corpus_score_is_the_sum_of_document_scores(tokenizer):
    model = mamba1(tokenizer.vocab_size)
    texts = TEXTS[:3]
    score = evaluate_corpus(Scorer(model, 16), tokenizer, texts)
    nats = sum(direct_nll(model, d).sum() for d in document_tokens(tokenizer, texts))
    assert score.loss * score.tokens == pytest.approx(nats, rel=1e-5)
    assert score.bits_per_byte == pytest.approx(nats / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-5)


def test_cap_tokens_shares_the_budget_and_cuts_at_token_starts(tokenizer):
    """Short documents stay whole, the long ones get an equal share, cut texts are prefixes holding at most that
    share; a budget the corpus fits in changes nothing; more texts than tokens keeps the first ones."""
    texts = [TEXTS[0], TEXTS[3] * 6, TEXTS[2] * 9, TEXTS[1] * 4]
    lengths = [len(tokenizer.encode(t)) for t in texts]
    assert cap_tokens(tokenizer, texts, sum(lengths)) == texts
    budget = lengths[0] + 3 * 30
    assert min(lengths[1:]) > 30                                  # so the share is exactly 30
    cut = cap_tokens(tokenizer, texts, budget)
    assert cut[0] == texts[0]
    for text, part in zip(texts[1:], cut[1:]):
        assert text.startswith(part) and 27 <= len(tokenizer.encode(part)) <= 30
    assert sum(len(tokenizer.encode(t)) for t in cut) <= budget
    two = cap_tokens(tokenizer, texts, 2)
    assert len(two) == 2 and all(t.startswith(p) and len(tokenizer.encode(p)) == 1 for t, p in zip(texts, two))


def test_loss_by_position(tmp_path, tokenizer):
    model = mamba1(tokenizer.vocab_size)
    texts = [" ".join(TEXTS[i:i + 4]) for i in range(4)] + ["short"]
    docs = long_documents(tokenizer, texts, 20)
    assert len(docs) == 4 and all(len(d) == 21 for d in docs)                  # the short one is left out
    assert bucket_edges(20, 4) == [1, 6, 11, 16, 21] and bucket_edges(3, 8) == [1, 2, 3, 4]
    curve = loss_by_position(Scorer(model, 8), docs, 20, 4)
    nll = np.stack([direct_nll(model, d) for d in docs])
    np.testing.assert_allclose(curve.loss, [nll[:, i:i + 5].mean() for i in (0, 5, 10, 15)], rtol=1e-5)
    plot_by_position({"tiny": curve}, tmp_path / "pos.png", trained_length=8)
    assert (tmp_path / "pos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the harness adapter ------------------------------------------------------------------------------------------

def request(*args):
    """What the harness's Instance gives the model: .args."""
    return SimpleNamespace(args=args)


def test_adapter_loglikelihood_rolling_and_generate(tokenizer):
    model = mamba1(tokenizer.vocab_size, seed=3)
    adapter = HarnessAdapter(model, tokenizer, window=8, batch_size=2)
    context = "The quick brown"
    ids = tokenizer.encode(context)
    out = model.generate(torch.tensor([ids]), 4, temperature=0)[0, len(ids):].tolist()
    greedy_text = tokenizer.decode(out)
    pairs = [(context, " fox jumps"), ("", "A Mamba"), ("def add(a, b):  ", "return"), (context, greedy_text),
             ("x", "")]
    got = adapter.loglikelihood([request(c, x) for c, x in pairs])
    for (c, x), (logprob, is_greedy) in zip(pairs, got):
        if x == "":
            assert (logprob, is_greedy) == (0.0, True)
            continue
        ctx, cont = adapter.encode_pair(c, x)
        assert tokenizer.decode(ctx + cont) == (c + x if c else tokenizer.eot_token + x) and len(cont) >= 1
        expected = -direct_nll(model, ctx + cont)[-len(cont):].sum()
        assert logprob == pytest.approx(expected, abs=1e-4)
    assert got[3][1] is True and got[0][1] is False                            # the greedy continuation is greedy
    assert adapter.encode_pair("a b  ", "c")[1] == tokenizer.encode("a b  c")[len(tokenizer.encode("a b")):]

    rolling = adapter.loglikelihood_rolling([request(t) for t in TEXTS[:3]])
    for text, value in zip(TEXTS[:3], rolling):
        assert value == pytest.approx(-direct_nll(model, [tokenizer.eot_id] + tokenizer.encode(text)).sum(), abs=1e-4)

    prompts = ["The quick", "def add(a, b):", "The quick"]
    kwargs = [{"until": ["\n"], "max_gen_toks": 6}, {"until": "zz", "max_gen_toks": 6, "do_sample": False},
              {"until": ["\n"], "max_gen_toks": 6}]
    texts = adapter.generate_until([request(p, k) for p, k in zip(prompts, kwargs)])
    for p, k, text in zip(prompts, kwargs, texts):
        ids = tokenizer.encode(p)
        new = model.generate(torch.tensor([ids]), k["max_gen_toks"], temperature=0,
                             eos_token_id=tokenizer.eot_id)[0, len(ids):].tolist()
        full = tokenizer.decode([t for t in new if t != tokenizer.eot_id])
        stops = [k["until"]] if isinstance(k["until"], str) else k["until"]
        cut = min([full.find(s) for s in stops if s in full] or [len(full)])
        assert text == full[:cut]
    assert texts[0] == texts[2]


def test_adapter_equals_transformers_on_the_same_weights(tmp_path, tokenizer):
    """The harness's HF backend scores log_softmax(MambaForCausalLM(context + continuation)) over the continuation;
    on the same HF-format weights (fp32) ours agrees within 1e-4."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=24, num_hidden_layers=2, state_size=4, conv_kernel=3,
        eos_token_id=None, bos_token_id=None, pad_token_id=None))
    randomize_parameters(hf, scale=0.2)
    hf.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    from inference.loading import load_for_inference
    model, tok, _ = load_for_inference(tmp_path, torch.device("cpu"), torch.float32)
    adapter = HarnessAdapter(model, tok, window=4)                       # window 4: the steps are checked too
    pairs = [("The quick brown", " fox jumps over"), ("", "def add(a, b):"), ("Grüße aus", " Köln — naïve café")]
    got = adapter.loglikelihood([request(c, x) for c, x in pairs])
    for (c, x), (logprob, _) in zip(pairs, got):
        ctx, cont = adapter.encode_pair(c, x)
        with torch.no_grad():
            logits = hf(torch.tensor([ctx + cont])[:, :-1]).logits[0, -len(cont):].float()
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert logprob == pytest.approx(expected, abs=1e-4)


# ---- evaluate.py --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("ckpt")
    mamba1(tokenizer.vocab_size).save_pretrained(path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs")
    for i, text in enumerate(TEXTS[:4]):
        (path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return path


def run_main(capsys, *argv):
    code = evaluate.main(["--no_progress", "--device", "cpu", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_on_a_folder_and_on_one_file(capsys, checkpoint, corpus_dir, tokenizer):
    code, out, err = run_main(capsys, "--checkpoint", checkpoint, "--data_dir", corpus_dir, "--json")
    assert code == 0, err
    result = json.loads(out)["results"][0]
    texts = sorted((p.read_text(encoding="utf-8") for p in corpus_dir.iterdir()), key=TEXTS.index)
    expected = evaluate_corpus(Scorer(mamba1(tokenizer.vocab_size), 64), tokenizer, texts)
    assert result["corpus"]["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert result["corpus"]["tokens"] == expected.tokens and result["context"] == "full"
    code, out, err = run_main(capsys, "--checkpoint", checkpoint, "--data_dir", corpus_dir / "doc3.txt",
                              "--stride", "4", "--window", "8")
    assert code == 0, err
    assert "1 documents" in out and "bits per byte" in out and "stride 4" in out


def test_cli_by_position_writes_the_plot(capsys, tmp_path, checkpoint, corpus_dir):
    code, out, err = run_main(capsys, "--checkpoint", checkpoint, checkpoint, "--data_dir", corpus_dir,
                              "--by_position", "--length", "8", "--buckets", "4", "--plot", tmp_path / "p.png",
                              "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert len(results) == 2 and results[0]["by_position"]["edges"] == [1, 3, 5, 7, 9]
    assert (tmp_path / "p.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{missing}"], "does not exist"),
    (["--checkpoint", "{empty}"], "no checkpoint found"),
    (["--data_dir", "{empty}"], "no readable text"),
    (["--data_dir", "{missing}"], "does not exist"),
    (["--stride", "9", "--window", "4"], "larger than --window"),
    (["--tasks", "lambada_openai"], "pip install lm-eval"),
    (["--tasks", " , "], "--tasks is empty"),
    (["--by_position", "--length", "100000"], "no document of the corpus has that many tokens"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, monkeypatch, tmp_path, checkpoint, corpus_dir, argv, message):
    monkeypatch.setitem(sys.modules, "lm_eval", None)               # as if the harness were not installed
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    fill = {"{missing}": str(tmp_path / "nope"), "{empty}": str(tmp_path / "empty")}
    argv = [fill.get(a, a) for a in argv]
    base = [] if "--checkpoint" in argv else ["--checkpoint", checkpoint]
    base += [] if "--data_dir" in argv else ["--data_dir", corpus_dir]
    code, out, err = run_main(capsys, *base, *argv)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("evaluate.py: error: ") and message in last, err
    assert "Traceback" not in err and err.count("error") == 1, err


def test_cli_missing_checkpoint_subprocess(tmp_path):
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "nope")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "evaluate.py: error:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# ---- through the harness itself (only where lm-eval is installed; offline: a task written here) ---------------------

LOCAL_TASKS = {
    "tiny_choice": ("multiple_choice", [
        {"question": "The quick brown", "choices": [" fox", " dog", " cat"], "answer": 0},
        {"question": "def add(a, b):", "choices": ["\n    return a + b", " pass", " 42"], "answer": 0},
        {"question": "A Mamba model reads", "choices": [" text", " fish"], "answer": 0}]),
    "tiny_rolling": ("loglikelihood_rolling", [{"text": t} for t in TEXTS[:4]]),
}


def write_local_tasks(folder: Path) -> None:
    """A multiple-choice task and a rolling-loglikelihood one: YAMLs over JSONL files, no download."""
    for name, (kind, rows) in LOCAL_TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        fields = ('doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
                  "metric_list:\n  - metric: acc\n" if kind == "multiple_choice" else
                  'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n')
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {kind}\n{fields}", encoding="utf-8")


def test_harness_runs_a_local_task(tmp_path, monkeypatch, tokenizer):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from evaluation.harness import run_tasks
    write_local_tasks(tmp_path)
    model = mamba1(tokenizer.vocab_size, seed=5)
    adapter = HarnessAdapter(model, tokenizer, window=16)
    results = run_tasks(adapter, ["tiny_choice", "tiny_rolling"], include_path=str(tmp_path))["results"]
    right = 0
    for row in LOCAL_TASKS["tiny_choice"][1]:
        # the harness joins question and choice with its target_delimiter, " "
        scores = [ll for ll, _ in adapter.loglikelihood([request(row["question"], " " + c)
                                                         for c in row["choices"]])]
        right += int(np.argmax(scores) == row["answer"])
    assert results["tiny_choice"]["acc,none"] == pytest.approx(right / 3)
    ours = evaluate_corpus(Scorer(model, 16), tokenizer, TEXTS[:4])
    assert results["tiny_rolling"]["bits_per_byte,none"] == pytest.approx(ours.bits_per_byte, rel=1e-6)
    with pytest.raises(ValueError, match="no_such_task"):
        run_tasks(adapter, ["no_such_task"], include_path=str(tmp_path))


def test_harness_hf_backend_gives_the_same_loglikelihoods(tmp_path, tokenizer):
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=24, num_hidden_layers=2, state_size=4, conv_kernel=3,
        eos_token_id=tokenizer.eot_id, bos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id))
    randomize_parameters(hf, scale=0.2)
    hf.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    pairs = [("The quick brown", " fox jumps over"), ("Grüße aus", " Köln — naïve café"), ("def add(a, b):", "\n")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    theirs = HFLM(pretrained=str(tmp_path), device="cpu", dtype="float32", batch_size=2).loglikelihood(requests)
    from inference.loading import load_for_inference
    model, tok, _ = load_for_inference(tmp_path, torch.device("cpu"), torch.float32)
    ours = HarnessAdapter(model, tok, window=4).loglikelihood([request(*p) for p in pairs])
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
