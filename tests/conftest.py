import os
import sys
from pathlib import Path

import pytest

# before torch loads OpenMP: idle threads sleep instead of spinning (utils/cpu_threads.py; on a loaded 2-core machine
# spinning made a tiny training step ~10x slower)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# CPU threads: the cores shared out among pytest-xdist's workers (`-n 2` on CI's 2 cores: 1 each; a plain run: 2),
# at most 2. OMP_NUM_THREADS carries the same figure to the subprocesses tests start (train.py, torchrun, the
# interpreter suites), which would otherwise each take every core. xdist sets PYTEST_XDIST_WORKER_COUNT in its
# workers, and the subprocesses inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_loops     # the interpreter's scans and reductions a slice at a time (same bits, far faster)
    interpreter_loops.install()


def pytest_addoption(parser):
    parser.addoption("--triton-release-subset", action="store_true",
                     help="of each parametrized interp_ test, only its first case and the cases marked "
                          "triton_release (what .ci/run runs on the other Triton releases)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--triton-release-subset"):
        keep = [item for item in items if _in_triton_release_subset(item)]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
    # The interpreter-suite launchers (minutes each) first, so that pytest-xdist's workers start on them and the
    # short tests fill in around them, rather than one worker being left with a launcher at the end.
    items.sort(key=lambda item: item.originalname != "test_interpreter_suite")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _in_triton_release_subset(item) -> bool:
    """The subset .ci/run runs on the other Triton releases, one factor at a time: a test without parameters; the
    first case of a parametrized one (each parameter at its first value); and, from that case, each value marked
    triton_release (another dtype, layout or kernel branch that the first case does not reach) varied on its own."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return True
    varied = 0
    for mark in item.iter_markers("parametrize"):
        names, entries = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        entry = _entry_of_case(names, entries, callspec.params)
        if entry is None or entry is entries[0]:
            continue
        if not any(m.name == "triton_release" for m in getattr(entry, "marks", ())):   # only a pytest.param has marks
            return False
        varied += 1
    return varied <= 1


_ParameterSet = type(pytest.param())


def _entry_of_case(names, entries, params):
    """The entry of a parametrize list that gave this case its values (pytest keeps the very objects; its
    callspec.indices numbers the cases, not the entries)."""
    for entry in entries:
        values = entry.values if isinstance(entry, _ParameterSet) else (entry,) if len(names) == 1 else entry
        if all(name in params and params[name] is value for name, value in zip(names, values)):
            return entry
    return None
