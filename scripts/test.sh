#!/usr/bin/env bash
# Set everything up (the Python environment, and SLURM for the cluster tests), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_slurm.sh
# The workflow as the Snakemake catalog checks it: formatted, and lint-clean on a small config.
.venv/bin/snakefmt --check Snakefile workflow/
rm -rf .test/clean_bbpe_50k .test/held_out .test/results
.venv/bin/ckpt-migrate demo-tree .test/clean_bbpe_50k >/dev/null
.venv/bin/snakemake --lint --configfile .test/config/config.yaml >.test/lint.log 2>&1 || { cat .test/lint.log; exit 1; }
exec .venv/bin/python -m pytest "$@"
