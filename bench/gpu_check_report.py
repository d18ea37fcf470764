"""The report of bench/gpu_check.sh: every step's JSON and log merged into one JSON of figures by name, and one
Markdown table set, with issue 16's figures against their required and target values first.

    python bench/gpu_check_report.py --work WORK_DIR --out OUT_DIR

WORK_DIR is gpu_check.sh's scratch folder: steps.tsv (name, status, seconds, command per step), the benches' own
JSON files (train.json, scan.json, generate.json, generate_compile.json, profile.json, conv.json, ssd.json) and
the test shards' JUnit XML (tests_*.xml). OUT_DIR receives gpu_check.json and gpu_check.md (bench.log, the raw
output of every bench, is read for bench_vs_gpt figures where that script has no --json). A missing or broken
input leaves its figures out and is named in the report; this script itself never fails the check.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# issue 16: (label, figure name, required, target, "max" = at most / "min" = at least)
CHECKS = [
    ("train ours/GPT 8x2048, eager", "train.8x2048.eager.ratio", 0.47, 0.70, "min"),
    ("train ours/GPT 8x2048, graph step", "train.8x2048.graph.ratio", 0.47, 0.70, "min"),
    ("train ours/GPT 2x8192, eager", "train.2x8192.eager.ratio", 0.59, 0.88, "min"),
    ("train ours/GPT 2x8192, graph step", "train.2x8192.graph.ratio", 0.59, 0.88, "min"),
    ("train peak GiB 8x2048, eager", "train.8x2048.eager.ours_peak_gib", 12.0, 12.0, "max"),
    ("train peak GiB 8x2048, graph step", "train.8x2048.graph.ours_peak_gib", 12.0, 12.0, "max"),
    ("scan fwd+bwd ms (8, 2048, 1536, 16)", "scan.8x2048x1536x16.fwd+bwd.triton.ms", 2.3, 1.25, "max"),
    ("scan fwd+bwd ms (4, 8192, 2048, 16)", "scan.4x8192x2048x16.fwd+bwd.triton.ms", 6.2, 3.3, "max"),
    ("decode e2e ms/token, batch 1, default step", "decode.default.b1.e2e_ms_per_token", 0.80, 0.80, "max"),
    ("conv backward / forward, (8, 2048, 1536, 4) model layout", "conv.8x2048x1536x4.model.bwd_over_fwd", 2.0, 2.0,
     "max"),
    ("GPU tests failed or errors", "tests.failed", 0, 0, "max"),
]
DEFAULT_DECODE = ("graph/mixer", "graph/fused", "graph/triton")     # the default CUDA decoding step, newest first


def load_json(path: Path, problems: list[str]):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        problems.append(f"{path.name}: unreadable ({err})")
        return None


def squash(shape: str) -> str:
    return shape.replace(" ", "")


def train_figures(work: Path, bench_log: Path, figures: dict, problems: list[str]) -> None:
    """bench_vs_gpt.py rows: from its --json where it has one, else from its printed lines."""
    data = load_json(work / "train.json", problems)
    rows = data["rows"] if data else []
    if not rows and bench_log.exists():
        # the script before --json: "  8 x 2048 compile=False: ours 96200 tok/s, GPT 306800 tok/s, ratio 0.31, ..."
        line = re.compile(r"^\s+(\d+ x \d+) compile=(\w+): ours (\d+) tok/s, GPT (\d+) tok/s, ratio ([\d.]+), "
                          r"peak ours ([\d.]+) GiB, GPT ([\d.]+) GiB")
        for m in map(line.match, bench_log.read_text(errors="replace").splitlines()):
            if m:
                rows.append(dict(shape=m[1], ours="compile (default)" if m[2] == "True" else "eager",
                                 ours_tokens_per_s=int(m[3]), gpt_tokens_per_s=int(m[4]), ratio=float(m[5]),
                                 ours_peak_gib=float(m[6]), gpt_peak_gib=float(m[7])))
    for r in rows:
        kind = r["ours"].split(" ")[0] if r["ours"] != "compile (default)" else "compile_default"
        for key, value in r.items():
            if key not in ("shape", "ours", "gpt"):
                figures[f"train.{squash(r['shape'])}.{kind}.{key}"] = value


def scan_figures(data, figures: dict) -> None:
    for r in data["rows"]:
        base = f"scan.{r['shape']}.{r['mode']}.{r['backend']}"
        figures[f"{base}.ms"] = r["ms"]
        if "floor_ms" in r:
            figures[f"{base}.x_floor"] = r["ms"] / r["floor_ms"]


def decode_figures(data, figures: dict) -> None:
    for key, r in data.get("variants", {}).items():
        if "error" in r:
            figures[f"decode.{key.replace('/', '.')}.error"] = r["error"]
            continue
        for field in ("ms_per_token", "e2e_ms_per_token", "tokens_per_s"):
            figures[f"decode.{key.replace('/', '.')}.{field}"] = r[field]
    for batch in ("b1", "b64"):
        for name in DEFAULT_DECODE:
            r = data.get("variants", {}).get(f"{name}/{batch}")
            if r and "error" not in r:
                for field in ("ms_per_token", "e2e_ms_per_token", "tokens_per_s"):
                    figures[f"decode.default.{batch}.{field}"] = r[field]
                break


def profile_figures(data, figures: dict) -> None:
    for key in ("ms_per_step", "gpu_ms", "tokens_per_s", "peak_gib"):
        figures[f"profile.{key}"] = data[key]
    figures["profile.gpu_idle_ms"] = data["ms_per_step"] - data["gpu_ms"]


def conv_figures(data, figures: dict) -> None:
    """bench_conv.py --out: one row per (shape, layout, pass); "x_fwd" is the row's time over the forward's."""
    for r in data["rows"]:
        base = f"conv.{r['shape']}.{r['layout']}.{r['row'].replace(' ', '_')}"
        figures[f"{base}.triton_ms"] = r["triton_ms"]
        if r.get("cudnn_ms") is not None:
            figures[f"{base}.cudnn_ms"] = r["cudnn_ms"]
        if r["row"] == "bwd rows":
            figures[f"conv.{r['shape']}.{r['layout']}.bwd_over_fwd"] = r["x_fwd"]


def ssd_figures(data, figures: dict) -> None:
    for r in data["rows"]:
        base = f"ssd.{r['shape']}.{r['mode']}"
        figures[f"{base}.triton_ms"] = r["triton_ms"]
        figures[f"{base}.chunked_ms"] = r["chunked_ms"]


def test_results(work: Path, figures: dict, problems: list[str]) -> list[str]:
    """Counts over the shards' JUnit XML files; returns the ids of failed tests (with the first line of why)."""
    failed, totals, shards = [], dict(tests=0, failures=0, errors=0, skipped=0), 0
    for path in sorted(work.glob("tests_*.xml")):
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as err:
            problems.append(f"{path.name}: unreadable ({err})")
            continue
        shards += 1
        for suite in root.iter("testsuite"):
            for key in totals:
                totals[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                why = (bad.get("message") or "").strip().splitlines()
                failed.append(f"{case.get('classname')}::{case.get('name')}: {why[0][:160] if why else ''}")
    if shards:
        figures["tests.passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
        figures["tests.failed"] = totals["failures"] + totals["errors"]
        figures["tests.skipped"] = totals["skipped"]
    return failed


def read_steps(work: Path) -> list[dict]:
    steps = []
    path = work / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, seconds, command = (line.split("\t") + ["", "", "", ""])[:4]
            steps.append(dict(name=name, status=status, seconds=float(seconds or 0), command=command))
    return steps


def verdict(value, required, target, sense) -> str:
    if value is None:
        return "no figure"
    better = (lambda a, b: a <= b) if sense == "max" else (lambda a, b: a >= b)
    if better(value, target):
        return "target met"
    return "required met" if better(value, required) else "NOT met"


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}" if abs(value) < 10000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(report: dict, failed_tests: list[str]) -> str:
    f = report["figures"]
    out = [f"# gpu_check: {report.get('device', '?')}, torch {report.get('torch', '?')}", "",
           "## Issue 16's figures", "", "| figure | value | required | target | verdict |",
           "| --- | ---: | ---: | ---: | --- |"]
    for label, name, required, target, sense in CHECKS:
        value = f.get(name)
        bound = "<=" if sense == "max" else ">="
        out.append(f"| {label} | {fmt(value) if value is not None else '-'} | {bound} {required} | {bound} {target} "
                   f"| {verdict(value, required, target, sense)} |")
    out += ["", "## Steps", "", "| step | status | seconds |", "| --- | --- | ---: |"]
    out += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} |" for s in report["steps"]]
    if report["problems"]:
        out += ["", "Report problems: " + "; ".join(report["problems"])]
    sections = [("Training step (bench_vs_gpt.py)", "train."), ("Selective scan (bench_scan.py, bf16)", "scan."),
                ("Decoding (bench_generate.py)", "decode."), ("One training step profiled (profile_train.py)",
                                                               "profile."),
                ("Causal conv (bench_conv.py)", "conv."), ("SSD scan (bench_ssd.py --gpu)", "ssd."),
                ("GPU tests", "tests.")]
    for title, prefix in sections:
        names = [n for n in f if n.startswith(prefix)]
        if not names:
            continue
        out += ["", f"## {title}", "", "| figure | value |", "| --- | ---: |"]
        out += [f"| {n[len(prefix):]} | {fmt(f[n])} |" for n in names]
    top = report["raw"].get("profile", {}).get("top", []) if report["raw"].get("profile") else []
    if top:
        out += ["", "## Profiled step: top GPU operators (self time)", "", "| operator | calls | ms |",
                "| --- | ---: | ---: |"]
        out += [f"| `{t['name'][:70]}` | {t['calls']} | {t['self_ms']:.2f} |" for t in top[:15]]
    if failed_tests:
        out += ["", "## Failed GPU tests", ""] + [f"- {t}" for t in failed_tests]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="gpu_check.sh's scratch folder")
    p.add_argument("--out", required=True, help="where gpu_check.json and gpu_check.md go")
    p.add_argument("--wall_s", type=float, default=None, help="the whole check's wall time")
    args = p.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    problems: list[str] = []
    figures: dict = {}
    raw = {}
    readers = {"scan": scan_figures, "generate": decode_figures, "generate_compile": decode_figures,
               "profile": profile_figures, "conv": conv_figures, "ssd": ssd_figures}
    train_figures(work, out / "bench.log", figures, problems)
    raw["train"] = load_json(work / "train.json", problems)
    for name, read in readers.items():
        data = load_json(work / f"{name}.json", problems)
        raw[name] = data
        if data is None:
            continue
        try:
            read(data, figures)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
            problems.append(f"{name}.json: {type(err).__name__} {err}")
    failed_tests = test_results(work, figures, problems)
    device = next((d["device"] for d in raw.values() if isinstance(d, dict) and "device" in d), "?")
    torch_version = next((d["torch"] for d in raw.values() if isinstance(d, dict) and "torch" in d), "?")
    report = dict(device=device, torch=torch_version, wall_s=args.wall_s, steps=read_steps(work), figures=figures,
                  checks={label: dict(figure=name, value=figures.get(name), required=required, target=target,
                                      bound="at most" if sense == "max" else "at least",
                                      verdict=verdict(figures.get(name), required, target, sense))
                          for label, name, required, target, sense in CHECKS},
                  failed_tests=failed_tests, problems=problems, raw=raw)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    text = markdown(report, failed_tests)
    (out / "gpu_check.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
