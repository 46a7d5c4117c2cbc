"""Convert + check + write one full-size small checkpoint on a GPU, with the time of each stage.

    python3 benchmarks/gpu_convert.py --work /tmp/gpu_bench --out gpu_convert.json

Writes a small v2 checkpoint (12 layers, D 768, vocab 50000, Muon and Adam state: ~2.6 GB),
then, each in a fresh process, for the check shapes 8 x 1024 and 2 x 2048 tokens (fp32, TF32 off):
import time, and convert_file's own stage timings (load = open with mmap and detect, convert,
check = both forwards on the GPU including moving the weights there, write = torch.save +
fsync + rename). The check's pure GPU time (both forwards, CUDA events) is measured apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from ckpt_migrate.check import CheckSettings
from ckpt_migrate.one_file import convert_file, load_source, reference_model, build_model
from ckpt_migrate.models import GPTBatched
from ckpt_migrate.key_mapping import convert_state_dict
from ckpt_migrate.families import GPTConfig
from ckpt_migrate.check import random_tokens, no_tf32
torch.cuda.init()
t_import = time.perf_counter() - t0
src, dst, batch, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = convert_file(src, dst, CheckSettings(batch=batch, length=length, device="cuda"))
assert r["status"] == "converted", r
# The check's GPU time alone: both forwards on weights already on the GPU.
record, _, small = load_source(src)
cfg = GPTConfig.from_record(record)
ref = reference_model(record, small).cuda().float()
cand = build_model(GPTBatched, cfg, convert_state_dict(small, cfg)).cuda().float()
ids = random_tokens(cfg.vocab_size, batch, length, 1).cuda()[:, :-1]
times = []
with torch.no_grad(), no_tf32():
    for _ in range(4):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); ref(ids); cand(ids); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
print("RESULT " + json.dumps({"import_s": t_import, "timings": r["timings"], "check_timings": r["check_timings"], "max_abs_logit_diff": r["max_abs_logit_diff"],
                              "check_device": r["check_device"], "gpu_forward_s": sorted(times[1:])[1],
                              "converted_bytes": r["converted_bytes"]}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, SRC)
    from ckpt_migrate import synthetic

    src = os.path.join(args.work, "eng_spa_owt_run_1", "best_state_1770.pt")
    t0 = time.perf_counter()
    sd = synthetic.small_state_dict("v2", vocab=50000, num_layers=12, num_heads=6, model_dim=768, seed=1)
    synthetic.save(synthetic.upstream_checkpoint(sd, "small", step=1770, num_iterations=1770), src)
    del sd
    print(f"wrote {os.path.getsize(src) / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    for batch, length in ((8, 1024), (2, 2048)):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, src, os.path.join(args.work, f"out_{batch}x{length}.pt"),
                               str(batch), str(length)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": SRC})
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            return 1
        row = json.loads(proc.stdout.split("RESULT ", 1)[1])
        row.update(batch=batch, length=length, process_wall_s=time.perf_counter() - t)
        rows.append(row)
        print(json.dumps(row), flush=True)
    dd = subprocess.run(["dd", f"if={src}", "of=/dev/null", "bs=16M"], capture_output=True, text=True).stderr
    import torch

    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "source_bytes": os.path.getsize(src),
                   "cpu_count": os.cpu_count(), "dd_read_whole_source": dd.strip().splitlines()[-1], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
