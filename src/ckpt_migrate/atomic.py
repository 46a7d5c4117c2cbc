"""Atomic file writes: a temporary file in the destination folder, fsync, rename.

A writer that is killed part way leaves at most a hidden ``.<name>.tmp-*`` file beside
the destination, never a partial file at the final path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import BinaryIO, Callable, Iterator


class PendingFile:
    """A file written in full beside ``path`` first, and published (renamed) or dropped later.

    Lets a conversion write its output while the logit check still runs, and decide afterwards.
    """

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(self.folder, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=self.folder)
        try:
            # mkstemp creates 0600 whatever the umask; the lab shares outputs, so give the file
            # the mode open() would have (0666 less the umask) before anything is written.
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)

    def write_with(self, write: Callable[[BinaryIO], None]) -> tuple[str, int]:
        """Write the whole content through ``write(f)`` and fsync; returns (sha256 hex, bytes)."""
        with open(self.tmp, "wb") as f:
            writer = HashingWriter(f)
            try:
                write(writer)
            finally:
                writer.close()
            f.flush()
            os.fsync(f.fileno())
        return writer.sha256.hexdigest(), writer.size

    def commit(self) -> None:
        os.replace(self.tmp, self.path)
        _fsync_dir(self.folder)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


@contextlib.contextmanager
def atomic_open(path: str) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed onto ``path``."""
    pending = PendingFile(path)
    try:
        with open(pending.tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        pending.commit()
    except BaseException:
        pending.abort()
        raise


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _remove_stale_temporaries(path: str) -> None:
    """Temporary files of earlier writers of ``path`` that were killed (SIGKILL, node failure).
    Only one writer of a given output runs at a time (Snakemake locks its outputs)."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.tmp-"
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            if entry.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, entry))


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class HashingWriter:
    """A write-only file wrapper that hashes what passes through (sha256).

    A large chunk (a tensor's storage) is hashed on a second thread while it is written: both
    release the GIL, so the hash costs little beyond the write. Each call returns only when both
    are done, as the caller may reuse its buffer afterwards."""

    PARALLEL_BYTES = 1 << 20  # below this, starting the other thread costs more than it saves

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._hasher = None

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size < self.PARALLEL_BYTES:
            self.sha256.update(data)
            written = self._f.write(data)
        else:
            if self._hasher is None:
                from concurrent.futures import ThreadPoolExecutor

                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
            hashed = self._hasher.submit(self.sha256.update, data)
            try:
                written = self._f.write(data)
            finally:
                hashed.result()
        self.size += size
        return written

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        """Stop the hashing thread (the file itself belongs to the caller)."""
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
