"""One checkpoint file at a time: converted and checked against its own model, checked, or loaded for use.

Every file is read by one reader (:mod:`ckpt_migrate.safe_pickle`, no code runs) and its
tensors are memory-mapped at the offsets that reader validated (:mod:`ckpt_migrate.loader`),
so what is inspected is what is loaded and optimizer state stays on disk.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from .identity import file_identity
from .version import package_version
from . import converted_format  # "converted" names the converted weights below
from .atomic import PendingFile
from .check import CheckDeviceError, CheckSettings, logit_check
from .key_mapping import ConversionError, check_finite, convert_state_dict
from .detect import ManifestRecord, record_from_inspection, state_dict_of, strip_prefixes
from .families import FAMILIES, GPTConfig
from .fingerprint import converter_fingerprint
from .heap import return_freed_memory
from .loader import Checkpoint, CheckpointError, open_checkpoint
from .models import GPTBatched, GPTFlexAttention
from .validation import ShardError, evaluate, shard_tokens

log = logging.getLogger(__name__)


def load_source(path: str, overrides: dict | None = None) -> tuple[ManifestRecord, Checkpoint, dict[str, torch.Tensor]]:
    """(detection record, the read file, prefix-stripped state dict), memory-mapped.

    The record comes from the same read of the same open file as the tensors. Tensors outside
    the state dict (optimizer state) stay TensorStubs: described, never read."""
    checkpoint = open_checkpoint(path)
    record = record_from_inspection(path, checkpoint.inspection, overrides)
    if record["format"] not in ("small", "medium", converted_format.FORMAT):
        raise CheckpointError(f"{path}: {record['format']}: {record['reason']}")
    obj = checkpoint.inspection.obj
    if record["format"] == converted_format.FORMAT:
        return record, checkpoint, {k: checkpoint.tensor(v) for k, v in obj["model"].items()}
    state_dict = state_dict_of(obj, record)  # where detection found it, in this same read
    return record, checkpoint, {strip_prefixes(k): checkpoint.tensor(v) for k, v in state_dict.items()}


def build_model(cls, cfg: GPTConfig, state_dict: dict[str, torch.Tensor], **kwargs) -> torch.nn.Module:
    """Instantiate without allocating, then adopt the tensors as they are (dtypes kept), strictly.

    The meta device is passed to every constructor rather than set as a context: the context
    routes each initializer through Python decompositions, which cost over a second per process."""
    model = cls(cfg, device="meta", **kwargs)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def reference_model(record: ManifestRecord, state_dict: dict[str, torch.Tensor],
                    cfg: GPTConfig | None = None) -> torch.nn.Module:
    """The family's training-time forward in its original layout, attention written out ("math":
    what eager flex computes, a different computation from the candidate's sdpa kernel).
    ``cfg``: the record's config where the caller has built it already."""
    cfg = cfg or GPTConfig.from_record(record)
    if record["format"] == "small":
        return build_model(GPTFlexAttention, cfg, state_dict, variant=record["variant"], attention="math",
                           scalars_len=state_dict["scalars"].numel() if "scalars" in state_dict else None)
    return build_model(GPTBatched, cfg, state_dict, attention="math")


def _bytes_read() -> int | None:
    """Bytes this process has read so far (Linux /proc/self/io rchar), for progress logs."""
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])
    except (OSError, StopIteration, ValueError):
        return None


def _progress(stage: str, t0: float) -> None:
    read = _bytes_read()
    log.info("%-9s %7.1f s elapsed, %s read", stage, time.perf_counter() - t0,
             f"{read / 2**20:.1f} MiB" if read is not None else "? bytes")


def _same_file(src: str, dst: str) -> bool:
    """Whether ``dst`` names ``src`` (the same path, through a link, or a hard link to it)."""
    if os.path.realpath(src) == os.path.realpath(dst):
        return True
    try:
        return os.path.samefile(src, dst)
    except OSError:  # dst does not exist yet
        return False


def convert_file(src: str, dst: str | None, settings: CheckSettings | None = None,
                 overrides: dict | None = None, validation: dict | None = None) -> dict:
    """Convert a small checkpoint, check its logits and, if the check passes, write ``dst`` atomically.

    With ``validation`` (:func:`~.validation.validation_plan`), the check also runs on the
    held-out tokens, and the converted model's validation loss is computed after it passes.
    Returns the check record (metrics, timings, output hash). A refused conversion (a weight
    anywhere in the model that holds a NaN or an Inf included, named), a failed check, a source
    that changed while it was read, or a write that fails (disk full) returns ``status: failed``
    with a one-line reason, and nothing is left at ``dst``.
    """
    settings = settings or CheckSettings()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    result: dict[str, Any] = {"source": os.path.abspath(src), "converted_path": dst or "",
                              "converter_version": package_version(), "converter_fingerprint": converter_fingerprint(),
                              "status": "failed"}
    before = file_identity(src)  # None if it is not there: its reader says so below
    if dst and _same_file(src, dst):
        # Publishing would replace the checkpoint itself: the source is only ever read.
        result["reason"] = f"the output path {dst} is the source file itself; write the converted file elsewhere"
        return result
    if dst and os.path.isdir(dst):
        result["reason"] = f"the output path {dst} is a folder; give the converted file's own path"
        return result
    _progress("load", t0)
    try:
        record, checkpoint, small = load_source(src, overrides)
        if record["format"] != "small":
            raise CheckpointError(f"not a small checkpoint ({record['format']}: {record.get('reason', '')})")
        timings["load_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        check_finite(small)  # every weight, before anything is built from it (the logit check cannot see them all)
        timings["finite_s"] = time.perf_counter() - t1
        _progress("convert", t0)
        cfg = GPTConfig.from_record(record)
        t1 = time.perf_counter()
        # Built on the check's device, where the candidate needs them; the write copies them to the host.
        converted = convert_state_dict(small, cfg, settings.resolved_device())
        timings["convert_s"] = time.perf_counter() - t1
    except (ConversionError, CheckpointError, CheckDeviceError) as exc:
        result["reason"] = str(exc)
        return result
    # The output is written to a temporary file while the check runs (I/O beside compute), and
    # published by a rename only once the check has passed and the source is unchanged.
    payload = converted_format.payload(record, converted, cfg, bool(record.get("has_optimizer_state")))
    try:
        pending = _BackgroundWrite(dst, payload, t0) if dst else None
    except OSError as exc:  # its folder cannot be made or written
        result["reason"] = f"cannot write {dst}: {exc.strerror or exc}; nothing written"
        return result
    t2 = time.perf_counter()
    _progress("check", t0)
    try:
        reference = reference_model(record, small, cfg)
        candidate = build_model(GPTBatched, cfg, converted)
        held_out = _held_out(validation, cfg)
        check = logit_check(reference, candidate, cfg.vocab_size, settings, held_out)
    except BaseException:
        if pending:
            pending.finish()
            pending.file.abort()
        raise
    timings["check_s"] = time.perf_counter() - t2
    written = pending.finish() if pending else None
    del checkpoint
    result.update(check)
    if written is not None:
        timings["write_s"] = written["seconds"]
    reason = _why_not_published(check, written, dst, file_identity(src) != before)
    if reason:
        if pending:
            pending.file.abort()
        result["reason"] = reason
        return result
    if pending:
        try:
            pending.file.commit()
        except OSError as exc:  # the rename itself refused (a folder in the way, permissions)
            pending.file.abort()
            result["reason"] = f"cannot write {dst}: {exc.strerror or exc}; nothing written"
            return result
        result["sha256"], result["converted_bytes"] = written["sha256"], written["bytes"]
    if validation is not None:
        _progress("validate", t0)
        del reference
        result.update(evaluate(candidate, validation, settings.resolved_device(), held_out))
    timings["total_s"] = time.perf_counter() - t0
    _progress("done", t0)
    result.update(status="converted", reason="", timings=timings)
    return result


def _held_out(validation: dict | None, cfg: GPTConfig) -> torch.Tensor | None:
    """The held-out tokens the check also runs on (None without a usable shard: the validation
    then says why)."""
    if validation is None:
        return None
    try:
        return shard_tokens(validation, cfg.vocab_size)
    except ShardError:
        return None


def evaluate_file(path: str, validation: dict, device: str = "cpu") -> dict:
    """The validation fields (:func:`~.validation.evaluate`) of a file already in GPTBatched's
    layout, a medium checkpoint or a converted file, evaluated as it is: nothing converted or written."""
    record, checkpoint, state_dict = load_source(path)
    if record["format"] == converted_format.FORMAT:
        cfg = converted_format.read_config(checkpoint.inspection.obj)
    elif record["format"] == "medium":
        cfg = GPTConfig.from_record(record)
    else:
        raise CheckpointError(f"{path}: a {record['format']} file is evaluated on its converted file")
    check_finite(state_dict, f"{path}: ")
    return evaluate(build_model(GPTBatched, cfg, state_dict), validation, device)


def _why_not_published(check: dict, written: dict | None, dst: str | None, source_changed: bool) -> str:
    """The one-line reason a conversion is not published, or "" when it is."""
    if not check["check_passed"]:
        why = "non-finite logits" if not check["all_finite"] else (
            f"max |logit diff| {check['max_abs_logit_diff']:.3g} > tolerance {check['tolerance']:.3g}")
        return f"logit check failed: {why}; nothing written"
    if written is not None and written["error"]:
        return f"cannot write {dst}: {written['error']}; nothing written"
    if source_changed:
        # The weights we converted may be a mix of the old and the new file.
        return "the source changed while it was being converted; run again"
    return ""


class _BackgroundWrite:
    """torch.save of the converted payload into a PendingFile, on a thread."""

    def __init__(self, dst: str, payload: dict, t0: float):
        import threading

        self.file = PendingFile(dst)
        self.outcome: dict[str, Any] = {"error": "", "sha256": "", "bytes": 0, "seconds": 0.0}
        self._payload, self._t0 = payload, t0
        self._thread = threading.Thread(target=self._run, name="ckpt-migrate-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        _progress("write", self._t0)
        try:
            self.outcome["sha256"], self.outcome["bytes"] = self.file.write_with(
                lambda f: converted_format.save(self._payload, f))
        except (OSError, RuntimeError) as exc:  # torch's zip writer re-raises a failed write as RuntimeError
            cause = exc
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            self.outcome["error"] = ((cause.strerror or str(cause)) if isinstance(cause, OSError)
                                     else " ".join(str(exc).split()))
        self.outcome["seconds"] = time.perf_counter() - start
        return_freed_memory()
        _progress("written", self._t0)

    def finish(self) -> dict:
        self._thread.join()
        return self.outcome


def check_file(path: str, settings: CheckSettings | None = None, source: str | None = None,
               validation: dict | None = None) -> dict:
    """Logit check of any checkpoint: small (converted in memory), medium (its
    training-time forward against GPTBatched's), or converted; with ``validation``, on the
    held-out tokens too, then GPTBatched's validation loss.

    A converted file is checked against ``source``, the file it was converted from; a path
    recorded inside the converted file is never followed on its own. A weight that holds a NaN
    or an Inf, in either file, raises :class:`~ckpt_migrate.key_mapping.NonFiniteWeightsError`
    naming it, before any forward."""
    settings = settings or CheckSettings()
    record, checkpoint, state_dict = load_source(path)
    if record["format"] == converted_format.FORMAT:
        if source is None:
            raise CheckpointError(f"{path}: a converted file is checked against its source: pass the source file")
        cfg = converted_format.read_config(checkpoint.inspection.obj)
        src_record, _, src_sd = load_source(source)
        if src_record["format"] != cfg.family:
            raise CheckpointError(f"{source}: is {src_record['format']}, but {path} was converted from {cfg.family}")
        check_finite(src_sd, f"{source}: ")
        check_finite(state_dict, f"{path}: ")
        reference, candidate = reference_model(src_record, src_sd), build_model(GPTBatched, cfg, state_dict)
    else:
        check_finite(state_dict, f"{path}: ")
        cfg = GPTConfig.from_record(record)
        reference = reference_model(record, state_dict)
        weights = convert_state_dict(state_dict, cfg) if record["format"] == "small" else state_dict
        candidate = build_model(GPTBatched, cfg, weights)
    held_out = _held_out(validation, cfg)
    result = logit_check(reference, candidate, cfg.vocab_size, settings, held_out)
    if validation is not None:
        del reference
        result.update(evaluate(candidate, validation, settings.resolved_device(), held_out))
    return result


def load_pretrained_checkpoint(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``model, info, checkpoint`` for a small source, a medium source or a converted file.

    Drop-in for the lab's helper: ``model(input_ids)`` takes [B, T] token ids and returns fp32
    soft-capped logits [B, T, padded_vocab]; ``info["format"]`` is "small" or "medium".
    """
    record, checkpoint, state_dict = load_source(path)
    if record["format"] == converted_format.FORMAT:
        cfg = converted_format.read_config(checkpoint.inspection.obj)
        fmt, variant = cfg.family, record.get("variant", "")
    else:
        cfg = GPTConfig.from_record(record)
        fmt, variant = record["format"], record.get("variant", "")
        if fmt == "small":
            state_dict = convert_state_dict(state_dict, cfg)
    model = build_model(GPTBatched, cfg, state_dict)
    # A model for use: its parameters in the requested dtype on the device (memory-mapped
    # tensors become real memory here). With bf16, the fp32 linears are kept and cast at use,
    # as the training scripts did.
    model.to(device)
    if dtype == torch.float32:
        model.float()
    else:
        model.embed.to(dtype)
        model.value_embeds.to(dtype)
    model.compute_dtype = dtype
    info = {
        "format": fmt,
        "variant": variant,
        "step": record.get("step"),
        "config": cfg.to_dict(),
        "path": os.path.abspath(path),
        "converted_file": record["format"] == converted_format.FORMAT,
        "label": FAMILIES[fmt].label,
    }
    log.info("Format: %s", info["label"])
    return model, info, checkpoint.materialize(checkpoint.inspection.obj)
