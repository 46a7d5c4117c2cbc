"""Where the converted file's write spends its time (issue 12): the same payload written as raw
bytes, by torch.save to a buffered file object, by torch.save to a path (torch's own C++ writer),
through PendingFile.write_with with torch.save into the hashing writer (torch computing the
zip's CRCs: the write before zip_crc), and as the pipeline writes it now (converted_format.save: the
CRCs computed on a pool beside the write), each with fsync.

    PYTHONPATH=src python3 benchmarks/bench_write_paths.py --dir /tmp/bench --work /tmp/bw --runs 5
"""
import argparse, json, os, statistics, sys, time

import torch

from ckpt_migrate.atomic import PendingFile
from ckpt_migrate.key_mapping import convert_state_dict
from ckpt_migrate.converted_format import payload as converted_payload, save as converted_save
from ckpt_migrate.one_file import load_source
from ckpt_migrate.families import GPTConfig
from results_file import save_result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    src = os.path.join(a.dir, "eng_spa_owt_run_1", "best_state_1770.pt")
    record, checkpoint, small = load_source(src, None)
    cfg = GPTConfig.from_record(record)
    payload = converted_payload(record, {k: v.clone() for k, v in convert_state_dict(small, cfg).items()}, cfg, True)
    target = os.path.join(a.work, "out.pt")

    def raw():
        with open(target, "wb") as f:
            f.write(data); f.flush(); os.fsync(f.fileno())

    def save_fileobj():
        with open(target, "wb") as f:
            torch.save(payload, f); f.flush(); os.fsync(f.fileno())

    def save_path():
        torch.save(payload, target)
        fd = os.open(target, os.O_RDONLY); os.fsync(fd); os.close(fd)

    def ours_torch_crc():
        p = PendingFile(target); p.write_with(lambda f: torch.save(payload, f)); p.commit()

    def ours():
        p = PendingFile(target); p.write_with(lambda f: converted_save(payload, f)); p.commit()

    save_fileobj()
    data = open(target, "rb").read()
    paths = (("raw", raw), ("save_fileobj", save_fileobj), ("save_path", save_path),
             ("ours_torch_crc", ours_torch_crc), ("ours", ours))
    times = {name: [] for name, _ in paths}
    for _ in range(a.runs):
        for name, fn in paths:
            os.path.exists(target) and os.unlink(target)
            t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    out = {"bytes": len(data), "median_s": med, "over_raw": {k: round(v / med["raw"], 2) for k, v in med.items()},
           "runs": times}
    print(json.dumps({"bytes": len(data), "median_s": med, "over_raw": out["over_raw"]}))
    if a.out:
        save_result(a.out, out)


if __name__ == "__main__":
    sys.exit(main())
