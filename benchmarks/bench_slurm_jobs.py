"""How many SLURM jobs 100 small-checkpoint conversions cost, one job per batch of conversions_per_job.

    .venv/bin/python benchmarks/bench_slurm_jobs.py --work /tmp/bench_slurm --out benchmarks/results/slurm_jobs.json

Needs root and Debian's SLURM packages (scripts/setup_slurm.sh): it starts the tests' one-node
cluster (tests/slurm_cluster.py, one GPU), runs the pipeline with profiles/slurm (plus the test
overrides: no account, squeue status, fast polling) on N tiny small checkpoints, and counts the
sbatch submissions and the conversions per SLURM job (from the check records).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "src"))
sys.path.insert(0, REPO)

import yaml  # noqa: E402

from ckpt_migrate import synthetic  # noqa: E402
from tests.slurm_cluster import start, stop  # noqa: E402
from results_file import save_result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--files", type=int, default=100)
    args = ap.parse_args()
    root, out = os.path.join(args.work, "clean_bbpe_50k"), os.path.join(args.work, "results")
    seed = synthetic.save(synthetic.upstream_checkpoint(synthetic.small_state_dict("v2", vocab=1000), "small",
                                                        optimizers=False), os.path.join(args.work, "seed.pt"))
    for i in range(args.files):
        folder = os.path.join(root, f"eng_spa_owt_run_{i}")
        os.makedirs(folder, exist_ok=True)
        os.link(seed, os.path.join(folder, "best_state_100.pt"))
    cluster = os.path.join(args.work, "slurm")
    os.makedirs(cluster, exist_ok=True)
    env = {**os.environ, **start(cluster)}
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "snakemake"), "--profile", "profiles/slurm",
                               "--workflow-profile", "tests/slurm_profile", "--config", f"input_root={root}",
                               f"output_root={out}", "check={length: 128}"], cwd=REPO, env=env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - t0
    finally:
        stop(cluster)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return 1
    per_job = collections.Counter()
    for folder, _, files in os.walk(os.path.join(out, "checks")):
        for name in files:
            with open(os.path.join(folder, name)) as f:
                per_job[yaml.safe_load(f)["converted_on"]["slurm_job_id"]] += 1
    result = {"conversions": sum(per_job.values()), "sbatch_submissions": (proc.stdout + proc.stderr).count(
        "has been submitted with SLURM jobid"), "slurm_jobs_seen_in_records": len(per_job),
        "conversions_in_each_job": sorted(per_job.values(), reverse=True), "wall_s": round(wall, 1),
        "conversions_per_job": 8, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result))
    save_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
