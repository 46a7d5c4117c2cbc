"""A file's identity, and whether it changed since one was recorded: what every freshness
decision compares (the plan's manifests, a standing conversion, a conversion's own source while
it is read, verify-outputs)."""

from __future__ import annotations

import os
import stat
from typing import Any


TAIL_BYTES = 1 << 16  # a torch.save zip's central directory (every entry's CRC-32) lies in its last bytes


def file_identity(path: str, with_content: bool = False) -> dict | None:
    """What tells a file from a replacement: size, mtime, ctime and inode (and, ``with_content``,
    a hash of its last 64 KiB); None if it cannot be stat'ed or read.

    ``mv``, ``cp -p``, ``rsync -a`` and ``touch -r`` keep size and mtime, never the ctime of the
    file they leave (nor, but for ``mv`` and ``touch``, its inode). ctime also moves on a chmod
    or chown, which changes no byte: then the file's content decides (:func:`identity_change`).
    Not the device number: a shared filesystem shows other ones on other login nodes."""
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
    if before.get("ctime_ns") != now["ctime_ns"] and now["size"]:  # an empty file has no byte to change
        # A chmod or chown, or bytes written in place and the mtime set back (touch -r). The tail
        # holds the zip's CRC-32 of every entry: a new torch.save changes it. A patch of a few
        # bytes leaves it, but no longer matches its entry's CRC, so every entry is read.
        tail = file_identity(path, with_content=True)
        if tail is not None and tail.get("tail_sha256") != before.get("tail_sha256"):
            return "rewritten in place with its size and mtime kept"
        unvouched = _bytes_not_vouched_for(path)
        if unvouched:
            return f"rewritten in place with its size and mtime kept ({unvouched})"
    return ""


def _bytes_not_vouched_for(path: str) -> str:
    """"" if ``path`` is a zip whose every entry is stored and holds the bytes its CRC-32 records;
    else why its bytes cannot be taken as unchanged. Reads the whole file: only a file whose
    ctime alone moved gets here. A compressed entry is not inflated (a small file can hold an
    endless one), and a file that is not a zip has no CRC to vouch for it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            # Entries are counted, never named: a reason quotes no byte of a file.
            compressed = [i for i, e in enumerate(entries) if e.compress_type != zipfile.ZIP_STORED]
            if compressed:
                return f"entry {compressed[0] + 1} of {len(entries)} is compressed: its bytes were not compared"
            for number, entry in enumerate(entries, 1):
                try:
                    with archive.open(entry) as data:  # zipfile checks the CRC-32 at the entry's end
                        while data.read(1 << 20):
                            pass
                except zipfile.BadZipFile:
                    return f"entry {number} of {len(entries)} no longer matches its CRC-32"
    except Exception as exc:  # not a zip, or one zipfile cannot read: nothing vouches for its bytes
        return f"not a zip whose CRC-32s can vouch for its bytes: {type(exc).__name__}"
    return ""


def iso_utc(seconds: Any) -> str:
    """Seconds since 1970 as ISO 8601 UTC (``2026-11-28T01:14:55+00:00``); "" when unknown."""
    from datetime import datetime, timezone

    try:
        return datetime.fromtimestamp(float(seconds), timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""
