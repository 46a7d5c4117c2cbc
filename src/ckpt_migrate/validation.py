"""Validation loss on the lab's own held-out tokens, in modded-nanogpt's ``.bin`` shard format.

A shard is a header of 256 int32 (magic 20240520, version 1, the token count, then unused),
then that many uint16 token ids. The loss is the mean next-token cross-entropy of the first N
predictions of the first shard (in sorted order) matching the config's glob, in sequences of T
input tokens plus one, through the model's own forward: its soft-capped logits over the padded
head, the windows and documents its family applies, fp32.

Finding a shard and describing it are torch-free (the plan, on the login node, decides what to
evaluate); reading tokens and the loss import numpy and torch when called.
"""

from __future__ import annotations

import glob
import logging
import os

from .identity import file_identity
from .isolate import display_path

log = logging.getLogger(__name__)

SHARD_MAGIC = 20240520  # modded-nanogpt's data/fineweb.py header
SHARD_VERSION = 1
HEADER_INT32 = 256  # header length in int32 values (1024 bytes)


class ShardError(ValueError):
    """A validation shard that is not modded-nanogpt's token format, or holds ids the model lacks."""


def shard_for(data_glob: str, lang_pair: str) -> str | None:
    """The first file in sorted order matching ``data_glob`` with ``{lang}`` replaced by
    ``lang_pair`` (``eng_spa``), or None."""
    if not data_glob:
        return None
    if "{lang}" in data_glob and not lang_pair:
        return None  # a file outside a <lang>_owt_run_<n> folder has no language pair to look up
    matches = sorted(glob.glob(os.path.expanduser(data_glob.replace("{lang}", glob.escape(lang_pair)))))
    files = [path for path in matches if os.path.isfile(path)]  # a folder or FIFO that matches is not a shard
    return files[0] if files else None


def validation_plan(settings: dict | None, lang_pair: str) -> dict | None:
    """What a file's validation is for: the settings, the shard and its identity (so that a changed
    setting or shard is evaluated again, and nothing else); None when validation is off or there is
    no shard for this language pair."""
    settings = settings or {}
    shard = shard_for(settings.get("data") or "", lang_pair)
    if shard is None:
        return None
    return _plan(settings["data"], int(settings["tokens"]), int(settings["sequence_length"]), shard)


def _plan(data: str, tokens: int, sequence_length: int, shard: str) -> dict:
    return {"data": data, "tokens": tokens, "sequence_length": sequence_length, "shard": os.path.abspath(shard),
            "shard_identity": file_identity(shard, with_content=True)}


def held_out_file(path: str, tokens: int, sequence_length: int) -> dict:
    """The validation of ``ckpt-migrate check --val-data FILE``: that one shard (ValueError naming
    what is wrong with the numbers or the file)."""
    if tokens < 1 or sequence_length < 1:
        raise ValueError(f"--val-tokens and --val-sequence-length must be positive, not {tokens}, {sequence_length}")
    if not os.path.exists(path):
        raise ShardError(f"{display_path(path)}: no such token shard")
    if not os.path.isfile(path):
        raise ShardError(f"{display_path(path)}: not a regular file, so not a token shard")
    shard_length(path)  # its header, before any model is built
    return _plan(path, tokens, sequence_length, path)


def shard_length(path: str) -> int:
    """The token count of a shard, from its header (no numpy, no torch: ``doctor`` runs it on a login
    node); :class:`ShardError` naming the file when it is not modded-nanogpt's token format."""
    import struct

    name = display_path(path)
    try:
        size = os.path.getsize(path)
        if size < HEADER_INT32 * 4:
            raise ShardError(f"{name}: {size} bytes, shorter than a token shard's 1024-byte header")
        with open(path, "rb") as f:
            magic, version, count = struct.unpack("<3i", f.read(12))
    except OSError as exc:
        raise ShardError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    if magic != SHARD_MAGIC or version != SHARD_VERSION:
        raise ShardError(f"{name}: not a modded-nanogpt token shard (header starts {magic}, {version}; "
                         f"expected magic {SHARD_MAGIC}, version {SHARD_VERSION})")
    if count < 0 or HEADER_INT32 * 4 + 2 * count != size:
        raise ShardError(f"{name}: its header says {count} tokens, but the file holds "
                         f"{(size - HEADER_INT32 * 4) / 2:g} (a truncated or damaged shard)")
    return count


def read_shard(path: str, max_tokens: int | None = None):
    """The shard's token ids as a 1-D int64 torch tensor (the first ``max_tokens`` of them);
    :class:`ShardError` naming the file when it is not that format."""
    import numpy as np
    import torch

    count = shard_length(path)
    count = count if max_tokens is None else min(count, max_tokens)
    try:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INT32 * 4, shape=(count,)) if count else []
        return torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{display_path(path)}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None


def shard_tokens(plan: dict, vocab_size: int):
    """The tokens a validation needs (N predictions: N + 1 tokens) from its shard, checked against
    the model's vocabulary."""
    tokens = read_shard(plan["shard"], plan["tokens"] + 1)
    if len(tokens) < 2:
        raise ShardError(f"{display_path(plan['shard'])}: fewer than 2 tokens, nothing to predict")
    largest = int(tokens.max())
    if largest >= vocab_size:
        raise ShardError(f"{display_path(plan['shard'])}: token id {largest} is outside the model's vocabulary "
                         f"of {vocab_size} (a shard of another tokenizer?)")
    return tokens


# Input tokens per forward on a GPU (16 sequences of 2048): a batch keeps the GPU busy where one
# sequence at a time would leave it idle between kernels. One sequence at a time on the CPU.
GPU_TOKENS_PER_FORWARD = 1 << 15


def validation_loss(model, tokens, sequence_length: int, device: str, sequences_per_forward: int | None = None) -> dict:
    """Mean next-token cross-entropy of ``model`` over ``tokens`` (1-D: every token but the last is
    an input, every one but the first a target), in sequences of ``sequence_length`` inputs, fp32;
    ``sequences_per_forward`` of them at a time (default: by the device)."""
    import time

    import torch
    import torch.nn.functional as F

    from .check import CHUNK_ELEMENTS, no_tf32

    t0 = time.perf_counter()
    predictions, length = len(tokens) - 1, sequence_length
    if sequences_per_forward is None:
        sequences_per_forward = max(1, GPU_TOKENS_PER_FORWARD // length) if device.startswith("cuda") else 1
    full = predictions // length
    # (inputs, targets) batches: the full sequences, then the shorter last one.
    batches = [(tokens[s * length:e * length].view(-1, length), tokens[s * length + 1:e * length + 1].view(-1, length))
               for s, e in ((s, min(s + sequences_per_forward, full)) for s in range(0, full, sequences_per_forward))]
    if predictions > full * length:
        batches.append((tokens[full * length:predictions][None], tokens[full * length + 1:][None]))
    total = 0.0
    model.to(device)
    model.compute_dtype = torch.float32
    rows = max(1, CHUNK_ELEMENTS // model.cfg.padded_vocab)
    with torch.no_grad(), no_tf32():
        for inputs, targets in batches:
            hidden = model.hidden(inputs.to(device)).flatten(0, 1)  # (B * T, D)
            targets = targets.to(device).flatten()
            for row in range(0, len(targets), rows):
                logits = model.logits(hidden[row:row + rows])  # (rows, padded_vocab), soft-capped, fp32
                total += float(F.cross_entropy(logits, targets[row:row + rows], reduction="sum").double())
    result = {"val_loss": total / predictions, "val_tokens": predictions,
              "val_seconds": round(time.perf_counter() - t0, 3)}
    log.info("validation: loss %.4f over %d tokens in %.1f s", result["val_loss"], predictions, result["val_seconds"])
    return result


def evaluate(model, plan: dict | None, device: str, tokens=None) -> dict:
    """The validation fields of a check record: the loss per :func:`validation_loss`, or empty
    values with the reason when there is no shard, it cannot be used, or the evaluation fails (out
    of memory, say): a conversion stands whatever its validation does. ``tokens``: the shard's,
    where the caller has read them already (:func:`shard_tokens`)."""
    if plan is None:
        return {"val_loss": None, "val_tokens": None, "validation": None}
    fields = {"validation": plan, "val_data": display_path(plan["shard"]), "val_loss": None, "val_tokens": None}
    try:
        tokens = shard_tokens(plan, model.cfg.vocab_size) if tokens is None else tokens
        result = validation_loss(model, tokens, plan["sequence_length"], device)
    except ShardError as exc:
        return {**fields, "val_error": str(exc)}
    except Exception as exc:  # the model on these tokens, not the file: a field of the record
        log.exception("validation on %s failed", display_path(plan["shard"]))
        return {**fields, "val_error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    if result["val_tokens"] < plan["tokens"]:
        result["val_note"] = (f"{result['val_tokens']:,} predictions: the shard holds fewer than the "
                              f"{plan['tokens']:,} asked")
    return {**fields, **result}
