"""bench/gpu_check_report.py, the report of bench/gpu_check.sh, on made-up step outputs: figures by name, the issue's
verdicts, test failures from JUnit XML, bench_vs_gpt figures from its log where it wrote no JSON, and missing or
broken inputs named rather than fatal."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check_report  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="4"><testcase classname="tests.test_ssd_triton" name="test_gpu_matches_ref"><failure
message="RuntimeError: Expected all tensors to be on the same device&#10;more">trace</failure></testcase>
<testcase classname="tests.test_norm" name="test_gpu_strided"/><testcase classname="tests.test_norm" name="a"/>
<testcase classname="tests.test_norm" name="b"><skipped message="no"/></testcase></testsuite></testsuites>"""


def write(work: Path, name: str, data) -> None:
    (work / name).write_text(data if isinstance(data, str) else json.dumps(data))


def make_work(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    write(work, "steps.tsv", "train\tok\t61\tpython bench/bench_vs_gpt.py\nssd\ttimed out after 60 s\t60\tx\n")
    row = dict(gpt="eager", gpt_tokens_per_s=300000, ours_ms=100.0, gpt_peak_gib=16.0)
    write(work, "train.json", {"device": "NVIDIA H200", "torch": "2.11.0", "rows": [
        dict(row, shape="8 x 2048", ours="eager", ours_tokens_per_s=150000, ratio=0.5, ours_peak_gib=10.6),
        dict(row, shape="8 x 2048", ours="graph", ours_tokens_per_s=220000, ratio=0.733, ours_peak_gib=12.5)]})
    write(work, "scan.json", {"device": "NVIDIA H200", "rows": [
        dict(shape="8x2048x1536x16", mode="fwd+bwd", backend="triton", ms=2.0, floor_ms=0.5)]})
    write(work, "generate.json", {"device": "NVIDIA H200", "variants": {
        "eager/triton/b1": dict(ms_per_token=10.0, e2e_ms_per_token=10.9, tokens_per_s=100.0),
        "graph/triton/b1": dict(ms_per_token=0.93, e2e_ms_per_token=0.997, tokens_per_s=1075.0),
        "graph/torch/b64": {"error": "RuntimeError: boom"}}})
    write(work, "conv.json", {"rows": [
        dict(shape="8x2048x1536x4", layout="model", row="fwd", triton_ms=0.04, x_fwd=1.0, cudnn_ms=0.1),
        dict(shape="8x2048x1536x4", layout="model", row="bwd rows", triton_ms=0.42, x_fwd=10.5, cudnn_ms=0.3),
        dict(shape="8x2048x1536x4", layout="model", row="bwd tiles", triton_ms=0.46, x_fwd=11.5, cudnn_ms=None)]})
    write(work, "profile.json", dict(ms_per_step=139.3, gpu_ms=117.9, tokens_per_s=117600.0, peak_gib=11.0,
                                     top=[dict(name="_scan_bwd_kernel", calls=24, self_ms=61.2)]))
    write(work, "ssd.json", "{not json")
    write(work, "tests_0.xml", JUNIT)
    return work, out


def test_figures_verdicts_and_failures(tmp_path, capsys):
    work, out = make_work(tmp_path)
    assert gpu_check_report.main(["--work", str(work), "--out", str(out), "--wall_s", "400"]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    f = report["figures"]
    assert f["train.8x2048.graph.ratio"] == 0.733 and f["train.8x2048.eager.ours_peak_gib"] == 10.6
    assert f["scan.8x2048x1536x16.fwd+bwd.triton.ms"] == 2.0 and f["scan.8x2048x1536x16.fwd+bwd.triton.x_floor"] == 4
    assert f["decode.default.b1.e2e_ms_per_token"] == 0.997 and "decode.default.b64.ms_per_token" not in f
    assert f["decode.graph.torch.b64.error"] == "RuntimeError: boom"
    assert abs(f["conv.8x2048x1536x4.model.bwd_over_fwd"] - 10.5) < 1e-9
    assert abs(f["profile.gpu_idle_ms"] - 21.4) < 1e-9
    assert (f["tests.passed"], f["tests.failed"], f["tests.skipped"]) == (2, 1, 1)
    checks = report["checks"]
    assert checks["train ours/GPT 8x2048, graph step"]["verdict"] == "target met"
    assert checks["train ours/GPT 8x2048, eager"]["verdict"] == "required met"
    assert checks["train peak GiB 8x2048, graph step"]["verdict"] == "NOT met"
    assert checks["scan fwd+bwd ms (8, 2048, 1536, 16)"]["verdict"] == "required met"
    assert checks["scan fwd+bwd ms (4, 8192, 2048, 16)"]["verdict"] == "no figure"
    assert checks["decode e2e ms/token, batch 1, default step"]["verdict"] == "NOT met"
    assert checks["GPU tests failed or errors"]["verdict"] == "NOT met"
    assert report["failed_tests"] == ["tests.test_ssd_triton::test_gpu_matches_ref: RuntimeError: Expected all "
                                      "tensors to be on the same device"]
    assert any(p.startswith("ssd.json: unreadable") for p in report["problems"])
    assert report["steps"][1] == dict(name="ssd", status="timed out after 60 s", seconds=60.0, command="x")
    md = (out / "gpu_check.md").read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"     # the table is also printed, last
    assert "| train ours/GPT 8x2048, graph step | 0.733 | >= 0.47 | >= 0.7 | target met |" in md
    assert "| ssd | timed out after 60 s | 60 |" in md and "`_scan_bwd_kernel` | 24 | 61.20" in md


def test_train_figures_from_the_log_without_json(tmp_path):
    """bench_vs_gpt.py before its --json option: its printed lines are the figures."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (out / "bench.log").write_text("===== train\nNVIDIA H200\n  8 x 2048 compile=False: ours 96200 tok/s, GPT 306800 "
                                   "tok/s, ratio 0.31, peak ours 10.6 GiB, GPT 16.0 GiB\n")
    gpu_check_report.main(["--work", str(work), "--out", str(out)])
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["figures"]["train.8x2048.eager.ratio"] == 0.31
    assert report["figures"]["train.8x2048.eager.ours_tokens_per_s"] == 96200
    assert report["checks"]["GPU tests failed or errors"]["verdict"] == "no figure"
