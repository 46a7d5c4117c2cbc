"""Records and facts the pipeline's steps share: YAML records, job logging, file identity and
times.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
from typing import Any


from .atomic import atomic_write_text, open_log
from .isolate import display_path

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


def read_yaml(path: str) -> dict:
    """A record this pipeline wrote; yaml.YAMLError if the file is damaged or holds no mapping."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            value = yaml.load(f, Loader=_yaml_loader()) or {}
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


TAIL_BYTES = 1 << 16  # a torch.save zip's central directory (every entry's CRC-32) lies in its last bytes


def file_identity(path: str, with_content: bool = False) -> dict | None:
    """What tells a file from a replacement: size, mtime, ctime and inode (and, ``with_content``,
    a hash of its last 64 KiB); None if it cannot be stat'ed or read.

    ``mv``, ``cp -p``, ``rsync -a`` and ``touch -r`` keep size and mtime, never the ctime of the
    file they leave (nor, but for ``mv`` and ``touch``, its inode). ctime also moves on a chmod
    or chown, which changes no byte: then the tail hash, which holds the zip's CRC of every
    entry, decides (:func:`identity_change`). Not the device number: a shared filesystem shows
    other ones on other login nodes."""
    try:
        st = os.stat(path)
        identity = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}
        if with_content and stat.S_ISREG(st.st_mode):  # never open a FIFO or a device: it may block
            identity["tail_sha256"] = _tail_sha256(path, st.st_size)
    except OSError:
        return None
    return identity


def _tail_sha256(path: str, size: int) -> str:
    import hashlib

    with open(path, "rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        return hashlib.sha256(f.read(TAIL_BYTES)).hexdigest()[:32]


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
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        return {}


def identity_change(before: dict | None, path: str) -> str:
    """How the file at ``path`` differs from ``before`` (a :func:`file_identity` recorded with
    its content), in words; "" if it does not (a chmod or chown changes no byte), or if it
    cannot be stat'ed now (its reader says why)."""
    now = file_identity(path)
    if now is None:
        return ""
    before = before or {}
    if before.get("size") != now["size"]:
        return f"{before.get('size')} -> {now['size']} bytes"
    if before.get("mtime_ns") != now["mtime_ns"]:
        return f"modified {iso_utc(now['mtime_ns'] / 1e9)}"
    if before.get("inode") != now["inode"]:
        return "replaced by another file with its size and mtime kept"
    if before.get("ctime_ns") != now["ctime_ns"]:
        tail = file_identity(path, with_content=True)
        if tail is not None and tail.get("tail_sha256") != before.get("tail_sha256"):
            return "rewritten in place with its size and mtime kept"
    return ""


def iso_utc(seconds: Any) -> str:
    """Seconds since 1970 as ISO 8601 UTC (``2026-11-28T01:14:55+00:00``); "" when unknown."""
    from datetime import datetime, timezone

    try:
        return datetime.fromtimestamp(float(seconds), timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def seconds_of_iso(text: str) -> float:
    """A report time back to seconds since 1970 (ISO 8601, or the old float form)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return float(text or "nan")
