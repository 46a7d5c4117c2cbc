#!/usr/bin/env bash
# Install what the SLURM tests need (Debian's slurmctld, slurmd, slurm-client and munge), as
# root, where it is missing. The tests themselves start and stop the one-node cluster.
# Without root or apt-get this does nothing, and the SLURM tests skip (except in CI, where they fail).
set -euo pipefail
have_all() { command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; }
if have_all; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup_slurm: not root or no apt-get; the SLURM tests will skip" >&2
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
have_all
