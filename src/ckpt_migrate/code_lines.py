"""A training script's source read as lines: comments stripped, each line found by what it
holds, and shown briefly in a reason."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


MAX_LINES_PER_NEEDLE = 64  # a script states each fact a few times at most; beyond is not a training script
MAX_LINE = 4096  # characters of a line read around a hit
SHOWN_LINE = 90  # characters of an offending line quoted in a reason


@dataclass
class Line:
    number: int  # 1-based line number in the code
    offset: int  # where the line starts in the code
    text: str  # as written, comment and indentation stripped
    key: str  # without any whitespace: what spellings are matched against


@dataclass
class Reading:
    """Lines found per needle, and the problems met while reading them."""

    lines: dict[str, list[Line]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    used: dict[str, list[int]] = field(default_factory=dict)  # fact -> line numbers that decided it


def strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` inside a string literal is kept)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def find_lines(code: str, needles: tuple[str, ...]) -> tuple[dict[str, list[Line]], str]:
    """Every line of ``code`` that holds each needle (bounded), with its line number.

    One pass per needle with str.find, and line numbers counted once over the sorted hits:
    linear in the code's size whatever it holds (tens of MB of padding included)."""
    hits: dict[str, list[tuple[int, int]]] = {}  # needle -> (line start, where the needle is on it)
    for needle in needles:
        starts, pos = [], 0
        while True:
            at = code.find(needle, pos)
            if at < 0:
                break
            start = code.rfind("\n", 0, at) + 1
            if not starts or starts[-1][0] != start:
                starts.append((start, at))
                if len(starts) > MAX_LINES_PER_NEEDLE:
                    return {}, f"the training code has more than {MAX_LINES_PER_NEEDLE} lines with {needle!r}"
            end = code.find("\n", at)
            pos = len(code) if end < 0 else end + 1
        hits[needle] = starts
    numbers: dict[int, int] = {}
    line_no, last = 1, 0
    for start in sorted({s for starts in hits.values() for s, _ in starts}):
        line_no += code.count("\n", last, start)
        numbers[start], last = line_no, start
    found: dict[str, list[Line]] = {}
    for needle, starts in hits.items():
        lines = []
        for start, at in starts:
            end = code.find("\n", start)
            end = len(code) if end < 0 else end
            if end - start > MAX_LINE:
                # No model line is this long: keep the stretch around the hit (shown, and never a known spelling).
                raw = code[max(start, at - MAX_LINE // 2): min(end, at + MAX_LINE // 2)]
            else:
                raw = code[start:end]
            text = strip_comment(raw).strip()
            if needle in text:  # a needle only in a comment does not state anything
                lines.append(Line(numbers[start], start, text, re.sub(r"\s+", "", text)))
        found[needle] = lines
    return found, ""


def show_line(line: Line) -> str:
    text = line.text if len(line.text) <= SHOWN_LINE else line.text[:SHOWN_LINE - 3] + "..."
    return f"code line {line.number}: `{text}`"


def unknown(fact: str, line: Line, known: str) -> str:
    return f"the training code's {fact} ({show_line(line)}) is not a spelling this tool reproduces (known: {known})"


def lines_holding(reading: Reading, *needles: str, starts: tuple[str, ...] = ()) -> list[Line]:
    """The lines holding any of ``needles`` (each once), optionally only those whose key starts so."""
    seen: dict[int, Line] = {}
    for needle in needles:
        for line in reading.lines.get(needle, []):
            if not starts or line.key.startswith(starts):
                seen.setdefault(line.number, line)
    return [seen[n] for n in sorted(seen)]


def record_use(reading: Reading, fact: str, lines: list[Line]) -> None:
    reading.used.setdefault(fact, []).extend(line.number for line in lines)
