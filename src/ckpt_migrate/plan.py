"""The plan job: detect every new or changed checkpoint (each in a budgeted child, no torch) and
put the small-format ones into conversion batches (and, with ``validation`` set, the medium ones
into the same batches, to be evaluated).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time

import yaml

from .version import package_version
from .atomic import atomic_write_text
from .detect import ManifestRecord
from .isolate import DEFAULT_MEMORY_MB, DEFAULT_SECONDS, detect_isolated, display_path
from .layout import OutputLayout, lang_and_run
from .records import (FUTURE_SLACK_NS, job_environment, mtime_ns, read_index, read_yaml, require_regular_file,
                      write_yaml)
from .identity import file_identity, identity_change, iso_utc

log = logging.getLogger(__name__)


# key: the checkpoint's wildcard value (its path, %-escaped, without .pt); batch: the conversion job
# a small file (or a medium one to evaluate) is in; source: its path as hex bytes (any file name
# survives the TSV); validation: what its validation loss is computed on, as JSON (empty: none).
PLAN_HEADER = ("key", "status", "batch", "source", "validation")
# Statuses whose files get a validation loss when ``validation`` is set: small files on their
# conversion, medium (and already converted) ones as they are.
EVALUATED = ("to_convert", "not_needed")


DEFAULT_CONVERSIONS_PER_JOB = 8
# What one conversion job asks for, in one place: the rule requests it, `doctor` checks a node
# fits it. Memory for one full 2 GB checkpoint at a time (its weights memory-mapped, its optimizer
# state never read) with ample headroom; CPUs to read and write it.
CONVERT_JOB_RESOURCES = {"cpus_per_task": 4, "mem_mb": 32000, "gpu": 1}


def batch_minutes(files: int) -> int:
    """The time a conversion job asks for: start-up, then a generous 5 minutes a file (one full-size
    file takes well under a minute on a GPU and a few on a CPU)."""
    return 10 + 5 * max(1, files)


def write_manifest(src: str, relative_path: str, manifest_path: str, seconds: float = DEFAULT_SECONDS,
                   memory_mb: int = DEFAULT_MEMORY_MB, overrides: dict | None = None,
                   not_read_because: str = "") -> ManifestRecord:
    """Detect the format of ``src`` (in a child, within budget) and write its manifest; with
    ``not_read_because``, the file is not opened and is unreadable for that reason.

    Bad files give a manifest, not an error; the record holds only plain values (it went
    through JSON), so it always serializes."""
    from .fingerprint import detector_fingerprint

    identity = file_identity(src, with_content=True)  # before reading: one replaced meanwhile is detected again
    if not not_read_because and identity is not None and identity["mtime_ns"] > time.time_ns() + FUTURE_SLACK_NS:
        not_read_because = (f"modified in the future ({iso_utc(identity['mtime_ns'] / 1e9)}; the clock of whatever "
                            f"wrote it is ahead): Snakemake cannot order it; fix the time (touch the file) and rerun")
    if not_read_because:
        from .detect import record_from_inspection
        from .safe_pickle import ArchiveInspection

        record = record_from_inspection(src, ArchiveInspection("unreadable", not_read_because), overrides)
    else:
        record = detect_isolated(src, seconds, memory_mb, overrides)
    record = {**record, "source_identity": identity, "not_read_because": not_read_because,
              "relative_path": display_path(relative_path), "detector_version": package_version(),
              "detector_fingerprint": detector_fingerprint(), "overrides": dict(overrides or {}),
              "detected_on": job_environment()}
    write_yaml(manifest_path, record)
    log.info("%s: %s %s %s", display_path(relative_path), record["format"], record.get("variant", ""),
             record.get("reason", ""))
    return record


def _still_current(manifest_path: str, src: str, identity: dict) -> ManifestRecord | None:
    """The manifest, if it describes ``src`` as it is now (:func:`identity_change`) with this
    detector, these overrides and the same reason not to read it."""
    try:
        record = read_yaml(manifest_path)
    except (OSError, yaml.YAMLError):
        return None
    recorded = {"detector": record.get("detector_fingerprint"), "overrides": record.get("overrides"),
                "not_read": record.get("not_read_because")}
    same = all(recorded[k] == identity[k] for k in recorded) and record.get("source_identity") is not None
    return record if same and not identity_change(record["source_identity"], src) else None


def detect_and_plan(sources: dict[str, str], relative_paths: dict[str, str], layout: OutputLayout,
                    seconds: float = DEFAULT_SECONDS, memory_mb: int = DEFAULT_MEMORY_MB,
                    overrides: dict | None = None,
                    conversions_per_job: int = DEFAULT_CONVERSIONS_PER_JOB,
                    not_read: dict[str, str] | None = None, validation: dict | None = None) -> list[str]:
    """Detect every checkpoint whose manifest is missing or stale, in this one process, and write the plan.

    A manifest is reused when its file's identity (:func:`file_identity`), the detector and
    the overrides are unchanged, so a rerun detects only what is new or changed. Each small file is put in a
    conversion batch: the one it was in if the file is unchanged (so its finished conversion
    stands), else a new batch of up to ``conversions_per_job`` new, changed or unrecorded files.
    A match in ``not_read`` (key -> why: a link out of input_root, a path over PATH_MAX) is never opened.
    With ``validation`` (the config's section) and a shard for a file's language pair, small and
    medium files are batched for their validation loss too; a file whose validation (settings,
    shard) is unchanged keeps its batch. Returns the keys to convert."""
    from .validation import validation_plan
    from .fingerprint import detector_fingerprint

    overrides = dict(overrides or {})
    detector = detector_fingerprint()
    index = read_index(layout.manifest_index)
    new_index: dict[str, dict] = {}
    rows, detected, t0 = [], 0, time.perf_counter()
    unbatched: list[str] = []
    validations: dict[str, dict | None] = {}  # per language pair: one shard lookup for the tree
    for key in sorted(sources):
        manifest_path = layout.manifest(key)
        why_not_read = (not_read or {}).get(key, "")
        identity = {"file": file_identity(sources[key]), "detector": detector, "overrides": overrides,
                    "not_read": why_not_read, "manifest_ns": mtime_ns(manifest_path)}
        entry = index.get(key) or {}
        unchanged = entry.get("manifest_ns") is not None and {k: entry.get(k) for k in identity} == identity
        if unchanged:
            status = entry["status"]  # unchanged file and manifest: not even the YAML is read
        else:
            record = _still_current(manifest_path, sources[key], identity)
            unchanged = record is not None  # the same bytes (a chmod moves ctime only)
            if record is None:
                record = write_manifest(sources[key], relative_paths[key], manifest_path, seconds, memory_mb, overrides,
                                        why_not_read)
                detected += 1
            status = record.get("status", "unknown")
            identity["manifest_ns"] = mtime_ns(manifest_path)
        lang = lang_and_run(relative_paths[key])[0]
        if lang not in validations:
            validations[lang] = validation_plan(validation, lang)
        evaluation = validations[lang] if status in EVALUATED else None
        new_index[key] = {**identity, "status": status, "validation": evaluation}
        if status == "to_convert" or evaluation is not None:
            # A file keeps its batch while it and its validation are unchanged and its record is
            # there; one whose record was deleted (to retry it) or never written gets a new batch.
            # Validation turned off needs no job: the report leaves out a loss that is not current.
            same_validation = entry.get("validation") == evaluation or evaluation is None
            if unchanged and entry.get("batch") and same_validation and os.path.exists(layout.check(key)):
                new_index[key]["batch"] = entry["batch"]
            else:
                unbatched.append(key)
        rows.append(key)
    for start in range(0, len(unbatched), max(1, conversions_per_job)):
        members = unbatched[start:start + max(1, conversions_per_job)]
        # Named by what it holds, so that planning again with nothing changed gives the same
        # batches; the files' staged records are part of it, so that a retried file (its record
        # deleted, its last attempt staged) never lands in the finished batch it was in.
        batch_id = "b" + hashlib.sha256(json.dumps(
            [[key, new_index[key]["file"], mtime_ns(layout.staged(key)), new_index[key]["validation"]]
             for key in members]).encode()).hexdigest()[:12]
        for key in members:
            new_index[key]["batch"] = batch_id
            _clear_record_path(layout.check(key))
    missing = sorted(lang or "(no language pair)" for lang, found in validations.items() if found is None)
    if (validation or {}).get("data") and missing:
        log.warning("validation: no shard matches %r for %s: their files get no val_loss", validation["data"],
                    ", ".join(missing))
    atomic_write_text(layout.manifest_index, json.dumps(new_index))
    log.info("detected %d file(s), reused %d manifest(s) in %.1f s; %d new or changed file(s) to convert",
             detected, len(rows) - detected, time.perf_counter() - t0, len(unbatched))
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(PLAN_HEADER)
    for key in rows:
        entry = new_index[key]
        source = os.fsencode(os.path.abspath(sources[key])).hex() if entry.get("batch") else ""
        evaluation = json.dumps(entry["validation"]) if entry.get("validation") else ""
        writer.writerow((key, entry["status"], entry.get("batch", ""), source, evaluation))
    atomic_write_text(layout.plan, buf.getvalue())
    return [key for key in rows if new_index[key]["status"] == "to_convert"]


def plan_out_of_date(sources: dict[str, str], layout: OutputLayout) -> str:
    """Why the plan must run again, whatever Snakemake remembers ("" if it need not): a match the
    last plan did not see, or saw as another file, or one it saw that is gone, or a plan file
    that cannot be read. Snakemake reruns the plan on changed params only where its own records
    (``.snakemake`` of this checkout, for this very path) hold them: a second checkout, or
    output_root given through a link, would otherwise take a replaced file for the old one."""
    if not os.path.exists(layout.plan):
        return ""  # Snakemake runs it anyway
    index = read_index(layout.manifest_index)
    if set(index) != set(sources):
        return "the matches differ from those the last plan saw"
    changed = next((key for key, path in sources.items()
                    if (index[key] or {}).get("file") != file_identity(path)), None)
    if changed is not None:
        return f"{display_path(sources[changed])} is not the file the last plan saw"
    try:
        planned = {row["key"] for row in _plan_rows(layout.plan)}
    except (OSError, ValueError, csv.Error):  # not text, not UTF-8, NUL bytes: rewritten by the plan
        planned = None
    return "" if planned == set(sources) else f"{display_path(layout.plan)} is damaged"


def age_out_of_date_plan(sources: dict[str, str], layout: OutputLayout) -> str:
    """Date plan.tsv back to 1970 where :func:`plan_out_of_date` says it is, so that Snakemake,
    which compares it with the matches' mtimes, runs the plan; returns why ("" if it is current)."""
    why = plan_out_of_date(sources, layout)
    if why:
        os.utime(layout.plan, (0, 0), follow_symlinks=False)  # a link there is replaced, its file untouched
        log.info("the plan runs again: %s", why)
    return why


def _clear_record_path(path: str) -> None:
    """Remove what lies at the record path of a file given a new batch: an old record (it describes
    other bytes or settings), or a link or file planted there, which Snakemake would take for a
    finished conversion and never run its job. Only the name goes: nothing is written through it."""
    try:
        os.unlink(path)
        log.info("removed %s: its file is converted again", display_path(path))
    except FileNotFoundError:
        pass
    except OSError as exc:  # a folder there: Snakemake names it when the job cannot write
        log.warning("could not remove %s: %s", display_path(path), exc.strerror)


def read_plan(plan_path: str) -> list[tuple[str, str, str]]:
    """(key, status, batch) of every checkpoint in the plan (batch "" when it has no job)."""
    return [(row["key"], row["status"], row["batch"]) for row in _plan_rows(plan_path)]


def read_validations(plan_path: str) -> dict[str, dict]:
    """{key: what its validation loss is computed on} (:func:`~.validation.validation_plan`)."""
    return {row["key"]: json.loads(row["validation"]) for row in _plan_rows(plan_path) if row["validation"]}


def read_batches(plan_path: str) -> dict[str, dict[str, str]]:
    """{batch id: {key: source path}} of the small files the plan says to convert."""
    batches: dict[str, dict[str, str]] = {}
    for row in _plan_rows(plan_path):
        if row["batch"]:
            batches.setdefault(row["batch"], {})[row["key"]] = os.fsdecode(bytes.fromhex(row["source"]))
    return batches


def _plan_rows(plan_path: str) -> list[dict[str, str]]:
    require_regular_file(plan_path)
    with open(plan_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader, None)
        # A plan written before the validation column reads as one without validation.
        return [dict(zip(PLAN_HEADER, row + [""] * (len(PLAN_HEADER) - len(row)))) for row in reader
                if len(PLAN_HEADER) - 1 <= len(row) <= len(PLAN_HEADER)]
