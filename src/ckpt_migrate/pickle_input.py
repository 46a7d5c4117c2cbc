"""The pickle's bytes as CPython's C unpickler reads them from a file object (a frame is a
buffer), and an opcode's argument read without acting on it."""

from __future__ import annotations

import codecs
import math
import pickletools
import re
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


# --- protocol 0's numbers written as text: parsed as Modules/_pickle.c parses them ---------------

_C_SPACE = b" \t\n\v\f\r"  # C's isspace (Python's str.strip would also take \x1c-\x1f)
_HEX_DIGITS = b"0123456789abcdefABCDEF"
# What PyOS_string_to_double reads: float()'s syntax without whitespace or underscores.
_FLOAT_TEXT = re.compile(rb"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|(?i:infinity|inf|nan))")


def text_int(line: bytes) -> int:
    """INT: ``strtol(line, &end, 0)`` (octal "010" is 8); a value that overflows a C long, or
    text after it, goes to Python's int parser instead; exactly two characters that read 0 or 1
    are protocol 0's booleans (" 1" and "+0" too)."""
    if not line:
        raise UnreadableError("INT with an empty line")
    value, end = _strtol(line)
    if value is None or (end < len(line) and line[end] != 0):
        return _python_int(line)
    return bool(value) if len(line) == 2 and value in (0, 1) else value


def text_long(line: bytes) -> int:
    """LONG: one trailing "L" dropped, then Python's int parser with base 0 ("L00" is 0, "L010" an error)."""
    if not line:
        raise UnreadableError("LONG with an empty line")
    return _python_int(line[:-1] if line.endswith(b"L") else line)


def _strtol(text: bytes) -> tuple[int | None, int]:
    """glibc's strtol with base 0: (value, or None past 64 bits; index of the first byte not read)."""
    i = 0
    while i < len(text) and text[i] in _C_SPACE:
        i += 1
    negative = text[i:i + 1] == b"-"
    i += text[i:i + 1] in (b"-", b"+")
    base = 10
    if text[i:i + 2].lower() == b"0x" and len(text) > i + 2 and text[i + 2] in _HEX_DIGITS:
        base, i = 16, i + 2
    elif text[i:i + 1] == b"0":
        base = 8
    start = i
    digits = "0123456789abcdef"[:base]
    while i < len(text) and chr(text[i]).lower() in digits:
        i += 1
    if i == start:
        return 0, 0  # no number: strtol points back at the start
    if i - start > 40:
        return None, i
    value = int(text[start:i], base) * (-1 if negative else 1)
    return (value, i) if -2**63 <= value < 2**63 else (None, i)


def _python_int(text: bytes) -> int:
    """PyLong_FromString(text, NULL, 0): the text up to a NUL, ASCII whitespace around it."""
    text = text.split(b"\0", 1)[0]
    if len(text) > 400 or any(b > 0x7E or (b < 0x20 and b not in _C_SPACE) for b in text):
        raise UnreadableError("an integer written as text that the unpickler cannot parse")
    try:
        return int(text.decode("ascii"), 0)
    except ValueError:
        raise UnreadableError("an integer written as text that the unpickler cannot parse") from None


def text_float(line: bytes) -> float:
    """FLOAT: PyOS_string_to_double, which takes what float() takes but no whitespace and no
    underscores, and refuses a value past the double range; it must end the line (or a NUL)."""
    match = _FLOAT_TEXT.match(line)
    if not line or match is None or (match.end() < len(line) and line[match.end()] != 0):
        raise UnreadableError("a float written as text that the unpickler cannot parse")
    value = float(match.group())
    if math.isinf(value) and b"n" not in match.group().lower():
        raise UnreadableError("a float written as text past the double range (the unpickler refuses it)")
    return value
