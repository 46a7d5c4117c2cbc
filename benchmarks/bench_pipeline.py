"""Pipeline scale: 1,000 checkpoints through Snakemake (local executor), four measurements.

    .venv/bin/python benchmarks/bench_pipeline.py --work /tmp/bench_pipeline --out benchmarks/results/pipeline.json

The tree holds N files named like the lab's (`<lang>_owt_run_<n>/best_state_<step>.pt`), hard
links to a few tiny real checkpoints: mostly medium (detection only), some small (converted).
Measured, each as wall time of the whole `snakemake` process and the jobs it ran per rule:
1. the first run; 2. `snakemake -n` on the finished tree; 3. a rerun with nothing new;
4. a rerun after one new run directory lands (it must run only that directory's jobs).
And the naive paths they are held to, in the same run: one `ckpt-migrate inspect` process over
every file (target: first run <= 30x it), and a no-op rerun of a trivial one-rule workflow
(target: our no-op rerun <= 3x it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "src"))

from ckpt_migrate import synthetic  # noqa: E402
from results_file import save_result

LANGS = ("eng_spa", "hin_urd", "rus_pol", "tam_mal")


def jobs_by_rule(output: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for match in re.finditer(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):$", output, re.MULTILINE):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def run(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = proc.stdout + proc.stderr
    return {"wall_s": round(wall, 2), "jobs": jobs_by_rule(out), "nothing_to_do": "Nothing to be done" in out}


def inspect_all(root: str) -> dict:
    """One `ckpt-migrate inspect` process over every checkpoint of the tree."""
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
    cli = os.path.join(os.path.dirname(sys.executable), "ckpt-migrate")
    t0 = time.perf_counter()
    proc = subprocess.run([cli, "inspect", *paths], capture_output=True, text=True)
    return {"wall_s": round(time.perf_counter() - t0, 2), "files": len(paths), "exit": proc.returncode}


def trivial_noop(work: str) -> dict:
    """A no-op rerun of a one-rule workflow: what Snakemake itself costs to say "Nothing to be done"."""
    folder = os.path.join(work, "trivial")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "Snakefile"), "w") as f:
        f.write('rule all:\n    input: "done.txt"\n\nrule make:\n    output: "done.txt"\n    shell: "touch {output}"\n')
    cmd = [os.path.join(os.path.dirname(sys.executable), "snakemake"), "--cores", "1", "--directory", folder,
           "--snakefile", os.path.join(folder, "Snakefile")]
    subprocess.run(cmd, capture_output=True, check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {"wall_s": round(time.perf_counter() - t0, 2), "nothing_to_do": "Nothing to be done" in proc.stdout + proc.stderr}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--small-every", type=int, default=20, help="one small checkpoint per this many files")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    seeds = os.path.join(args.work, "seeds")
    small = synthetic.save(synthetic.upstream_checkpoint(synthetic.small_state_dict("v2", vocab=1000), "small",
                                                         optimizers=False), os.path.join(seeds, "small.pt"))
    medium = synthetic.save(synthetic.upstream_checkpoint(synthetic.medium_state_dict(vocab=1000), "medium",
                                                          optimizers=False), os.path.join(seeds, "medium.pt"))
    root = os.path.join(args.work, "clean_bbpe_50k")
    for i in range(args.files):
        folder = os.path.join(root, f"{LANGS[i % 4]}_owt_run_{i // 4}")
        os.makedirs(folder, exist_ok=True)
        os.link(small if i % args.small_every == 0 else medium, os.path.join(folder, f"best_state_{100 + i}.pt"))
    out = os.path.join(args.work, "results")
    snakemake = [os.path.join(os.path.dirname(sys.executable), "snakemake"), "--cores", "2",
                 "--config", f"input_root={root}", f"output_root={out}", "check={length: 128}"]
    results = {"files": args.files, "small": len(range(0, args.files, args.small_every)),
               "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    results["first_run"] = run(snakemake)
    print("first run", results["first_run"], flush=True)
    results["dry_run_finished"] = run(snakemake + ["-n"])
    print("dry run", results["dry_run_finished"], flush=True)
    results["noop_rerun"] = run(snakemake)
    print("no-op rerun", results["noop_rerun"], flush=True)
    folder = os.path.join(root, "eng_spa_owt_run_9999")
    os.makedirs(folder)
    os.link(small, os.path.join(folder, "best_state_5000.pt"))
    results["one_new_run"] = run(snakemake)
    print("one new run", results["one_new_run"], flush=True)
    results["inspect_every_file_one_process"] = inspect_all(root)
    results["trivial_workflow_noop"] = trivial_noop(args.work)
    results["first_run_over_inspect"] = round(results["first_run"]["wall_s"]
                                              / results["inspect_every_file_one_process"]["wall_s"], 1)
    results["noop_over_trivial_noop"] = round(results["noop_rerun"]["wall_s"]
                                              / results["trivial_workflow_noop"]["wall_s"], 2)
    print({k: results[k] for k in ("inspect_every_file_one_process", "trivial_workflow_noop", "first_run_over_inspect",
                                   "noop_over_trivial_noop")}, flush=True)
    save_result(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
