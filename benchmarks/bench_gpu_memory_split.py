"""Where a GPU conversion's host memory goes (issue 12's memory target on the GPU host): peak
anonymous memory of one process at each step — interpreter, torch imported, CUDA initialized,
then each piece the check uses for the first time (a cuBLAS matmul, sdpa with a dense mask, the
reference's written-out attention; with --flex also a flex block mask and eager flex attention,
which the reference used before), a warm-up conversion of a tiny model (the same code path),
then one full-size conversion with its write — against the full-size file's weight bytes. At
the end, the mappings that hold the most anonymous memory (/proc/self/smaps).

    PYTHONPATH=src python3 benchmarks/bench_gpu_memory_split.py --dir /tmp/bench --work /tmp/gms [--flex]
"""
import argparse, os, sys, threading, time

from results_file import print_and_save


def anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def largest_anonymous_mappings(top: int = 12) -> dict:
    """MiB of anonymous memory per mapping name (a library's copied-on-write pages, [heap], ...)."""
    sizes, name = {}, "?"
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                name = fields[5] if len(fields) > 5 else "[anonymous]"
            elif fields[0] == "Anonymous:":
                sizes[name] = sizes.get(name, 0) + int(fields[1])
    return {k: round(v / 1024, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:top]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--flex", action="store_true", help="also run eager flex attention first")
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
    import torch.nn.functional as F
    from ckpt_migrate import models
    a_ = torch.randn(256, 256, device=a.device)
    (a_ @ a_).sum().item()
    step("cuBLAS matmul")
    ids = torch.randint(0, 1000, (1, 2048), device=a.device)
    q = torch.randn(1, 2, 2048, 64, device=a.device)
    F.scaled_dot_product_attention(q, q, q, attn_mask=models.dense_mask(ids, 999, 8)).sum().item()
    step("sdpa, dense mask")
    models.attend(q, q, q, models.math_mask(ids, 999, 8)).sum().item()
    step("attention written out")
    if a.flex:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.upstream_flex import flex_block_mask  # upstream's attention lives with the tests

        block_mask = flex_block_mask(ids, 999, 8)
        step("flex block mask")
        models.attend(q, q, q, block_mask).sum().item()
        step("flex attention (eager)")
    from ckpt_migrate import synthetic
    from ckpt_migrate.check import CheckSettings
    from ckpt_migrate.one_file import convert_file
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
    out = {"modules_loaded": {m: m in sys.modules for m in ("torch._dynamo", "torch._inductor", "triton")},
           "largest_anonymous_mappings_mib": largest_anonymous_mappings(),"weight_bytes": weights, "device": a.device,
           "peak_anon_over_weights": {k: round(v * 1024 / weights, 3) for k, v in steps.items()},
           "full_conversion_rise_over_weights": round((steps["full-size conversion"] - base) * 1024 / weights, 3),
           "tiny_warmup_peak_over_weights": round(steps["tiny warm-up conversion"] * 1024 / weights, 3)}
    print_and_save(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
