"""The cost of the validation loss on N held-out tokens per full-size checkpoint, against the
conversion it rides on, in one process (as a conversion job runs them).

    PYTHONPATH=src python3 benchmarks/bench_validation.py --work /tmp/bench_val --device cuda \
        --out benchmarks/results/validation_gpu_h200.json

Writes a full-size small checkpoint (12 layers, D 768, vocab 50304, Muon and Adam state) and a
full-size medium one (16 layers, D 1024), both with separator 50256 in their code, and one
``.bin`` shard of N + 1 tokens in documents. After a warm-up conversion of a tiny file (CUDA
start-up, paid once per job), times ``convert_file`` of the small file without and with the
validation (2 x 2048 check, fp32), and ``evaluate_file`` of the medium file: batched as the
pipeline runs it, and one sequence per forward (the naive path) for the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from results_file import print_and_save

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

EOT = 50256
VOCAB = 50304


def make_files(work: str, tokens: int, tiny: bool) -> dict:
    """The two checkpoints and the shard (``tiny``: 128-wide models, to try the script on a CPU)."""
    from ckpt_migrate import synthetic

    small_dims = dict(num_layers=12, num_heads=1, model_dim=128) if tiny else dict(num_layers=12, num_heads=6,
                                                                                   model_dim=768)
    medium_dims = dict(num_layers=16, num_heads=1, model_dim=128) if tiny else dict(num_layers=16, num_heads=8,
                                                                                    model_dim=1024)

    paths = {"small": os.path.join(work, "eng_spa_owt_run_1", "best_state_1770.pt"),
             "medium": os.path.join(work, "eng_spa_owt_run_2", "best_state_5960.pt"),
             "tiny": os.path.join(work, "tiny", "best_state_100.pt"),
             "shard": os.path.join(work, "held_out", "eng_spa_val_000000.bin")}
    if not os.path.exists(paths["small"]):
        sd = synthetic.small_state_dict("v2", vocab=VOCAB, seed=1, **small_dims)
        synthetic.save(synthetic.upstream_checkpoint(sd, "small", step=1770, num_iterations=1770, eot_token=EOT),
                       paths["small"])
    if not os.path.exists(paths["medium"]):
        sd = synthetic.medium_state_dict(vocab=VOCAB, seed=2, **medium_dims)
        synthetic.save(synthetic.upstream_checkpoint(sd, "medium", step=5960, num_iterations=5960, eot_token=EOT,
                                                     optimizers=False), paths["medium"])
    sd = synthetic.small_state_dict("v2", vocab=1000, seed=3)
    synthetic.save(synthetic.upstream_checkpoint(sd, "small", step=100), paths["tiny"])
    synthetic.write_token_shard(paths["shard"], synthetic.documents(VOCAB, tokens + 1, EOT))
    return paths


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, help="scratch folder (about 3.5 GB)")
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--sequence-length", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="128-wide models: try the script on a CPU")
    ap.add_argument("--out")
    a = ap.parse_args()
    t0 = time.perf_counter()
    paths = make_files(a.work, a.tokens, a.tiny)
    made_s = time.perf_counter() - t0

    import torch

    from ckpt_migrate.check import CheckSettings
    from ckpt_migrate.one_file import convert_file, evaluate_file
    from ckpt_migrate.validation import validation_plan

    settings = CheckSettings(device=a.device)
    plan = validation_plan({"data": os.path.join(a.work, "held_out", "{lang}_val_*.bin"), "tokens": a.tokens,
                            "sequence_length": a.sequence_length}, "eng_spa")
    t = time.perf_counter()
    assert convert_file(paths["tiny"], os.path.join(a.work, "out", "tiny.pt"), settings)["status"] == "converted"
    warm_up_s = time.perf_counter() - t

    def timed(call):
        start = time.perf_counter()
        result = call()
        return result, time.perf_counter() - start

    plain, plain_s = timed(lambda: convert_file(paths["small"], os.path.join(a.work, "out", "a.pt"), settings))
    with_val, with_val_s = timed(lambda: convert_file(paths["small"], os.path.join(a.work, "out", "b.pt"), settings,
                                                      validation=plan))
    medium, medium_s = timed(lambda: evaluate_file(paths["medium"], plan, settings.resolved_device()))
    from ckpt_migrate import validation

    batched = validation.GPU_TOKENS_PER_FORWARD
    validation.GPU_TOKENS_PER_FORWARD = a.sequence_length  # one sequence per forward, as on the CPU
    one_by_one, one_by_one_s = timed(lambda: evaluate_file(paths["medium"], plan, settings.resolved_device()))
    validation.GPU_TOKENS_PER_FORWARD = batched
    assert plain["status"] == with_val["status"] == "converted", (plain.get("reason"), with_val.get("reason"))
    result = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "tokens": a.tokens, "sequence_length": a.sequence_length,
        "files_made_s": round(made_s, 1), "warm_up_conversion_s": round(warm_up_s, 2),
        "small": {"conversion_without_validation_s": round(plain_s, 2),
                  "conversion_with_validation_s": round(with_val_s, 2),
                  "val_seconds": with_val["val_seconds"], "val_loss": with_val["val_loss"],
                  "val_tokens": with_val["val_tokens"],
                  "val_over_conversion": round(with_val["val_seconds"] / plain_s, 3),
                  "check_separators": with_val["check_separators"], "check_documents": with_val["check_documents"],
                  "check_real_tokens": with_val["check_real_tokens"],
                  "max_abs_logit_diff": with_val["max_abs_logit_diff"]},
        "medium_evaluation": {"wall_s": round(medium_s, 2), "val_seconds": medium["val_seconds"],
                              "val_loss": medium["val_loss"], "val_tokens": medium["val_tokens"],
                              "tokens_per_forward": batched},
        "medium_evaluation_one_sequence_per_forward": {"wall_s": round(one_by_one_s, 2),
                                                       "val_seconds": one_by_one["val_seconds"],
                                                       "val_loss": one_by_one["val_loss"]},
    }
    print_and_save(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
