"""Detection in a child process with a time and memory budget: a verdict for every file.

The reader (:mod:`ckpt_migrate.safe_pickle`) caps the work a file can ask for, but a verdict
must not depend on every cap being right: :func:`detect_isolated` forks, limits the child's
address space and CPU time, and turns anything that goes wrong there (an exception, a signal,
running out of memory or time) into an ``unreadable`` record naming what ran out. The parent
never parses the file's bytes; it reads back only the child's JSON record.
"""

from __future__ import annotations

import json
import math
import os
import resource
import select
import signal
import time
from typing import Any

from .safe_pickle import ArchiveInspection, ReaderLimits, one_line

DEFAULT_SECONDS = 60.0
DEFAULT_MEMORY_MB = 1024


def display_path(path: str) -> str:
    """A path as report text: undecodable bytes as \\xNN, control characters as \\n, \\t or \\xNN."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() or ch == " " else
                   {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch, f"\\x{ord(ch):02x}") for ch in text)


def _detect(path: str, seconds: float, overrides: dict | None, reason: str = "") -> dict[str, Any]:
    """The record of ``path`` with its paths as report text: detected here, or, given ``reason``,
    the ``unreadable`` record that says why the child gave no verdict."""
    from .detect import detect, record_from_inspection

    record = (record_from_inspection(path, ArchiveInspection("unreadable", reason)) if reason
              else detect(path, ReaderLimits(seconds=seconds), overrides))
    record["path"], record["realpath"] = display_path(record["path"]), display_path(record["realpath"])
    return record


def _virtual_memory_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _child(path: str, seconds: float, memory_mb: int, write_fd: int, overrides: dict | None) -> None:
    """In the forked child: limit, detect, write the JSON record, exit without cleanup."""
    try:
        budget = memory_mb * 2**20
        # The address-space limit counts what the process already maps (interpreter, libraries).
        limit = _virtual_memory_bytes() + budget
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        cpu = math.ceil(seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        data = json.dumps(_detect(path, seconds, overrides), default=str).encode()
    except MemoryError:
        data = json.dumps({"error": f"ran out of its memory budget ({memory_mb} MB)"}).encode()
    except BaseException as exc:  # noqa: BLE001 - the child reports everything, then exits
        data = json.dumps({"error": one_line(f"the reader failed: {type(exc).__name__}: {exc}")}).encode()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(write_fd, view):]
    finally:
        os._exit(0)


def detect_isolated(path: str, seconds: float = DEFAULT_SECONDS, memory_mb: int = DEFAULT_MEMORY_MB,
                    overrides: dict | None = None) -> dict:
    """The manifest record of ``path``, detected in a child with ``seconds`` and ``memory_mb``.

    Never raises for anything about the file: a child that crashes, is killed, or overruns its
    budget gives an ``unreadable`` record saying so."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:  # no process to spare (RLIMIT_NPROC, memory): the reader's own caps still bound it
        os.close(read_fd)
        os.close(write_fd)
        record = _detect(path, seconds, overrides)
        record.setdefault("notes", []).append(f"detected in-process: could not fork ({exc.strerror})")
        return json.loads(json.dumps(record, default=str))
    if pid == 0:
        os.close(read_fd)
        _child(path, seconds, memory_mb, write_fd, overrides)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + seconds + 5  # the child stops itself at `seconds`; this is the backstop
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        return _detect(path, seconds, overrides, f"inspection ran out of its time budget ({seconds:g} s)")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        what = ("ran out of its CPU time budget" if sig == signal.SIGXCPU
                else f"was killed by {signal.Signals(sig).name}" if sig in signal.Signals._value2member_map_
                else f"was killed by signal {sig}")
        budget = f"memory budget {memory_mb} MB, time {seconds:g} s"
        return _detect(path, seconds, overrides, f"the reader {what} ({budget})")
    try:
        result = json.loads(b"".join(chunks))
    except ValueError:
        return _detect(path, seconds, overrides, "the reader stopped without a verdict")
    if "error" in result:
        return _detect(path, seconds, overrides, result["error"])
    return result
