"""Logit check: does the converted model give the original model's logits?

The reference (original weights, original layout, attention written out as eager flex computes
it) and the candidate (GPTBatched on converted weights, the sdpa kernel) run on the same seeded
random token batches. We report max/mean absolute logit difference, top-1 agreement,
KL(reference || candidate) and both next-token losses; the check passes when every logit is
finite and the max difference is within tolerance.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn.functional as F

from .check_settings import DEFAULT_TOLERANCE, CheckDeviceError, CheckSettings  # noqa: F401 (re-exported)
from .heap import return_freed_memory

log = logging.getLogger(__name__)


@contextlib.contextmanager
def no_tf32():
    """Full fp32 matmuls on CUDA for the duration (TF32 would add ~1e-3 relative error)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def random_tokens(vocab_size: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """(batch, length + 1) seeded token ids; the extra column gives next-token targets."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length + 1), generator=gen)


# Rows of logits compared at a time: about 16 MB of fp32 logits per model for a 50k vocabulary,
# so the check's memory does not grow with batch x length (a 2 x 2048 check would otherwise hold
# several [B, T, V] tensors of 0.8 GB each).
CHUNK_ELEMENTS = 1 << 22


class _LogitStats:
    """Max/mean |diff|, top-1 agreement, KL(ref || cand) and both losses, accumulated over row chunks."""

    def __init__(self):
        self.rows = 0
        self.values = 0
        self.max_diff = 0.0
        self.sum_diff = self.top1 = self.kl = self.loss_ref = self.loss_cand = 0.0
        self.finite = True

    def add(self, ref: torch.Tensor, cand: torch.Tensor, targets: torch.Tensor) -> None:  # (rows, V), (rows,)
        self.finite = self.finite and bool(torch.isfinite(ref).all() and torch.isfinite(cand).all())
        diff = (ref - cand).abs()
        self.max_diff = max(self.max_diff, float(diff.max()))
        self.sum_diff += float(diff.sum(dtype=torch.float64))
        del diff
        ref_logp, cand_logp = F.log_softmax(ref, dim=-1), F.log_softmax(cand, dim=-1)
        self.kl += float(F.kl_div(cand_logp, ref_logp, log_target=True, reduction="sum"))
        self.loss_ref -= float(ref_logp.gather(1, targets[:, None]).sum(dtype=torch.float64))
        self.loss_cand -= float(cand_logp.gather(1, targets[:, None]).sum(dtype=torch.float64))
        self.top1 += float((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.rows += ref.shape[0]
        self.values += ref.numel()

    def result(self, tolerance: float) -> dict:
        result = {
            "max_abs_logit_diff": self.max_diff,
            "mean_abs_logit_diff": self.sum_diff / self.values,
            "top1_agreement": self.top1 / self.rows,
            "kl": max(0.0, self.kl / self.rows),  # rounding can make a ~0 KL slightly negative
            "loss_ref": self.loss_ref / self.rows,
            "loss_converted": self.loss_cand / self.rows,
            "all_finite": self.finite,
            "tolerance": tolerance,
        }
        result["check_passed"] = self.finite and result["max_abs_logit_diff"] <= tolerance
        return result


def logit_check(reference: torch.nn.Module, candidate: torch.nn.Module, vocab_size: int,
                settings: CheckSettings) -> dict:
    """Run both models on the same seeded batch and compare their logits."""
    device, dtype = settings.resolved_device(), settings.torch_dtype()
    tokens = random_tokens(vocab_size, settings.batch, settings.length, settings.seed).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    outputs = []
    transfer_s = forward_s = 0.0
    with torch.no_grad(), no_tf32():
        for model in (reference, candidate):
            t0 = time.perf_counter()
            model.to(device)  # with memory-mapped weights this is also where they are read from disk
            model.compute_dtype = dtype  # weights stay as stored, cast at use (see _GPT)
            _sync(device)
            t1 = time.perf_counter()
            # One sequence at a time (attention's activations scale with T^2 per sequence), and the
            # head below a few rows at a time: memory stays near the weights' whatever B and T.
            outputs.append(torch.cat([model.hidden(inputs[i:i + 1]) for i in range(len(inputs))]).flatten(0, 1))
            _sync(device)
            return_freed_memory()
            transfer_s += t1 - t0
            forward_s += time.perf_counter() - t1
        stats, flat_targets = _LogitStats(), targets.flatten()
        rows = max(1, CHUNK_ELEMENTS // reference.cfg.padded_vocab)
        t1 = time.perf_counter()
        for start in range(0, flat_targets.numel(), rows):
            chunk = slice(start, start + rows)
            stats.add(reference.logits(outputs[0][chunk]), candidate.logits(outputs[1][chunk]), flat_targets[chunk])
        _sync(device)
        forward_s += time.perf_counter() - t1
    result = stats.result(settings.resolved_tolerance())
    result["check_timings"] = {"weights_to_device_s": round(transfer_s, 4), "forwards_s": round(forward_s, 4)}
    result.update(check_device=torch.device(device).type if device != "cuda" else _gpu_name(),
                  check_dtype=settings.dtype, check_batch=settings.batch,
                  check_length=settings.length, check_seed=settings.seed)
    log.info("logit check: max %.3g mean %.3g top1 %.4f kl %.3g -> %s", result["max_abs_logit_diff"],
             result["mean_abs_logit_diff"], result["top1_agreement"], result["kl"],
             "passed" if result["check_passed"] else "FAILED")
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _gpu_name() -> str:
    return f"cuda ({torch.cuda.get_device_name()})"

