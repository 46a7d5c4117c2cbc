"""The opcode machine: one pickle's opcodes, read as CPython's unpickler reads them, into inert values.

We never hand a pickle to Python's unpickler. :class:`PickleMachine` reads the bytes itself,
one small handler per opcode (:data:`DISPATCH`, as ``pickle._Unpickler.dispatch`` is laid out),
and every name or call goes through the allow-list (:mod:`ckpt_migrate.pickle_allowlist`):
a name that is not on it is ``unsafe`` where the real unpickler would import it.

Bytes are read as the C unpickler reads a file object: a ``FRAME`` is read into a buffer, and a
read the buffer cannot satisfy drops the buffer's rest and continues after it (that is how an
argument or line that straddles a frame's end is read). Python's own unpickler refuses such a
pickle, and newer C unpicklers may read it differently, so a frame that is not read exactly to
its end is recorded; :meth:`PickleMachine.run` reads such a pickle again with frames as plain
bytes, names a call that either reading reaches, and otherwise calls the pickle unreadable.

Every quantity the bytes control is capped (:class:`ReaderLimits`). Standard library only.
"""

from __future__ import annotations

import _compat_pickle
import struct
import time
import warnings
from typing import Any

from . import pickle_allowlist as allow
from .pickle_checks import MAIN_MODULE, check_no_records, is_main_record
from .pickle_values import (DEFAULT_LIMITS, STORAGE_DTYPES, DTYPE_ITEMSIZE, CounterValue, DefaultDictValue,
                            GlobalRef, LegacyRef, OrderedDictValue, PickledObject, ReaderLimits, StorageStub,
                            TensorStub, UnreadableError, UnsafePickleError, one_line)
from .pickle_input import PickleInput, OPCODES, STRING_OPS, scan_argument
from .pickle_opcodes import DISPATCH, Stop


class PickleMachine:
    """Interprets one pickle's opcodes into inert values, within :class:`ReaderLimits`.

    ``persistent``: what a persistent id means here: ``"zip"`` (a storage record of a torch.save
    archive), ``"legacy"`` (a pre-1.6 file: kept as :class:`LegacyRef`) or ``None`` (no
    persistent_load: the opcode is an error, as in the real unpickler)."""

    def __init__(self, data: bytes, limits: ReaderLimits = DEFAULT_LIMITS, deadline: float | None = None,
                 persistent: str | None = "zip"):
        self.data, self.limits, self.persistent = data, limits, persistent
        self.deadline = deadline if deadline is not None else time.monotonic() + limits.seconds
        self.storages: dict[str, StorageStub] = {}
        self.objects: set[str] = set()
        self.protocol = 0
        self.end = 0  # where the file stands after STOP: past the frame that holds it
        self.stop_at = 0  # offset just past STOP (where a reader that peeks its buffer stands)
        self._objects = self._items = 0

    # -- bookkeeping the allow-list's handlers use
    def count(self, objects: int = 1, items: int = 0) -> None:
        self._objects += objects
        self._items += items
        if self._objects > self.limits.max_objects:
            raise UnreadableError(f"pickle creates more than {self.limits.max_objects} objects")
        if self._items > self.limits.max_items:
            raise UnreadableError(f"pickle adds more than {self.limits.max_items} container items")

    def record(self, cls: str, args: tuple = (), state: Any = None) -> PickledObject:
        self.count()
        self.objects.add(cls)
        return PickledObject(cls, args, state)

    def key(self, value: Any) -> Any:
        """A value used as a dict key or set member: plain, hashable, and cheap to hash.

        Hashing a tuple visits every element, shared ones again each time, so the size that
        counts is the tree's, not the DAG's: 60 nested pairs of one tuple are 2**60 visits."""
        sizes: dict[int, int] = {}
        pending = [(value, False)]
        while pending:
            v, children_done = pending.pop()
            if isinstance(v, PickledObject):
                if is_main_record(v):
                    raise UnsafePickleError(f"a {v.cls} instance used as a dict key or set member "
                                            f"(its __hash__ would run)")
                raise UnreadableError(f"a {v.cls} used as a dict key or set member")
            if isinstance(v, (list, dict, set, bytearray)):
                raise UnreadableError(f"unhashable {type(v).__name__} used as a dict key or set member")
            if isinstance(v, (TensorStub, LegacyRef)):
                # torch hashes a tensor by identity; a stub compares by what it describes, so two
                # views alike would become one key and a value would be lost
                raise UnreadableError("a tensor used as a dict key or set member")
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

    # -- the run
    def run(self, start: int = 0) -> Any:
        """The pickle's value; raises UnsafePickleError naming the first name or call outside the
        allow-list, or UnreadableError. A pickle whose frames are not read exactly is read a
        second time with frames as plain bytes (see the module doc)."""
        value, error = self._attempt(start, frames_are_plain_bytes=False)
        problem = self._input.frame_problem
        if problem:
            # Another reading of the same bytes: a call that reading reaches is named too.
            PickleMachine(self.data, self.limits, self.deadline, self.persistent)._attempt(start, True)
            raise UnreadableError(f"damaged framing: {problem}")
        if error is not None:
            raise error
        return value

    def _attempt(self, start: int, frames_are_plain_bytes: bool) -> tuple[Any, UnreadableError | None]:
        try:
            return self._run(start, frames_are_plain_bytes), None
        except UnreadableError as exc:
            # We stop at a cap or a refusal where the real unpickler may go on: a pickle is
            # straight-line code, so every name in the rest of it is one it may still resolve.
            self._scan_rest()
            return None, exc

    def _scan_rest(self) -> None:
        """Resolve every name the rest of the pickle holds (up to STOP), without running it."""
        # Strings on the stack and in the memo, None for other values: STACK_GLOBAL's operands.
        pushed: list = [v if isinstance(v, str) else None for v in getattr(self, "stack", [])[-2:]]
        memo: dict[int, Any] = {k: v for k, v in getattr(self, "memo", {}).items() if isinstance(v, str)}
        for ops in range(1, 1 << 62):
            if ops & 0xFFF == 0 and time.monotonic() > self.deadline:
                return
            try:
                code = self._input.read(1)
                op = OPCODES.get(code[0])
                if op is None or op.name == "STOP":
                    return
                arg = scan_argument(self._input, op)
            except (UnreadableError, ValueError, UnicodeDecodeError, struct.error):
                return
            name = op.name
            if name in ("GLOBAL", "INST"):
                self.resolve(*arg, name)
            elif name == "STACK_GLOBAL":
                operands = pushed[-2:]
                if len(operands) < 2 or not all(isinstance(o, str) for o in operands):
                    raise UnsafePickleError("STACK_GLOBAL names an object the reader cannot follow, after the point "
                                            "where it stopped reading")
                self.resolve(*operands, name)
            elif name in STRING_OPS:
                pushed.append(arg)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif name == "FRAME":
                self._input.frame(arg)
            elif name == "PROTO":
                self.protocol = arg
            else:
                pushed.append(None)

    def _run(self, start: int, frames_are_plain_bytes: bool) -> Any:
        self._input = PickleInput(self.data, start, frames_are_plain_bytes)
        self.stack: list = []
        self.marks: list[list] = []
        self.memo: dict[int, Any] = {}
        ops = 0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # escape_decode of damaged STRINGs
                while True:
                    ops += 1
                    if ops & 0xFFF == 0 and time.monotonic() > self.deadline:
                        raise UnreadableError(f"reading the pickle took longer than {self.limits.seconds:g} s")
                    code = self._input.read(1)
                    handler = DISPATCH.get(code[0])
                    if handler is None:
                        raise UnreadableError(f"invalid opcode 0x{code[0]:02x} at byte {self._input.position - 1}")
                    handler(self)
        except Stop as stop:
            self.end = self._input.stream  # where the file stands: the next pickle of a legacy file
            self.stop_at = self._input.position
            return stop.value
        except (UnreadableError, UnsafePickleError):
            raise
        except IndexError:
            raise UnreadableError("damaged pickle: opcode on an empty stack") from None
        except RecursionError:
            raise UnreadableError("damaged pickle: nests too deeply") from None
        except MemoryError:
            raise  # the caller's budget ran out: it names the budget (isolate.detect_isolated)
        except Exception as exc:  # anything else the bytes provoke is a damaged file
            # The type and place only: the message of int(), float() or a decoder quotes the
            # file's own bytes, and a reason never does.
            raise UnreadableError(f"damaged pickle: {type(exc).__name__} at byte {self._input.position}") from None

    # -- helpers for the handlers
    def push(self, value: Any) -> None:
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack:
            raise UnreadableError("unpickling stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise UnreadableError("could not find MARK")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._input.read(struct.calcsize(fmt)))[0]

    def sized(self, fmt: str, payload: bool = False) -> bytes:
        n = self.unpack(fmt)
        if n < 0:
            raise UnreadableError("negative byte count")
        if n > len(self.data):
            raise UnreadableError("damaged pickle: data was truncated (a length beyond its end)")
        return self._input.read_payload(n) if payload else self._input.read(n)

    def text(self, raw: bytes, encoding: str = "utf-8") -> str:
        self.count()
        return raw.decode(encoding, "surrogatepass" if encoding == "utf-8" else "strict")

    def blob(self, raw: bytes) -> bytes:
        self.count()
        return bytes(raw)

    def counted(self, items: list) -> list:
        self.count(1, len(items))
        return items

    def line(self) -> bytes:
        return self._input.readline()[:-1]

    def resolve(self, module: Any, name: Any, opcode: str) -> GlobalRef:
        """The object a name resolves to, if the allow-list has it; else the import is code."""
        if not (isinstance(module, str) and isinstance(name, str)):
            raise UnreadableError(f"{opcode} with names that are not strings")
        if self.protocol < 3:  # what the real find_class does (fix_imports)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        module = {"torch.tensor": "torch._tensor"}.get(module, module)  # torch's own find_class mapping
        ref = GlobalRef(module, name)
        if module == MAIN_MODULE and name.isidentifier():
            return ref
        if str(ref) not in allow.ALLOWED_GLOBALS:
            raise UnsafePickleError(f"{opcode} names {one_line(ref, 120)}: not data (the unpickler would import "
                                    f"{one_line(module, 80)}, and what it names may run code)")
        return ref

    def call(self, func: Any, args: Any, opcode: str) -> Any:
        if isinstance(func, PickledObject) or not isinstance(func, GlobalRef):
            raise UnsafePickleError(f"{opcode} calls a {type(func).__name__} built by the pickle")
        if not isinstance(args, tuple):
            raise UnreadableError(f"{opcode} with arguments that are not a tuple")
        handler = allow.CALLS.get(str(func))
        if handler is None:
            if func.module == MAIN_MODULE:
                raise UnsafePickleError(f"{opcode} calls {func} (the training script's function, or its class's "
                                        f"__init__, would run)")
            if allow.is_record_class(func):
                raise UnsafePickleError(f"{opcode} calls {func} (its __init__ would run)")
            raise UnsafePickleError(f"{opcode} calls {func}")
        return handler(self, args)

    def instantiate(self, cls: Any, args: list, opcode: str) -> Any:
        # INST/OBJ: a class with no arguments is created without __init__; anything else is a call.
        # A name of __main__ may be a function of the training script (main, train), which the
        # unpickler would call: only NEWOBJ and copyreg._reconstructor, which refuse a non-class,
        # may make its instances (what Python 3 writes for them).
        if isinstance(cls, GlobalRef) and not args and allow.is_record_class(cls) and cls.module != MAIN_MODULE:
            return self.record(str(cls))
        return self.call(cls, tuple(args), opcode)

    def storage(self, pid: Any) -> Any:
        if self.persistent is None:
            raise UnreadableError("a persistent id in a pickle that has no persistent_load")
        if self.persistent == "legacy":
            check_no_records(pid, "persistent_load")
            return LegacyRef(pid if isinstance(pid, (int, str)) else "storage")
        # torch.save writes ('storage', storage_type, key, location, numel).
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnreadableError(f"unexpected persistent id {one_line(pid, 60)} (torch.load cannot read it)")
        _, storage_type, key, location, numel = pid
        if not (isinstance(storage_type, GlobalRef) and storage_type.name in STORAGE_DTYPES):
            raise UnreadableError(f"unknown storage type {one_line(storage_type, 60)}")
        if not (isinstance(key, str) and key.isascii() and key.replace(".", "").replace("_", "").isalnum()
                and len(key) <= 64 and isinstance(location, str) and type(numel) is int
                and 0 <= numel <= self.limits.max_dim):
            raise UnreadableError("malformed storage reference")
        dtype = STORAGE_DTYPES[storage_type.name]
        stub = StorageStub(key, dtype, one_line(location, 32), numel * DTYPE_ITEMSIZE[dtype])
        if self.storages.setdefault(key, stub) != stub:
            raise UnreadableError(f"storage {key} is referenced with two different types or sizes")
        return stub

    def add_items(self, target: Any, items: list, opcode: str) -> None:
        """APPEND(S), SETITEM(S), ADDITEMS: only on the real containers they are meant for."""
        self.count(0, len(items))
        if isinstance(target, PickledObject) or isinstance(target, GlobalRef):
            method = {"A": "append/extend", "S": "__setitem__", "D": "add"}[opcode[0]]
            raise UnsafePickleError(f"{opcode} on a {one_line(target, 80)} would call its {method}")
        if opcode.startswith("APPEND") and type(target) is list:
            target.extend(items)
        elif opcode.startswith("SETITEM") and type(target) in (dict, OrderedDictValue, CounterValue,
                                                               DefaultDictValue):
            if len(items) % 2:
                raise UnreadableError(f"odd number of items for {opcode}")
            for i in range(0, len(items), 2):
                target[self.key(items[i])] = items[i + 1]
        elif opcode == "ADDITEMS" and type(target) is set:
            target.update(self.key(i) for i in items)
        else:
            raise UnreadableError(f"{opcode} on a {type(target).__name__}")

    def build(self, target: Any, state: Any) -> None:
        """BUILD: state for an allowed record or an OrderedDict's attributes; nothing else."""
        if isinstance(target, GlobalRef):
            raise UnsafePickleError(f"BUILD sets attributes of {target}")
        if isinstance(target, PickledObject):
            if target.cls in allow.NUMPY_RECORDS:
                check_no_records(state, f"{target.cls}.__setstate__")
            elif target.cls.startswith("torch.Tensor ("):
                raise UnreadableError(f"BUILD on a {target.cls}")
            else:
                _attributes(state, target.cls)
            target.state = state
        elif isinstance(target, (OrderedDictValue, CounterValue, DefaultDictValue)):
            _attributes(state, "an OrderedDict")  # a state dict's _metadata: kept out of the values
        elif isinstance(target, (TensorStub, LegacyRef)):
            raise UnreadableError(f"BUILD on a {type(target).__name__} would replace a tensor's data")
        elif state is not None:
            raise UnreadableError(f"BUILD on a {type(target).__name__}")


def _attributes(state: Any, what: str) -> None:
    """Instance state as ``object.__reduce_ex__`` writes it: a dict of attributes, or (dict, slots).
    Its values are only stored (a nested config is a record among them); its keys are names."""
    parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
    for part in parts:
        if part is not None and not (isinstance(part, dict) and all(isinstance(k, str) for k in part)):
            raise UnreadableError(f"BUILD on {what} with a state that is not attributes")


# --- one handler per opcode ----------------------------------------------------------------------


