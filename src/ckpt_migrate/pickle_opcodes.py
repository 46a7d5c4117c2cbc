"""One handler per pickle opcode, and the table that dispatches to them: each acts on the
machine's stack, memo and allow-list as CPython's unpickler would, on inert values."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from . import pickle_allowlist as allow
from .pickle_input import quoted_string, text_float, text_int, text_long
from .pickle_values import GlobalRef, PickledObject, UnreadableError, UnsafePickleError, one_line

if TYPE_CHECKING:  # only named in annotations: the machine imports this table
    from .pickle_machine import PickleMachine


class Stop(Exception):
    def __init__(self, value: Any):
        self.value = value


def _checked_int(m: PickleMachine, value: int) -> int:
    if type(value) is int and value.bit_length() > m.limits.max_int_bits:
        raise UnreadableError(f"integer of {value.bit_length()} bits")
    return value


def _string(m: PickleMachine, raw: bytes) -> str:
    # torch.load unpickles with encoding="utf-8": protocol 0-2 strings are decoded so.
    m.count()
    return raw.decode("utf-8")


def _proto(m: PickleMachine) -> None:
    version = m._input.read(1)[0]
    if version > 5:
        raise UnreadableError(f"unsupported pickle protocol: {version}")
    m.protocol = version


def _stop(m: PickleMachine) -> None:
    raise Stop(m.pop())


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
    b"I": _push(lambda m: _checked_int(m, text_int(m.line()))),          # INT
    b"J": _push(lambda m: m.unpack("<i")),                               # BININT
    b"K": _push(lambda m: m.unpack("<B")),                               # BININT1
    b"M": _push(lambda m: m.unpack("<H")),                               # BININT2
    b"L": _push(lambda m: _checked_int(m, text_long(m.line()))),         # LONG
    b"\x8a": _push(lambda m: _checked_int(m, int.from_bytes(m.sized("<B"), "little", signed=True))),  # LONG1
    b"\x8b": _push(lambda m: _checked_int(m, int.from_bytes(m.sized("<i"), "little", signed=True))),  # LONG4
    b"F": _push(lambda m: text_float(m.line())),                         # FLOAT
    b"G": _push(lambda m: m.unpack(">d")),                               # BINFLOAT
    b"S": _push(lambda m: _string(m, quoted_string(m.line()))),                # STRING
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
