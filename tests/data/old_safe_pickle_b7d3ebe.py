"""The one reader of ``torch.save`` files: total, bounded, and nothing in the file ever runs.

A ``torch.save`` file is a zip archive holding ``<prefix>/data.pkl`` (the pickled object
tree) and one ``<prefix>/data/<key>`` entry per tensor storage. We never hand the pickle to
Python's unpickler. :class:`PickleMachine` interprets its opcodes itself (every protocol,
0 to 5) and builds only inert values:

- containers and plain values (what ``torch.load(weights_only=True)`` admits: dict, list,
  tuple, set, frozenset, bytes, complex, OrderedDict, Counter, torch.device, torch.Size,
  dtypes), with tensors as :class:`TensorStub` (dtype, shape, stride, storage, offset);
- instances of other classes that a pickle creates without calling anything of theirs
  (``NEWOBJ``, ``copyreg._reconstructor``: dataclasses, ``argparse.Namespace``, numpy RNG
  state, numpy arrays and scalars) as :class:`PickledObject` records: the class name and
  the data the pickle holds; the class is never imported;
- a call of anything else (``REDUCE``, ``INST``, ``OBJ``, ...) makes the file ``unsafe``,
  naming the callable: that is what ``torch.load(weights_only=False)`` would run.

Every quantity the bytes control is capped (:class:`ReaderLimits`: objects, items, memo,
integer size, key size, rank, time), so a hostile file costs bounded work. The archive must
be unambiguous: one pickle, every entry under its prefix, storages stored uncompressed at
offsets inside the file; the loader (:mod:`ckpt_migrate.loader`) memory-maps tensors at
exactly the offsets validated here, so what is inspected is what is loaded.

Standard library only (no torch): detection runs on the login node in milliseconds.
:func:`inspect_archive` never raises for bad input.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickletools
import re
import stat
import struct
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any

# torch dtype name -> bytes per element: every dtype torch.save writes for plain tensors.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "complex32": 4, "complex64": 8,
    "complex128": 16, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "uint16": 2,
    "uint32": 4, "uint64": 8, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}
# Legacy typed-storage class names (protocol of torch < 2.x, still written for these dtypes).
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
TORCH_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64",
                       "int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128",
                       "chalf": "complex32"}
# The entries torch.save writes beside data.pkl and data/<key>; anything else is ambiguous.
KNOWN_ENTRIES = {"version", ".data/version", ".data/serialization_id", "byteorder", ".format_version",
                 ".storage_alignment"}


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
    seconds: float = 60.0  # wall time for one file


DEFAULT_LIMITS = ReaderLimits()


class UnsafePickleError(Exception):
    """The pickle calls something beyond data reconstruction; the message names it."""


class UnreadableError(Exception):
    """The bytes are not a checkpoint we can read unambiguously; the message says why (one line)."""


@dataclass(frozen=True)
class GlobalRef:
    """A module attribute the pickle names (a class, a dtype); never imported."""

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
    """An instance the pickle creates without calling its class: the class name and its data."""

    cls: str  # "module.Name", as the pickle names it
    args: tuple = ()
    state: Any = None
    items: Any = None  # what SETITEM(S)/APPEND(S) added (dict and list subclasses)

    def __repr__(self) -> str:
        return f"<{self.cls}>"


@dataclass
class ArchiveInspection:
    """What :func:`inspect_archive` found."""

    status: str  # "ok", "unsafe" or "unreadable"
    reason: str = ""  # one line, empty when ok
    obj: Any = None  # the object tree with TensorStubs, when ok
    storages: dict[str, StorageStub] = field(default_factory=dict)
    # storage key -> (offset of its bytes in the file, byte count), validated
    storage_spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    objects: list[str] = field(default_factory=list)  # non-container classes the pickle holds, sorted
    protocol: int = 0


def one_line(text: Any, limit: int = 200) -> str:
    """A reason fit for a report cell: printable, one line, at most ``limit`` characters."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- reconstruction: the only callables a pickle may call -----------------------------

def _ints(value: Any, what: str, limits: ReaderLimits) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > limits.max_rank:
        raise UnreadableError(f"{what} is not a tuple of at most {limits.max_rank} integers")
    if not all(type(v) is int and 0 <= v <= limits.max_dim for v in value):
        raise UnreadableError(f"{what} has an entry that is not an integer in [0, 2**48]")
    return value


def _dtype_name(value: Any) -> str:
    if isinstance(value, GlobalRef) and value.module == "torch":
        name = TORCH_DTYPE_ALIASES.get(value.name, value.name)
        if name in DTYPE_ITEMSIZE:
            return name
    raise UnreadableError(f"unsupported tensor dtype {one_line(value, 60)}")


class PickleMachine:
    """Interprets one pickle's opcodes into inert values, within :class:`ReaderLimits`."""

    def __init__(self, data: bytes, limits: ReaderLimits = DEFAULT_LIMITS, deadline: float | None = None,
                 legacy: bool = False):
        self.data, self.limits, self.legacy = data, limits, legacy
        self.deadline = deadline if deadline is not None else time.monotonic() + limits.seconds
        self.storages: dict[str, StorageStub] = {}
        self.objects: set[str] = set()
        self.protocol = 0
        self.end = 0  # offset just past STOP
        self._objects = self._items = 0
        self._reconstruct = {
            ("collections", "OrderedDict"): self._dict_from,
            ("collections", "Counter"): self._counter,
            ("collections", "defaultdict"): lambda *a: {},
            ("builtins", "set"): lambda items=(): self._set(items, set),
            ("builtins", "frozenset"): lambda items=(): self._set(items, frozenset),
            ("builtins", "complex"): self._complex,
            ("builtins", "bytes"): lambda items=(): self._bytes(items),
            ("builtins", "bytearray"): self._bytearray,
            ("_codecs", "encode"): self._codecs_encode,
            ("copyreg", "_reconstructor"): self._reconstructor,
            ("torch", "device"): self._device,
            ("torch", "Size"): lambda dims=(): _ints(tuple(dims) if isinstance(dims, list) else dims,
                                                     "torch.Size", self.limits),
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
        }

    # -- bookkeeping
    def _count(self, objects: int = 1, items: int = 0) -> None:
        self._objects += objects
        self._items += items
        if self._objects > self.limits.max_objects:
            raise UnreadableError(f"pickle creates more than {self.limits.max_objects} objects")
        if self._items > self.limits.max_items:
            raise UnreadableError(f"pickle adds more than {self.limits.max_items} container items")

    def _key(self, value: Any) -> Any:
        """A value used as a dict key or set member: hashable, and cheap to hash.

        Hashing a tuple visits every element, shared ones again each time, so the size that
        counts is the tree's, not the DAG's: 60 nested pairs of one tuple are 2**60 visits."""
        sizes: dict[int, int] = {}
        pending = [(value, False)]
        while pending:
            v, children_done = pending.pop()
            if isinstance(v, (list, dict, set, bytearray)):
                raise UnreadableError(f"unhashable {type(v).__name__} used as a dict key or set member")
            if not isinstance(v, tuple) or id(v) in sizes:
                continue
            if children_done:
                sizes[id(v)] = 1 + sum(sizes.get(id(c), 1) for c in v)
                if sizes[id(v)] > self.limits.max_key_nodes:
                    raise UnreadableError(f"a dict key or set member has more than {self.limits.max_key_nodes} parts")
            else:
                pending.append((v, True))
                pending.extend((c, False) for c in v)
        return value

    # -- reconstruction functions (the call opcodes' only targets)
    def _dict_from(self, items: Any = ()) -> dict:
        result: dict = {}
        if isinstance(items, dict):
            items = list(items.items())
        for pair in items if isinstance(items, (list, tuple)) else ():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise UnreadableError("OrderedDict built from something that is not key/value pairs")
            result[self._key(pair[0])] = pair[1]
        self._count(1, len(result))
        return result

    def _counter(self, items: Any = None) -> dict:
        self.objects.add("collections.Counter")
        return dict(items) if isinstance(items, dict) else {}

    def _set(self, items: Any, kind: type):
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise UnreadableError(f"{kind.__name__} built from a {type(items).__name__}")
        self._count(1, len(items))
        return kind(self._key(i) for i in items)

    def _complex(self, real: Any = 0.0, imag: Any = 0.0) -> complex:
        if not all(type(x) in (int, float) for x in (real, imag)):
            raise UnreadableError("complex built from something that is not a number")
        return complex(real, imag)

    def _bytes(self, items: Any) -> bytes:
        if isinstance(items, (bytes, bytearray)):
            return bytes(items)
        if isinstance(items, (list, tuple)) and all(type(i) is int and 0 <= i < 256 for i in items):
            return bytes(items)
        raise UnreadableError("bytes built from something that is not bytes")

    def _bytearray(self, data: Any = b"", encoding: Any = None) -> bytes:
        # Protocol 2 pickles bytearray(b) as bytearray(b.decode("latin-1"), "latin-1").
        return self._codecs_encode(data, encoding) if encoding is not None else self._bytes(data)

    def _codecs_encode(self, text: Any, encoding: Any = "utf-8") -> bytes:
        # Protocol < 3 pickles bytes as _codecs.encode(str, "latin1").
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
            raise UnreadableError("_codecs.encode with arguments that are not a string and a text encoding")
        try:
            return text.encode(encoding)
        except UnicodeEncodeError as exc:
            raise UnreadableError(f"_codecs.encode: {exc.reason}") from None

    def _reconstructor(self, cls: Any = None, base: Any = None, state: Any = None) -> PickledObject:
        # copyreg._reconstructor(cls, object, None) is how protocols 0 and 1 create a plain
        # instance. With another base it runs base.__init__(obj, state): only builtin containers'.
        if not isinstance(cls, GlobalRef) or not isinstance(base, GlobalRef):
            raise UnreadableError("copyreg._reconstructor without a class")
        if base.module != "builtins" or base.name not in ("object", "dict", "list", "set", "tuple", "int",
                                                          "float", "str", "bytes"):
            raise UnsafePickleError(f"copyreg._reconstructor runs {base}.__init__")
        if cls.module.split(".")[0] in _NO_NEWOBJ_MODULES:
            raise UnsafePickleError(f"copyreg._reconstructor creates {cls}")
        return self._record(cls, (), state)

    def _device(self, kind: Any = "cpu", index: Any = None) -> str:
        if not isinstance(kind, str) or not (index is None or type(index) is int):
            raise UnreadableError("torch.device with arguments that are not a name and an index")
        self.objects.add("torch.device")
        return one_line(kind if index is None else f"{kind}:{index}", 40)

    def _record(self, cls: GlobalRef, args: tuple = (), state: Any = None) -> PickledObject:
        self._count()
        self.objects.add(str(cls))
        return PickledObject(str(cls), args, state)

    def _tensor(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> TensorStub:
        if not isinstance(storage, StorageStub):
            raise UnreadableError("tensor rebuilt from something that is not a storage")
        dtype = dtype or storage.dtype
        shape, strides = _ints(size, "tensor size", self.limits), _ints(stride, "tensor stride", self.limits)
        if type(offset) is not int or offset < 0 or len(shape) != len(strides):
            raise UnreadableError(f"tensor of shape {list(shape)} has a malformed layout")
        stub = TensorStub(dtype, shape, storage.key, offset, strides)
        capacity = storage.nbytes // DTYPE_ITEMSIZE[dtype]
        if stub.numel and offset + sum((d - 1) * s for d, s in zip(shape, strides)) >= capacity:
            raise UnreadableError(f"tensor of shape {list(shape)} reaches past its storage of {capacity} elements")
        self._count()
        return stub

    def _rebuild_tensor(self, storage=None, offset=None, size=None, stride=None, *_ignored) -> TensorStub:
        return self._tensor(storage, offset, size, stride, None)

    def _rebuild_tensor_v3(self, storage=None, offset=None, size=None, stride=None, requires_grad=False,
                           hooks=None, dtype=None, *_ignored) -> TensorStub:
        return self._tensor(storage, offset, size, stride, _dtype_name(dtype))

    def _rebuild_parameter(self, data=None, *_ignored) -> TensorStub:
        if not isinstance(data, TensorStub):
            raise UnreadableError("parameter rebuilt from something that is not a tensor")
        return data

    def _storage(self, pid: Any) -> StorageStub:
        # torch.save writes ('storage', storage_type, key, location, numel); legacy files add a view.
        if isinstance(pid, str):  # protocol 0 writes the tuple's repr
            m = re.fullmatch(r"\('storage', <class 'torch\.(?:storage\.)?(\w+)'>, '([\w.]{1,64})', "
                             r"'([\w:]{1,32})', (\d{1,16})\)", pid)
            if not m:
                raise UnreadableError(f"unexpected persistent id {one_line(pid, 60)!r}")
            pid = ("storage", GlobalRef("torch", m.group(1)), m.group(2), m.group(3), int(m.group(4)))
        if not (isinstance(pid, tuple) and len(pid) == (6 if self.legacy else 5) and pid[0] == "storage"):
            raise UnreadableError(f"unexpected persistent id {one_line(repr(pid), 60)}")
        _, storage_type, key, location, numel = pid[:5]
        if not (isinstance(storage_type, GlobalRef) and storage_type.module in ("torch", "torch.storage")
                and storage_type.name in STORAGE_DTYPES):
            raise UnreadableError(f"unknown storage type {one_line(storage_type, 60)}")
        if not (isinstance(key, str) and re.fullmatch(r"[\w.]{1,64}", key) and isinstance(location, str)
                and type(numel) is int and 0 <= numel <= self.limits.max_dim):
            raise UnreadableError("malformed storage reference")
        dtype = STORAGE_DTYPES[storage_type.name]
        stub = StorageStub(key, dtype, one_line(location, 32), numel * DTYPE_ITEMSIZE[dtype])
        if self.storages.setdefault(key, stub) != stub:
            raise UnreadableError(f"storage {key} is referenced with two different types or sizes")
        return self.storages[key]

    def _call(self, func: Any, args: Any, opcode: str) -> Any:
        if not isinstance(args, tuple):
            raise UnreadableError(f"{opcode} with arguments that are not a tuple")
        if not isinstance(func, GlobalRef):
            raise UnsafePickleError(f"{opcode} calls a {type(func).__name__} built by the pickle")
        target = self._reconstruct.get((func.module, func.name))
        if target is not None:
            try:
                return target(*args)
            except TypeError:
                raise UnreadableError(f"{func} called with {len(args)} argument(s)") from None
        if (func.module, func.name) in _STDLIB_VALUES:
            return self._record(func, args)  # a date, a path, a decimal: its class and arguments, as data
        if _numpy_data(func):
            return _numpy_value(self, func, args)
        raise UnsafePickleError(f"{opcode} calls {func}")

    def _newobj(self, cls: Any, args: Any) -> Any:
        # NEWOBJ creates cls.__new__(cls, *args) without running __init__: a plain instance.
        if not isinstance(cls, GlobalRef) or not isinstance(args, tuple):
            raise UnreadableError("NEWOBJ without a class and an argument tuple")
        if cls.module == "builtins" and cls.name in ("object", "dict", "list", "set", "tuple"):
            return {"object": lambda: self._record(cls), "dict": dict, "list": list,
                    "set": set, "tuple": tuple}[cls.name]()
        if (cls.module, cls.name) in self._reconstruct or cls.module.split(".")[0] in _NO_NEWOBJ_MODULES:
            if (cls.module, cls.name) in self._reconstruct and not args:
                return self._call(cls, args, "NEWOBJ")
            raise UnsafePickleError(f"NEWOBJ creates {cls}")
        return self._record(cls, args)

    # -- the machine
    def run(self, start: int = 0) -> Any:
        stack: list = []
        marks: list[list] = []
        memo: dict[int, Any] = {}
        stream = io.BytesIO(self.data)
        stream.seek(start)
        ops = 0
        lim = self.limits

        def pop_mark() -> list:
            nonlocal stack
            if not marks:
                raise UnreadableError("pickle pops a mark it never set")
            items, stack = stack, marks.pop()
            return items

        try:
            with warnings.catch_warnings():
                # pickletools decodes protocol-0 strings with codecs.escape_decode, which warns
                # about invalid escapes in damaged data: the verdict says enough.
                warnings.simplefilter("ignore", DeprecationWarning)
                for op, arg, pos in pickletools.genops(stream):
                    ops += 1
                    if ops & 0xFFF == 0 and time.monotonic() > self.deadline:
                        raise UnreadableError(f"reading the pickle took longer than {lim.seconds:g} s")
                    name = op.name
                    if name in _PUSH_ARG:
                        if type(arg) is int and arg.bit_length() > lim.max_int_bits:
                            raise UnreadableError(f"integer of {arg.bit_length()} bits")
                        if name in ("STRING", "BINSTRING", "SHORT_BINSTRING") and isinstance(arg, bytes):
                            arg = arg.decode("latin-1")
                        elif name == "BYTEARRAY8":
                            arg = bytes(arg)
                        if isinstance(arg, (str, bytes)):
                            self._count()
                        stack.append(arg)
                    elif name in _PUSH_CONST:
                        stack.append(_PUSH_CONST[name])
                    elif name == "PROTO":
                        if not 0 <= arg <= 5:
                            raise UnreadableError(f"pickle protocol {arg} is not one Python writes")
                        self.protocol = arg
                    elif name == "FRAME":
                        pass
                    elif name == "STOP":
                        if len(stack) != 1 or marks:
                            raise UnreadableError("pickle ends with an unbalanced stack")
                        self.end = stream.tell()
                        return stack[0]
                    elif name == "MARK":
                        marks.append(stack)
                        stack = []
                    elif name == "POP":
                        if stack:
                            stack.pop()
                        else:
                            pop_mark()
                    elif name == "POP_MARK":
                        pop_mark()
                    elif name == "DUP":
                        stack.append(stack[-1])
                    elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                        self._count()
                        stack.append({"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_SET": set}[name]())
                    elif name == "EMPTY_TUPLE":
                        stack.append(())
                    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                        n = int(name[-1])
                        if len(stack) < n:
                            raise UnreadableError(f"{name} on a stack of {len(stack)}")
                        items = tuple(stack[-n:])
                        del stack[-n:]
                        self._count(1, n)
                        stack.append(items)
                    elif name in ("TUPLE", "LIST", "FROZENSET"):
                        items = pop_mark()
                        self._count(1, len(items))
                        stack.append(tuple(items) if name == "TUPLE" else items if name == "LIST"
                                     else frozenset(self._key(i) for i in items))
                    elif name == "DICT":
                        items = pop_mark()
                        if len(items) % 2:
                            raise UnreadableError("DICT with an odd number of items")
                        self._count(1, len(items) // 2)
                        stack.append({self._key(items[i]): items[i + 1] for i in range(0, len(items), 2)})
                    elif name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"):
                        if name in ("APPEND", "SETITEM"):
                            n = 1 if name == "APPEND" else 2
                            if len(stack) < n + 1:
                                raise UnreadableError(f"{name} on a stack of {len(stack)}")
                            items = stack[-n:]
                            del stack[-n:]
                        else:
                            items = pop_mark()
                        if not stack:
                            raise UnreadableError(f"{name} without a container")
                        self._add(stack[-1], items, name)
                    elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                        if not stack:
                            raise UnreadableError("memo store from an empty stack")
                        index = len(memo) if name == "MEMOIZE" else arg
                        if type(index) is not int or index < 0:
                            raise UnreadableError("memo index is not a non-negative integer")
                        memo[index] = stack[-1]
                        if len(memo) > lim.max_memo:
                            raise UnreadableError(f"pickle memo exceeds {lim.max_memo} entries")
                    elif name in ("GET", "BINGET", "LONG_BINGET"):
                        if arg not in memo:
                            raise UnreadableError(f"memo entry {one_line(arg, 20)} read before it was stored")
                        stack.append(memo[arg])
                    elif name in ("GLOBAL", "STACK_GLOBAL"):
                        if name == "GLOBAL":
                            module, _, attr = arg.partition(" ")
                        else:
                            if len(stack) < 2:
                                raise UnreadableError("STACK_GLOBAL on a short stack")
                            module, attr = stack[-2], stack[-1]
                            del stack[-2:]
                            if not (isinstance(module, str) and isinstance(attr, str)):
                                raise UnreadableError("STACK_GLOBAL with names that are not strings")
                        stack.append(_global(module, attr))
                    elif name == "REDUCE":
                        if len(stack) < 2:
                            raise UnreadableError("REDUCE on a short stack")
                        func, args = stack[-2], stack[-1]
                        del stack[-2:]
                        stack.append(self._call(func, args, "REDUCE"))
                    elif name in ("NEWOBJ", "NEWOBJ_EX"):
                        n = 2 if name == "NEWOBJ" else 3
                        if len(stack) < n:
                            raise UnreadableError(f"{name} on a short stack")
                        cls, args = stack[-n], stack[-n + 1]
                        if name == "NEWOBJ_EX" and stack[-1]:
                            raise UnsafePickleError(f"NEWOBJ_EX calls {one_line(cls, 80)} with keyword arguments")
                        del stack[-n:]
                        stack.append(self._newobj(cls, args))
                    elif name == "INST":
                        module, _, attr = arg.partition(" ")
                        stack.append(self._call(_global(module, attr), tuple(pop_mark()), "INST"))
                    elif name == "OBJ":
                        items = pop_mark()
                        if not items:
                            raise UnreadableError("OBJ without a class")
                        stack.append(self._call(items[0], tuple(items[1:]), "OBJ"))
                    elif name == "BUILD":
                        if len(stack) < 2:
                            raise UnreadableError("BUILD on a short stack")
                        state = stack.pop()
                        self._build(stack[-1], state)
                    elif name in ("PERSID", "BINPERSID"):
                        pid = arg if name == "PERSID" else (stack.pop() if stack else None)
                        stack.append(self._storage(pid))
                    elif name in ("EXT1", "EXT2", "EXT4"):
                        raise UnreadableError(f"extension code {arg} is not registered")
                    else:  # NEXT_BUFFER, READONLY_BUFFER: out-of-band data a file cannot carry
                        raise UnreadableError(f"opcode {name} is not supported in a file")
        except (UnreadableError, UnsafePickleError):
            raise
        except IndexError:
            raise UnreadableError("damaged pickle: opcode on an empty stack") from None
        except RecursionError:
            raise UnreadableError("damaged pickle: nests too deeply") from None
        except MemoryError:
            raise  # the caller's budget ran out: it names the budget (isolate.detect_isolated)
        except Exception as exc:  # anything else the bytes provoke is a damaged file
            raise UnreadableError(f"damaged pickle: {type(exc).__name__}: {one_line(exc, 120)}") from None
        raise UnreadableError("damaged pickle: ends without STOP (truncated)")

    def _add(self, target: Any, items: list, opcode: str) -> None:
        self._count(0, len(items))
        if isinstance(target, PickledObject):  # a dict or list subclass being filled
            if opcode.startswith("SETITEM"):
                target.items = target.items if isinstance(target.items, dict) else {}
            else:
                target.items = target.items if isinstance(target.items, list) else []
            target = target.items
        if opcode.startswith("APPEND") and isinstance(target, list):
            target.extend(items)
        elif opcode.startswith("SETITEM") and isinstance(target, dict):
            if len(items) % 2:
                raise UnreadableError("SETITEMS with an odd number of items")
            for i in range(0, len(items), 2):
                target[self._key(items[i])] = items[i + 1]
        elif opcode == "ADDITEMS" and isinstance(target, set):
            target.update(self._key(i) for i in items)
        else:
            raise UnreadableError(f"{opcode} on a {type(target).__name__}")

    def _build(self, target: Any, state: Any) -> None:
        # BUILD sets an instance's state. On a record it is data; on a dict (a state dict's
        # _metadata) it would only set attributes, which we do not keep. On a class it would
        # set class attributes: code, in effect.
        if isinstance(target, PickledObject):
            target.state = state
        elif isinstance(target, GlobalRef):
            raise UnsafePickleError(f"BUILD sets attributes of {target}")
        elif not isinstance(target, (dict, list)):
            raise UnreadableError(f"BUILD on a {type(target).__name__}")


# Modules whose classes a pickle may not create even without __init__ (their __new__ or
# __setstate__ act on the world, or they are callables in disguise).
_NO_NEWOBJ_MODULES = {"os", "posix", "nt", "subprocess", "sys", "builtins", "shutil", "socket", "importlib",
                      "ctypes", "code", "runpy", "pty", "multiprocessing", "functools", "operator", "_operator",
                      "pickle", "_pickle", "marshal", "io", "_io", "webbrowser", "types", "codecs", "_codecs",
                      "signal", "threading", "asyncio", "tempfile", "copyreg", "inspect", "torch", "_thread"}
# Standard-library value types whose constructors only build the value; kept as records.
_STDLIB_VALUES = {("datetime", n) for n in ("datetime", "date", "time", "timedelta", "timezone")} | {
    ("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")} | {
    ("decimal", "Decimal"), ("fractions", "Fraction"), ("uuid", "UUID")}
_PUSH_ARG = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
             "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
             "BYTEARRAY8", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_PUSH_CONST = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


def _global(module: str, name: str) -> GlobalRef:
    """A name the pickle refers to, with Python 2 names mapped as a real unpickler would."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return GlobalRef(one_line(module, 120), one_line(name, 120))


# --- numpy values: data that numpy's own reduce functions rebuild --------------------

_NUMPY_SCALAR_FORMATS = {"b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I",
                         "i8": "q", "u8": "Q", "f2": "e", "f4": "f", "f8": "d"}


def _numpy_data(func: GlobalRef) -> bool:
    """numpy's data-rebuilding functions: dtype, scalar, array, and RNG state constructors
    (including the Cython-generated ``__pyx_unpickle_*`` of numpy.random's classes)."""
    if func.module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        return func.name in ("dtype", "scalar", "_reconstruct")
    if func.module in ("numpy.core.numeric", "numpy._core.numeric"):
        return func.name == "_frombuffer"  # protocol 5 arrays
    return func.module.split(".")[:2] == ["numpy", "random"] and (
        func.name in ("__RandomState_ctor", "__randomstate_ctor", "__bit_generator_ctor", "__generator_ctor")
        or func.name.startswith("__pyx_unpickle_"))


def _numpy_value(machine: PickleMachine, func: GlobalRef, args: tuple) -> Any:
    """A numpy scalar becomes its Python number (a step, a loss); everything else a record."""
    if func.name == "scalar" and len(args) == 2 and isinstance(args[0], PickledObject) \
            and args[0].cls.endswith("dtype") and args[0].args and isinstance(args[1], bytes):
        machine.objects.add("numpy.scalar")
        code = str(args[0].args[0]).lstrip("<>=|")
        fmt = _NUMPY_SCALAR_FORMATS.get(code)
        if fmt and struct.calcsize(fmt) == len(args[1]):
            return struct.unpack("<" + fmt, args[1])[0]
    name = "numpy.ndarray" if func.name in ("_reconstruct", "_frombuffer") else str(func)
    return machine._record(GlobalRef(*name.rsplit(".", 1)), args)


# --- the archive -----------------------------------------------------------------------

def _entry_span(f, info: zipfile.ZipInfo, file_size: int) -> tuple[int, int]:
    """(offset, size) of a stored entry's bytes, read from its local header and checked."""
    if not 0 <= info.header_offset < file_size:
        raise UnreadableError(f"zip entry {one_line(info.filename, 60)} starts outside the file")
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise UnreadableError(f"zip entry {one_line(info.filename, 60)} has no local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    if f.read(name_len) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace"):
        raise UnreadableError(f"zip entry {one_line(info.filename, 60)}: local and central names differ")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > file_size:
        raise UnreadableError(f"zip entry {one_line(info.filename, 60)} reaches past the end of the file (truncated)")
    return start, info.file_size


def _archive_layout(f, file_size: int, limits: ReaderLimits) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """The one prefix and the entries by name, or UnreadableError for anything ambiguous."""
    try:
        archive = zipfile.ZipFile(f)
        infos = archive.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, NotImplementedError) as exc:
        raise UnreadableError(f"damaged or truncated zip archive: {one_line(exc, 120)}") from None
    if len(infos) > limits.max_entries:
        raise UnreadableError(f"zip archive with {len(infos)} entries")
    names = [i.filename for i in infos]
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pickles:
        raise UnreadableError("zip archive without data.pkl (not a torch.save file)")
    if len(pickles) > 1:
        raise UnreadableError(f"ambiguous archive: {len(pickles)} data.pkl entries")
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
        raise UnreadableError("a TorchScript archive (torch.jit.save), not a torch.save checkpoint")
    if len(set(names)) != len(names):
        raise UnreadableError("ambiguous archive: duplicate entry names")
    entries = {}
    for info in infos:
        rel = info.filename[len(prefix):] if info.filename.startswith(prefix) else None
        if rel is None or "/" in prefix[:-1] or not (rel == "data.pkl" or rel in KNOWN_ENTRIES
                                                    or re.fullmatch(r"data/[\w.]{1,64}", rel)):
            raise UnreadableError(f"ambiguous archive: stray entry {one_line(info.filename, 80)!r}")
        if info.flag_bits & 0x1:
            raise UnreadableError(f"zip entry {one_line(info.filename, 60)} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            raise UnreadableError(f"zip entry {one_line(info.filename, 60)} is compressed "
                                  f"(torch.save stores entries uncompressed)")
        entries[rel] = info
    return prefix, entries


def _small_entry(f, info: zipfile.ZipInfo | None, file_size: int, limit: int = 64) -> str:
    if info is None:
        return ""
    if info.file_size > limit:
        raise UnreadableError(f"zip entry {one_line(info.filename, 60)} is larger than expected")
    start, size = _entry_span(f, info, file_size)
    f.seek(start)
    return f.read(size).decode("ascii", "replace").strip()


def inspect_file(f, limits: ReaderLimits = DEFAULT_LIMITS) -> ArchiveInspection:
    """Inspect an open, regular ``torch.save`` file; raises UnreadableError/UnsafePickleError only."""
    try:
        return _inspect_file(f, limits)
    except (UnreadableError, UnsafePickleError, MemoryError):
        raise
    except OSError as exc:
        raise UnreadableError(f"cannot read: {exc.strerror or exc}") from None
    except Exception as exc:  # whatever else the bytes provoke (zipfile, struct): a damaged file
        raise UnreadableError(f"damaged file: {type(exc).__name__}: {one_line(exc, 120)}") from None


def _inspect_file(f, limits: ReaderLimits) -> ArchiveInspection:
    deadline = time.monotonic() + limits.seconds
    file_size = f.seek(0, 2)
    f.seek(0)
    head = f.read(4)
    if not head:
        raise UnreadableError("empty file")
    if head != b"PK\x03\x04":
        if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"K", b"I", b"L"):
            _legacy(f, file_size, limits, deadline)
        f.seek(8)
        if f.read(2) in (b'{"', b"{'"):  # an 8-byte header length, then a JSON header
            raise UnreadableError("a safetensors file, not a torch.save checkpoint")
        raise UnreadableError("not a zip archive (torch.save format)")
    prefix, entries = _archive_layout(f, file_size, limits)
    if _small_entry(f, entries.get("byteorder"), file_size) not in ("", "little"):
        raise UnreadableError("big-endian archive (byteorder is not little)")
    pkl = entries["data.pkl"]
    if pkl.file_size > limits.max_pickle_bytes:
        raise UnreadableError(f"pickle of {pkl.file_size} bytes exceeds the limit of {limits.max_pickle_bytes}")
    start, size = _entry_span(f, pkl, file_size)
    f.seek(start)
    data = f.read(size)
    if len(data) != size:
        raise UnreadableError("data.pkl is cut short (truncated)")
    machine = PickleMachine(data, limits, deadline)
    obj = machine.run()
    spans: dict[str, tuple[int, int]] = {}
    for key, storage in machine.storages.items():
        info = entries.get(f"data/{key}")
        if info is None:
            raise UnreadableError(f"storage data/{key} missing from the archive")
        spans[key] = _entry_span(f, info, file_size)
        if spans[key][1] < storage.nbytes:
            raise UnreadableError(f"storage data/{key} holds {spans[key][1]} bytes, expected {storage.nbytes}")
    return ArchiveInspection("ok", "", obj, machine.storages, spans, sorted(machine.objects), machine.protocol)


def _legacy(f, file_size: int, limits: ReaderLimits, deadline: float) -> None:
    """A pre-1.6 (non-zip) torch.save file: read its pickles to tell unsafe from merely old."""
    f.seek(0)
    data = f.read(min(file_size, limits.max_pickle_bytes))
    position = 0
    try:
        for part in ("magic number", "protocol", "system info", "object"):
            machine = PickleMachine(data, limits, deadline, legacy=(part == "object"))
            machine.run(position)
            position = machine.end
    except UnsafePickleError:
        raise
    except UnreadableError as exc:
        raise UnreadableError(f"not a zip archive, and not a legacy torch.save file either ({exc})") from None
    raise UnreadableError("legacy (pre-1.6, non-zip) torch.save format is not supported; its pickle calls "
                          "nothing unsafe; ask for a copy saved by torch>=1.6 where the model was trained")


_FILE_KINDS = ((stat.S_ISDIR, "is a directory, not a file"), (stat.S_ISFIFO, "is a FIFO (named pipe), not a file"),
               (stat.S_ISSOCK, "is a socket, not a file"), (stat.S_ISCHR, "is a character device, not a file"),
               (stat.S_ISBLK, "is a block device, not a file"))


def open_regular(path: str):
    """Open ``path`` for reading only if it is a regular file, without ever blocking (FIFOs)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnreadableError("file not found (broken symlink or removed)") from None
    for is_kind, message in _FILE_KINDS:
        if is_kind(st.st_mode):
            raise UnreadableError(message)
    # O_NONBLOCK: if the path was swapped for a FIFO since the stat, open() returns at once.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise UnreadableError("is not a regular file")
    return f


def inspect_archive(path: str, limits: ReaderLimits = DEFAULT_LIMITS) -> ArchiveInspection:
    """Read the object tree of the ``torch.save`` file at ``path``; never raises for bad input."""
    try:
        with open_regular(path) as f:
            return inspect_file(f, limits)
    except UnsafePickleError as exc:
        return ArchiveInspection("unsafe", one_line(f"pickle {exc}"))
    except UnreadableError as exc:
        return ArchiveInspection("unreadable", one_line(exc))
    except PermissionError:
        return ArchiveInspection("unreadable", "permission denied")
    except OSError as exc:
        return ArchiveInspection("unreadable", one_line(f"cannot read: {exc.strerror or exc}"))
    except RecursionError:
        return ArchiveInspection("unreadable", "nests too deeply")
    except MemoryError:
        raise  # a memory budget ran out, not a property of the file alone; the budget's owner names it
    except Exception as exc:  # the contract: a verdict, never a traceback
        return ArchiveInspection("unreadable", one_line(f"cannot inspect: {type(exc).__name__}: {exc}"))
