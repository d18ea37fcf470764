#!/usr/bin/env bash
# One command sets up this machine: PyTorch (a CUDA build where an NVIDIA GPU is present, otherwise a CPU
# build), Triton, and the project's requirements. Safe to re-run; it keeps a working torch that is already installed.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"

if "$PY" -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('.')[:2])) >= (2, 1) else 1)" 2>/dev/null; then
    echo "setup: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing a CUDA build of torch"
    "$PY" -m pip install "torch>=2.1"
else
    # No GPU: 2.13.0 is the version we test on the CPU (some machines carry its CPU wheel locally).
    echo "setup: no NVIDIA GPU found, installing torch 2.13.0 for the CPU"
    "$PY" -m pip install "torch==2.13.0"
fi

# A CUDA build of torch brings the Triton it was built with; a CPU build brings none. Without a GPU the tests run
# the Triton kernels through Triton's interpreter (TRITON_INTERPRET=1), at the GPU machine's version (.ci/run also runs
# the interpreter suites on 3.7.1 and 3.9.0).
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && ! "$PY" -c "import triton" 2>/dev/null; then
    echo "setup: installing Triton 3.6.0"
    "$PY" -m pip install "triton==3.6.0"
fi

"$PY" -m pip install -r requirements.txt
"$PY" - <<'PYCHECK'
import importlib.util
import torch
triton = "yes" if importlib.util.find_spec("triton") else "no"
print(f"setup: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, Triton: {triton}")
PYCHECK
