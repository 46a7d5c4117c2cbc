"""The conversion job: convert and check each file of a batch in one process, writing each file's
record the moment it is done; kill bookkeeping.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any

import yaml

from .atomic import open_log
from .isolate import display_path
from .safe_pickle import one_line
from .layout import OutputLayout
from .plan import read_batches, read_validations
from .records import LOG_FORMAT, mtime_ns, job_environment, read_yaml, write_yaml
from .identity import file_identity, identity_change
from .slurm import unfinished_conversion_reason

log = logging.getLogger(__name__)


def run_conversion(src: str, manifest_path: str, converted_path: str, check_path: str,
                   check_settings: dict[str, Any], attempt_path: str | None = None,
                   overrides: dict | None = None, log_path: str | None = None, attempts: int = 1,
                   validation: dict | None = None) -> dict:
    """Convert + check one small checkpoint; always writes the check record, the .pt only on success.

    ``attempt_path`` records where the conversion runs before it starts, so that a job killed
    from outside (SLURM's memory or time limit, scancel) can still be named in the report. The
    record says which file (size, mtime), converter, check settings and overrides it is for, so
    that a later run can tell whether it still stands (:func:`standing_conversion`)."""
    # Recorded before torch is even imported: a job killed for memory may not get further.
    if attempt_path:
        write_yaml(attempt_path, attempt_record(log_path, attempts))
    from .check import CheckSettings
    from .fingerprint import converter_fingerprint
    from .one_file import convert_file

    manifest = read_yaml(manifest_path)
    settings = CheckSettings(**check_settings)
    identity = file_identity(src, with_content=True)
    changed = identity_change(manifest.get("source_identity"), src)
    failed = {"source": os.path.abspath(src), "status": "failed", "converter_fingerprint": converter_fingerprint()}
    if changed:
        # Its manifest (format, shapes, step: the report's row) describes other bytes; the next
        # run's plan detects the file again and gives it a new batch.
        result = {**failed, "reason": f"the file changed after the plan detected it ({changed}); "
                                      f"the next run detects and converts it again"}
    else:
        try:
            # convert_file reads the file as it is now (one read for the record and the tensors).
            result = convert_file(src, converted_path, settings, overrides, validation)
        except Exception as exc:  # one line in the record; the run goes on with the other checkpoints
            log.exception("conversion of %s failed", src)
            result = {**failed, "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    if result["status"] != "converted" and os.path.exists(converted_path):
        # A previous good conversion of an older file must not stand for this one.
        os.unlink(converted_path)
    result = {"relative_path": manifest.get("relative_path", ""), **result, "converted_on": job_environment(),
              "source_identity": identity, "check_settings": dict(check_settings),
              "overrides": dict(overrides or {})}
    if display_path(src) != src:  # the YAML text of the path is not the path: keep its bytes too
        result["source_path_hex"] = os.fsencode(os.path.abspath(src)).hex()
    write_yaml(check_path, result)
    log.info("%s: %s %s", display_path(src), result["status"], result.get("reason", ""))
    return result


def attempt_record(log_path: str | None, attempts: int) -> dict:
    """What an attempt record holds: where and when a file's work started, and how many times in a row."""
    import time

    return {**job_environment(), "pid": os.getpid(), "started": time.time(), "log": log_path or "",
            "attempts": attempts}


def standing_conversion(record_path: str, src: str, converted_path: str, check_settings: dict[str, Any],
                        overrides: dict | None) -> dict | None:
    """The check record at ``record_path`` if it is a conversion that still stands for ``src`` as
    it is now: the same file (size, mtime, inode), converter, check settings and overrides, and its
    output still there. None otherwise, a failure included (then the file is converted again)."""
    from .fingerprint import converter_fingerprint

    try:
        record = read_yaml(record_path)
    except (OSError, yaml.YAMLError):
        return None
    stands = (record.get("source_identity") is not None and os.path.exists(src)
              and not identity_change(record["source_identity"], src)
              and record.get("converter_fingerprint") == converter_fingerprint()
              and record.get("check_settings") == dict(check_settings)
              and record.get("overrides") == dict(overrides or {})
              and record.get("status") == "converted" and _own_file(converted_path))
    return record if stands else None


def _own_file(path: str) -> bool:
    """A regular file under no other name (not a symlink, not a hard link): as the pipeline writes."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def run_batch(layout: OutputLayout, batch_id: str, check_settings: dict[str, Any], overrides: dict | None,
              summary_path: str) -> dict:
    """One conversion job: every file of a batch, one after another in this one process: a small
    file converted, checked and (with validation) evaluated; a medium one evaluated only.

    Python, torch and (on a GPU) CUDA start once for the batch. Each file's record and log are
    written the moment that file is done (``staged/``), so a job killed part way keeps what it
    finished and the report names the file it was on; a file that fails is a record, not a
    failed job. A file whose conversion from an earlier run still stands is not converted again
    (only evaluated, when its validation changed)."""
    import time

    from .heap import return_freed_memory

    t0 = time.perf_counter()
    members = read_batches(layout.plan).get(batch_id)
    if members is None:
        raise ValueError(f"batch {batch_id} is not in the plan {layout.plan}; rerun the workflow")
    validations = read_validations(layout.plan)
    summary: dict[str, Any] = {"batch": batch_id, **job_environment(), "pid": os.getpid(), "files": []}
    # A file whose conversion was killed before (memory, time limit, a crash in torch) goes last,
    # so that it cannot keep the others of its batch from being converted run after run.
    kills = {key: killed_attempts(layout, key) for key in members}
    for key in sorted(members, key=lambda k: kills[k] > 0):
        src, staged, converted = members[key], layout.staged(key), layout.converted(key)
        linked = next(filter(None, map(layout.linked_folder, (converted, staged, layout.attempt(key)))), "")
        if linked:  # made a link since the run started: what is written below would land elsewhere
            raise OSError(f"{display_path(linked)} became a link to {display_path(os.path.realpath(linked))} during "
                          f"the run: nothing written below it (remove the link and rerun)")
        started, started_at = time.perf_counter(), time.time()
        validation, manifest = validations.get(key), read_yaml(layout.manifest(key))
        to_convert = manifest.get("status") == "to_convert"
        standing = (standing_conversion(staged, src, converted, check_settings, overrides) if to_convert
                    else _standing_evaluation(staged, src))
        if standing is not None and standing.get("validation") == validation:
            log.info("%s: its record from an earlier run stands", display_path(src))
            summary["files"].append({"key": key, "status": standing["status"], "reused": True,
                                     "started": round(started_at, 3), "seconds": 0.0})
            continue
        if to_convert and standing is None and kills[key] >= MAX_KILLED_ATTEMPTS:
            _given_up(layout, key, src, kills[key])
            summary["files"].append({"key": key, "status": "failed", "reused": False,
                                     "started": round(started_at, 3), "seconds": 0.0})
            continue
        handler = _file_log(layout.staged_log(key))
        try:
            log.info("batch %s, file %d of %d: %s", batch_id, len(summary["files"]) + 1, len(members),
                     display_path(src))
            if to_convert and standing is None:
                record = run_conversion(src, layout.manifest(key), converted, staged, check_settings,
                                        layout.attempt(key), overrides, layout.staged_log(key), kills[key] + 1,
                                        validation)
            else:  # only the validation loss: of a standing conversion's file, or of a medium file as it is
                if kills[key] < MAX_KILLED_ATTEMPTS:
                    write_yaml(layout.attempt(key), attempt_record(layout.staged_log(key), kills[key] + 1))
                    record = _evaluated(standing, manifest, src, converted if to_convert else src, validation,
                                        check_settings)
                else:
                    reason = unfinished_conversion_reason(layout, key, "evaluation")
                    record = _evaluated(standing, manifest, src, "", None, check_settings)
                    record.update(validation=validation, val_error=one_line(
                        f"killed {kills[key]} times while being evaluated, not tried again (last: {reason}); "
                        f"to retry, delete its check record and rerun with --forcerun plan", 300))
                write_yaml(staged, record)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
            handler.stream.close()
        summary["files"].append({"key": key, "status": record["status"], "reused": False,
                                 "started": round(started_at, 3), "seconds": round(time.perf_counter() - started, 3)})
        # Its tensors went with its last reference (no cycles hold them: a gc.collect() per file
        # cost 0.15 s and freed nothing); the heap they leave is handed back before the next.
        return_freed_memory()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    write_yaml(summary_path, summary)
    return summary


def _standing_evaluation(record_path: str, src: str) -> dict | None:
    """The evaluation record of a medium file at ``record_path`` if it is for ``src`` as it is now."""
    try:
        record = read_yaml(record_path)
    except (OSError, yaml.YAMLError):
        return None
    stands = (record.get("status") == "evaluated" and record.get("source_identity") is not None
              and os.path.exists(src) and not identity_change(record["source_identity"], src))
    return record if stands else None


VALIDATION_KEYS = ("validation", "val_loss", "val_tokens", "val_seconds", "val_data", "val_error", "val_note")


def _evaluated(standing: dict | None, manifest: dict, src: str, model_path: str, validation: dict | None,
               check_settings: dict[str, Any]) -> dict:
    """``standing`` (a conversion's record; for a medium file, a new evaluation record) with the
    validation loss of the model at ``model_path`` on ``validation``; an error is a field, not a crash."""
    from .check import CheckSettings
    from .one_file import evaluate_file

    record = {key: value for key, value in (standing or {}).items() if key not in VALIDATION_KEYS}
    if standing is None:
        record.update(relative_path=manifest.get("relative_path", ""), source=os.path.abspath(src),
                      status="evaluated", source_identity=file_identity(src, with_content=True))
    record.update(validation=validation, val_loss=None, val_tokens=None, evaluated_on=job_environment())
    if validation is not None:
        try:
            record.update(evaluate_file(model_path, validation, CheckSettings(**check_settings).resolved_device()))
        except Exception as exc:  # one line in the record; the run goes on with the other files
            log.exception("evaluation of %s failed", display_path(model_path))
            record["val_error"] = f"{type(exc).__name__}: {one_line(str(exc), 300)}"
    log.info("%s: validation loss %s", display_path(src), record.get("val_loss"))
    return record


MAX_KILLED_ATTEMPTS = 2  # a file whose conversion was killed this often in a row is a failed record


def killed_attempts(layout: OutputLayout, key: str) -> int:
    """How many conversions of this file in a row started and never wrote its record: each was
    killed from outside (memory or time limit, a crash), since a failure in Python is a record."""
    attempt_ns = mtime_ns(layout.attempt(key))
    staged_ns = mtime_ns(layout.staged(key))
    if attempt_ns is None or (staged_ns is not None and staged_ns >= attempt_ns):
        return 0
    try:
        return max(1, int(read_yaml(layout.attempt(key)).get("attempts", 1)))
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return 1


def _given_up(layout: OutputLayout, key: str, src: str, kills: int) -> dict:
    """The failed record of a file that was killed every time it was converted."""
    from .fingerprint import converter_fingerprint

    reason = one_line(f"killed {kills} times while being converted, not tried again (last: "
                      f"{unfinished_conversion_reason(layout, key)}); to retry, delete its check record "
                      f"and rerun with --forcerun plan", 300)
    if os.path.exists(layout.converted(key)):
        os.unlink(layout.converted(key))  # an older file's conversion must not stand for this one
    record = {"relative_path": read_yaml(layout.manifest(key)).get("relative_path", ""),
              "source": os.path.abspath(src), "status": "failed", "reason": reason,
              "converter_fingerprint": converter_fingerprint(), "converted_on": job_environment()}
    write_yaml(layout.staged(key), record)
    with open_log(layout.staged_log(key), append=True) as f:
        f.write(f"{reason}\n")
    log.warning("%s: %s", display_path(src), reason)
    return record


def _file_log(path: str) -> logging.Handler:
    """Log records to ``path`` too (a file's own log, beside the job's), from now until removed."""
    handler = logging.StreamHandler(open_log(path))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler
