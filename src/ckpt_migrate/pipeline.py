"""What the workflow's jobs do, behind its one-call scripts: the run over the whole tree.

A run detects every new or changed file (each in a budgeted child, no torch, all in one job),
plans which small files to convert and in which batches, converts a batch in one process
writing each file's record the moment it is done, and reports every matched path, also after a
failed or killed job. Each job's inputs and outputs sit in one :class:`OutputLayout` under
``output_root``; every output is written atomically, and nothing is ever written under the input
root. A rerun reuses what still describes a file as it is now (its size, mtime, the code's
fingerprint, the run's settings) and redoes only the rest.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import stat
import sys
import time
from typing import Any, Iterable

import yaml

from . import __version__
from .atomic import atomic_write_text, open_log, sha256_file
from .detect import ManifestRecord
from .isolate import DEFAULT_MEMORY_MB, DEFAULT_SECONDS, detect_isolated, display_path
from .metrics import CHECK_FIELDS
from .safe_pickle import one_line

log = logging.getLogger(__name__)

# key: the checkpoint's wildcard value (its path, %-escaped, without .pt); batch: the conversion job
# a small file is in; source: its path as hex bytes (any file name survives the TSV).
PLAN_HEADER = ("key", "status", "batch", "source")
DEFAULT_CONVERSIONS_PER_JOB = 8


def batch_minutes(files: int) -> int:
    """The time a conversion job asks for: start-up, then a generous 5 minutes a file (one full-size
    file takes well under a minute on a GPU and a few on a CPU)."""
    return 10 + 5 * max(1, files)
REPORT_COLUMNS = (
    "path", "relative_path", "lang_pair", "run", "step", "format", "variant", "reason", "num_layers",
    "model_dim", "num_heads", "vocab_size", "padded_vocab", "params", "size_bytes", "mtime", "status",
    "converted_path", "converted_sha256", *CHECK_FIELDS, "direct_load_ok",
    "long_window_blocks", "window_source", "eot_token", "eot_token_source", "num_iterations", "num_iterations_source",
    "forward_source", "notes", "pickle_objects", "realpath",
)
NEEDS_A_PERSON = ("failed", "unknown", "unsafe", "unreadable")
_RUN_DIR = re.compile(r"^(?P<lang>.+?)_owt_run_(?P<run>[^/]+)$")


def job_logging(log_path: str) -> None:
    """Send this job's stderr and log records to its Snakemake log file."""
    sys.stderr = open_log(log_path, append=True)
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
    """A record this pipeline wrote; yaml.YAMLError if the file is damaged or holds no mapping."""
    try:
        with open(path, encoding="utf-8") as f:
            value = yaml.load(f, Loader=_YAML_LOADER) or {}
    except UnicodeDecodeError as exc:
        raise yaml.YAMLError(f"{display_path(path)} is not UTF-8 text ({exc.reason})") from None
    if not isinstance(value, dict):
        raise yaml.YAMLError(f"{display_path(path)} holds no record (a {type(value).__name__}, not a mapping)")
    return value


def _yaml_text(value: Any) -> Any:
    """Strings made encodable (a path's non-UTF-8 bytes become \\xNN), in nested dicts and lists."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_yaml_text(k): _yaml_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_text(v) for v in value]
    return value


def write_yaml(path: str, data: dict) -> None:
    atomic_write_text(path, yaml.dump(_yaml_text(data), Dumper=_YAML_DUMPER, sort_keys=False, allow_unicode=True,
                                      width=120))


def job_environment() -> dict[str, str]:
    """Where this job ran: host, and the SLURM job, partition and GPUs when under SLURM."""
    import socket

    env = {"host": socket.gethostname()}
    for key, var in (("slurm_job_id", "SLURM_JOB_ID"), ("slurm_partition", "SLURM_JOB_PARTITION"),
                     ("cuda_visible_devices", "CUDA_VISIBLE_DEVICES")):
        if os.environ.get(var):
            env[key] = os.environ[var]
    return env


class OutputLayout:
    """Where the pipeline writes each thing under ``output_root``, by checkpoint key (the one place
    the rules, ``verify-outputs`` and ``report`` take the layout from)."""

    def __init__(self, root: str):
        self.root = root
        self.manifests_dir = f"{root}/manifests"
        self.checks_dir = f"{root}/checks"
        self.converted_dir = f"{root}/converted"
        self.plan = f"{root}/plan.tsv"
        self.plan_log = self.job_log("plan")  # detection of every file happens in the plan job
        self.manifest_index = f"{self.manifests_dir}/.index.json"  # the plan's record of what each manifest describes
        self.report = f"{root}/report.csv"
        self.report_index = f"{root}/.report_index.json"  # the rows of report.csv and what each was read from
        self.report_ok = f"{root}/report.ok"  # the gate's flag: written only when no check failed (or that is allowed)
        # The HTML report's figures and tables (plots.write_report_figures takes them by these names).
        self.figures = {"logit": f"{root}/figures/logit_check.png",
                        "status": f"{root}/figures/status_by_lang_pair.png",
                        "table": f"{root}/figures/report_table.html",
                        "attention": f"{root}/figures/needs_attention.html"}

    def job_log(self, job: str) -> str:
        """The log of a job that runs once per run (plan, report, figures, gate)."""
        return f"{self.root}/logs/{job}.log"

    def benchmark(self, job: str) -> str:
        """Snakemake's benchmark table of a job (``job`` may hold a wildcard: ``convert/{ckpt}``)."""
        return f"{self.root}/benchmarks/{job}.tsv"

    def manifest(self, key: str) -> str:
        return f"{self.manifests_dir}/{key}.yaml"

    def check(self, key: str) -> str:
        return f"{self.checks_dir}/{key}.yaml"

    def converted(self, key: str) -> str:
        return f"{self.converted_dir}/{key}.pt"

    def attempt(self, key: str) -> str:
        """Written when a conversion starts: where it runs (the SLURM job), for a report after a kill."""
        return f"{self.root}/attempts/{key}.yaml"

    def log(self, rule: str, key: str) -> str:
        return f"{self.root}/logs/{rule}/{key}.log"

    def batch(self, batch_id: str) -> str:
        """The summary a conversion job writes when every file of its batch has its record."""
        return f"{self.root}/batches/{batch_id}.yaml"

    def batch_log(self, batch_id: str) -> str:
        return f"{self.root}/logs/convert_batch/{batch_id}.log"

    def staged(self, key: str) -> str:
        """A file's check record as its conversion job writes it, the moment that file is done
        (the per-file ``convert`` rule publishes it as ``check(key)``)."""
        return f"{self.root}/staged/{key}.yaml"

    def staged_log(self, key: str) -> str:
        return f"{self.root}/staged/{key}.log"


# The folders under output_root that the pipeline writes into (OutputLayout's paths live in them).
OUTPUT_FOLDERS = ("manifests", "checks", "converted", "staged", "attempts", "batches", "logs", "figures",
                  "benchmarks")


def placement_problem(input_root: str, output_root: str, sources: Iterable[str] = ()) -> str:
    """Why writing to ``output_root`` could write into the tree at ``input_root`` ("" if it cannot):
    output_root inside the tree, the tree inside one of the folders the pipeline writes (a
    converted file's path mirrors its source's), a link into the tree among or below those
    folders, or a hard link to one of ``sources`` (the matched checkpoints) anywhere there.
    Links are resolved: the real places count."""
    tree, out = os.path.realpath(os.path.expanduser(input_root)), os.path.realpath(os.path.expanduser(output_root))
    if os.path.commonpath([out, tree]) == tree:
        return (f"output_root {out} is inside input_root {tree}: the checkpoint tree is only ever read "
                f"(set output_root elsewhere)")
    for name in OUTPUT_FOLDERS:
        folder = os.path.realpath(os.path.join(out, name))  # a folder there may be a link elsewhere
        if os.path.commonpath([tree, folder]) == folder:
            return (f"input_root {tree} is inside {folder}, where the pipeline writes: "
                    f"its outputs could land on the checkpoints (set output_root elsewhere)")
    return _link_into_tree(tree, out, _file_ids(sources))


def _file_ids(paths: Iterable[str]) -> dict[tuple[int, int], str]:
    """(device, inode) -> path of every regular file among ``paths`` (in this one process, the
    device number is a fair name for the filesystem)."""
    ids = {}
    for path in paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            ids[(st.st_dev, st.st_ino)] = path
    return ids


def _link_into_tree(tree: str, out: str, tree_files: dict[tuple[int, int], str]) -> str:
    """The first link into the tree that is one of the written folders (``converted`` made a link
    to the tree) or lies below one (``converted/<run>`` → a run directory, planted after a first
    run): what is written through it would land in the tree. The pipeline makes no links, so
    every one found is someone's."""
    def into_tree(path: str) -> bool:
        return os.path.commonpath([tree, os.path.realpath(path)]) == tree

    with contextlib.suppress(OSError):  # the files at the top (plan.tsv, report.csv, ...)
        for entry in os.scandir(out):
            problem = _entry_problem(entry, tree, tree_files, into_tree)
            if problem:
                return problem
    pending = []
    for name in OUTPUT_FOLDERS:
        top = os.path.join(out, name)  # may be a link elsewhere (a bigger disk): then walked there
        if os.path.islink(top) and into_tree(top):
            return _link_problem(top, tree)
        pending.append(top)
    benchmarks = os.path.join(out, "benchmarks")
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not there (yet), or not a folder: nothing below it
            continue
        for entry in entries:  # links below the top are checked, not followed
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
                continue
            problem = _entry_problem(entry, tree, tree_files, into_tree)
            if not problem and os.path.commonpath([benchmarks, folder]) == benchmarks:
                problem = _benchmark_link_problem(entry)
            if problem:
                return problem
    return ""


def _benchmark_link_problem(entry: os.DirEntry) -> str:
    """Snakemake writes its benchmark tables itself, through whatever link is there: any link
    among them is named (the pipeline's own files replace a link instead)."""
    with contextlib.suppress(OSError):
        if entry.is_symlink() or entry.stat(follow_symlinks=False).st_nlink > 1:
            return (f"{display_path(entry.path)} is a link (Snakemake would write its benchmark into the file "
                    f"it names): remove it")
    return ""


def _entry_problem(entry: os.DirEntry, tree: str, tree_files: dict[tuple[int, int], str], into_tree) -> str:
    """A symlink into the tree, or a hard link to a checkpoint of it (a file written there would
    be written into that checkpoint)."""
    if entry.is_symlink():
        return _link_problem(entry.path, tree) if into_tree(entry.path) else ""
    with contextlib.suppress(OSError):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in tree_files:
            return (f"{display_path(entry.path)} is a hard link to {display_path(tree_files[(st.st_dev, st.st_ino)])}: "
                    f"the pipeline writes there, and the checkpoint tree is only ever read (remove the link)")
    return ""


def _link_problem(link: str, tree: str) -> str:
    return (f"{display_path(link)} is a link into input_root {tree}: the pipeline writes there, "
            f"and the checkpoint tree is only ever read (remove the link)")


def glob_problem(pattern: str) -> str:
    """Why ``pattern`` could match outside input_root ("" if it cannot): absolute, or with a ``..``."""
    if os.path.isabs(pattern) or pattern.startswith("~"):
        return f"glob {pattern!r} must be relative to input_root (set input_root to the folder it starts from)"
    if ".." in pattern.replace(os.sep, "/").split("/"):
        return f"glob {pattern!r} climbs out of input_root with '..' (set input_root higher instead)"
    return ""


def checkpoint_key(relative_path: str) -> str:
    """Wildcard value of a checkpoint: its path under input_root without the .pt suffix.

    Characters Snakemake cannot carry in a wildcard or a file name it writes are %-escaped:
    braces (its pattern syntax), %, control characters such as a newline, and bytes that are
    not UTF-8. A folder or file name too long to carry a .yaml or temporary suffix is shortened
    with a hash, so every path the glob finds gets a key (and a row)."""
    stem = relative_path[:-3] if relative_path.endswith(".pt") else relative_path
    escaped = "".join(
        f"%{ord(ch) - 0xDC00:02X}" if 0xDC80 <= ord(ch) <= 0xDCFF
        else f"%{ord(ch):02X}" if ch in "%{}" or ord(ch) < 32 or ord(ch) == 127
        else ch
        for ch in stem
    )
    parts = []
    for part in escaped.split("/"):
        if len(os.fsencode(part)) > 180:
            digest = hashlib.sha256(os.fsencode(part)).hexdigest()[:16]
            part = f'{os.fsencode(part)[:120].decode("utf-8", "ignore")}~{digest}'
        parts.append(part)
    return "/".join(parts)


def checkpoint_sources(input_root: str, pattern: str) -> dict[str, str]:
    """{key: path} for every match of ``pattern`` under ``input_root``, files or not; two paths
    whose keys coincide (``x.pt`` and ``x``) both keep a row."""
    import glob

    problem = glob_problem(pattern)
    if problem:
        raise ValueError(problem)
    keyed: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(input_root), pattern))):
        key = checkpoint_key(os.path.relpath(path, input_root))
        if key in keyed:
            key = f"{key}~{hashlib.sha256(os.fsencode(path)).hexdigest()[:12]}"
        keyed[key] = path
    return keyed


def write_manifest(src: str, relative_path: str, manifest_path: str, seconds: float = DEFAULT_SECONDS,
                   memory_mb: int = DEFAULT_MEMORY_MB, overrides: dict | None = None,
                   not_read_because: str = "") -> ManifestRecord:
    """Detect the format of ``src`` (in a child, within budget) and write its manifest; with
    ``not_read_because``, the file is not opened and is unreadable for that reason.

    Bad files give a manifest, not an error; the record holds only plain values (it went
    through JSON), so it always serializes."""
    from .fingerprint import detector_fingerprint

    identity = file_identity(src)  # before reading: a file replaced meanwhile is detected again
    if not not_read_because and identity is not None and identity["mtime_ns"] > time.time_ns() + FUTURE_SLACK_NS:
        not_read_because = (f"modified in the future ({iso_utc(identity['mtime_ns'] / 1e9)}; the clock of whatever "
                            f"wrote it is ahead): Snakemake cannot order it; fix the time (touch the file) and rerun")
    if not_read_because:
        from .detect import record_from_inspection
        from .safe_pickle import ArchiveInspection

        record = record_from_inspection(src, ArchiveInspection("unreadable", not_read_because), overrides)
    else:
        record = detect_isolated(src, seconds, memory_mb, overrides)
    record = {**record, "source_identity": identity, "not_read_because": not_read_because, "relative_path": display_path(relative_path), "detector_version": __version__,
              "detector_fingerprint": detector_fingerprint(), "overrides": dict(overrides or {}),
              "detected_on": job_environment()}
    write_yaml(manifest_path, record)
    log.info("%s: %s %s %s", display_path(relative_path), record["format"], record.get("variant", ""),
             record.get("reason", ""))
    return record


def link_outside(path: str, input_root: str) -> str:
    """Why ``path`` is not read: it resolves outside ``input_root`` through a symlink ("" if not)."""
    tree, real = os.path.realpath(input_root), os.path.realpath(path)
    if os.path.commonpath([tree, real]) == tree:
        return ""
    return (f"a link to {display_path(real)}, outside input_root: not read (set follow_links: true to read "
            f"links that leave the tree)")


def _still_current(manifest_path: str, identity: dict) -> ManifestRecord | None:
    """The manifest, if it describes the file as ``identity`` says it is now (file identity, detector, overrides)."""
    try:
        record = read_yaml(manifest_path)
    except (OSError, yaml.YAMLError):
        return None
    recorded = {"file": record.get("source_identity"), "detector": record.get("detector_fingerprint"),
                "overrides": record.get("overrides"), "outside": record.get("not_read_because")}
    return record if all(recorded[k] == identity[k] for k in recorded) else None


# A file modified further ahead than this is "in the future" (Snakemake refuses to order it).
FUTURE_SLACK_NS = 2 * 10**9


def file_identity(path: str) -> dict | None:
    """What tells a file from a replacement: size, mtime, ctime and inode; None if it cannot be
    stat'ed. ``mv``, ``cp -p``, ``rsync -a`` and ``touch -r`` keep size and mtime, never the
    ctime of the file they leave (nor, but for ``mv`` and ``touch``, its inode). Not the device
    number: a shared filesystem shows other ones on other login nodes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def source_identities(sources: dict[str, str]) -> dict[str, list]:
    """{key: identity as a list} for the plan's params: Snakemake reruns the plan when any
    changes, whether or not a file's mtime is newer than the plan's."""
    return {key: list((file_identity(path) or {}).values()) for key, path in sources.items()}


def is_from_the_future(path: str) -> bool:
    identity = file_identity(path)
    return identity is not None and identity["mtime_ns"] > time.time_ns() + FUTURE_SLACK_NS


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _read_index(path: str) -> dict:
    """The plan's index of manifests (file identity, detector, overrides, status), or {} if unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        return {}


def detect_and_plan(sources: dict[str, str], relative_paths: dict[str, str], layout: OutputLayout,
                    seconds: float = DEFAULT_SECONDS, memory_mb: int = DEFAULT_MEMORY_MB,
                    overrides: dict | None = None,
                    conversions_per_job: int = DEFAULT_CONVERSIONS_PER_JOB,
                    outside: dict[str, str] | None = None) -> list[str]:
    """Detect every checkpoint whose manifest is missing or stale, in this one process, and write the plan.

    A manifest is reused when its file's identity (:func:`file_identity`), the detector and
    the overrides are unchanged, so a rerun detects only what is new or changed. Each small file is put in a
    conversion batch: the one it was in if the file is unchanged (so its finished conversion
    stands), else a new batch of up to ``conversions_per_job`` new, changed or unrecorded files.
    A match in ``outside`` (key -> why: it resolves outside input_root) is never opened.
    Returns the keys to convert."""
    from .fingerprint import detector_fingerprint

    overrides = dict(overrides or {})
    detector = detector_fingerprint()
    index = _read_index(layout.manifest_index)
    new_index: dict[str, dict] = {}
    rows, detected, t0 = [], 0, time.perf_counter()
    unbatched: list[str] = []
    for key in sorted(sources):
        manifest_path = layout.manifest(key)
        not_read = (outside or {}).get(key, "")
        identity = {"file": file_identity(sources[key]), "detector": detector, "overrides": overrides,
                    "outside": not_read, "manifest_ns": _mtime_ns(manifest_path)}
        entry = index.get(key) or {}
        if entry.get("manifest_ns") is not None and {k: entry.get(k) for k in identity} == identity:
            status = entry["status"]  # unchanged file and manifest: not even the YAML is read
        else:
            record = _still_current(manifest_path, identity)
            if record is None:
                record = write_manifest(sources[key], relative_paths[key], manifest_path, seconds, memory_mb, overrides,
                                        not_read)
                detected += 1
            status = record.get("status", "unknown")
            identity["manifest_ns"] = _mtime_ns(manifest_path)
        new_index[key] = {**identity, "status": status}
        if status == "to_convert":
            # A file keeps its batch while it is unchanged and its record is there; one whose
            # record was deleted (to retry it) or never written gets a new batch.
            same_file = entry.get("file") == identity["file"]
            if same_file and entry.get("batch") and os.path.exists(layout.check(key)):
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
            [[key, new_index[key]["file"], _mtime_ns(layout.staged(key))]
             for key in members]).encode()).hexdigest()[:12]
        for key in members:
            new_index[key]["batch"] = batch_id
    atomic_write_text(layout.manifest_index, json.dumps(new_index))
    log.info("detected %d file(s), reused %d manifest(s) in %.1f s; %d new or changed file(s) to convert",
             detected, len(rows) - detected, time.perf_counter() - t0, len(unbatched))
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(PLAN_HEADER)
    for key in rows:
        entry = new_index[key]
        source = os.fsencode(os.path.abspath(sources[key])).hex() if entry.get("batch") else ""
        writer.writerow((key, entry["status"], entry.get("batch", ""), source))
    atomic_write_text(layout.plan, buf.getvalue())
    return [key for key in rows if new_index[key]["status"] == "to_convert"]


def read_plan(plan_path: str) -> list[tuple[str, str]]:
    """(key, status) of every checkpoint in the plan."""
    return [(row["key"], row["status"]) for row in _plan_rows(plan_path)]


def read_batches(plan_path: str) -> dict[str, dict[str, str]]:
    """{batch id: {key: source path}} of the small files the plan says to convert."""
    batches: dict[str, dict[str, str]] = {}
    for row in _plan_rows(plan_path):
        if row["batch"]:
            batches.setdefault(row["batch"], {})[row["key"]] = os.fsdecode(bytes.fromhex(row["source"]))
    return batches


def _plan_rows(plan_path: str) -> list[dict[str, str]]:
    with open(plan_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader, None)
        return [dict(zip(PLAN_HEADER, row)) for row in reader if len(row) == len(PLAN_HEADER)]


def run_conversion(src: str, manifest_path: str, converted_path: str, check_path: str,
                   check_settings: dict[str, Any], attempt_path: str | None = None,
                   overrides: dict | None = None, log_path: str | None = None, attempts: int = 1) -> dict:
    """Convert + check one small checkpoint; always writes the check record, the .pt only on success.

    ``attempt_path`` records where the conversion runs before it starts, so that a job killed
    from outside (SLURM's memory or time limit, scancel) can still be named in the report. The
    record says which file (size, mtime), converter, check settings and overrides it is for, so
    that a later run can tell whether it still stands (:func:`standing_conversion`)."""
    import time

    # Recorded before torch is even imported: a job killed for memory may not get further.
    if attempt_path:
        write_yaml(attempt_path, {**job_environment(), "pid": os.getpid(), "started": time.time(),
                                  "log": log_path or "", "attempts": attempts})
    from .check import CheckSettings
    from .fingerprint import converter_fingerprint
    from .conversion import convert_file

    manifest = read_yaml(manifest_path)
    settings = CheckSettings(**check_settings)
    identity = file_identity(src)
    changed = _changed_since_detection(manifest, src)
    failed = {"source": os.path.abspath(src), "status": "failed", "converter_fingerprint": converter_fingerprint()}
    if changed:
        # Its manifest (format, shapes, step: the report's row) describes other bytes; the next
        # run's plan detects the file again and gives it a new batch.
        result = {**failed, "reason": f"the file changed after the plan detected it ({changed}); "
                                      f"the next run detects and converts it again"}
    else:
        try:
            # convert_file reads the file as it is now (one read for the record and the tensors).
            result = convert_file(src, converted_path, settings, overrides)
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


def _changed_since_detection(manifest: dict, src: str) -> str:
    """How the file differs from what its manifest was detected from (:func:`file_identity`);
    "" if it does not, or if it cannot be read now (the conversion says why)."""
    return identity_change(manifest.get("source_identity"), file_identity(src))


def identity_change(before: dict | None, now: dict | None) -> str:
    """What differs between two :func:`file_identity` values, in words; "" if nothing (or if
    the file cannot be stat'ed now: its reader says why)."""
    if now is None or before == now:
        return ""
    before = before or {}
    if before.get("size") != now["size"]:
        return f"{before.get('size')} -> {now['size']} bytes"
    if before.get("mtime_ns") != now["mtime_ns"]:
        return f"modified {iso_utc(now['mtime_ns'] / 1e9)}"
    return "replaced or rewritten with its size and mtime kept (another inode or ctime)"


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
    identity = file_identity(src)
    stands = (identity is not None and record.get("source_identity") == identity
              and record.get("converter_fingerprint") == converter_fingerprint()
              and record.get("check_settings") == dict(check_settings)
              and record.get("overrides") == dict(overrides or {})
              and record.get("status") == "converted" and os.path.isfile(converted_path))
    return record if stands else None


def run_batch(layout: OutputLayout, batch_id: str, check_settings: dict[str, Any], overrides: dict | None,
              summary_path: str) -> dict:
    """One conversion job: every small file of a batch, one after another in this one process.

    Python, torch and (on a GPU) CUDA start once for the batch. Each file's record and log are
    written the moment that file is done (``staged/``), so a job killed part way keeps what it
    finished and the report names the file it was on; a file that fails is a record, not a
    failed job. A file whose conversion from an earlier run still stands is not converted again."""
    import time

    from .heap import return_freed_memory

    t0 = time.perf_counter()
    members = read_batches(layout.plan).get(batch_id)
    if members is None:
        raise ValueError(f"batch {batch_id} is not in the plan {layout.plan}; rerun the workflow")
    summary: dict[str, Any] = {"batch": batch_id, **job_environment(), "pid": os.getpid(), "files": []}
    # A file whose conversion was killed before (memory, time limit, a crash in torch) goes last,
    # so that it cannot keep the others of its batch from being converted run after run.
    kills = {key: killed_attempts(layout, key) for key in members}
    for key in sorted(members, key=lambda k: kills[k] > 0):
        src, staged, converted = members[key], layout.staged(key), layout.converted(key)
        started, started_at = time.perf_counter(), time.time()
        if standing_conversion(staged, src, converted, check_settings, overrides) is not None:
            log.info("%s: its conversion from an earlier run stands", display_path(src))
            summary["files"].append({"key": key, "status": "converted", "reused": True,
                                     "started": round(started_at, 3), "seconds": 0.0})
            continue
        if kills[key] >= MAX_KILLED_ATTEMPTS:
            _given_up(layout, key, src, kills[key])
            summary["files"].append({"key": key, "status": "failed", "reused": False,
                                     "started": round(started_at, 3), "seconds": 0.0})
            continue
        handler = _file_log(layout.staged_log(key))
        try:
            log.info("batch %s, file %d of %d: %s", batch_id, len(summary["files"]) + 1, len(members),
                     display_path(src))
            record = run_conversion(src, layout.manifest(key), converted, staged, check_settings,
                                    layout.attempt(key), overrides, layout.staged_log(key), kills[key] + 1)
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


MAX_KILLED_ATTEMPTS = 2  # a file whose conversion was killed this often in a row is a failed record


def killed_attempts(layout: OutputLayout, key: str) -> int:
    """How many conversions of this file in a row started and never wrote its record: each was
    killed from outside (memory or time limit, a crash), since a failure in Python is a record."""
    attempt_ns = _mtime_ns(layout.attempt(key))
    staged_ns = _mtime_ns(layout.staged(key))
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
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def lang_and_run(relative_path: str) -> tuple[str, str]:
    """``eng_spa_owt_run_3/best_state_800`` -> ("eng_spa", "3"); ("", "") when the folder is named otherwise."""
    folder = relative_path.replace(os.sep, "/").split("/")[0]
    match = _RUN_DIR.match(folder)
    return (match.group("lang"), match.group("run")) if match else ("", "")


def iso_utc(seconds: Any) -> str:
    """Seconds since 1970 as ISO 8601 UTC (``2026-11-28T01:14:55+00:00``); "" when unknown."""
    from datetime import datetime, timezone

    try:
        return datetime.fromtimestamp(float(seconds), timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def _seconds(text: str) -> float:
    """A report time back to seconds since 1970 (ISO 8601, or the old float form)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return float(text or "nan")


def report_row(manifest: ManifestRecord, check: dict | None) -> dict:
    """One report row from a manifest and, for small files, its check record."""
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
    row["status"] = status
    return row


def write_report(layout: OutputLayout) -> list[dict]:
    """``report.csv``: one row per checkpoint in the plan, from its manifest and, for small files, its check record.

    A row whose manifest and check record are the very files (same size, mtime and inode) it was made
    from last time is taken from the report's own index instead of reading them again: with
    10,000 files, reading every manifest is most of a rerun's time."""
    from .fingerprint import report_fingerprint

    version = report_fingerprint()  # rows made by other report code are made again
    index = _read_index(layout.report_index)
    index = index.get("rows", {}) if index.get("version") == version else {}
    new_index: dict[str, dict] = {}
    rows = []
    for key, status in read_plan(layout.plan):
        manifest_path, check_path = layout.manifest(key), layout.check(key)
        stamp = [file_identity(manifest_path), file_identity(check_path) if status == "to_convert" else None]
        entry = index.get(key)
        if entry is not None and entry.get("stamp") == stamp and stamp[0] is not None:
            row = entry["row"]
        else:
            manifest = read_yaml(manifest_path)
            check = read_yaml(check_path) if stamp[1] is not None else None
            row = report_row(manifest, check)
        new_index[key] = {"stamp": stamp, "row": row}
        rows.append(row)
    rows.sort(key=lambda r: r["relative_path"])
    _write_rows(rows, layout.report)
    atomic_write_text(layout.report_index, json.dumps({"version": version, "rows": new_index}))
    return rows


def _write_rows(rows: list[dict], report_path: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)
    atomic_write_text(report_path, buf.getvalue())


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
    for key, rel in sorted(relative_paths.items(), key=lambda kv: kv[1]):
        manifest_path, check_path = layout.manifest(key), layout.check(key)
        inputs += [manifest_path, check_path, layout.staged(key)]
        if os.path.exists(manifest_path):
            manifest = read_yaml(manifest_path)
        else:
            manifest = {"relative_path": display_path(rel), "status": "failed", "format": "",
                        "reason": f"detection did not finish (log: {layout.plan_log})"}
        check = None
        if manifest.get("status") == "to_convert":
            # A file its conversion job finished before the failure has its record in staged/.
            staged = layout.staged(key)
            newest = max((p for p in (check_path, staged) if os.path.exists(p)), key=_mtime_ns, default=None)
            check = read_yaml(newest) if newest else {
                "status": "failed", "reason": unfinished_conversion_reason(layout, key)}
        rows.append(report_row(manifest, check))
    _write_rows(rows, layout.report)
    # Dated just before its oldest input, so that Snakemake sees it as out of date and the
    # next run writes the complete report (a current date would make it look finished).
    mtimes = [os.stat(p).st_mtime for p in inputs if os.path.exists(p)]
    if mtimes:
        os.utime(layout.report, (min(mtimes) - 1, min(mtimes) - 1))
    return rows


def unfinished_conversion_reason(layout: OutputLayout, key: str) -> str:
    """Why a planned conversion has no check record: its job was killed (and how), or never ran."""
    attempt_path = layout.attempt(key)
    if not os.path.exists(attempt_path):
        return "conversion did not run (the run stopped before it; the next run does it)"
    attempt = read_yaml(attempt_path)
    where = f"on {attempt.get('host', '?')}"
    job_id = str(attempt.get("slurm_job_id") or "")
    state = slurm_job_state(job_id) if job_id else ""
    if job_id:
        where += f" in SLURM job {job_id}" + (f" ({state})" if state else "")
    log_path = attempt.get("log") or layout.staged_log(key)
    return one_line(f"conversion started {where} but did not finish; log: {log_path}", 300)


# What a SLURM job's own log says when SLURM or the kernel stopped it.
_SLURM_LOG_SIGNS = (("Exceeded job memory limit", "exceeded its memory limit"), ("oom-kill", "killed for memory (OOM)"),
                    ("DUE TO TIME LIMIT", "hit its time limit"), ("DUE TO NODE FAILURE", "node failure"),
                    ("CANCELLED AT", "cancelled"))


def slurm_job_state(job_id: str) -> str:
    """A finished SLURM job's state (e.g. "OUT_OF_MEMORY", "CANCELLED") and what its log says, or "".

    sacct where the cluster keeps accounting; else scontrol, which knows a job for MinJobAge."""
    import subprocess

    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        return ""
    state, log_path = "", ""
    for cmd in (["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"],
                ["scontrol", "-o", "show", "job", job_id]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if cmd[0] == "sacct":
            if out.strip():
                job_state, _, code = out.strip().splitlines()[0].partition("|")
                state = f"{job_state.strip()}, exit code {code.strip()}"
            continue
        fields = dict(item.partition("=")[::2] for item in out.split() if "=" in item)
        log_path = fields.get("StdOut", "")
        if fields.get("JobState") and not state:
            reason = fields.get("Reason", "None")
            state = (fields["JobState"] + (f", reason {reason}" if reason not in ("None", "") else "")
                     + f", exit code {fields.get('ExitCode', '?')}")
    return "; ".join(part for part in (state, _slurm_log_says(log_path)) if part)


def _slurm_log_says(path: str) -> str:
    """What the job's log says stopped it (SLURM writes these lines itself), or ""."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 65536))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return ", ".join(meaning for sign, meaning in _SLURM_LOG_SIGNS if sign in tail)


def summarize(rows: Iterable[dict]) -> str:
    """Counts per status and per language pair, and the files that need a person."""
    rows = list(rows)
    by_status: dict[str, int] = {}
    by_lang: dict[str, dict[str, int]] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        lang = by_lang.setdefault(row["lang_pair"] or "(other)", {})
        lang[row["status"]] = lang.get(row["status"], 0) + 1
    if not rows:
        return "0 checkpoints: the glob matched nothing under input_root (check input_root and glob)"
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
        age = time.time() - _seconds(row.get("mtime") or "")
    except ValueError:
        return ""
    not_a_file = "not a file" in row.get("reason", "")
    if row["status"] == "unreadable" and not not_a_file and 0 <= age < RECENT_WRITE_S:
        return f" (modified {age:.0f} s ago: probably still being written; the next run picks it up)"
    return ""


def read_report(report_path: str) -> list[dict]:
    """The rows of a report.csv; ValueError naming the file if it is damaged."""
    try:
        with open(report_path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{display_path(report_path)} is damaged ({exc}); rerun the pipeline to write it "
                         f"again") from None


def verify_outputs(output_root: str, recheck: bool = False, settings: dict | None = None) -> tuple[int, list[str]]:
    """Re-verify every converted file under ``output_root`` against its check record.

    Returns (files verified, problems): a converted file that is missing, whose sha256 differs
    from the one recorded at write time, that has no record, or (with ``recheck``) whose logits
    no longer match its source's.
    """
    from .fingerprint import converter_fingerprint

    current = converter_fingerprint()
    layout = OutputLayout(output_root)
    checks_dir, converted_dir = layout.checks_dir, layout.converted_dir
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
                problems.append(f"missing: {path} (recorded in {record_path}; delete that record and "
                                f"rerun with --forcerun plan to convert it again)")
                continue
            digest = sha256_file(path)
            if digest != record.get("sha256"):
                problems.append(f"changed: {path}: sha256 {digest[:16]}... != recorded {str(record.get('sha256'))[:16]}... "
                                f"(delete {record_path} and rerun with --forcerun plan to convert it again)")
                continue
            source = (os.fsdecode(bytes.fromhex(record["source_path_hex"])) if record.get("source_path_hex")
                      else str(record.get("source", "")))
            change = identity_change(record.get("source_identity"), file_identity(source))
            if change:
                problems.append(f"source changed: {display_path(source)} no longer matches {path} ({change}; "
                                f"rerun the pipeline to convert it again)")
                continue
            if record.get("converter_fingerprint") != current:
                problems.append(f"outdated: {path} was made by converter {record.get('converter_fingerprint') or '?'}, "
                                f"this one is {current} (rerun the pipeline to reconvert)")
                continue
            if recheck:
                from .check_settings import CheckSettings
                from .conversion import CheckpointError, check_file
                from .convert import ConversionError

                # The source is the one our own record names, not a path read from the converted file.
                try:
                    result = check_file(path, CheckSettings(**(settings or {})), source=source)
                except (CheckpointError, ConversionError) as exc:  # a weight now non-finite, say
                    problems.append(f"recheck failed: {path}: {exc}")
                    continue
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
