#!/usr/bin/env bash
# Run the pipeline on a schedule (cron on a login node, or scrontab), as new runs land:
#   */30 * * * *  /path/to/ckpt-migrate/scripts/run_periodic.sh >> /path/to/ckpt-migrate/periodic.log 2>&1
# With no arguments it runs `snakemake --profile profiles/slurm`; arguments replace those.
# Runs never overlap: one that finds the previous still going exits 0 at once (saying so),
# instead of failing on Snakemake's lock; the next scheduled run picks up what is new.
set -uo pipefail
cd "$(dirname "$0")/.."
lock=${CKPT_MIGRATE_LOCK:-.snakemake/ckpt-migrate-periodic.lock}
mkdir -p "$(dirname "$lock")"
exec 9>>"$lock"
if ! flock -n 9; then
    echo "$(date -Is) ckpt-migrate: a previous run still holds $lock; this one exits, the next one picks up what is new"
    exit 0
fi
echo "$(date -Is) ckpt-migrate: run starts"
if [ $# -eq 0 ]; then set -- --profile profiles/slurm; fi
.venv/bin/snakemake "$@"
status=$?
echo "$(date -Is) ckpt-migrate: run ends with status $status"
exit $status
