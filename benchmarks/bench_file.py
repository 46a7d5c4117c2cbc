"""One full-size checkpoint: detection and conversion, ours against the naive path, in one run.

    .venv/bin/python benchmarks/bench_file.py make  --dir /tmp/bench           # ~2.6 GB small + medium
    .venv/bin/python benchmarks/bench_file.py detect --dir /tmp/bench --runs 5 --out benchmarks/results/detect.json
    .venv/bin/python benchmarks/bench_file.py convert --dir /tmp/bench --runs 3 --out benchmarks/results/convert.json

Every measured side is a fresh Python process (imports included), timed from the parent; the
child reports its own bytes read (``rchar`` of /proc/self/io: every byte read through a system
call, page-cached or not; ``read_bytes`` would count only what reached the disk) and its peak
RSS (``ru_maxrss``). Sides alternate, after one untimed warm-up each, so both see the page cache
in the same (warm) state; medians of ``--runs``.

naive detect:  torch.load(weights_only=True) of the whole file, then list the model's keys.
naive convert: the lab's helper loop: torch.load of everything (optimizer state included), build
               the small model, build GPTBatched, copy the weights across, torch.save.
ours:          ckpt_migrate.detect.detect / ckpt_migrate.one_file.convert_file (with its logit check).
floor:         dd reading the model-weight bytes of the source plus dd copying the output file to a
               new file with fsync: what the disk needs at least.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from results_file import print_and_save

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, SRC)

REPORT = """
import json, resource
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print("RESULT " + json.dumps({"rchar": int(io["rchar"]), "read_bytes": int(io["read_bytes"]),
      "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      "detect_call_rchar": globals().get("DETECT_RCHAR", 0)}))
"""

CHILDREN = {
    "python_baseline": "",  # the interpreter alone: what starting Python reads and holds
    "ours_detect": ("from ckpt_migrate.detect import detect\n"
                    "rchar = lambda: int(open('/proc/self/io').read().split('rchar: ')[1].split()[0])\n"
                    "before = rchar()\nr = detect(PATH)\nDETECT_RCHAR = rchar() - before\n"
                    "assert r['format'] == 'small'\n"),
    "naive_detect": ("import torch\nobj = torch.load(PATH, map_location='cpu', weights_only=True)\n"
                     "keys = [k.replace('_orig_mod.', '') for k in obj['model']]\nassert 'lm_head.weight' in keys\n"),
    "ours_convert": ("from ckpt_migrate.check import CheckSettings\nfrom ckpt_migrate.one_file import convert_file\n"
                     "r = convert_file(PATH, OUT, CheckSettings(batch=BATCH, length=LENGTH, device='cpu'))\n"
                     "assert r['status'] == 'converted', r\n"),
    "naive_convert": (
        "import torch\n"
        "from ckpt_migrate.key_mapping import convert_state_dict\n"
        "from ckpt_migrate.detect import detect, strip_prefixes\nfrom ckpt_migrate.families import GPTConfig\n"
        "from ckpt_migrate.models import GPTBatched, GPTFlexAttention\n"
        "obj = torch.load(PATH, map_location='cpu', weights_only=True)\n"
        "sd = {strip_prefixes(k): v for k, v in obj['model'].items()}\n"
        "record = detect(PATH)\n"
        "cfg = GPTConfig.from_record(record)\n"
        "small = GPTFlexAttention(cfg, record['variant'], scalars_len=sd['scalars'].numel())\n"
        "small.load_state_dict(sd)\n"
        "batched = GPTBatched(cfg)\n"
        "batched.load_state_dict(convert_state_dict(small.state_dict(), cfg))\n"
        "torch.save({'model': batched.state_dict(), 'config': cfg.to_dict()}, OUT)\n"),
}


def child(name: str, path: str, out: str = "", batch: int = 1, length: int = 256) -> dict:
    code = (f"PATH, OUT, BATCH, LENGTH = {path!r}, {out!r}, {batch}, {length}\n" + CHILDREN[name] + REPORT)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    result["wall_s"] = wall
    return result


def dd_floor(src: str, weight_bytes: int, out: str, scratch: str) -> dict:
    """Read the source's model-weight bytes, then write the output's bytes (a copy of the real
    output, not zeros, which a virtual disk may write faster) with fsync."""
    mib = 1 << 20
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={src}", "of=/dev/null", f"bs={mib}", f"count={-(-weight_bytes // mib)}"],
                   check=True, capture_output=True)
    t1 = time.perf_counter()
    subprocess.run(["dd", f"if={out}", f"of={scratch}", f"bs={16 * mib}", "conv=fsync"], check=True, capture_output=True)
    t2 = time.perf_counter()
    os.unlink(scratch)
    return {"read_s": t1 - t0, "write_s": t2 - t1, "wall_s": t2 - t0}


def compare(names: tuple[str, str], runs: int, **kw) -> dict:
    for name in names:  # warm-up: same cache state for both sides
        child(name, **kw)
    samples: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(runs):
        for name in names:
            samples[name].append(child(name, **kw))
    summary = {}
    for name, rows in samples.items():
        summary[name] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        summary[name]["runs"] = [round(r["wall_s"], 3) for r in rows]
    return summary


def machine() -> dict:
    import platform

    disk = subprocess.run(["df", "-h", HERE], capture_output=True, text=True).stdout.splitlines()[-1]
    return {"cores": os.cpu_count(), "python": platform.python_version(), "disk": disk,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=("make", "detect", "convert"))
    ap.add_argument("--dir", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--out")
    args = ap.parse_args()
    small = os.path.join(args.dir, "eng_spa_owt_run_1", "best_state_1770.pt")
    if args.action == "make":
        from ckpt_migrate import synthetic

        sd = synthetic.small_state_dict("v2", vocab=50000, num_layers=12, num_heads=6, model_dim=768, seed=1)
        synthetic.save(synthetic.upstream_checkpoint(sd, "small", step=1770, num_iterations=1770), small)
        del sd
        sd = synthetic.medium_state_dict(vocab=50000, num_layers=16, num_heads=8, model_dim=1024, seed=2)
        synthetic.save(synthetic.upstream_checkpoint(sd, "medium", step=5960, num_iterations=5960),
                       os.path.join(args.dir, "hin_urd_owt_run_1", "best_state_5960.pt"))
        print(subprocess.run(["du", "-ah", args.dir], capture_output=True, text=True).stdout)
        return 0
    from ckpt_migrate.detect import detect

    record = detect(small)
    result = {"machine": machine(), "file": small, "file_bytes": record["size_bytes"],
              "weight_bytes": record["weight_bytes"]}
    if args.action == "detect":
        result.update(compare(("ours_detect", "naive_detect"), args.runs, path=small))
        ours, naive = result["ours_detect"], result["naive_detect"]
        result["python_baseline"] = compare(("python_baseline",), args.runs, path=small)["python_baseline"]
    else:
        out = os.path.join(args.dir, "converted.pt")
        result.update(compare(("ours_convert", "naive_convert"), args.runs, path=small, out=out,
                              batch=args.batch, length=args.length))
        result["check"] = {"batch": args.batch, "length": args.length, "device": "cpu", "dtype": "float32"}
        floors = [dd_floor(small, record["weight_bytes"], out, out + ".dd") for _ in range(args.runs)]
        result["disk_floor"] = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
        ours, naive = result["ours_convert"], result["naive_convert"]
        result["ours_over_floor"] = ours["wall_s"] / result["disk_floor"]["wall_s"]
    result["ratios"] = {"wall naive/ours": naive["wall_s"] / ours["wall_s"],
                        "rchar naive/ours": naive["rchar"] / max(ours["rchar"], 1),
                        "maxrss naive/ours": naive["maxrss_kib"] / ours["maxrss_kib"]}
    print_and_save(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
