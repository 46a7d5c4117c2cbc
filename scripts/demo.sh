#!/usr/bin/env bash
# Set everything up, write the built-in demo tree, and run the main job on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf demo_tree && .venv/bin/ckpt-migrate demo-tree demo_tree/clean_bbpe_50k >/dev/null
.venv/bin/ckpt-migrate inspect demo_tree/clean_bbpe_50k/*/best_state_*.pt || true
for f in demo_tree/clean_bbpe_50k/*/best_state_*.pt; do
    .venv/bin/ckpt-migrate convert "$f" "results/converted/${f#demo_tree/clean_bbpe_50k/}" || true
done
