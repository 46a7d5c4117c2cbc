"""Peak anonymous memory of one conversion, against the file's model-weight bytes (issue 12's memory target).

    .venv/bin/python benchmarks/bench_memory.py --dir /tmp/bench --out benchmarks/results/memory.json

Uses the full-size small checkpoint that `bench_file.py make` writes (with Muon and Adam state).
In a fresh process, a thread samples `RssAnon` from /proc/self/status every 10 ms while
`convert_file` runs (check 2 x --length tokens on the CPU, 2048 by default as in the pipeline); the page cache behind the memory-mapped
source is file-backed and not counted, as the target asks. Reported: the peak, the process's
anonymous memory just before the conversion (interpreter and torch), and both as ratios of the
weight bytes. The naive path (the lab's helper: torch.load of everything) is measured the same way.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from results_file import save_result

CHILD = r"""
import json, sys, threading, time
def anon_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))
import torch
from ckpt_migrate.check import CheckSettings
from ckpt_migrate.one_file import convert_file
peak, stop = [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.01)
before = anon_kib()
cuda_runtime = 0
if torch.cuda.is_available():  # the CUDA runtime's own host memory (context, kernels), paid once per process
    x = torch.ones(256, 256, device="cuda")
    (x @ x).sum().item()
    cuda_runtime = anon_kib() - before
t = threading.Thread(target=sample, daemon=True); t.start()
if sys.argv[1] == "ours":
    result = convert_file(sys.argv[2], sys.argv[3], CheckSettings(length=int(sys.argv[4])))
    assert result["status"] == "converted", result
else:
    obj = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
    sd = {k.removeprefix("_orig_mod."): v.float().clone() for k, v in obj["model"].items()}
    torch.save(sd, sys.argv[3])
stop.set(); t.join()
print(json.dumps({"anon_before_kib": before, "cuda_runtime_kib": cuda_runtime, "peak_anon_kib": max(peak[0], anon_kib()),
                  "device": "cuda" if torch.cuda.is_available() else "cpu"}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--length", type=int, default=2048, help="check tokens per sequence (the pipeline's default)")
    args = ap.parse_args()
    src = sorted(glob.glob(os.path.join(args.dir, "eng_spa_owt_run_*", "*.pt")))[0]
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    from ckpt_migrate.detect import detect

    weights = detect(src)["weight_bytes"]
    result = {"file": src, "file_bytes": os.path.getsize(src), "weight_bytes": weights,
              "check": f"2 x {args.length} tokens, fp32 (device: each side's 'device')"}
    for name in ("ours", "naive"):
        dst = os.path.join(args.dir, f"memory_{name}.pt")
        out = subprocess.run([sys.executable, "-c", CHILD, name, src, dst, str(args.length)], capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        peak = measured["peak_anon_kib"] * 1024
        runtime = (measured["anon_before_kib"] + measured["cuda_runtime_kib"]) * 1024
        result[name] = {**measured, "peak_anon_over_weights": round(peak / weights, 3),
                        "peak_minus_runtime_over_weights": round((peak - runtime) / weights, 3),
                        "peak_minus_start_over_weights": round((peak - measured["anon_before_kib"] * 1024) / weights, 3)}
        os.unlink(dst)
    save_result(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
