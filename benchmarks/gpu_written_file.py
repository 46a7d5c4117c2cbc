"""A file converted on a GPU is the file converted on the CPU, and loads where there is no GPU.

    PYTHONPATH=src python3 benchmarks/gpu_written_file.py --dir /tmp/bench --work /tmp/gwf --out result.json

On a GPU host the tensors a conversion builds (qkvo_w, scalars) live on the GPU and are written
from there, recorded as CPU storages (`converted_format.save`). This converts the full-size small file
that `bench_file.py make` wrote once with the check on cuda and once in a process that sees no
GPU, then, in a process that sees no GPU: loads the GPU-written file with a plain
`torch.load(weights_only=True)` (no map_location), compares every tensor with the CPU-written
file's, compares the two zip archives member by member (only `.data/serialization_id` may
differ), and runs `zipfile`'s CRC test over it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from results_file import print_and_save

CONVERT = r"""
import json, sys
from ckpt_migrate.check import CheckSettings
from ckpt_migrate.one_file import convert_file
r = convert_file(sys.argv[1], sys.argv[2], CheckSettings(length=256, device=sys.argv[3]))
print(json.dumps({k: r.get(k) for k in ("status", "reason", "check_device", "max_abs_logit_diff", "sha256")}))
"""

COMPARE = r"""
import json, sys, zipfile
import torch
gpu_file, cpu_file = sys.argv[1], sys.argv[2]
a = torch.load(gpu_file, weights_only=True)  # no map_location, no GPU in sight
b = torch.load(cpu_file, weights_only=True)
same = sorted(a["model"]) == sorted(b["model"]) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
with zipfile.ZipFile(gpu_file) as za, zipfile.ZipFile(cpu_file) as zb:
    differing = sorted(n.split("/", 1)[1] for n, m in zip(za.namelist(), zb.namelist()) if n != m or za.read(n) != zb.read(m))
    crc_error = za.testzip()
print(json.dumps({"cuda_available": torch.cuda.is_available(),
                  "devices_loaded": sorted({str(t.device) for t in a["model"].values()}),
                  "tensors": len(a["model"]), "all_tensors_equal": same,
                  "members": len(za.namelist()), "members_differing": differing, "zip_crc_error": crc_error}))
"""


def run(code: str, *args: str, no_gpu: bool = False) -> dict:
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if no_gpu else {})}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="where bench_file.py make wrote the full-size files")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    src = os.path.join(a.dir, "eng_spa_owt_run_1", "best_state_1770.pt")
    gpu_file, cpu_file = os.path.join(a.work, "on_gpu.pt"), os.path.join(a.work, "on_cpu.pt")
    result = {"converted_on_gpu": run(CONVERT, src, gpu_file, "cuda"),
              "converted_on_cpu": run(CONVERT, src, cpu_file, "cpu", no_gpu=True)}
    result["read_without_gpu"] = run(COMPARE, gpu_file, cpu_file, no_gpu=True)
    result["same_sha256"] = result["converted_on_gpu"]["sha256"] == result["converted_on_cpu"]["sha256"]
    print_and_save(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
