"""What the Snakemake jobs do, one function per job (the workflow's scripts call these).

- :func:`write_manifest`: detection of one file -> ``manifests/<rel>.yaml`` (no torch).
- :func:`write_plan`: all manifests -> ``plan.tsv``, the files that need a conversion.
- :func:`run_conversion`: one small file -> ``converted/<rel>.pt`` (only if the check passes)
  and ``checks/<rel>.yaml`` (always: a failed check is a record, not a failed job).
- :func:`write_report`: manifests + check records -> ``report.csv``; :func:`summarize` the
  end-of-run summary; :func:`check_gate` the non-zero exit after a failed check;
  :func:`verify_outputs` the later re-verification of converted files.

Every output is written atomically; nothing is ever written under the input root.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import sys
from typing import Any, Iterable

import yaml

from . import __version__
from .atomic import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

PLAN_HEADER = ("relative_path", "status")
REPORT_COLUMNS = (
    "path", "relative_path", "lang_pair", "run", "step", "format", "variant", "reason", "num_layers",
    "model_dim", "num_heads", "vocab_size", "padded_vocab", "params", "size_bytes", "mtime", "status",
    "converted_path", "converted_sha256", "max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement",
    "kl", "loss_ref", "loss_converted", "check_passed", "tolerance", "check_device", "check_dtype", "direct_load_ok",
    "long_window_blocks", "window_source", "realpath",
)
NEEDS_A_PERSON = ("failed", "unknown", "unsafe", "unreadable")
_RUN_DIR = re.compile(r"^(?P<lang>.+?)_owt_run_(?P<run>[^/]+)$")


def job_logging(log_path: str) -> None:
    """Send this job's stderr and log records to its Snakemake log file."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    sys.stderr = open(log_path, "a", buffering=1, encoding="utf-8")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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


# libyaml's loader and dumper where PyYAML has them: the plan and report read every manifest,
# and the pure-Python loader takes ~9 s for a thousand of them.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def read_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_YAML_LOADER) or {}


def write_yaml(path: str, data: dict) -> None:
    atomic_write_text(path, yaml.dump(data, Dumper=_YAML_DUMPER, sort_keys=False, allow_unicode=True, width=120))


def job_environment() -> dict[str, str]:
    """Where this job ran: host, and the SLURM job, partition and GPUs when under SLURM."""
    import socket

    env = {"host": socket.gethostname()}
    for key, var in (("slurm_job_id", "SLURM_JOB_ID"), ("slurm_partition", "SLURM_JOB_PARTITION"),
                     ("cuda_visible_devices", "CUDA_VISIBLE_DEVICES")):
        if os.environ.get(var):
            env[key] = os.environ[var]
    return env


def write_manifest(src: str, relative_path: str, manifest_path: str) -> dict:
    """Detect the format of ``src`` and write its manifest; bad files give a manifest, not an error."""
    from .detect import detect

    record = detect(src)
    record = {"relative_path": relative_path, "detector_version": __version__, **record,
              "detected_on": job_environment()}
    write_yaml(manifest_path, record)
    log.info("%s: %s %s %s", relative_path, record["format"], record.get("variant", ""), record.get("reason", ""))
    return record


def write_plan(manifests: dict[str, str], plan_path: str) -> list[str]:
    """TSV of every checkpoint and its detection status; returns those to convert."""
    rows = [(rel, read_yaml(path).get("status", "unknown")) for rel, path in sorted(manifests.items())]
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(PLAN_HEADER)
    writer.writerows(rows)
    atomic_write_text(plan_path, buf.getvalue())
    return [rel for rel, status in rows if status == "to_convert"]


def read_plan(plan_path: str) -> list[tuple[str, str]]:
    with open(plan_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader, None)
        return [(row[0], row[1]) for row in reader if len(row) == 2]


def run_conversion(src: str, manifest_path: str, converted_path: str, check_path: str,
                   check_settings: dict[str, Any]) -> dict:
    """Convert + check one small checkpoint; always writes the check record, the .pt only on success."""
    from .check import CheckSettings
    from .detect import detect
    from .migrate import convert_file

    manifest = read_yaml(manifest_path)
    settings = CheckSettings(**check_settings)
    try:
        record = detect(src)  # the file may have changed since detection; decide on what is there now
        if (record.get("size_bytes"), record.get("mtime")) != (manifest.get("size_bytes"), manifest.get("mtime")):
            log.warning("%s changed since its manifest was written; converting what is there now", src)
        result = convert_file(src, converted_path, settings, record)
    except Exception as exc:  # one line in the record; the run goes on with the other checkpoints
        log.exception("conversion of %s failed", src)
        result = {"source": os.path.abspath(src), "status": "failed",
                  "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    if result["status"] != "converted" and os.path.exists(converted_path):
        # A previous good conversion of an older file must not stand for this one.
        os.unlink(converted_path)
    result = {"relative_path": manifest.get("relative_path", ""), **result, "converted_on": job_environment()}
    write_yaml(check_path, result)
    log.info("%s: %s %s", src, result["status"], result.get("reason", ""))
    return result


def lang_and_run(relative_path: str) -> tuple[str, str]:
    """``eng_spa_owt_run_3/best_state_800`` -> ("eng_spa", "3"); ("", "") when the folder is named otherwise."""
    folder = relative_path.replace(os.sep, "/").split("/")[0]
    match = _RUN_DIR.match(folder)
    return (match.group("lang"), match.group("run")) if match else ("", "")


def report_row(manifest: dict, check: dict | None) -> dict:
    """One report row from a manifest and, for small files, its check record."""
    rel = manifest.get("relative_path", "")
    lang, run = lang_and_run(rel)
    row = {key: manifest.get(key, "") for key in REPORT_COLUMNS}
    row.update(relative_path=rel, lang_pair=lang, run=run,
               direct_load_ok=(manifest.get("direct_load") or {}).get("ok", ""))
    status = manifest.get("status") or "unknown"
    if status == "to_convert":
        if check is None:
            status, row["reason"] = "failed", "conversion did not run (no check record)"
        else:
            status = check.get("status", "failed")
            row["reason"] = check.get("reason", "")
            for key in ("max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement", "kl", "loss_ref",
                        "loss_converted", "check_passed", "tolerance", "check_device", "check_dtype"):
                row[key] = check.get(key, "")
            if status == "converted":
                row["converted_path"] = check.get("converted_path", "")
                row["converted_sha256"] = check.get("sha256", "")
    row["status"] = status
    return row


def write_report(manifest_paths: list[str], check_paths: list[str], report_path: str) -> list[dict]:
    """``report.csv`` with one row per manifest, joined with check records on ``relative_path``."""
    checks = {c.get("relative_path"): c for c in map(read_yaml, check_paths)}
    manifests = sorted(map(read_yaml, manifest_paths), key=lambda m: m.get("relative_path", ""))
    rows = [report_row(m, checks.get(m.get("relative_path"))) for m in manifests]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(report_path, buf.getvalue())
    return rows


def summarize(rows: Iterable[dict]) -> str:
    """Counts per status and per language pair, and the files that need a person."""
    rows = list(rows)
    by_status: dict[str, int] = {}
    by_lang: dict[str, dict[str, int]] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        lang = by_lang.setdefault(row["lang_pair"] or "(other)", {})
        lang[row["status"]] = lang.get(row["status"], 0) + 1
    lines = [f"{len(rows)} checkpoints: " + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))]
    for lang, counts in sorted(by_lang.items()):
        lines.append(f"  {lang}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    attention = [r for r in rows if r["status"] in NEEDS_A_PERSON]
    if attention:
        lines.append("needs a person:")
        lines += [f"  {r['status']}: {r['relative_path']}: {r['reason']}{_still_writing(r)}" for r in attention]
    return "\n".join(lines)


RECENT_WRITE_S = 15 * 60  # an unreadable file modified this recently is probably still being saved


def _still_writing(row: dict) -> str:
    import time

    try:
        age = time.time() - float(row.get("mtime") or "nan")
    except ValueError:
        return ""
    if row["status"] == "unreadable" and 0 <= age < RECENT_WRITE_S:
        return f" (modified {age:.0f} s ago: probably still being written; the next run picks it up)"
    return ""


def read_report(report_path: str) -> list[dict]:
    with open(report_path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def verify_outputs(output_root: str, recheck: bool = False, settings: dict | None = None) -> tuple[int, list[str]]:
    """Re-verify every converted file under ``output_root`` against its check record.

    Returns (files verified, problems): a converted file that is missing, whose sha256 differs
    from the one recorded at write time, that has no record, or (with ``recheck``) whose logits
    no longer match its source's.
    """
    checks_dir = os.path.join(output_root, "checks")
    converted_dir = os.path.join(output_root, "converted")
    problems: list[str] = []
    recorded: set[str] = set()
    verified = 0
    for folder, _, files in os.walk(checks_dir):
        for name in sorted(files):
            if not name.endswith(".yaml") or name.startswith("."):
                continue
            record_path = os.path.join(folder, name)
            record = read_yaml(record_path)
            if record.get("status") != "converted":
                continue
            rel = os.path.relpath(record_path, checks_dir)[: -len(".yaml")] + ".pt"
            path = os.path.join(converted_dir, rel)
            recorded.add(os.path.normpath(path))
            if not os.path.exists(path):
                problems.append(f"missing: {path} (recorded in {record_path})")
                continue
            digest = sha256_file(path)
            if digest != record.get("sha256"):
                problems.append(f"changed: {path}: sha256 {digest[:16]}... != recorded {str(record.get('sha256'))[:16]}...")
                continue
            if recheck:
                from .check import CheckSettings
                from .migrate import check_file

                result = check_file(path, CheckSettings(**(settings or {})))
                if not result["check_passed"]:
                    problems.append(f"recheck failed: {path}: max |logit diff| {result['max_abs_logit_diff']:.3g}")
                    continue
            verified += 1
    for folder, _, files in os.walk(converted_dir):
        for name in files:
            path = os.path.normpath(os.path.join(folder, name))
            if name.endswith(".pt") and not name.startswith(".") and path not in recorded:
                problems.append(f"unrecorded: {path} has no converted check record")
    return verified, problems
