"""Where a GPU conversion's host memory goes (issue 12's memory target on the GPU host): peak
anonymous memory of one process at each step — interpreter, torch imported, CUDA initialized, a
warm-up conversion of a tiny model (the same code path: flex and sdpa attention, cuBLAS), then
one full-size conversion with its write — against the full-size file's weight bytes.

    PYTHONPATH=src python3 benchmarks/bench_gpu_memory_split.py --dir /tmp/bench --work /tmp/gms
"""
import argparse, os, sys, threading, time

from results_file import print_and_save


def anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    a = ap.parse_args()
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(anon_kib())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    steps = {"interpreter": anon_kib()}

    def step(name):
        steps[name] = max(samples + [anon_kib()])  # the step's peak, sampled every 5 ms
        samples.clear()

    import torch
    step("torch imported")
    if a.device == "cuda":
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    step("CUDA initialized")
    from ckpt_migrate import synthetic
    from ckpt_migrate.check import CheckSettings
    from ckpt_migrate.conversion import convert_file
    from ckpt_migrate.detect import detect

    os.makedirs(a.work, exist_ok=True)
    tiny = synthetic.save(synthetic.upstream_checkpoint(synthetic.small_state_dict("v2", vocab=1000), "small", step=100),
                          os.path.join(a.work, "tiny", "best_state_100.pt"))
    settings = CheckSettings(length=2048, device=a.device)
    assert convert_file(tiny, os.path.join(a.work, "tiny_out.pt"), settings)["status"] == "converted"
    step("tiny warm-up conversion")
    src = os.path.join(a.dir, "eng_spa_owt_run_1", "best_state_1770.pt")
    weights = detect(src)["weight_bytes"]
    samples.clear()
    base = anon_kib()
    result = convert_file(src, os.path.join(a.work, "full_out.pt"), settings)
    assert result["status"] == "converted", result
    step("full-size conversion")
    stop.set()
    out = {"weight_bytes": weights, "device": a.device,
           "peak_anon_over_weights": {k: round(v * 1024 / weights, 3) for k, v in steps.items()},
           "full_conversion_rise_over_weights": round((steps["full-size conversion"] - base) * 1024 / weights, 3),
           "tiny_warmup_peak_over_weights": round(steps["tiny warm-up conversion"] * 1024 / weights, 3)}
    print_and_save(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
