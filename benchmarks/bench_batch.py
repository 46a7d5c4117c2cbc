"""Conversions in batches (issue 12): N full-size small files converted by one process, as a
``convert_batch`` job does, against the disk floor of each file, in one run.

    .venv/bin/python benchmarks/bench_file.py make --dir /tmp/bench        # once: the full-size files
    .venv/bin/python benchmarks/bench_batch.py --dir /tmp/bench --work /tmp/bench_batch \
        --sizes 1 8 32 --device cpu --out benchmarks/results/batch_cpu.json

For each N: a tree of N run folders whose checkpoint is a hard link to the full-size small file
(2.66 GB with Muon and Adam state, 0.79 GB of model weights; warm page cache, as the floor), the
plan (``detect_and_plan`` with ``conversions_per_job=N``), then ``pipeline.run_batch`` in a fresh
Python process, timed from the parent. Columns:

- start-up: process wall time less N times the median further file (Python, torch, CUDA, and
  whatever the first file pays once);
- further file: median wall time of files 2..N from the batch summary; its check time (the
  record's ``check_s``, the two forwards) alongside;
- floor: ``dd`` reading the file's model-weight bytes plus ``dd`` copying one converted file to a
  new file with ``conv=fsync``, in the same run; target: further file <= 1.5 x floor + check;
- peak anonymous memory (``RssAnon`` sampled every 10 ms; the memory-mapped source is
  file-backed and not counted) over the weight bytes, for the whole batch and per file
  (first and last: it must not grow with N).

``--write-runs R`` also times the converted file's write alone: ``PendingFile.write_with``
(``converted_format.save`` through the sha256 writer, then fsync) against a plain sequential write plus fsync of
the same bytes from memory on the same disk, alternating, R runs each (target: <= 1.3x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from results_file import save_result

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, SRC)
sys.path.insert(0, HERE)

BATCH_CHILD = r"""
import json, sys, threading, time
t0 = time.perf_counter()
def anon_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))
samples, stop = [], threading.Event()
def sample():
    while not stop.is_set():
        samples.append((time.time(), anon_kib()))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
from ckpt_migrate.pipeline import OutputLayout, run_batch
out, batch, device, length = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t_run = time.perf_counter()
summary = run_batch(OutputLayout(out), batch, {"length": length, "device": device}, {}, out + "/summary.yaml")
t_end = time.perf_counter()
stop.set()
# Per-file anonymous-memory peaks, from each file's start and seconds in the summary.
peaks = [max((kib for t, kib in samples if f["started"] <= t <= f["started"] + f["seconds"]), default=0)
         for f in summary["files"]]
# What each file adds over what the process held when it started (interpreter, torch, CUDA's kernels).
rises = [peak - next((kib for t, kib in samples if t >= f["started"]), peak) for peak, f in zip(peaks, summary["files"])]
print("RESULT " + json.dumps({"import_s": t_run - t0, "run_batch_s": t_end - t_run, "summary": summary,
                              "peak_anon_kib": max(kib for _, kib in samples), "file_peak_anon_kib": peaks, "file_rise_anon_kib": rises,
                              "anon_before_kib": samples[0][1]}))
"""

WRITE_CHILD = r"""
import json, os, statistics, sys, time
import torch
from ckpt_migrate.atomic import PendingFile
from ckpt_migrate.key_mapping import convert_state_dict
from ckpt_migrate.families import GPTConfig
from ckpt_migrate.converted_format import payload as converted_payload, save as converted_save
from ckpt_migrate.one_file import load_source
src, work, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
record, checkpoint, small = load_source(src, None)
cfg = GPTConfig.from_record(record)
payload = converted_payload(record, convert_state_dict(small, cfg), cfg, True)
ours_path, plain_path = os.path.join(work, "ours.pt"), os.path.join(work, "plain.bin")
def ours():
    pending = PendingFile(ours_path)
    t = time.perf_counter()
    pending.write_with(lambda f: converted_save(payload, f))
    took = time.perf_counter() - t
    pending.commit()
    return took
ours()
with open(ours_path, "rb") as f:
    data = f.read()
def plain():
    t = time.perf_counter()
    with open(plain_path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - t
    os.unlink(plain_path)
    return took
times = {"ours": [], "plain": []}
for _ in range(runs):
    times["ours"].append(ours())
    times["plain"].append(plain())
os.unlink(ours_path)
print("RESULT " + json.dumps({"bytes": len(data), **times}))
"""


def run_child(code: str, *argv: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1]), wall


def batch_run(src: str, n: int, work: str, device: str, length: int, weights: int) -> dict:
    from bench_file import dd_floor
    from ckpt_migrate.pipeline import OutputLayout, detect_and_plan, read_batches

    shutil.rmtree(work, ignore_errors=True)
    tree, out = os.path.join(work, "tree"), os.path.join(work, "out")
    sources, relative = {}, {}
    for i in range(n):
        rel = f"eng_spa_owt_run_{i}/best_state_1770.pt"
        os.makedirs(os.path.join(tree, os.path.dirname(rel)))
        os.link(src, os.path.join(tree, rel))
        sources[rel[:-3]], relative[rel[:-3]] = os.path.join(tree, rel), rel
    layout = OutputLayout(out)
    detect_and_plan(sources, relative, layout, conversions_per_job=n)
    (batch,) = read_batches(layout.plan)
    measured, wall = run_child(BATCH_CHILD, out, batch, device, str(length))
    files = measured["summary"]["files"]
    if any(f["status"] != "converted" for f in files):
        raise SystemExit(f"a conversion failed: {files}")
    from ckpt_migrate.pipeline import read_yaml

    records = [read_yaml(layout.staged(f["key"])) for f in files]
    further = [f["seconds"] for f in files[1:]] or [files[0]["seconds"]]
    per_file = statistics.median(further)
    check_s = statistics.median(r["timings"]["check_s"] for r in records[1:] or records)
    write_s = statistics.median(r["timings"]["write_s"] for r in records[1:] or records)
    converted = layout.converted(files[0]["key"])
    floors = [dd_floor(sources[files[0]["key"]], weights, converted, converted + ".dd") for _ in range(3)]
    floor = statistics.median(f["wall_s"] for f in floors)
    peaks = measured["file_peak_anon_kib"]
    row = {
        "n": n, "device": device, "process_wall_s": round(wall, 2), "import_s": round(measured["import_s"], 2),
        "first_file_s": round(files[0]["seconds"], 2), "further_file_s": round(per_file, 2),
        "startup_s": round(wall - n * per_file, 2), "run_batch_s": round(measured["run_batch_s"], 2),
        "files_sum_s": round(sum(f["seconds"] for f in files), 2), "check_s": round(check_s, 3), "write_s": round(write_s, 2),
        "floor_s": round(floor, 2), "floor_read_s": round(statistics.median(f["read_s"] for f in floors), 2),
        "floor_write_s": round(statistics.median(f["write_s"] for f in floors), 2),
        "further_over_floor": round(per_file / floor, 2),
        "limit_s": round(1.5 * floor + check_s, 2), "met": per_file <= 1.5 * floor + check_s,
        "peak_anon_over_weights": round(measured["peak_anon_kib"] * 1024 / weights, 3),
        "anon_before_over_weights": round(measured["anon_before_kib"] * 1024 / weights, 3),
        "first_file_peak_over_weights": round(peaks[0] * 1024 / weights, 3),
        "last_file_peak_over_weights": round(peaks[-1] * 1024 / weights, 3),
        "first_file_rise_over_weights": round(measured["file_rise_anon_kib"][0] * 1024 / weights, 3),
        "max_further_file_rise_over_weights": round(max(measured["file_rise_anon_kib"][1:] or [0]) * 1024 / weights, 3),
    }
    shutil.rmtree(work, ignore_errors=True)
    return row


def machine() -> dict:
    import platform

    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="where bench_file.py make wrote the full-size files")
    ap.add_argument("--work", required=True, help="scratch folder on the disk to measure (outputs: N x 0.79 GB)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--length", type=int, default=2048, help="check tokens per sequence (the pipeline's default)")
    ap.add_argument("--write-runs", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from ckpt_migrate.detect import detect

    src = os.path.join(args.dir, "eng_spa_owt_run_1", "best_state_1770.pt")
    weights = detect(src)["weight_bytes"]
    result = {"machine": machine(), "file_bytes": os.path.getsize(src), "weight_bytes": weights,
              "check": f"2 x {args.length} tokens, fp32, {args.device}", "batches": []}
    for n in args.sizes:
        row = batch_run(src, n, os.path.join(args.work, f"n{n}"), args.device, args.length, weights)
        print(json.dumps(row), flush=True)
        result["batches"].append(row)
    if args.write_runs:
        os.makedirs(args.work, exist_ok=True)
        times, _ = run_child(WRITE_CHILD, src, args.work, str(args.write_runs))
        ours, plain = statistics.median(times["ours"]), statistics.median(times["plain"])
        result["write"] = {**times, "ours_median_s": round(ours, 3), "plain_median_s": round(plain, 3),
                           "ratio": round(ours / plain, 3), "target": 1.3, "met": ours / plain <= 1.3}
        print(json.dumps(result["write"]), flush=True)
    save_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
