"""The whole bad-input catalogue through one pipeline run: wall time and peak memory of the process tree.

    .venv/bin/python benchmarks/bench_catalogue.py --work /tmp/bench_catalogue --out benchmarks/results/catalogue.json

Builds the tree of `tests/test_reliability.py` (every catalogue case, the odd file names, the
symlinked run directory), runs `snakemake --cores 2` on it, and samples every 50 ms the
resident memory of the snakemake process and all its descendants (detection children, jobs,
conversions), summed: the peak of that sum is what the login node must have. Also reported:
the largest single process seen, and the exit status (non-zero: the catalogue holds failed
conversions) with the report's row count.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from tests.test_reliability import CATALOGUE, ODD_FOLDER, ODD_NAMES, _small_ckpt  # noqa: E402
from results_file import save_result


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(pid))
    return tree


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(summed RSS of root and all descendants, largest single RSS), in KiB."""
    tree, pending, total, largest = _children(), [root], 0, 0
    while pending:
        pid = pending.pop()
        rss = _rss_kib(pid)
        total, largest = total + rss, max(largest, rss)
        pending.extend(tree.get(pid, []))
    return total, largest


def build_tree(root: str) -> int:
    for i, (name, build, _, _) in enumerate(CATALOGUE):
        folder = os.path.join(root, f"case_owt_run_{i:02d}_{name}")
        os.makedirs(folder)
        build(os.path.join(folder, "best_state_100.pt"))
    os.makedirs(os.path.join(root, ODD_FOLDER))
    for name in ODD_NAMES:
        _small_ckpt()(os.fsdecode(os.fsencode(os.path.join(root, ODD_FOLDER)) + b"/" + name))
    os.symlink(os.path.join(root, f"case_owt_run_{len(CATALOGUE) - 1:02d}_{CATALOGUE[-1][0]}"),
               os.path.join(root, "case_owt_run_99_symlink"))
    return len(CATALOGUE) + len(ODD_NAMES) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    root, out = os.path.join(args.work, "clean_bbpe_50k"), os.path.join(args.work, "out")
    files = build_tree(root)
    cmd = [os.path.join(os.path.dirname(sys.executable), "snakemake"), "--cores", "2", "--config",
           f"input_root={root}", f"output_root={out}", "check={length: 512}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_total = peak_single = 0
    while proc.poll() is None:
        total, largest = tree_rss(proc.pid)
        peak_total, peak_single = max(peak_total, total), max(peak_single, largest)
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    with open(os.path.join(out, "report.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    result = {"files": files, "report_rows": len(rows), "exit_status": proc.returncode,
              "wall_s": round(elapsed, 1), "peak_tree_rss_mib": round(peak_total / 1024, 1),
              "peak_single_process_rss_mib": round(peak_single / 1024, 1),
              "statuses": {s: sum(1 for r in rows if r["status"] == s) for s in sorted({r["status"] for r in rows})}}
    save_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
