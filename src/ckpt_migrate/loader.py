"""Tensors from a ``torch.save`` file, through the same reader that inspected it.

There is no second parser: :func:`open_checkpoint` opens the file once, inspects it with
:mod:`ckpt_migrate.safe_pickle` (which validates every storage's span in the file and every
tensor's dtype, shape, stride and offset against its storage) and memory-maps the same open
file. Tensors are views of that map at exactly the validated offsets, copy-on-write, so the
scratch tree is never written and bytes that are never used (optimizer state) are never read.
"""

from __future__ import annotations

import mmap
from typing import Any

import torch

from .safe_pickle import DEFAULT_LIMITS, ArchiveInspection, ReaderLimits, TensorStub, UnreadableError, \
    UnsafePickleError, inspect_file, one_line, open_regular


class CheckpointError(ValueError):
    """The file is not one we can load or convert; the message is one line naming the file."""


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"tensor dtype {name} is not known to this torch ({torch.__version__})")
    return dtype


class Checkpoint:
    """An inspected file and its memory map; :meth:`tensor` materializes one TensorStub."""

    def __init__(self, inspection: ArchiveInspection, mapped: mmap.mmap | None):
        self.inspection = inspection
        self._map = mapped
        self._storages: dict[tuple[str, str], torch.Tensor] = {}

    def _storage(self, key: str, dtype: str) -> torch.Tensor:
        """The storage's bytes as a flat tensor of ``dtype`` (one per key and dtype, shared by views)."""
        if (key, dtype) not in self._storages:
            offset, size = self.inspection.storage_spans[key]
            torch_dtype = _torch_dtype(dtype)
            itemsize = torch.empty((), dtype=torch_dtype).element_size()
            count = size // itemsize * itemsize
            raw = (torch.frombuffer(self._map, dtype=torch.uint8, count=count, offset=offset)
                   if count else torch.empty(0, dtype=torch.uint8))
            self._storages[(key, dtype)] = raw.view(torch_dtype)
        return self._storages[(key, dtype)]

    def tensor(self, stub: TensorStub) -> torch.Tensor:
        flat = self._storage(stub.storage_key, stub.dtype)
        # safe_pickle checked that offset + sum((d - 1) * stride) stays inside the storage.
        return torch.as_strided(flat, stub.shape, stub.stride, stub.storage_offset)

    def materialize(self, obj: Any) -> Any:
        """A copy of ``obj`` with every TensorStub a tensor. A container the pickle shares is
        copied once and stays shared (as torch.load returns it), so a pickle that nests one list
        at every level costs its size, not its number of paths."""
        copies: dict[int, Any] = {}

        def copy(value: Any, depth: int) -> Any:
            if isinstance(value, TensorStub):
                return self.tensor(value)
            if not isinstance(value, (dict, list, tuple)):
                return value
            if depth >= MAX_MATERIALIZE_DEPTH:  # the rest is returned as is: it must hold no tensor
                if _holds_tensor(value):
                    raise CheckpointError(f"a tensor nested deeper than {MAX_MATERIALIZE_DEPTH} containers: not read")
                return value
            if id(value) not in copies:
                if isinstance(value, dict):
                    copies[id(value)] = {k: copy(v, depth + 1) for k, v in value.items()}
                else:
                    items = [copy(v, depth + 1) for v in value]
                    copies[id(value)] = items if isinstance(value, list) else tuple(items)
            return copies[id(value)]

        return copy(obj, 0)


MAX_MATERIALIZE_DEPTH = 32  # containers are copied this deep (a pickle may nest them without end)


def _holds_tensor(value: Any) -> bool:
    """Whether a TensorStub lies anywhere in ``value``, walked without recursion."""
    pending, seen = [value], set()
    while pending:
        v = pending.pop()
        if isinstance(v, TensorStub):
            return True
        if isinstance(v, (dict, list, tuple)) and id(v) not in seen:
            seen.add(id(v))
            pending.extend(v.values() if isinstance(v, dict) else v)
    return False


def open_checkpoint(path: str, limits: ReaderLimits = DEFAULT_LIMITS) -> Checkpoint:
    """Inspect ``path`` and map it; :class:`CheckpointError` (one line) when it is not ``ok``."""
    try:
        with open_regular(path) as f:
            inspection = inspect_file(f, limits)
            size = f.seek(0, 2)
            # ACCESS_COPY: private pages, so torch may treat tensors as writable while the file
            # itself can never be written through the map.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    except UnsafePickleError as exc:
        raise CheckpointError(f"{path}: unsafe: pickle {one_line(exc)}") from None
    except UnreadableError as exc:
        raise CheckpointError(f"{path}: unreadable: {one_line(exc)}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return Checkpoint(inspection, mapped)
