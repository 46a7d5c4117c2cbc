"""The inert values the pickle reader builds, its two verdict exceptions and its limits.

Standard library only: detection runs on the login node without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# torch dtype name -> bytes per element: every dtype torch.save writes for plain tensors.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "complex32": 4, "complex64": 8,
    "complex128": 16, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "uint16": 2,
    "uint32": 4, "uint64": 8, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "quint8": 1, "qint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,  # quantized tensors' storages
}
# Legacy typed-storage class names (still written by torch.save for these dtypes).
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8", "QUInt8Storage": "quint8", "QInt8Storage": "qint8", "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}
TORCH_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64",
                       "int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128",
                       "chalf": "complex32"}


@dataclass(frozen=True)
class ReaderLimits:
    """Caps on the work a file can ask of the reader (each far above what a real checkpoint needs)."""

    max_pickle_bytes: int = 256 * 2**20  # data.pkl size; a real one is a few MB (code + optimizer bookkeeping)
    max_objects: int = 1_000_000  # containers, strings and records created
    max_items: int = 5_000_000  # elements appended or set into containers
    max_memo: int = 1_000_000  # memo entries
    max_int_bits: int = 1024  # larger integers are not checkpoint data
    max_key_nodes: int = 256  # elements of one dict key / set member (hashing cost)
    max_rank: int = 64  # tensor dimensions
    max_dim: int = 2**48  # elements along one dimension
    max_entries: int = 100_000  # zip entries
    max_pickles: int = 100_000  # pickles in one legacy file (its storage records)
    seconds: float = 60.0  # wall time for one file


DEFAULT_LIMITS = ReaderLimits()


class UnsafePickleError(Exception):
    """The pickle would import or call something beyond data reconstruction; the message names it."""


class UnreadableError(Exception):
    """The bytes are not a checkpoint we can read unambiguously; the message says why (one line)."""


def one_line(text: Any, limit: int = 200) -> str:
    """A reason fit for a report cell: printable, one line, at most ``limit`` characters.

    A value read from a pickle is named by :func:`describe`, never printed whole."""
    text = text if isinstance(text, (str, BaseException)) else describe(text)
    text = "".join(ch if ch.isprintable() else " " for ch in str(text)[: limit * 4])
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    """A short name for a value read from a pickle. Never its repr: containers a pickle shares
    by memo print to exponentially many characters, and a huge int refuses to print."""
    if value is None or isinstance(value, (bool, float, GlobalRef)):
        return str(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:80])
    if isinstance(value, PickledObject):
        return f"a {value.cls} instance"
    if isinstance(value, (tuple, list, dict, set, frozenset, bytes, bytearray)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class GlobalRef:
    """An allowed module attribute the pickle names (a class, a dtype); never imported."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class StorageStub:
    """Where a storage's bytes live in the archive."""

    key: str  # entry name under <prefix>/data/
    dtype: str  # element dtype of a typed storage; "uint8" for an untyped one
    location: str  # device the storage was saved from, e.g. "cuda:0"
    nbytes: int


@dataclass(frozen=True)
class TensorStub:
    """A tensor as the pickle describes it, validated against its storage; no byte of it is read."""

    dtype: str
    shape: tuple[int, ...]
    storage_key: str
    storage_offset: int  # in elements of dtype
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]


@dataclass(eq=False)
class PickledObject:
    """An instance of an allowed record class (a ``__main__`` class, ``argparse.Namespace``, a
    numpy value, a sparse or quantized tensor): its class name and the data the pickle holds."""

    cls: str  # "module.Name", as the pickle names it
    args: tuple = ()
    state: Any = None

    def __repr__(self) -> str:
        return f"<{self.cls}>"


@dataclass(frozen=True)
class LegacyRef:
    """A persistent id of a pre-1.6 file (a storage key or a container's source): never loaded."""

    pid: Any


class OrderedDictValue(dict):
    """A ``collections.OrderedDict``: a dict that may also receive BUILD (its ``_metadata``)."""


class CounterValue(dict):
    """A ``collections.Counter``."""


class DefaultDictValue(dict):
    """A ``collections.defaultdict`` (its default factory is kept as a name, never called)."""


# Dicts the SETITEM(S) opcodes may fill: the real containers, never a record's __setitem__.
DICT_TYPES = (dict,)
