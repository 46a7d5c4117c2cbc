#!/usr/bin/env bash
# Set up .venv with ckpt-migrate and its dependencies. Idempotent; safe to rerun.
# Torch first: a torch the machine already provides (a cluster's CUDA build, seen through
# --system-site-packages) is kept; otherwise the pinned CPU wheel 2.13.0 is installed, so
# that pip never resolves a plain "torch" to a multi-GB CUDA download.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv
fi
pip_install() {  # quiet unless it fails
    if ! .venv/bin/pip install --quiet --disable-pip-version-check "$@" >.venv/pip.log 2>&1; then
        cat .venv/pip.log >&2
        exit 1
    fi
}
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    pip_install "torch==2.13.0"
fi
pip_install -e ".[test]"
.venv/bin/python -c "import torch, snakemake, ckpt_migrate; print('ckpt-migrate', ckpt_migrate.__version__, '| torch', torch.__version__)"
