"""torch.save's zip archive with its CRC-32s computed beside the write, on several cores.

torch's zip writer computes the CRC-32 of every record on the saving thread before it writes
it: 0.14 s per 0.8 GB on the H200 host, a third of what a plain write of the same bytes costs
(benchmarks/RESULTS.md). With ``torch.utils.serialization.config.save.compute_crc32`` off,
torch writes the same archive with zeros where the CRCs go; :class:`CrcFillingWriter` sits
between torch and the file, computes each record's CRC from the bytes passing through (large
writes in chunks on a thread pool, combined with :func:`crc32_combine`) and puts it into the
record's data descriptor and central-directory entry on their way to the file. Nothing is
patched afterwards, so whatever reads the file behind the writer (its sha256) sees final bytes.

The archive is the one torch writes with its own CRCs except for ``.data/serialization_id``,
which torch derives from the CRCs it computed (zeros here): a 40-digit identifier that nothing
loading the file checks. If the stream is not laid out as expected (another torch), the writer
raises :class:`ZipLayoutError` and the caller writes the file again with torch's own CRCs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

LOCAL_HEADER = b"PK\x03\x04"
DATA_DESCRIPTOR = b"PK\x07\x08"
CENTRAL_HEADER = b"PK\x01\x02"
_LOCAL_FIXED = 30  # bytes of a local file header before its name and extra field
_CENTRAL_FIXED = 46  # the same for a central-directory entry
_HAS_DESCRIPTOR = 0x08  # general-purpose flag: sizes and CRC follow the data

# Writes at least this long are CRC'd in CHUNK-sized pieces on the pool while they are written.
PARALLEL_MIN = 8 << 20
CHUNK = 4 << 20


class ZipLayoutError(ValueError):
    """The bytes torch wrote are not the archive layout this writer knows."""


def _times(matrix: tuple[int, ...], vector: int) -> int:
    """A 32 x 32 matrix over GF(2) (one int per column) applied to a 32-bit vector."""
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _square(matrix: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_times(matrix, column) for column in matrix)


@functools.lru_cache(maxsize=None)
def _zeros_operator(log2_bytes: int) -> tuple[int, ...]:
    """The matrix that advances a CRC-32 register over 2**log2_bytes zero bytes."""
    if log2_bytes == 0:
        one_bit = (0xEDB88320, *(1 << n for n in range(31)))  # the reflected polynomial's shift
        return _square(_square(_square(one_bit)))  # 1 -> 2 -> 4 -> 8 bits
    return _square(_zeros_operator(log2_bytes - 1))


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC-32 of A + B from CRC-32(A), CRC-32(B) and len(B) (zlib's crc32_combine)."""
    k = 0
    while length_b:
        if length_b & 1:
            crc_a = _times(_zeros_operator(k), crc_a)
        length_b >>= 1
        k += 1
    return crc_a ^ crc_b


class CrcFillingWriter:
    """A write-only file wrapper for ``torch.save`` with CRC computation off (see the module).

    ``close()`` writes the central directory (held back until then, as it is rewritten) and
    raises :class:`ZipLayoutError` unless every record got its CRC."""

    def __init__(self, f, pool: ThreadPoolExecutor | None = None):
        self._f = f
        self._pool = pool
        self._header = bytearray()  # a local header being read, across write calls
        self._name = ""  # the record whose data is passing
        self._crc = self._length = 0
        self._in_data = False
        self._crcs: dict[str, int] = {}
        self._tail = bytearray()  # the central directory and end records

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._tail or (not self._in_data and not self._header and view[:4] == CENTRAL_HEADER):
            self._tail += view
            return len(view)
        if self._in_data:
            if self._is_descriptor(view):
                self._write(self._descriptor_with_crc(view))
                self._in_data = False
            else:
                self._crc_and_write(view)
            return len(view)
        self._header += view
        self._read_local_header()
        self._write(view)
        return len(view)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if self._in_data or self._header:
            raise ZipLayoutError(f"the archive ended inside record {self._name or '(a header)'}")
        self._write(self._central_directory_with_crcs())
        self._tail = bytearray()

    def _write(self, data) -> None:
        view, done = memoryview(data), 0
        while done < len(view):
            done += self._f.write(view[done:])

    def _read_local_header(self) -> None:
        if len(self._header) < _LOCAL_FIXED:
            return
        if self._header[:4] != LOCAL_HEADER:
            raise ZipLayoutError("expected a local file header")
        flags, size = struct.unpack_from("<H", self._header, 6)[0], struct.unpack_from("<I", self._header, 18)[0]
        name_len, extra_len = struct.unpack_from("<HH", self._header, 26)
        end = _LOCAL_FIXED + name_len + extra_len
        if len(self._header) < end:
            return
        if len(self._header) > end:
            raise ZipLayoutError("record data arrived in the same write as its header")
        self._name = bytes(self._header[_LOCAL_FIXED:_LOCAL_FIXED + name_len]).decode("utf-8", "replace")
        self._header = bytearray()
        if flags & _HAS_DESCRIPTOR:
            self._crc = self._length = 0
            self._in_data = True
        elif size == 0:  # an empty record: no data, no descriptor, CRC 0 in the header is right
            self._crcs[self._name] = 0
        else:
            raise ZipLayoutError(f"record {self._name} has data but no data descriptor")

    def _is_descriptor(self, view: memoryview) -> bool:
        if view[:4] != DATA_DESCRIPTOR:
            return False
        if len(view) == 16:
            return struct.unpack_from("<II", view, 8) == (self._length, self._length)
        return len(view) == 24 and struct.unpack_from("<QQ", view, 8) == (self._length, self._length)

    def _descriptor_with_crc(self, view: memoryview) -> bytes:
        written_crc = struct.unpack_from("<I", view, 4)[0]
        if written_crc not in (0, self._crc):  # torch computed one after all: it must agree
            raise ZipLayoutError(f"record {self._name}: CRC {written_crc:08x} written, {self._crc:08x} computed")
        self._crcs[self._name] = self._crc
        return bytes(view[:4]) + struct.pack("<I", self._crc) + bytes(view[8:])

    def _crc_and_write(self, view: memoryview) -> None:
        if self._pool is None or len(view) < PARALLEL_MIN:
            self._crc = zlib.crc32(view, self._crc)
            self._write(view)
        else:
            pieces = [view[i:i + CHUNK] for i in range(0, len(view), CHUNK)]
            futures = [self._pool.submit(zlib.crc32, piece) for piece in pieces]
            self._write(view)  # the pool CRCs the same memory meanwhile (both release the GIL)
            for piece, future in zip(pieces, futures):
                self._crc = crc32_combine(self._crc, future.result(), len(piece))
        self._length += len(view)

    def _central_directory_with_crcs(self) -> bytes:
        tail, pos = bytearray(self._tail), 0
        filled = set()
        while tail[pos:pos + 4] == CENTRAL_HEADER:
            if len(tail) < pos + _CENTRAL_FIXED:
                raise ZipLayoutError("central directory entry cut short")
            name_len, extra_len, comment_len = struct.unpack_from("<HHH", tail, pos + 28)
            name = bytes(tail[pos + _CENTRAL_FIXED:pos + _CENTRAL_FIXED + name_len]).decode("utf-8", "replace")
            if name not in self._crcs:
                raise ZipLayoutError(f"central directory names {name}, which no record had")
            struct.pack_into("<I", tail, pos + 16, self._crcs[name])
            filled.add(name)
            pos += _CENTRAL_FIXED + name_len + extra_len + comment_len
        if filled != set(self._crcs):
            raise ZipLayoutError(f"{len(set(self._crcs) - filled)} record(s) missing from the central directory")
        return bytes(tail)


@contextlib.contextmanager
def torch_crc_off():
    """While open, torch.save leaves its CRCs to a :class:`CrcFillingWriter`; yields False
    (and changes nothing) on a torch that always computes them itself."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        yield False
        return
    saved = getattr(config.save, "compute_crc32", None)
    if saved is None:
        yield False
        return
    config.save.compute_crc32 = False
    try:
        yield True
    finally:
        config.save.compute_crc32 = saved


def save_with_parallel_crc(obj, f) -> bool:
    """torch.save(obj) into the file object ``f`` with the CRCs computed here (see the module);
    False if this torch cannot leave them to us (then torch.save computed them)."""
    import torch

    with torch_crc_off() as ours:
        if not ours:
            torch.save(obj, f)
            return False
        workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="crc32") as pool:
            writer = CrcFillingWriter(f, pool if workers > 1 else None)
            try:
                torch.save(obj, writer)
            except RuntimeError as exc:  # torch's zip writer wraps what our write() raised
                if isinstance(exc.__context__, ZipLayoutError):
                    raise exc.__context__ from None
                raise
            writer.close()
    return True
