"""Read a ``torch.save`` archive's object tree without torch and without running anything.

A ``torch.save`` file is a zip archive holding ``<prefix>/data.pkl`` (the pickled object
tree) and one ``<prefix>/data/<key>`` entry per tensor storage. The pickle names the
functions that rebuild tensors; a hostile pickle can name any importable callable
instead. We unpickle with a restricted ``find_class`` that admits only containers,
primitive values and the tensor-rebuild references, each replaced by a harmless stand-in,
so tensors come back as :class:`TensorStub` (dtype, shape, storage key, offset) and no
tensor byte is read. Any other global makes the file ``unsafe``; a damaged file is
``unreadable``. Neither ever raises out of :func:`inspect_archive`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any

# Storage class name in the pickle -> (dtype name, bytes per element).
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexFloatStorage": ("complex64", 8),
    "ComplexDoubleStorage": ("complex128", 16),
}
# torch dtypes may appear as plain values (e.g. in metadata); they are harmless names.
TORCH_DTYPE_NAMES = {
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
    "uint8", "bool", "complex64", "complex128", "float", "double", "half", "long", "int",
}

# Largest pickle we are willing to parse: the object tree of a real checkpoint is a few
# MB (the training script text and optimizer bookkeeping); more is a damaged or hostile file.
MAX_PICKLE_BYTES = 256 * 1024 * 1024


class UnsafePickleError(Exception):
    """The pickle references a global outside the allow-list."""


@dataclass(frozen=True)
class StorageStub:
    """Where a tensor's bytes live in the archive."""

    dtype: str  # element dtype name, e.g. "bfloat16"
    key: str  # entry name under <prefix>/data/
    location: str  # device the storage was saved from, e.g. "cuda:0"
    numel: int  # elements in the storage


@dataclass(frozen=True)
class TensorStub:
    """A tensor as described by the pickle; its bytes are never read."""

    dtype: str
    shape: tuple[int, ...]
    storage_key: str
    storage_offset: int
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: str) -> int:
    for name, size in STORAGE_DTYPES.values():
        if name == dtype:
            return size
    return 1


@dataclass
class ArchiveInspection:
    """What :func:`inspect_archive` found."""

    status: str  # "ok", "unsafe" or "unreadable"
    reason: str = ""  # one line, empty when ok
    obj: Any = None  # the object tree with TensorStubs, when ok
    storages: dict[str, StorageStub] = field(default_factory=dict)


# --- the stand-ins that the allow-list maps globals to -------------------------------

def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, StorageStub):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    stub = TensorStub(storage.dtype, tuple(int(s) for s in size), storage.key,
                      int(storage_offset), tuple(int(s) for s in stride))
    if len(stub.shape) != len(stub.stride) or any(d < 0 for d in stub.shape + stub.stride) or stub.storage_offset < 0:
        raise pickle.UnpicklingError(f"tensor of shape {list(stub.shape)} has a malformed layout")
    if stub.numel and stub.storage_offset + sum((d - 1) * st for d, st in zip(stub.shape, stub.stride)) >= storage.numel:
        raise pickle.UnpicklingError(f"tensor of shape {list(stub.shape)} reaches past its storage "
                                     f"of {storage.numel} elements")
    return stub


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, TensorStub):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


class _DtypeName(str):
    """A torch dtype or storage type seen as a value; only its name is kept."""


# (module, name) -> stand-in. Everything else is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, StorageStub] = {}

    def find_class(self, module: str, name: str):
        # Resolve Python 2 names ("__builtin__", "commands") as a real unpickler would, so the
        # reason names what would have run.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        stand_in = _ALLOWED_GLOBALS.get((module, name))
        if stand_in is not None:
            return stand_in
        if module == "torch" and (name in STORAGE_DTYPES or name in TORCH_DTYPE_NAMES):
            return _DtypeName(name)
        raise UnsafePickleError(f"{module}.{name}")

    def persistent_load(self, pid):
        # torch.save writes ('storage', storage_type, key, location, numel).
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, location, numel = pid
        type_name = str(storage_type)
        if type_name not in STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unknown storage type {type_name!r:.40}")
        stub = StorageStub(STORAGE_DTYPES[type_name][0], str(key), str(location), int(numel))
        self.storages[stub.key] = stub
        return stub


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def inspect_archive(path: str) -> ArchiveInspection:
    """Read the object tree of the ``torch.save`` archive at ``path``; never raises for bad input."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if not head:
                return ArchiveInspection("unreadable", "empty file")
            if head != b"PK\x03\x04":
                if head[:2] == b"\x80\x02":
                    return ArchiveInspection(
                        "unreadable", "legacy (non-zip) torch serialization; re-save with torch>=1.6")
                return ArchiveInspection("unreadable", "not a zip archive (torch.save format)")
            f.seek(0)
            return _inspect_zip(f)
    except IsADirectoryError:
        return ArchiveInspection("unreadable", "is a directory, not a file")
    except FileNotFoundError:
        return ArchiveInspection("unreadable", "file not found (broken symlink or removed)")
    except PermissionError:
        return ArchiveInspection("unreadable", "permission denied")
    except OSError as exc:
        return ArchiveInspection("unreadable", _one_line(f"cannot read: {exc}"))


def _inspect_zip(f) -> ArchiveInspection:
    try:
        archive = zipfile.ZipFile(f)
        infos = {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        return ArchiveInspection("unreadable", _one_line(f"damaged or truncated zip archive: {exc}"))
    pickles = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pickles:
        return ArchiveInspection("unreadable", "zip archive without data.pkl (not a torch.save file)")
    pkl_name = sorted(pickles, key=len)[0]
    prefix = pkl_name[: -len("data.pkl")]
    if infos[pkl_name].file_size > MAX_PICKLE_BYTES:
        return ArchiveInspection("unreadable", f"pickle of {infos[pkl_name].file_size} bytes exceeds the limit")
    try:
        data = archive.read(pkl_name)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        return ArchiveInspection("unreadable", _one_line(f"cannot read data.pkl: {exc}"))
    unpickler = _RestrictedUnpickler(data)
    try:
        obj = unpickler.load()
    except UnsafePickleError as exc:
        return ArchiveInspection("unsafe", f"pickle references disallowed global {exc}")
    except RecursionError:
        return ArchiveInspection("unreadable", "pickle nests too deeply")
    except MemoryError:
        return ArchiveInspection("unreadable", "pickle needs too much memory")
    except Exception as exc:  # any parse failure of untrusted bytes is a damaged file
        return ArchiveInspection("unreadable", _one_line(f"damaged pickle: {type(exc).__name__}: {exc}"))
    # Every storage the pickle names must be in the archive with enough bytes.
    for key, stub in unpickler.storages.items():
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            return ArchiveInspection("unreadable", f"storage data/{key} missing from the archive")
        need = stub.numel * _itemsize(stub.dtype)
        if info.file_size < need:
            return ArchiveInspection(
                "unreadable", f"storage data/{key} holds {info.file_size} bytes, expected {need}")
    return ArchiveInspection("ok", "", obj, unpickler.storages)
