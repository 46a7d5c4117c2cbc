"""Atomic file writes: a temporary file in the destination folder, fsync, rename.

A writer that is killed part way leaves at most a hidden ``.<name>.tmp-*`` file beside
the destination, never a partial file at the final path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from typing import BinaryIO, Callable, Iterator, TextIO


class PendingFile:
    """A file written in full beside ``path`` first, and published (renamed) or dropped later.

    Lets a conversion write its output while the logit check still runs, and decide afterwards.
    """

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(self.folder, exist_ok=True)
        refuse_special_destination(path)
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
        with open(self.tmp, "wb", buffering=0) as f:
            writer = HashingWriter(f)
            try:
                write(writer)
                os.fsync(f.fileno())  # the hasher catches up meanwhile
            except BaseException:
                writer.abandon()
                raise
        return writer.hexdigest(), writer.size

    def commit(self) -> None:
        refuse_special_destination(self.path)
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


class DestinationError(OSError):
    """A path to write that holds something other than a regular file (a device, a folder)."""


def refuse_special_destination(path: str) -> None:
    """Raise DestinationError if ``path`` is there and neither a regular file nor a symlink (a
    file or link there is replaced, never written through; ``/dev/null`` is not replaced)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            return  # a broken link: replaced
        if not (stat.S_ISREG(target.st_mode) or stat.S_ISDIR(target.st_mode)):
            # /dev/stdout, a link to a device or a FIFO: replacing the link would break the system
            raise DestinationError(f"{path} is a link to something that is not a regular file: refusing to "
                                   f"replace it (name a new file to write)")
        return
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise DestinationError(f"{path} is {kind}: refusing to replace it (name a new file to write)")


def open_log(path: str, append: bool = False) -> TextIO:
    """``path`` opened to write a log (text, line-buffered), never through a link.

    A symlink, or a hard link (another name for a file elsewhere: a checkpoint, say), at
    ``path`` is removed first, so that the log is a new file of its own; anything else there that
    is not a regular file is refused by name. A log is appended to (``append``) only while it is
    a plain file of its own; otherwise it is started afresh."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    refuse_special_destination(path)
    if st is not None and (not append or stat.S_ISLNK(st.st_mode) or st.st_nlink > 1):
        os.unlink(path)  # the link goes, never what it names
    fd = os.open(path, flags | (os.O_APPEND if append else os.O_EXCL), 0o666)
    if os.fstat(fd).st_nlink > 1:  # linked meanwhile: nothing is written yet
        os.close(fd)
        os.unlink(path)
        fd = os.open(path, flags | os.O_EXCL, 0o666)
    return os.fdopen(fd, "a" if append else "w", buffering=1, encoding="utf-8")


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


def remove_temporaries(root: str, folders: tuple[str, ...]) -> int:
    """Remove the temporaries (``.<name>.tmp-*``) that writers killed in earlier runs left in
    ``root`` and its ``folders``; for a run that holds ``root`` and has no job running yet.
    Returns how many were removed."""
    removed = 0
    pending = [root] + [os.path.join(root, name) for name in folders]
    while pending:
        folder = pending.pop()
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if entry.is_dir(follow_symlinks=False):
                    if folder != root:
                        pending.append(entry.path)
                elif entry.name.startswith(".") and ".tmp-" in entry.name:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed += 1
    return removed


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
    """A write-only file wrapper that counts what passes through and has it hashed (sha256).

    The hash is taken from the file itself, read back from the page cache a little behind the
    writer by a second thread: it costs little beyond the write (both release the GIL), and it
    is the hash of the bytes the file holds, whatever buffer the caller wrote them from.
    ``f`` must be unbuffered (``open(path, "wb", buffering=0)``), so that what the writer
    has written is in the file when the hasher reads it."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.size = 0
        self._hash = _TrailingHash(f.name)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # a raw write may take only part (e.g. 2 GiB at most on Linux)
            done += self._f.write(view[done:])
        self.size += done
        self._hash.advance(done)
        return done

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        """The file's sha256, once everything written so far is hashed."""
        return self._hash.finish()

    def abandon(self) -> None:
        """Stop hashing (the write failed; its error is the one to report)."""
        with contextlib.suppress(OSError):
            self._hash.finish()


class _TrailingHash:
    """sha256 of a file being written, read back through its own descriptor on its own thread."""

    CHUNK = 16 << 20  # wake the hasher once this much is written and not yet hashed

    def __init__(self, path: str):
        import threading

        self._fd = os.open(path, os.O_RDONLY)
        self._sha256 = hashlib.sha256()
        self._written = self._hashed = 0
        self._done = False
        self._error: BaseException | None = None
        self._digest = ""
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def advance(self, nbytes: int) -> None:
        with self._wake:
            self._written += nbytes
            if self._written - self._hashed >= self.CHUNK:
                self._wake.notify()

    def finish(self) -> str:
        if not self._digest:
            with self._wake:
                self._done = True
                self._wake.notify()
            self._thread.join()
            os.close(self._fd)
            if self._error is not None:
                raise OSError(f"cannot read back the file being written to hash it: {self._error}")
            self._digest = self._sha256.hexdigest()
        return self._digest

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._done and self._written - self._hashed < self.CHUNK:
                        self._wake.wait()
                    target, last = self._written, self._done
                if target > self._hashed:
                    self._hash_range(target)
                if last:
                    return
        except BaseException as exc:  # reported by finish(), in the writer's thread
            self._error = exc

    def _hash_range(self, target: int) -> None:
        """Hash the file's bytes from where the hash stands up to ``target`` (all written).

        Through a read-only mapping of the range: the hash reads the page cache in place, which
        keeps it at the speed of sha256 over memory; a copy per read first (pread) costs ~15%
        (benchmarks/bench_hash.py on the H200 host: 0.61 s with a mapping, 0.68 s with preadv,
        0.44-0.50 s for the write alone, 805 MB). A file system that cannot map is read instead."""
        import mmap

        begin = self._hashed - self._hashed % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(self._fd, target - begin, offset=begin, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            mapping = None
        if mapping is None:
            while self._hashed < target:
                chunk = os.pread(self._fd, min(self.CHUNK, target - self._hashed), self._hashed)
                if not chunk:
                    raise OSError(f"file shorter ({self._hashed} bytes) than written ({target})")
                self._sha256.update(chunk)
                self._hashed += len(chunk)
            return
        with mapping, memoryview(mapping) as view:
            self._sha256.update(view[self._hashed - begin:])
        self._hashed = target


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
