"""Ground truth for the reader's verdicts: CPython's own C unpickler, run so that it imports nothing
and calls nothing real.

:func:`record` loads a pickle with a subclass of the C ``pickle.Unpickler`` over ``io.BytesIO``
(how ``torch.load`` reads ``data.pkl``, with torch's ``encoding="utf-8"``). Its ``find_class``
returns a fresh *recording stub class* for every name and its ``persistent_load`` a stub
storage, so every opcode runs exactly as it does under ``torch.load(weights_only=False)``,
frames and memo included, but what the unpickler would import or call is only written down:

- ``resolve``: a ``GLOBAL``/``STACK_GLOBAL``/``INST`` name, raw and after the ``_compat_pickle``
  mapping the real ``find_class`` applies while the unpickler's protocol is below 3 (read from
  the C unpickler itself through a probe name, see :func:`_protocol_below_3`);
- ``call`` (``REDUCE``, ``OBJ``, ``INST`` with arguments), ``new`` (``NEWOBJ``, empty ``INST``),
  ``setstate`` (``BUILD``), ``setitem``/``extend``/``append``/``add`` (``SETITEM(S)``,
  ``APPEND(S)``, ``ADDITEMS`` on a stub), ``hash`` (a stub used as a dict key or set member),
  ``getattr``, ``iter``, ``persid`` (a persistent id).

:func:`analyse` turns a record into the verdict the reader owes, given an allow-list.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import math
import pickle
import sys
import tarfile
import types
import zipfile
from dataclasses import dataclass, field
from typing import Any

MAIN = "__main__"

# --- recording stubs -----------------------------------------------------------------------------

_current: list | None = None  # the event list of the load in progress (None: record nothing)


def _event(kind: str, target: Any, *details: Any) -> None:
    if _current is not None:
        _current.append((kind, target) + details)


class _Method:
    """A method that records its call, on a stub class as on a stub instance (BUILD, APPEND(S)
    and ADDITEMS look ``__setstate__``/``extend``/``append``/``add`` up on whatever they are given)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __get__(self, obj, owner):
        target, kind = (owner if obj is None else obj), self.kind

        def method(*args, **kwargs):
            _event(kind, target, args, kwargs)
        return method


class _StubMeta(type):
    """The type of every stub class: calling one records a call and returns a stub instance."""

    def __call__(cls, *args, **kwargs):
        if cls.__dict__.get("_stub_name") == "copyreg._reconstructor" and args and isinstance(args[0], _StubMeta):
            obj = object.__new__(args[0])  # _reconstructor(cls, base, state) returns an instance of cls
            obj.__dict__["_stub_how"] = "reconstructor"
        else:
            obj = object.__new__(cls)
            obj.__dict__["_stub_how"] = "call"
        _event("call", cls, args, kwargs, obj)
        return obj

    def __getattr__(cls, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)  # no __getinitargs__, __reduce__...: as on a plain class
        _event("getattr", cls, attr)
        return _anonymous("getattr")

    def __setitem__(cls, key, value):
        _event("setitem", cls, (key, value), {})

    def __iter__(cls):
        _event("iter", cls)
        return iter(())

    def __repr__(cls):
        return f"<stub {cls._stub_name}>"


class Stub(metaclass=_StubMeta):
    """Base of the stub classes; its instances are what a stub call or NEWOBJ returns."""

    _stub_name = "<value>"  # "module.name" for a resolved global
    _stub_global = False

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_stub_how"] = "new"
        _event("new", cls, args, kwargs, obj)
        return obj

    def __call__(self, *args, **kwargs):
        _event("call", self, args, kwargs, None)
        return _anonymous("call")

    __setstate__ = _Method("setstate")
    extend = _Method("extend")
    append = _Method("append")
    add = _Method("add")

    def __setitem__(self, key, value):
        _event("setitem", self, (key, value), {})

    def __getitem__(self, key):
        _event("getitem", self, key)
        return _anonymous("getitem")

    def __iter__(self):
        _event("iter", self)
        return iter(())

    def __hash__(self):
        _event("hash", self)
        return id(self) >> 4

    def __eq__(self, other):
        return self is other

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__") or attr == "_stub_how":
            raise AttributeError(attr)
        _event("getattr", self, attr)
        return _anonymous("getattr")

    def __repr__(self):
        return f"<stub {type(self)._stub_name} instance>"


class _Anonymous(Stub):
    _stub_name = "<built by the pickle>"


class PersistentStub(Stub):
    _stub_name = "<persistent>"


def _anonymous(how: str) -> Stub:
    obj = object.__new__(_Anonymous)
    obj.__dict__["_stub_how"] = how
    return obj


def _stub_class(module: str, name: str) -> type:
    return _StubMeta("Stub", (Stub,), {"_stub_name": f"{module}.{name}", "_stub_module": module,
                                       "_stub_global": True})


def is_stub(value: Any) -> bool:
    return isinstance(value, Stub) or (isinstance(value, type) and issubclass(value, Stub))


def stub_name(value: Any) -> str:
    """The global a stub class stands for, or the class of a stub instance."""
    return value._stub_name if isinstance(value, type) else type(value)._stub_name


# --- the protocol the C unpickler is at, read from the unpickler itself ----------------------------

_PROBE_RAW, _PROBE_MAPPED = "_ckpt_migrate_probe_raw", "_ckpt_migrate_probe_mapped"


@contextlib.contextmanager
def _probe_installed():
    """A name only the compat mapping turns into another: the real ``find_class`` resolves it to
    True exactly when it would map Python 2 names (protocol < 3 and fix_imports). Both modules are
    in sys.modules, so resolving the probe imports nothing."""
    raw, mapped = types.ModuleType(_PROBE_RAW), types.ModuleType(_PROBE_MAPPED)
    raw.p, mapped.p = False, True
    sys.modules[_PROBE_RAW], sys.modules[_PROBE_MAPPED] = raw, mapped
    _compat_pickle.NAME_MAPPING[(_PROBE_RAW, "p")] = (_PROBE_MAPPED, "p")
    try:
        yield
    finally:
        _compat_pickle.NAME_MAPPING.pop((_PROBE_RAW, "p"), None)
        sys.modules.pop(_PROBE_RAW, None)
        sys.modules.pop(_PROBE_MAPPED, None)


def mapped_name(module: str, name: str, below_3: bool) -> tuple[str, str]:
    """(module, name) after the mapping ``_pickle.c``'s find_class applies (same order)."""
    if below_3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            return _compat_pickle.NAME_MAPPING[(module, name)]
        if module in _compat_pickle.IMPORT_MAPPING:
            return _compat_pickle.IMPORT_MAPPING[module], name
    return module, name


class _RecordingUnpickler(pickle.Unpickler):  # the C implementation (_pickle.Unpickler)
    def find_class(self, module, name):
        below_3 = pickle.Unpickler.find_class(self, _PROBE_RAW, "p")
        mod, nm = mapped_name(module, name, below_3)
        cls = _stub_class(mod, nm)
        _event("resolve", cls, module, name)
        return cls

    def persistent_load(self, pid):
        obj = object.__new__(PersistentStub)
        obj.__dict__["_stub_how"] = "persistent"
        _event("persid", obj, pid)
        return obj


@dataclass
class Record:
    events: list = field(default_factory=list)
    error: BaseException | None = None
    result: Any = None
    end: int = 0  # offset just past what the load consumed

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def resolved(self) -> list[str]:
        return [stub_name(e[1]) for e in self.events if e[0] == "resolve"]


def record(data: bytes | io.BytesIO) -> Record:
    """Run the C unpickler over ``data`` (bytes, or a stream already positioned) with stubs."""
    global _current
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    rec = Record()
    with _probe_installed():
        _current = rec.events
        try:
            rec.result = _RecordingUnpickler(stream, encoding="utf-8").load()
        except Exception as exc:  # whatever the bytes provoke ends the load, as it ends torch.load
            rec.error = exc
        finally:
            _current = None
    rec.end = stream.tell()
    return rec


def records_of_file(path: str) -> list[Record]:
    """The pickles ``torch.load(path, weights_only=False)`` unpickles, in its order, recorded: a zip's
    data.pkl (inflated if stored compressed), a tar's ``storages``/``tensors``/``pickle`` members, or
    the stream of a raw or pre-1.6 file (magic, protocol, system info, object, storage keys)."""
    with open(path, "rb") as f:
        data = f.read()
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            return [record(z.read(name))]
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            out = []
            for member in ("storages", "tensors", "pickle"):
                stream = io.BytesIO(tar.extractfile(member).read())
                out.append(record(stream))
                if member == "storages" and out[-1].ok and out[-1].result == 0:
                    out.append(record(stream))  # no storages: then the list of storage views
            return out
    except tarfile.TarError:
        pass
    stream, out = io.BytesIO(data), []
    for _ in range(5):
        out.append(record(stream))
        if not out[-1].ok:
            break
    return out


# --- what a record says the reader owes ------------------------------------------------------------

@dataclass
class Verdict:
    offender: str | None = None  # the dotted name the reader must give
    also: tuple = ()  # other names that identify the same offence (e.g. the callable reached)
    how: str = ""  # import | main-call | main-method | main-reaches-call | main-hashed | main-class-state
    natural_prefix: bool = True  # every event before the offence had a signature seen in real files
    natural: bool = True  # every event had one
    only_data: bool = False  # load succeeded, no offence, nothing but allowed names and __main__ records
    first_unnatural: Any = None


def _stubs_in(value: Any, depth: int = 0, seen: set | None = None):
    """Stubs held by ``value`` (through plain containers, bounded)."""
    if is_stub(value):
        yield value
        return
    if depth > 12:
        return
    seen = set() if seen is None else seen
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        if id(value) in seen:
            return
        seen.add(id(value))
        items = value.items() if isinstance(value, dict) else value
        for item in items:
            yield from _stubs_in(item, depth + 1, seen)


def kind(value: Any, depth: int = 0) -> Any:
    """A value's shape, without its contents: types all the way down (bounded), stubs by name."""
    if is_stub(value):
        if isinstance(value, type):
            return ("G", value._stub_name)
        return ("I", type(value)._stub_name, value.__dict__.get("_stub_how"))
    if depth > 4:
        return "..."
    if isinstance(value, dict):
        return ("dict", frozenset(kind(k, depth + 1) for k in list(value)[:64]),
                frozenset(kind(v, depth + 1) for v in list(value.values())[:64]))
    if isinstance(value, (list, tuple, set, frozenset)):
        return (type(value).__name__, frozenset(kind(v, depth + 1) for v in list(value)[:64]))
    return type(value).__name__


def signature(event: tuple) -> Any:
    """An event's shape: what happened to what, with arguments of which kinds."""
    kind_, target = event[0], event[1]
    if kind_ == "resolve":
        return ("resolve", stub_name(target))
    if kind_ in ("call", "new", "setstate", "setitem", "extend", "append", "add"):
        return (kind_, kind(target), kind(tuple(event[2])), kind(event[3]))
    if kind_ == "persid":
        return ("persid", kind(event[2]))
    return (kind_, kind(target))


_BUILTIN_BASES = {f"builtins.{n}" for n in ("object", "dict", "list", "set", "frozenset", "tuple", "int", "float",
                                              "str", "bytes", "bytearray", "complex")}


def analyse(rec: Record, allowed: frozenset, natural: set | frozenset = frozenset()) -> Verdict:
    """The first offence in ``rec``: a name outside ``allowed`` resolved (an import), or a
    ``__main__`` class or record used beyond the contract (created by NEWOBJ or by
    ``copyreg._reconstructor(cls, builtins.object, None)``, given state by BUILD)."""
    verdict = Verdict()
    allowed_only = True
    for event in rec.events:
        sig_ok = signature(event) in natural
        kind_, target = event[0], event[1]
        offence = None
        if kind_ == "resolve":
            name, raw = stub_name(target), f"{event[2]}.{event[3]}"
            if target._stub_module != MAIN and name not in allowed:
                offence = (name, (raw,) if raw != name else (), "import")
        elif is_stub(target) and stub_name(target).startswith(MAIN + "."):
            name = stub_name(target)
            if kind_ == "call" and isinstance(target, type):
                offence = (name, (), "main-call")
            elif kind_ == "setstate" and isinstance(target, type):
                offence = (name, (), "main-class-state")
            elif kind_ in ("setitem", "extend", "append", "add", "call", "iter", "getitem"):
                offence = (name, (), "main-method")
            elif kind_ == "hash":
                offence = (name, (), "main-hashed")
        if offence is None and kind_ in ("setitem", "add") and is_stub(target):
            # A stub of an allowed dict or set class (an OrderedDict, a Counter) hashes what it is given
            # as a key or member once it is real.
            keys = [event[2][0]] if kind_ == "setitem" else list(event[2])
            main = [s for s in _stubs_in(keys) if stub_name(s).startswith(MAIN + ".")]
            if main:
                offence = (stub_name(main[0]), (), "main-hashed")
        if offence is None and kind_ == "call" and is_stub(target) and isinstance(target, type):
            args = tuple(event[2]) + tuple(event[3].values())
            callee = stub_name(target)
            main = [s for s in _stubs_in(args) if stub_name(s).startswith(MAIN + ".")]
            # copyreg._reconstructor(cls, base, state) runs base.__new__(cls, state) and, unless base is
            # object, base.__init__(obj, state): a builtin base's own code, never cls's.
            plain_record = (callee == "copyreg._reconstructor" and len(args) == 3 and is_stub(args[0])
                            and isinstance(args[0], type) and is_stub(args[1]) and isinstance(args[1], type)
                            and stub_name(args[1]) in _BUILTIN_BASES and not any(s is not args[0] for s in main))
            if main and not plain_record:
                offence = (stub_name(main[0]), (callee,), "main-reaches-call")
                # Certain only where real files call this callable with as many arguments (it then
                # uses them); a call no real file makes may fail before it touches the record.
                if ("arity", callee, len(event[2])) not in natural:
                    verdict.natural_prefix = False
                    verdict.first_unnatural = verdict.first_unnatural or signature(event)
        if offence is not None:
            verdict.offender, verdict.also, verdict.how = offence
            verdict.natural = False
            return verdict
        if not sig_ok:
            if verdict.natural_prefix:
                verdict.first_unnatural = signature(event)
            verdict.natural_prefix = verdict.natural = False
        if kind_ == "resolve" and stub_name(target) not in allowed and target._stub_module != MAIN:
            allowed_only = False
    verdict.only_data = rec.ok and allowed_only
    return verdict


def natural_signatures(records: list[Record]) -> set:
    """The event shapes real, benign files show (the calibration for 'natural')."""
    out = set()
    for rec in records:
        out.update(signature(e) for e in rec.events)
        out.update(("arity", stub_name(e[1]), len(e[2])) for e in rec.events
                   if e[0] == "call" and isinstance(e[1], type) and is_stub(e[1]))
    return out


# --- values, for comparing what the reader returns with what CPython returns -------------------

class Cyclic(Exception):
    pass


def canon(value: Any, _stack: tuple = ()) -> Any:
    """A comparable form of a plain-data value (floats by bits, so NaNs compare; bytearray as bytes)."""
    if id(value) in _stack:
        raise Cyclic
    stack = _stack + (id(value),)
    if value is None or isinstance(value, (bool, str)):
        return (type(value).__name__, value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value.hex() if not math.isnan(value) else "nan")
    if isinstance(value, complex):
        return ("complex", canon(value.real), canon(value.imag))
    if isinstance(value, (bytes, bytearray)):
        return ("bytes", bytes(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(canon(v, stack) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(canon(v, stack) for v in value))
    if isinstance(value, dict):
        return ("dict", frozenset((canon(k, stack), canon(v, stack)) for k, v in value.items()))
    return ("other", type(value).__name__)


def plain(value: Any, _depth: int = 0, _seen: set | None = None) -> bool:
    """True when ``value`` is built of plain Python data only (no stubs, nothing else)."""
    _seen = set() if _seen is None else _seen
    if value is None or type(value) in (bool, int, float, complex, str, bytes, bytearray):
        return True
    if type(value) in (list, tuple, set, frozenset, dict):
        if id(value) in _seen:
            return True
        _seen.add(id(value))
        items = list(value.items()) if type(value) is dict else list(value)
        return all(plain(v, _depth + 1, _seen) for v in items)
    return False


__all__ = ["Record", "Stub", "Verdict", "analyse", "canon", "Cyclic", "is_stub", "kind", "mapped_name",
           "natural_signatures", "plain", "record", "records_of_file", "signature", "stub_name"]
