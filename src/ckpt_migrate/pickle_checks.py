"""Checks every allowed callable makes of its arguments: how many there are, and that no __main__
record reaches code that would call its methods."""

from __future__ import annotations

from typing import Any
from .pickle_values import GlobalRef, PickledObject, UnreadableError, UnsafePickleError


MAIN_MODULE = "__main__"


def is_main_record(value: Any) -> bool:
    return isinstance(value, PickledObject) and value.cls.startswith(MAIN_MODULE + ".")


def named(value: Any, *names: str) -> bool:
    """``value`` is the allowed global ``names`` name (a string that spells it is not)."""
    return isinstance(value, GlobalRef) and str(value) in names


def check_no_records(value: Any, what: str) -> None:
    """``value`` holds no ``__main__`` instance, whose methods would run when ``what`` uses it.

    Each container is visited once: a pickle can share one list at every level (by memo), and
    a walk that followed every path would take exponential time."""
    seen: set[int] = set()
    pending = [value]
    while pending:
        v = pending.pop()
        if is_main_record(v):
            raise UnsafePickleError(f"{what} would be given a {v.cls} instance (its methods would run)")
        if id(v) in seen or not isinstance(v, (list, tuple, set, frozenset, dict)):
            continue
        seen.add(id(v))
        if isinstance(v, dict):
            pending.extend(v.keys())
            pending.extend(v.values())
        else:
            pending.extend(v)


def iterable_argument(value: Any, what: str) -> list | tuple | set | frozenset | dict:
    """An argument that ``what`` iterates: a real container (a record's __iter__ would run)."""
    if isinstance(value, PickledObject):
        raise UnsafePickleError(f"{what} would iterate a {value.cls} instance (its methods would run)")
    if not isinstance(value, (list, tuple, set, frozenset, dict, str, bytes)):
        raise UnreadableError(f"{what} given a {type(value).__name__} to iterate")
    return value


def arguments(args: tuple, what: str, low: int, high: int) -> tuple:
    if not low <= len(args) <= high:
        raise UnreadableError(f"{what} called with {len(args)} argument(s)")
    return args
