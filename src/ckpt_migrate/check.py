"""Logit check: does the converted model give the original model's logits?

The reference (original weights, original layout, attention written out as eager flex computes
it) and the candidate (GPTBatched on converted weights, the sdpa kernel) run on the same seeded
random token batches. Where the file's document separator is known, each sequence holds several
documents at seeded positions (some shorter than a window block, one longer than the longest
window where the sequence allows), so the proof covers document masking too; with the lab's
held-out tokens (:mod:`.validation`), their sequences are checked as well. We report max/mean
absolute logit difference, top-1 agreement, KL(reference || candidate) and both next-token
losses; the check passes when every logit is finite and the max difference is within tolerance.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn.functional as F

from .families import WINDOW_BLOCK
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


def document_tokens(vocab_size: int, batch: int, length: int, seed: int, eot_token: int | None,
                    longest_window: int) -> torch.Tensor:
    """:func:`random_tokens` holding documents: the separator ``eot_token`` only where placed, at
    the start of each document after the first. Documents come in turns of short (under one
    window block), medium (one to four blocks) and, in every other sequence, long (longer than
    ``longest_window`` tokens, where the sequence has room for one). Plain random tokens when the
    separator is unknown (None) or outside the vocabulary."""
    tokens = random_tokens(vocab_size, batch, length, seed)
    if known_separator(eot_token, vocab_size) is None or vocab_size < 2:
        return tokens
    tokens[tokens == eot_token] = (eot_token + 1) % vocab_size  # separators only where placed
    gen = torch.Generator().manual_seed(seed + 1)

    def between(low: int, high: int) -> int:
        return int(torch.randint(low, max(low, high) + 1, (1,), generator=gen))

    short = max(1, min(WINDOW_BLOCK - 1, length // 4))  # a short sequence still holds several documents
    sizes = {"short": lambda: between(1, short),
             "medium": lambda: between(short + 1, min(4 * WINDOW_BLOCK, length // 2)),
             "long": lambda: longest_window + between(1, WINDOW_BLOCK)}
    for row in range(batch):
        turns = ("short", "long", "short", "medium") if row % 2 == 0 else ("short", "medium")
        start = 0
        for turn in range(length):
            kind = turns[turn % len(turns)]
            size = sizes[kind]()
            if kind == "long" and start + size >= length:
                continue  # no room for a document longer than the longest window here
            start += size
            if start >= length:
                break
            tokens[row, start] = eot_token
    return tokens


def known_separator(eot_token: int | None, vocab_size: int) -> int | None:
    """The document separator the check places and counts: ``eot_token`` where it is a token of
    the vocabulary, else None (no documents)."""
    return eot_token if eot_token is not None and 0 <= eot_token < vocab_size else None


def document_counts(inputs: list[torch.Tensor], eot_token: int | None) -> dict:
    """How many separators and documents the check's input sequences hold (None: no separator known)."""
    if eot_token is None:
        return {"check_separators": None, "check_documents": None}
    separators = sum(int((seq == eot_token).sum()) for seq in inputs)
    leading = sum(int(seq[0] == eot_token) for seq in inputs if len(seq))
    return {"check_separators": separators, "check_documents": separators + len(inputs) - leading}


def token_sequences(tokens: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """Up to ``count`` sequences of ``length`` + 1 tokens from the start of a 1-D ``tokens``, each
    starting where the last one's inputs ended (its last token is only a target)."""
    sequences = []
    for i in range(count):
        seq = tokens[i * length:(i + 1) * length + 1]
        if len(seq) < 2:
            break
        sequences.append(seq)
    return sequences


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
                settings: CheckSettings, real_tokens: torch.Tensor | None = None) -> dict:
    """Run both models on the same seeded batch (documents included where the separator is known)
    and, given ``real_tokens`` (1-D, the lab's held-out text), on ``settings.batch`` sequences of
    them too, and compare their logits."""
    device, dtype = settings.resolved_device(), settings.torch_dtype()
    cfg = reference.cfg
    longest_window = max(cfg.window_blocks(i) for i in range(cfg.num_layers)) * WINDOW_BLOCK
    synthetic = document_tokens(vocab_size, settings.batch, settings.length, settings.seed, cfg.eot_token,
                                longest_window)
    sequences = list(synthetic)
    real = token_sequences(real_tokens, settings.batch, settings.length) if real_tokens is not None else []
    sequences += real
    inputs = [seq[:-1].to(device) for seq in sequences]
    targets = torch.cat([seq[1:] for seq in sequences]).to(device)
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
            outputs.append(torch.cat([model.hidden(seq[None])[0] for seq in inputs]))  # (tokens, D)
            _sync(device)
            return_freed_memory()
            transfer_s += t1 - t0
            forward_s += time.perf_counter() - t1
        stats, flat_targets = _LogitStats(), targets
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
                  check_length=settings.length, check_seed=settings.seed,
                  check_real_tokens=sum(len(seq) - 1 for seq in real),
                  **document_counts(inputs, known_separator(cfg.eot_token, vocab_size)))
    log.info("logit check: max %.3g mean %.3g top1 %.4f kl %.3g -> %s", result["max_abs_logit_diff"],
             result["mean_abs_logit_diff"], result["top1_agreement"], result["kl"],
             "passed" if result["check_passed"] else "FAILED")
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _gpu_name() -> str:
    return f"cuda ({torch.cuda.get_device_name()})"

