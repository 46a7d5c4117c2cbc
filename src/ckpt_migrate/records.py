"""Records and facts the pipeline's steps share: YAML records, job logging, file identity and
times.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


from .atomic import atomic_write_text, open_log
from .isolate import display_path
from .identity import file_identity

log = logging.getLogger(__name__)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # every log this package writes


def job_logging(log_path: str) -> None:
    """Send this job's stderr and log records to its Snakemake log file."""
    sys.stderr = open_log(log_path, append=True)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True,
                        format=LOG_FORMAT)


# libyaml's loader and dumper where PyYAML has them: the plan and report read every manifest,
# and the pure-Python loader takes ~9 s for a thousand of them.
def _yaml_loader():
    import yaml  # here: a login-node command that only logs need not load it

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml_dumper():
    import yaml

    return getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def require_regular_file(path: str) -> None:
    """Raise OSError naming ``path`` unless it is a regular file (after links): opening a FIFO
    waits for a writer that never comes, and a device is no record."""
    import stat

    mode = os.stat(path).st_mode  # FileNotFoundError names the path
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise OSError(f"{display_path(path)} is {kind}, not a file: not read")


def yaml_problem(exc: Exception) -> str:
    """Where a YAML parser stopped, without its words: they quote the file (a tag, a line)."""
    mark = getattr(exc, "problem_mark", None)
    return f"not valid YAML (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "not valid YAML"


def read_yaml(path: str) -> dict:
    """A record this pipeline wrote; yaml.YAMLError if the file is damaged or holds no mapping,
    OSError if it is not there, not a regular file, or a link (the pipeline writes every record
    as a file of its own: a symlink or hard link there is someone else's file)."""
    import stat
    import yaml

    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1):
        raise OSError(f"{display_path(path)} is a link, not a record this pipeline wrote: not read")
    if not stat.S_ISREG(st.st_mode):
        require_regular_file(path)  # raises, naming what is there
    try:
        with open(path, encoding="utf-8") as f:
            value = yaml.load(f, Loader=_yaml_loader()) or {}
    except UnicodeDecodeError as exc:
        raise yaml.YAMLError(f"{display_path(path)} is not UTF-8 text ({exc.reason})") from None
    except yaml.YAMLError as exc:
        raise yaml.YAMLError(f"{display_path(path)} is {yaml_problem(exc)}") from None
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
    import yaml

    atomic_write_text(path, yaml.dump(_yaml_text(data), Dumper=_yaml_dumper(), sort_keys=False, allow_unicode=True,
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


# A file modified further ahead than this is "in the future" (Snakemake refuses to order it).
FUTURE_SLACK_NS = 2 * 10**9


def source_identities(sources: dict[str, str]) -> dict[str, list]:
    """{key: identity as a list} for the plan's params: Snakemake reruns the plan when any
    changes, whether or not a file's mtime is newer than the plan's."""
    return {key: list((file_identity(path) or {}).values()) for key, path in sources.items()}


def is_from_the_future(path: str) -> bool:
    identity = file_identity(path)
    return identity is not None and identity["mtime_ns"] > time.time_ns() + FUTURE_SLACK_NS


def mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def read_index(path: str) -> dict:
    """The plan's index of manifests (file identity, detector, overrides, status), or {} if unusable."""
    try:
        require_regular_file(path)
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        return {}


def seconds_of_iso(text: str) -> float:
    """A report time back to seconds since 1970 (ISO 8601, or the old float form)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return float(text or "nan")
