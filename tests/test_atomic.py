"""The hashing writer: the sha256 it reports is the written file's, however the bytes arrive."""

from __future__ import annotations

import hashlib
import mmap
import os

import pytest

from ckpt_migrate import atomic

# Pieces that straddle the hasher's 16 MiB wake-up size and the page size, as torch.save's
# small headers and large tensor records do.
PIECES = [1, 4097, (16 << 20) + 3, 7, (5 << 20) - 1, 123_457, (16 << 20), 2]


def _write_pieces(path: str) -> tuple[str, int, bytes]:
    data = os.urandom(sum(PIECES))
    pending = atomic.PendingFile(path)

    def write(f):
        offset = 0
        for size in PIECES:
            f.write(memoryview(data)[offset:offset + size])
            offset += size

    digest, size = pending.write_with(write)
    pending.commit()
    return digest, size, data


def test_hash_of_odd_pieces_is_the_files_sha256(tmp_path):
    path = str(tmp_path / "out.bin")
    digest, size, data = _write_pieces(path)
    assert size == len(data) == os.path.getsize(path)
    assert digest == hashlib.sha256(data).hexdigest() == atomic.sha256_file(path)


def test_hash_without_memory_mapping_reads_the_file_instead(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # what a file system that cannot map says

    monkeypatch.setattr(mmap, "mmap", refuse)
    path = str(tmp_path / "out.bin")
    digest, _, data = _write_pieces(path)
    assert digest == hashlib.sha256(data).hexdigest()


def test_a_failed_write_leaves_no_file_and_keeps_its_error(tmp_path):
    path = tmp_path / "out.bin"
    pending = atomic.PendingFile(str(path))

    def write(f):
        f.write(b"x" * (20 << 20))
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        pending.write_with(write)
    pending.abort()
    assert os.listdir(tmp_path) == []


def test_a_device_or_fifo_is_never_replaced(tmp_path):
    """Issue 21: ``convert SRC /dev/null`` must not put a regular file where the device was."""
    import stat as stat_module

    from ckpt_migrate.atomic import DestinationError, atomic_write_bytes

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # Links to a device or a FIFO (what /dev/stdout is on a terminal or a pipe) are not replaced either.
    (tmp_path / "to_pipe").symlink_to(fifo)
    (tmp_path / "to_null").symlink_to("/dev/null")
    for path in ("/dev/null", str(fifo), str(tmp_path / "to_pipe"), str(tmp_path / "to_null")):
        with pytest.raises(DestinationError, match="not a regular file"):
            atomic_write_bytes(path, b"x")
    assert os.path.islink(tmp_path / "to_pipe") and os.path.islink(tmp_path / "to_null")
    assert stat_module.S_ISCHR(os.stat("/dev/null").st_mode) and stat_module.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "to_null", "to_pipe"]  # no temporary left


def test_open_log_never_writes_through_a_link(tmp_path):
    from ckpt_migrate.atomic import open_log

    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"weights")
    for kind, append in (("symlink", False), ("hardlink", True)):
        log = tmp_path / f"{kind}.log"
        (log.symlink_to if kind == "symlink" else log.hardlink_to)(target)
        with open_log(str(log), append=append) as f:
            f.write("a log line\n")
        assert target.read_bytes() == b"weights"
        assert not log.is_symlink() and log.stat().st_nlink == 1 and log.read_text() == "a log line\n"
    own = tmp_path / "own.log"
    own.write_text("earlier run\n")
    with open_log(str(own), append=True) as f:
        f.write("this run\n")
    assert own.read_text() == "earlier run\nthis run\n"
