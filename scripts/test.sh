#!/usr/bin/env bash
# Set everything up (the Python environment, and SLURM for the cluster tests), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_slurm.sh
exec .venv/bin/python -m pytest "$@"
