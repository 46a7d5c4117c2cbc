"""The pickle's bytes as CPython's C unpickler reads them from a file object (a frame is a
buffer), and an opcode's argument read without acting on it."""

from __future__ import annotations

import codecs
import pickletools
import struct
from typing import Any

from .pickle_values import UnreadableError


class PickleInput:
    """The pickle's bytes as the C unpickler reads them from a file object (see the module doc)."""

    def __init__(self, data: bytes, start: int, frames_are_plain_bytes: bool):
        self.data = data
        self.stream = start  # where the next read from the underlying file begins
        self.next = self.end = start  # the frame buffer still unread: data[next:end]
        self.plain = frames_are_plain_bytes
        self.frame_problem = ""

    def _buffer_left(self, what: str) -> None:
        if self.next < self.end and not self.frame_problem:
            self.frame_problem = f"{what} at byte {self.next} runs past the end of its frame"
        self.next = self.end = self.stream

    def read(self, n: int) -> bytes:
        if self.next + n <= self.end:
            self.next += n
            return self.data[self.next - n:self.next]
        self._buffer_left("an opcode or its argument")
        chunk = self.data[self.stream:self.stream + n]
        if len(chunk) < n:
            raise UnreadableError("damaged pickle: data was truncated")
        self.stream += n
        self.next = self.end = self.stream
        return chunk

    def read_payload(self, n: int) -> bytes:
        """The bytes of BINBYTES/BYTEARRAY8: the C unpickler takes what its buffer holds and reads
        only the rest from the file (other reads drop the buffer's rest)."""
        if self.next + n <= self.end or self.plain:
            return self.read(n)
        head = self.data[self.next:self.end]
        if head and not self.frame_problem:
            self.frame_problem = f"a bytes argument at byte {self.next} runs past the end of its frame"
        self.next = self.end = self.stream
        return head + self.read(n - len(head))

    def readline(self) -> bytes:
        newline = self.data.find(b"\n", self.next, self.end)
        if newline >= 0:
            line, self.next = self.data[self.next:newline + 1], newline + 1
            return line
        self._buffer_left("a line")
        newline = self.data.find(b"\n", self.stream)
        if newline < 0:
            raise UnreadableError("damaged pickle: data was truncated (a line without its newline)")
        line, self.stream = self.data[self.stream:newline + 1], newline + 1
        self.next = self.end = self.stream
        return line

    def frame(self, length: int) -> None:
        if self.plain:
            if length > len(self.data) - self.position:
                raise UnreadableError(f"FRAME declares {length} bytes, more than the pickle holds (truncated)")
            return
        if self.next < self.end:
            if not self.frame_problem:
                self.frame_problem = f"a FRAME at byte {self.next} starts before the previous frame is used up"
            if self.next + length <= self.end:
                return  # the C unpickler finds the new frame inside its buffer and carries on
            self.next = self.end = self.stream
        self.read(length)
        self.next -= length  # the frame is the buffer now

    @property
    def position(self) -> int:
        return self.next if self.next < self.end else self.stream


OPCODES = {ord(op.code): op for op in pickletools.opcodes}


STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}


LENGTH_FORMATS = {pickletools.TAKEN_FROM_ARGUMENT1: "<B", pickletools.TAKEN_FROM_ARGUMENT4: "<i",
                   pickletools.TAKEN_FROM_ARGUMENT4U: "<I", pickletools.TAKEN_FROM_ARGUMENT8U: "<Q"}


def scan_argument(source: PickleInput, op: pickletools.OpcodeInfo) -> Any:
    """An opcode's argument read from ``source`` without acting on it: the names of GLOBAL and
    INST, the text of a string, the number of a memo index, PROTO or FRAME."""
    spec = op.arg
    if spec is None:
        return None
    if spec.n >= 0:
        raw = source.read(spec.n)
    elif spec.n == pickletools.UP_TO_NEWLINE:
        raw = source.readline()[:-1]
        if spec.name == "stringnl_noescape_pair":
            return raw.decode("utf-8"), source.readline()[:-1].decode("utf-8")
    else:
        fmt = LENGTH_FORMATS[spec.n]
        length = struct.unpack(fmt, source.read(struct.calcsize(fmt)))[0]
        if not 0 <= length <= len(source.data):
            raise UnreadableError("a length beyond the pickle")
        raw = source.read(length)
    if op.name in STRING_OPS:
        if op.name == "UNICODE":
            return raw.decode("raw-unicode-escape")
        return (quoted_string(raw) if op.name == "STRING" else raw).decode("utf-8", "surrogatepass")
    if op.name in ("PUT", "GET"):
        return int(raw)
    if op.name in ("BINPUT", "BINGET", "LONG_BINPUT", "LONG_BINGET", "PROTO", "FRAME"):
        return int.from_bytes(raw, "little")
    return None


def quoted_string(line: bytes) -> bytes:
    if len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"'):
        return codecs.escape_decode(line[1:-1])[0]
    raise UnreadableError("the STRING opcode argument must be quoted")
