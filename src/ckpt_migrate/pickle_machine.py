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
import codecs
import pickletools
import struct
import time
import warnings
from typing import Any, Callable

from . import pickle_allowlist as allow
from .pickle_values import (DEFAULT_LIMITS, STORAGE_DTYPES, DTYPE_ITEMSIZE, CounterValue, DefaultDictValue,
                            GlobalRef, LegacyRef, OrderedDictValue, PickledObject, ReaderLimits, StorageStub,
                            TensorStub, UnreadableError, UnsafePickleError, one_line)


class _Input:
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


class _Stop(Exception):
    def __init__(self, value: Any):
        self.value = value


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
                if allow.is_main_record(v):
                    raise UnsafePickleError(f"a {v.cls} instance used as a dict key or set member "
                                            f"(its __hash__ would run)")
                raise UnreadableError(f"a {v.cls} used as a dict key or set member")
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
                op = _OPCODES.get(code[0])
                if op is None or op.name == "STOP":
                    return
                arg = _scan_argument(self._input, op)
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
            elif name in _STRING_OPS:
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
        self._input = _Input(self.data, start, frames_are_plain_bytes)
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
        except _Stop as stop:
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
        if module == allow.MAIN_MODULE and name.isidentifier():
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
            if allow.is_record_class(func):
                raise UnsafePickleError(f"{opcode} calls {func} (its __init__ would run)")
            raise UnsafePickleError(f"{opcode} calls {func}")
        return handler(self, args)

    def instantiate(self, cls: Any, args: list, opcode: str) -> Any:
        # INST/OBJ: a class with no arguments is created without __init__; anything else is a call.
        if isinstance(cls, GlobalRef) and not args and allow.is_record_class(cls):
            return self.record(str(cls))
        return self.call(cls, tuple(args), opcode)

    def storage(self, pid: Any) -> Any:
        if self.persistent is None:
            raise UnreadableError("a persistent id in a pickle that has no persistent_load")
        if self.persistent == "legacy":
            allow.check_no_records(pid, "persistent_load")
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
                allow.check_no_records(state, f"{target.cls}.__setstate__")
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

_OPCODES = {ord(op.code): op for op in pickletools.opcodes}
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_LENGTH_FORMATS = {pickletools.TAKEN_FROM_ARGUMENT1: "<B", pickletools.TAKEN_FROM_ARGUMENT4: "<i",
                   pickletools.TAKEN_FROM_ARGUMENT4U: "<I", pickletools.TAKEN_FROM_ARGUMENT8U: "<Q"}


def _scan_argument(source: _Input, op: pickletools.OpcodeInfo) -> Any:
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
        fmt = _LENGTH_FORMATS[spec.n]
        length = struct.unpack(fmt, source.read(struct.calcsize(fmt)))[0]
        if not 0 <= length <= len(source.data):
            raise UnreadableError("a length beyond the pickle")
        raw = source.read(length)
    if op.name in _STRING_OPS:
        if op.name == "UNICODE":
            return raw.decode("raw-unicode-escape")
        return (_quoted(raw) if op.name == "STRING" else raw).decode("utf-8", "surrogatepass")
    if op.name in ("PUT", "GET"):
        return int(raw)
    if op.name in ("BINPUT", "BINGET", "LONG_BINPUT", "LONG_BINGET", "PROTO", "FRAME"):
        return int.from_bytes(raw, "little")
    return None


def _int_from_line(line: bytes) -> Any:
    if line in (b"00", b"01"):  # protocol 0's booleans
        return line == b"01"
    text = line.decode("ascii").strip().rstrip("L")
    if len(text) > 400:  # far past max_int_bits; Python refuses to parse such text anyway
        raise UnreadableError(f"integer of {len(text)} digits")
    try:
        return int(text, 0)  # the C unpickler parses with base 0 (strtol)
    except ValueError:
        return int(text, 8)  # strtol's octal "010", which int(..., 0) refuses


def _checked_int(m: PickleMachine, value: int) -> int:
    if type(value) is int and value.bit_length() > m.limits.max_int_bits:
        raise UnreadableError(f"integer of {value.bit_length()} bits")
    return value


def _string(m: PickleMachine, raw: bytes) -> str:
    # torch.load unpickles with encoding="utf-8": protocol 0-2 strings are decoded so.
    m.count()
    return raw.decode("utf-8")


def _quoted(line: bytes) -> bytes:
    if len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"'):
        return codecs.escape_decode(line[1:-1])[0]
    raise UnreadableError("the STRING opcode argument must be quoted")


def _proto(m: PickleMachine) -> None:
    version = m._input.read(1)[0]
    if version > 5:
        raise UnreadableError(f"unsupported pickle protocol: {version}")
    m.protocol = version


def _stop(m: PickleMachine) -> None:
    raise _Stop(m.pop())


def _pop(m: PickleMachine) -> None:
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()  # POP on a mark removes the mark, as the C unpickler does


def _tuple_n(n: int) -> Callable:
    def handler(m: PickleMachine) -> None:
        if len(m.stack) < n:
            raise UnreadableError("unpickling stack underflow")
        items = tuple(m.stack[len(m.stack) - n:])
        del m.stack[len(m.stack) - n:]
        m.count(1, n)
        m.push(items)
    return handler


def _dict(m: PickleMachine) -> None:
    items = m.pop_mark()
    if len(items) % 2:
        raise UnreadableError("odd number of items for DICT")
    m.count(1, len(items) // 2)
    m.push({m.key(items[i]): items[i + 1] for i in range(0, len(items), 2)})


def _frozenset(m: PickleMachine) -> None:
    items = m.pop_mark()
    m.count(1, len(items))
    m.push(frozenset(m.key(i) for i in items))


def _add(opcode: str, marked: bool, n: int = 0) -> Callable:
    def handler(m: PickleMachine) -> None:
        if marked:
            items = m.pop_mark()
        else:
            if len(m.stack) < n + 1:
                raise UnreadableError(f"{opcode} on a short stack")
            items = m.stack[len(m.stack) - n:]
            del m.stack[len(m.stack) - n:]
        if not m.stack:
            raise UnreadableError(f"{opcode} without a container")
        m.add_items(m.stack[-1], items, opcode)
    return handler


def _put(index_of: Callable) -> Callable:
    def handler(m: PickleMachine) -> None:
        index = index_of(m)
        if not m.stack:
            raise UnreadableError("memo store from an empty stack")
        if type(index) is not int or index < 0:
            raise UnreadableError("negative PUT argument")
        m.memo[index] = m.stack[-1]
        if len(m.memo) > m.limits.max_memo:
            raise UnreadableError(f"pickle memo exceeds {m.limits.max_memo} entries")
    return handler


def _get(index_of: Callable) -> Callable:
    def handler(m: PickleMachine) -> None:
        index = index_of(m)
        if index not in m.memo:
            raise UnreadableError(f"memo value not found at index {one_line(index, 20)}")
        m.push(m.memo[index])
    return handler


def _global(m: PickleMachine) -> None:
    module, name = m.line().decode("utf-8"), m.line().decode("utf-8")
    m.push(m.resolve(module, name, "GLOBAL"))


def _stack_global(m: PickleMachine) -> None:
    name, module = m.pop(), m.pop()
    m.push(m.resolve(module, name, "STACK_GLOBAL"))


def _inst(m: PickleMachine) -> None:
    module, name = m.line().decode("utf-8"), m.line().decode("utf-8")
    cls = m.resolve(module, name, "INST")
    m.push(m.instantiate(cls, m.pop_mark(), "INST"))


def _obj(m: PickleMachine) -> None:
    items = m.pop_mark()
    if not items:
        raise UnreadableError("OBJ without a class")
    m.push(m.instantiate(items[0], items[1:], "OBJ"))


def _reduce(m: PickleMachine) -> None:
    args, func = m.pop(), m.pop()
    m.push(m.call(func, args, "REDUCE"))


def _newobj(m: PickleMachine) -> None:
    args, cls = m.pop(), m.pop()
    _new(m, cls, args, "NEWOBJ")


def _newobj_ex(m: PickleMachine) -> None:
    kwargs, args, cls = m.pop(), m.pop(), m.pop()
    if kwargs:
        raise UnsafePickleError(f"NEWOBJ_EX calls {one_line(cls, 80)} with keyword arguments")
    _new(m, cls, args, "NEWOBJ_EX")


def _new(m: PickleMachine, cls: Any, args: Any, opcode: str) -> None:
    if isinstance(cls, PickledObject):
        raise UnsafePickleError(f"{opcode} calls a PickledObject built by the pickle")
    if not isinstance(cls, GlobalRef) or not isinstance(args, tuple):
        raise UnreadableError(f"{opcode} without a class and an argument tuple")
    m.push(allow.new_instance(m, cls, args))


def _build(m: PickleMachine) -> None:
    state = m.pop()
    if not m.stack:
        raise UnreadableError("BUILD on an empty stack")
    m.build(m.stack[-1], state)


def _persid(m: PickleMachine) -> None:
    pid = m.line().decode("ascii")
    m.push(m.storage(pid))


def _binpersid(m: PickleMachine) -> None:
    m.push(m.storage(m.pop()))


def _ext(fmt: str) -> Callable:
    def handler(m: PickleMachine) -> None:
        raise UnreadableError(f"extension code {m.unpack(fmt)} is not registered")
    return handler


def _out_of_band(m: PickleMachine) -> None:
    raise UnreadableError("the pickle refers to out-of-band buffers, which a file cannot carry")


def _frame(m: PickleMachine) -> None:
    m._input.frame(m.unpack("<Q"))


def _mark(m: PickleMachine) -> None:
    m.marks.append(m.stack)
    m.stack = []


def _dup(m: PickleMachine) -> None:
    if not m.stack:
        raise UnreadableError("unpickling stack underflow")
    m.push(m.stack[-1])


def _push(make: Callable[[PickleMachine], Any]) -> Callable:
    def handler(m: PickleMachine) -> None:
        m.push(make(m))
    return handler


def _empty(kind: type) -> Callable:
    def make(m: PickleMachine) -> Any:
        m.count()
        return kind()
    return make


DISPATCH: dict[int, Callable[[PickleMachine], None]] = {op[0]: handler for op, handler in {
    b"\x80": _proto,                                                     # PROTO
    b"\x95": _frame,                                                     # FRAME
    b".": _stop,                                                         # STOP
    b"(": _mark,                                                         # MARK
    b"0": _pop,                                                          # POP
    b"1": lambda m: m.pop_mark(),                                        # POP_MARK
    b"2": _dup,                                                          # DUP
    b"N": _push(lambda m: None),                                         # NONE
    b"\x88": _push(lambda m: True),                                      # NEWTRUE
    b"\x89": _push(lambda m: False),                                     # NEWFALSE
    b"I": _push(lambda m: _checked_int(m, _int_from_line(m.line()))),    # INT
    b"J": _push(lambda m: m.unpack("<i")),                               # BININT
    b"K": _push(lambda m: m.unpack("<B")),                               # BININT1
    b"M": _push(lambda m: m.unpack("<H")),                               # BININT2
    b"L": _push(lambda m: _checked_int(m, _int_from_line(m.line()))),    # LONG
    b"\x8a": _push(lambda m: _checked_int(m, int.from_bytes(m.sized("<B"), "little", signed=True))),  # LONG1
    b"\x8b": _push(lambda m: _checked_int(m, int.from_bytes(m.sized("<i"), "little", signed=True))),  # LONG4
    b"F": _push(lambda m: float(m.line())),                              # FLOAT
    b"G": _push(lambda m: m.unpack(">d")),                               # BINFLOAT
    b"S": _push(lambda m: _string(m, _quoted(m.line()))),                # STRING
    b"T": _push(lambda m: _string(m, m.sized("<i"))),                    # BINSTRING
    b"U": _push(lambda m: _string(m, m.sized("<B"))),                    # SHORT_BINSTRING
    b"V": _push(lambda m: m.text(m.line(), "raw-unicode-escape")),       # UNICODE
    b"X": _push(lambda m: m.text(m.sized("<I"))),                        # BINUNICODE
    b"\x8c": _push(lambda m: m.text(m.sized("<B"))),                     # SHORT_BINUNICODE
    b"\x8d": _push(lambda m: m.text(m.sized("<Q"))),                     # BINUNICODE8
    b"B": _push(lambda m: m.blob(m.sized("<I", payload=True))),          # BINBYTES
    b"C": _push(lambda m: m.blob(m.sized("<B", payload=True))),          # SHORT_BINBYTES
    b"\x8e": _push(lambda m: m.blob(m.sized("<Q", payload=True))),       # BINBYTES8
    b"\x96": _push(lambda m: m.blob(m.sized("<Q", payload=True))),       # BYTEARRAY8
    b")": _push(lambda m: ()),                                           # EMPTY_TUPLE
    b"]": _push(_empty(list)),                                           # EMPTY_LIST
    b"}": _push(_empty(dict)),                                           # EMPTY_DICT
    b"\x8f": _push(_empty(set)),                                         # EMPTY_SET
    b"t": _push(lambda m: tuple(m.counted(m.pop_mark()))),               # TUPLE
    b"\x85": _tuple_n(1),                                                # TUPLE1
    b"\x86": _tuple_n(2),                                                # TUPLE2
    b"\x87": _tuple_n(3),                                                # TUPLE3
    b"l": _push(lambda m: m.counted(m.pop_mark())),                      # LIST
    b"d": _dict,                                                         # DICT
    b"\x91": _frozenset,                                                 # FROZENSET
    b"a": _add("APPEND", False, 1),                                      # APPEND
    b"e": _add("APPENDS", True),                                         # APPENDS
    b"s": _add("SETITEM", False, 2),                                     # SETITEM
    b"u": _add("SETITEMS", True),                                        # SETITEMS
    b"\x90": _add("ADDITEMS", True),                                     # ADDITEMS
    b"p": _put(lambda m: int(m.line())),                                 # PUT
    b"q": _put(lambda m: m.unpack("<B")),                                # BINPUT
    b"r": _put(lambda m: m.unpack("<I")),                                # LONG_BINPUT
    b"\x94": _put(lambda m: len(m.memo)),                                # MEMOIZE
    b"g": _get(lambda m: int(m.line())),                                 # GET
    b"h": _get(lambda m: m.unpack("<B")),                                # BINGET
    b"j": _get(lambda m: m.unpack("<I")),                                # LONG_BINGET
    b"c": _global,                                                       # GLOBAL
    b"\x93": _stack_global,                                              # STACK_GLOBAL
    b"i": _inst,                                                         # INST
    b"o": _obj,                                                          # OBJ
    b"R": _reduce,                                                       # REDUCE
    b"\x81": _newobj,                                                    # NEWOBJ
    b"\x92": _newobj_ex,                                                 # NEWOBJ_EX
    b"b": _build,                                                        # BUILD
    b"P": _persid,                                                       # PERSID
    b"Q": _binpersid,                                                    # BINPERSID
    b"\x82": _ext("<B"),                                                 # EXT1
    b"\x83": _ext("<H"),                                                 # EXT2
    b"\x84": _ext("<i"),                                                 # EXT4
    b"\x97": _out_of_band,                                               # NEXT_BUFFER
    b"\x98": _out_of_band,                                               # READONLY_BUFFER
}.items()}
