"""The process heap between the stages of a conversion: freed memory handed back to the system.

A conversion job holds its memory limit through every stage and every file of its batch, and
glibc keeps large freed blocks (a forward's attention scores, the writer's buffers) for reuse;
handing them back after each stage keeps the job's peak at one stage's, not the sum of them.
"""

from __future__ import annotations


def return_freed_memory() -> None:
    """Hand freed heap memory back to the system now (glibc's ``malloc_trim``; elsewhere the
    allocator decides)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
