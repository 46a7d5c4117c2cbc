"""The report: one row per matched checkpoint from its manifest and check record (cached by what
each row was read from), also after a failed run; the gate and the summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Iterable

import yaml

from .atomic import atomic_write_text
from .detect import ManifestRecord
from .isolate import display_path
from .metrics import CHECK_FIELDS, VALIDATION_FIELDS
from .layout import OutputLayout, lang_and_run
from .plan import read_plan, read_validations
from .records import mtime_ns, read_index, read_yaml, require_regular_file, seconds_of_iso
from .identity import file_identity, iso_utc
from .slurm import unfinished_conversion_reason

log = logging.getLogger(__name__)


REPORT_COLUMNS = (
    "path", "relative_path", "lang_pair", "run", "step", "format", "variant", "reason", "num_layers",
    "model_dim", "num_heads", "vocab_size", "padded_vocab", "params", "size_bytes", "mtime", "status",
    "converted_path", "converted_sha256", *CHECK_FIELDS, *VALIDATION_FIELDS, "direct_load_ok",
    "long_window_blocks", "window_source", "eot_token", "eot_token_source", "num_iterations", "num_iterations_source",
    "forward_source", "notes", "pickle_objects", "realpath",
)


NEEDS_A_PERSON = ("failed", "unknown", "unsafe", "unreadable")


def check_gate(report_path: str, flag_path: str, allow_check_failures: bool) -> None:
    """Write ``flag_path`` unless a conversion failed its check and that is not allowed."""
    failed = [r for r in read_report(report_path) if r["status"] == "failed"]
    if failed and not allow_check_failures:
        names = ", ".join(r["relative_path"] for r in failed[:5]) + (" ..." if len(failed) > 5 else "")
        message = (f"{len(failed)} checkpoint(s) failed conversion or its check: {names} "
                   f"(see {report_path}; set allow_check_failures: true to accept)")
        print(message, file=sys.__stderr__)  # the console, not only the job log
        raise SystemExit(message)
    atomic_write_text(flag_path, f"{len(failed)} failed, allowed={allow_check_failures}\n")


def report_row(manifest: ManifestRecord, check: dict | None, validation: dict | None = None) -> dict:
    """One report row from a manifest and, for a file the plan gave a job (a small file's
    conversion, a medium file's evaluation), its check record; the record's validation loss only
    when it was computed on ``validation``, the plan's for this file now (None: validation off)."""
    rel = manifest.get("relative_path", "")
    lang, run = lang_and_run(rel)
    row = {key: manifest.get(key, "") for key in REPORT_COLUMNS}
    row.update(relative_path=rel, lang_pair=lang, run=run, mtime=iso_utc(manifest.get("mtime")),
               direct_load_ok=(manifest.get("direct_load") or {}).get("ok", ""),
               pickle_objects=" ".join(manifest.get("pickle_objects") or []),
               notes="; ".join(manifest.get("notes") or []))
    status = manifest.get("status") or "unknown"
    if status == "to_convert":
        if check is None:
            status, row["reason"] = "failed", "conversion did not run (no check record)"
        else:
            status = check.get("status", "failed")
            row["reason"] = check.get("reason", "")
            for key in CHECK_FIELDS:
                row[key] = check.get(key, "")
            if status == "converted":
                row["converted_path"] = check.get("converted_path", "")
                row["converted_sha256"] = check.get("sha256", "")
    if check is not None and status in ("converted", "not_needed") and validation is not None \
            and check.get("validation") == validation:
        row.update({key: check.get(key, "") for key in VALIDATION_FIELDS})
        if check.get("val_error"):
            row["reason"] = "; ".join(filter(None, (row["reason"], f"no validation loss: {check['val_error']}")))
        elif check.get("val_note"):
            row["reason"] = "; ".join(filter(None, (row["reason"], f"validation loss over {check['val_note']}")))
    row["status"] = status
    return row


def write_report(layout: OutputLayout) -> list[dict]:
    """``report.csv``: one row per checkpoint in the plan, from its manifest and, for small files, its check record.

    A row whose manifest and check record are the very files (same size, mtime and inode) it was made
    from last time is taken from the report's own index instead of reading them again: with
    10,000 files, reading every manifest is most of a rerun's time."""
    from .fingerprint import report_fingerprint

    version = report_fingerprint()  # rows made by other report code are made again
    index = read_index(layout.report_index)
    index = index.get("rows", {}) if index.get("version") == version else {}
    new_index: dict[str, dict] = {}
    rows = []
    validations = read_validations(layout.plan)
    for key, status, batch in read_plan(layout.plan):
        manifest_path, check_path = layout.manifest(key), layout.check(key)
        stamp = [file_identity(manifest_path), file_identity(check_path) if batch else None, validations.get(key)]
        entry = index.get(key)
        if entry is not None and entry.get("stamp") == stamp and stamp[0] is not None:
            row = entry["row"]
        else:
            manifest = _read_record(manifest_path, "manifest", f"{key}.pt")
            check = _read_record(check_path, "check record", f"{key}.pt") if stamp[1] is not None else None
            row = report_row(manifest, check, validations.get(key))
        new_index[key] = {"stamp": stamp, "row": row}
        rows.append(row)
    rows.sort(key=lambda r: r["relative_path"])
    _write_rows(rows, layout.report)
    atomic_write_text(layout.report_index, json.dumps({"version": version, "rows": new_index}))
    return rows


def _read_record(path: str, what: str, name: str) -> dict:
    """The record at ``path``; one that cannot be read (damaged, or a file put there by hand) is
    a failed row saying so, in words of its own: a parser's message would quote the file."""
    try:
        return read_yaml(path)
    except (OSError, yaml.YAMLError):
        return {"relative_path": display_path(name), "status": "failed", "format": "",
                "reason": f"its {what} {display_path(path)} is not one this pipeline wrote (damaged, or put "
                          f"there by hand): delete it and rerun to redo the file"}


def _write_rows(rows: list[dict], report_path: str) -> None:
    import pandas as pd

    # dtype=object: each cell as its row has it (an int stays 768, a missing value is empty).
    safe = [{key: spreadsheet_safe(row.get(key)) for key in REPORT_COLUMNS} for row in rows]
    table = pd.DataFrame(safe, columns=list(REPORT_COLUMNS), dtype=object)
    atomic_write_text(report_path, table.to_csv(index=False, lineterminator="\n"))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A cell a spreadsheet shows as text: a string starting with = + - @, tab or carriage return
    (a run folder named ``=WEBSERVICE(...)_owt_run_1``) gets a leading apostrophe, as OWASP
    advises; numbers (-0.5) stay numbers."""
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def report_after_failure(layout: OutputLayout, relative_paths: dict[str, str]) -> list[dict]:
    """The report of a run that stopped on a failed job: every checkpoint still gets its row.

    A file whose detection or conversion did not finish is ``failed``, with what is known of
    why (the SLURM job's state, the log to read); the next run redoes only those."""
    rows, inputs = [], [layout.plan]
    validations = read_validations(layout.plan) if os.path.exists(layout.plan) else {}
    for key, rel in sorted(relative_paths.items(), key=lambda kv: kv[1]):
        manifest_path, check_path = layout.manifest(key), layout.check(key)
        inputs += [manifest_path, check_path, layout.staged(key)]
        if os.path.exists(manifest_path):
            manifest = _read_record(manifest_path, "manifest", rel)
        else:
            manifest = {"relative_path": display_path(rel), "status": "failed", "format": "",
                        "reason": f"detection did not finish (log: {layout.plan_log})"}
        check = None
        if manifest.get("status") == "to_convert" or validations.get(key):
            # A file its job finished before the failure has its record in staged/.
            staged = layout.staged(key)
            newest = max((p for p in (check_path, staged) if os.path.exists(p)), key=mtime_ns, default=None)
            if newest:
                check = _read_record(newest, "check record", rel)
            elif manifest.get("status") == "to_convert":
                check = {"status": "failed", "reason": unfinished_conversion_reason(layout, key)}
            else:  # a medium file whose evaluation did not finish: the loss is missing, the file is fine
                check = {"validation": validations[key],
                         "val_error": unfinished_conversion_reason(layout, key, "evaluation")}
        rows.append(report_row(manifest, check, validations.get(key)))
    _write_rows(rows, layout.report)
    # Dated just before its oldest input, so that Snakemake sees it as out of date and the
    # next run writes the complete report (a current date would make it look finished).
    mtimes = [os.stat(p).st_mtime for p in inputs if os.path.exists(p)]
    if mtimes:
        os.utime(layout.report, (min(mtimes) - 1, min(mtimes) - 1))
    return rows


def status_counts(rows: Iterable[dict]):
    """(counts per status, counts per language pair and status) of report rows, as pandas Series."""
    import pandas as pd

    table = pd.DataFrame(list(rows), columns=["status", "lang_pair"]).fillna("")
    table["lang_pair"] = table["lang_pair"].replace("", "(other)")
    return table["status"].value_counts().sort_index(), table.groupby(["lang_pair", "status"]).size()


def summarize(rows: Iterable[dict]) -> str:
    """Counts per status and per language pair, and the files that need a person."""
    rows = list(rows)
    if not rows:
        return "0 checkpoints: the glob matched nothing under input_root (check input_root and glob)"
    by_status, by_lang = status_counts(rows)
    lines = [f"{len(rows)} checkpoints: " + ", ".join(f"{n} {s}" for s, n in by_status.items())]
    for lang, counts in by_lang.groupby(level="lang_pair"):
        lines.append(f"  {lang}: " + ", ".join(f"{n} {status}" for (_, status), n in counts.items()))
    attention = [r for r in rows if r["status"] in NEEDS_A_PERSON]
    if attention:
        lines.append("needs a person:")
        lines += [f"  {r['status']}: {r['relative_path']}: {r['reason']}{_still_writing(r)}" for r in attention]
    return "\n".join(lines)


RECENT_WRITE_S = 15 * 60  # an unreadable file modified this recently is probably still being saved


def _still_writing(row: dict) -> str:
    import time

    try:
        age = time.time() - seconds_of_iso(row.get("mtime") or "")
    except ValueError:
        return ""
    not_a_file = "not a file" in row.get("reason", "")
    if row["status"] == "unreadable" and not not_a_file and 0 <= age < RECENT_WRITE_S:
        return f" (modified {age:.0f} s ago: probably still being written; the next run picks it up)"
    return ""


def read_report(report_path: str) -> list[dict]:
    """The rows of a report.csv; ValueError naming the file if it is damaged."""
    import pandas as pd

    require_regular_file(report_path)
    try:
        table = pd.read_csv(report_path, dtype=str, keep_default_na=False, encoding="utf-8")
        return table.to_dict("records")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{display_path(report_path)} is empty (not even a header); rerun the pipeline to write "
                         f"it again") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise ValueError(f"{display_path(report_path)} is damaged ({exc}); rerun the pipeline to write it "
                         f"again") from None
