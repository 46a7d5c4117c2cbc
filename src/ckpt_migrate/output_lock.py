"""One run at a time per output folder, whichever checkout starts it.

Snakemake locks outputs in the ``.snakemake`` folder of its working directory, so two lab
members running two checkouts on one ``output_root`` would not see each other: one could fail
a file the other is converting. The run's main process holds ``<output_root>/.run.lock`` from
its start to its end, naming its host and pid; a second run refuses with one line naming the
holder. A lock whose holder is gone (same host, no such process) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time

LOCK_NAME = ".run.lock"


class OutputInUse(RuntimeError):
    """Another run holds the output folder; the message names it and what to do."""


def _holder_is_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another login node: its process cannot be checked from here
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def acquire(output_root: str) -> str:
    """Take the lock of ``output_root`` for this process; OutputInUse if a live run holds it."""
    os.makedirs(output_root, exist_ok=True)
    path = os.path.join(output_root, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            try:  # never through a link, never a FIFO: a lock is a file a run made
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                with os.fdopen(fd, encoding="utf-8") as f:
                    holder = json.loads(f.read(4096)) if stat.S_ISREG(os.fstat(fd).st_mode) else {}
            except (OSError, ValueError):
                holder = {}
            if not isinstance(holder, dict) or not holder or _holder_is_alive(holder):
                holder = holder if isinstance(holder, dict) else {}
                raise OutputInUse(
                    f"output_root {output_root} is in use by another run (host {holder.get('host', '?')}, "
                    f"pid {holder.get('pid', '?')}, since {holder.get('since', '?')}); wait for it to finish, "
                    f"or remove {path} if that run is gone") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale lock: its run ended without releasing it
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return path
    raise OutputInUse(f"output_root {output_root}: could not take {path} (another run is starting); try again")


def release(output_root: str) -> None:
    """Drop the lock if this process holds it."""
    path = os.path.join(output_root, LOCK_NAME)
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
            os.unlink(path)
