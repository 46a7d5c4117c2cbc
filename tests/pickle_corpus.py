"""The differential corpus of issue 19: seeded, deterministic pickles of every protocol, benign
and hostile, and their mutations (frames cut and shifted, memo indices changed, bytes flipped,
cut and inserted). See test_differential.py for what is checked on each.

Families:
- ``benign``: random trees of plain values, containers, OrderedDict/Counter/defaultdict,
  ``__main__`` records, argparse.Namespace, torch dtypes/devices/sizes (protocols 0-5);
- ``torch``: torch.save's data.pkl of state dicts, parameters, views, sparse, nested, meta and
  quantized tensors (pickle protocols 2, 4, 5); ``numpy``: numpy scalars, dtypes, arrays, RNG
  states, Generator and RandomState (protocols 0-5);
- ``hostile:<technique>``: a ``__reduce__`` returning a call (``posix.system``, ``builtins.eval``,
  containers built from instances, numpy RNG helpers given callables, foreign and ``__main__``
  classes misused...) placed at random in a benign tree (protocols 0-5);
- ``names``: hand-written pickles for the compat mapping (Python 2 names at protocol 2 and 3,
  PROTO changing mid-stream), dotted names, INST/OBJ/NEWOBJ_EX, EXT, persistent ids, BUILD
  on classes;
- ``frame-attack:<technique>``: calls hidden behind frame boundaries in benign trees (a string
  straddling the frame end, a new frame before the last is used up, a GLOBAL line split);
- ``mutation:<kind>``: each of the above mutated.
"""

from __future__ import annotations

import argparse
import collections
import copyreg
import functools
import io
import os
import pickle
import pickletools
import random
import struct
import subprocess
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from . import builders
from .builders import Call, posing_as

SEED = 19
NEVER = "/tmp/ckpt_migrate_differential_never_runs/PWNED"  # no case may ever create it
COMMAND = f"touch {NEVER}"
FOREIGN = "ckpt_foreign_mod"  # a module only the victim has: importing it is the code


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    data: bytes
    base: str = ""  # the case a mutation was made from

    @property
    def group(self) -> str:
        return self.family.split(":")[0]


# --- classes that pose as __main__ (the training script) or as a foreign module -------------------

class _TrainRecord:
    def __init__(self, lr=0.1, name="run"):
        self.lr, self.name = lr, name


class _MainRows:
    def __init__(self):
        self.rows = [("a", 1)]

    def __iter__(self):
        return iter(self.rows)


class _MainRegistry(dict):
    pass


class _MainGen:
    pass


def _main_helper(x):
    return x


class _ForeignRows:
    def __init__(self):
        self.rows = [("a", 1)]

    def __iter__(self):
        return iter(self.rows)


class _ForeignRegistry(dict):
    pass


class _ForeignConfig:
    def __init__(self):
        self.lr = 0.1


class _ForeignStateful:
    def __init__(self):
        self.step = 1

    def __reduce__(self):
        return copyreg._reconstructor, (type(self), object, None), {"step": self.step}


class _ForeignGen:
    pass


_MAIN_CLASSES = (_TrainRecord, _MainRows, _MainRegistry, _MainGen, _main_helper)
_FOREIGN_CLASSES = (_ForeignRows, _ForeignRegistry, _ForeignConfig, _ForeignStateful, _ForeignGen)


# --- benign values ---------------------------------------------------------------------------------

_TEXT = ["", "a", "lr", "model", "état", "日本語", "\U0001f600", "\ud800", "x" * 300, "line\nbreak", "q'\"\\"]
_BYTES = [b"", b"\x00", b"abc", bytes(range(256)), b"\xff" * 300]


def _key(rng: random.Random):
    r = rng.randrange(5)
    return [lambda: rng.choice(_TEXT[:7]), lambda: rng.randint(-5, 1000), lambda: (1, rng.randint(0, 9)),
            lambda: rng.choice([None, True, 2.5]), lambda: rng.choice(_BYTES[:3])][r]()


def _member(rng: random.Random):
    """A set member whose hash is not randomized (the corpus must not depend on PYTHONHASHSEED)."""
    return rng.choice([lambda: rng.randint(-300, 2**40), lambda: rng.random(), lambda: (rng.randint(0, 5), 1.5),
                       lambda: True, lambda: -2**70])()  # not None: its hash is its address in 3.11


def _leaf(rng: random.Random):
    r = rng.randrange(12)
    if r == 0:
        return rng.choice([None, True, False])
    if r == 1:
        return rng.randint(-300, 300)
    if r == 2:
        return rng.choice([255, 256, 65535, 65536, 2**31 - 1, 2**31, -2**31 - 1, 2**63, 2**64 + 5, -(2**100), 10**40])
    if r == 3:
        return rng.choice([0.0, -0.0, 1.5, 1e300, -1e-300, float("inf"), float("nan"), rng.random()])
    if r in (4, 5):
        return rng.choice(_TEXT)
    if r == 6:
        return rng.choice(_BYTES)
    if r == 7:
        return bytearray(rng.choice(_BYTES))
    if r == 8:
        return complex(rng.random(), -2.0)
    if r == 9:
        return rng.choice([torch.float32, torch.bfloat16, torch.int64, torch.device("cpu"), torch.device("cuda", 0),
                           torch.Size([2, 3])])
    if r == 10:
        return _TrainRecord(rng.random(), rng.choice(_TEXT[:4]))
    return argparse.Namespace(lr=rng.random(), tags=["a", "b"])


def benign_value(rng: random.Random, depth: int = 0):
    if depth >= 3 or rng.random() < 0.3:
        return _leaf(rng)
    n = rng.choice([0, 1, 2, 3, 4, 7])
    r = rng.randrange(10)
    if r == 0:
        return [benign_value(rng, depth + 1) for _ in range(n)]
    if r == 1:
        return tuple(benign_value(rng, depth + 1) for _ in range(n))
    if r in (2, 3):
        return {_key(rng): benign_value(rng, depth + 1) for _ in range(n)}
    if r == 4:
        return rng.choice([set, frozenset])(_member(rng) for _ in range(n))
    if r == 5:
        return collections.OrderedDict((rng.choice(_TEXT[:6]) + str(i), benign_value(rng, depth + 1)) for i in range(n))
    if r == 6:
        return collections.Counter({rng.choice(_TEXT[:6]) + str(i): rng.randint(0, 9) for i in range(n)})
    if r == 7:
        d = collections.defaultdict(rng.choice([list, int, dict]))
        for i in range(n):
            d[f"k{i}"] = benign_value(rng, depth + 1)
        return d
    if r == 8:
        shared = [benign_value(rng, depth + 1)]
        return [shared, shared, {"again": shared}]
    return [list(range(n * 40)), {"long": "y" * (n * 70)}]


# --- hostile values --------------------------------------------------------------------------------

def _hostile_values() -> dict:
    from numpy.random import _pickle as np_pickle
    return {
        "posix.system": lambda: Call(os.system, COMMAND),
        "builtins.eval": lambda: Call(eval, "1+1"),
        "builtins.exec": lambda: Call(exec, "x = 1"),
        "subprocess.Popen": lambda: Call(subprocess.Popen, ["touch", NEVER]),
        "getattr(__import__('os'), 'system')": lambda: Call(getattr, Call(__import__, "os"), "system"),
        "torch.load": lambda: Call(torch.load, NEVER),
        "Counter(foreign instance)": lambda: Call(collections.Counter, _ForeignRows()),
        "OrderedDict(foreign instance)": lambda: Call(collections.OrderedDict, _ForeignRows()),
        "set(foreign instance)": lambda: Call(set, _ForeignRows()),
        "defaultdict(None, foreign instance)": lambda: Call(collections.defaultdict, None, _ForeignRows()),
        "copyreg._reconstructor(list, list, foreign instance)":
            lambda: Call(copyreg._reconstructor, list, list, _ForeignRows()),
        "Counter(map(posix.system, ...))": lambda: Call(collections.Counter, map(os.system, iter([COMMAND]))),
        "set(map(posix.system, ...))": lambda: Call(set, map(os.system, iter([COMMAND]))),
        "__randomstate_ctor(command, posix.system)": lambda: Call(np_pickle.__randomstate_ctor, COMMAND, os.system),
        "__generator_ctor(command, posix.system)": lambda: Call(np_pickle.__generator_ctor, COMMAND, os.system),
        "__randomstate_ctor(command, builtins.eval)": lambda: Call(np_pickle.__randomstate_ctor, "1+1", eval),
        "__bit_generator_ctor(foreign class)": lambda: Call(np_pickle.__bit_generator_ctor, _ForeignGen),
        "foreign instance": lambda: _ForeignConfig(),
        "BUILD on a foreign instance (copyreg._reconstructor)": lambda: _ForeignStateful(),
        "SETITEMS on a foreign dict subclass": lambda: _ForeignRegistry(a=1, b=[2]),
        "Counter(__main__ record)": lambda: Call(collections.Counter, _MainRows()),
        "set(__main__ record)": lambda: Call(set, _MainRows()),
        "set([__main__ record])": lambda: Call(set, [_TrainRecord()]),
        "OrderedDict([(__main__ record, 1)])": lambda: Call(collections.OrderedDict, [(_TrainRecord(), 1)]),
        "__main__ record as a dict key": lambda: {_TrainRecord(): 1},
        "__main__ class called": lambda: Call(_TrainRecord, 0.1, "x"),
        "__main__ function called": lambda: Call(_main_helper, 1),
        "SETITEMS on a __main__ dict subclass": lambda: _MainRegistry(a=1),
        "__bit_generator_ctor(__main__ class)": lambda: Call(np_pickle.__bit_generator_ctor, _MainGen),
    }


def _embed(rng: random.Random, obj):
    r = rng.randrange(6)
    if r == 0:
        return obj
    if r == 1:
        return {"model": benign_value(rng, 1), "x": obj}
    if r == 2:
        return [benign_value(rng, 2), obj, benign_value(rng, 2)]
    if r == 3:
        return (obj, benign_value(rng, 1))
    if r == 4:
        return {"a": {"b": [benign_value(rng, 2), obj]}}
    return collections.OrderedDict([("step", 1), ("x", obj), ("y", benign_value(rng, 2))])


# --- real files' pickles -----------------------------------------------------------------------------

def _torch_values() -> list:
    g = torch.Generator().manual_seed(SEED)
    base = torch.randn(6, 4, generator=g)
    i = torch.tensor([[0, 1], [1, 0]])
    return [
        {"model": collections.OrderedDict([("w", base), ("b", torch.zeros(4, dtype=torch.bfloat16)),
                                           ("ids", torch.arange(5))]), "step": 3},
        {"view": base[2:4], "t": base.T, "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3)},
        {"p": torch.nn.Parameter(torch.ones(2, 2)), "frozen": torch.nn.Parameter(torch.ones(3), requires_grad=False)},
        {"state": {0: {"exp_avg": base.clone(), "step": torch.tensor(2.0)}},
         "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}]},
        {"coo": torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0]), (2, 2)),
         "csr": torch.tensor([[1.0, 0.0], [0.0, 2.0]]).to_sparse_csr()},
        {"meta": torch.empty(3, 4, device="meta"),
         "q": torch.quantize_per_tensor(torch.tensor([1.0, 2.0]), 0.1, 10, torch.quint8)},
        {"nested": torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)], layout=torch.strided)},
        {"dtype": torch.float16, "device": torch.device("cpu"), "size": torch.Size([3, 4]), "c": torch.ones(2) * 1j},
    ]


def _numpy_values() -> list:
    return [np.float64(1.5), np.int64(3), np.float32(-0.0), np.bool_(True), np.dtype("float32"), np.dtype("<u2"),
            np.arange(3), np.zeros((2, 2), dtype=np.float16),
            np.random.RandomState(0).get_state(),  # np.random.get_state()'s shape, seeded
            np.random.default_rng(0).bit_generator.state, np.random.default_rng(0), np.random.RandomState(0)]


def _torch_pickle(obj, protocol: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, buf, pickle_protocol=protocol)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


# --- hand-written pickles ---------------------------------------------------------------------------

def _hand_written() -> list[tuple[str, bytes]]:
    cmd = COMMAND.encode()
    return [
        ("compat: __builtin__.eval at protocol 2", b"\x80\x02c__builtin__\neval\n(V1+1\ntR."),
        ("compat: __builtin__.set at protocol 2", b"\x80\x02c__builtin__\nset\n]K\x01a\x85R."),
        ("compat: __builtin__.set at protocol 3", b"\x80\x03c__builtin__\nset\n]K\x01a\x85R."),
        ("compat: __builtin__.set without PROTO", b"c__builtin__\nset\n((lp0\nI1\natR."),
        ("compat: copy_reg._reconstructor at protocol 3",
         b"\x80\x03ccopy_reg\n_reconstructor\nc__builtin__\nlist\nc__builtin__\nlist\n]\x87R."),
        ("compat: PROTO 2 in the middle of a protocol-4 pickle", b"\x80\x04]\x80\x02c__builtin__\nset\n)Ra."),
        ("compat: PROTO 4 in the middle of a protocol-2 pickle", b"\x80\x02]\x80\x04c__builtin__\nset\n)Ra."),
        ("compat: exceptions.StandardError", b"cexceptions\nStandardError\n."),
        ("compat: UserDict.UserDict", b"\x80\x02cUserDict\nUserDict\n)R."),
        ("compat: __builtin__.xrange", b"\x80\x02c__builtin__\nxrange\nK\x03\x85R."),
        ("dotted: STACK_GLOBAL collections OrderedDict.fromkeys",
         b"\x80\x04\x8c\x0bcollections\x8c\x14OrderedDict.fromkeys\x93]K\x01a\x85R."),
        ("dotted: GLOBAL collections OrderedDict.fromkeys at protocol 2",
         b"\x80\x02ccollections\nOrderedDict.fromkeys\n]K\x01a\x85R."),
        ("dotted: STACK_GLOBAL os.path join", b"\x80\x04\x8c\x07os.path\x8c\x04join\x93."),
        ("INST posix.system", b"(V" + cmd + b"\niposix\nsystem\n."),
        ("INST with no arguments of collections.OrderedDict", b"(icollections\nOrderedDict\n."),
        ("OBJ posix.system", b"(cposix\nsystem\nV" + cmd + b"\no."),
        ("OBJ collections.OrderedDict", b"(ccollections\nOrderedDict\no."),
        ("NEWOBJ_EX posix.system", b"\x80\x04cposix\nsystem\n)}\x92."),
        ("NEWOBJ builtins.object", b"\x80\x02c__builtin__\nobject\n)\x81."),
        ("STACK_GLOBAL __main__ TrainRecord NEWOBJ BUILD",
         b"\x80\x04\x8c\x08__main__\x8c\x0bTrainRecord\x93)\x81}\x8c\x02lr\x47\x3f\xb9\x99\x99\x99\x99\x99\x9asb."),
        ("BUILD on the __main__ class itself", b"\x80\x02c__main__\nTrainRecord\nN}X\x01\x00\x00\x00aK\x01s\x86b."),
        ("BUILD on collections.OrderedDict itself",
         b"\x80\x02ccollections\nOrderedDict\nN}X\x01\x00\x00\x00aK\x01s\x86b."),
        ("BUILD on an OrderedDict instance", b"\x80\x02ccollections\nOrderedDict\n)R}X\x04\x00\x00\x00keysK\x01sb."),
        ("SETITEM on the OrderedDict class", b"\x80\x02ccollections\nOrderedDict\nK\x01K\x02s."),
        ("APPEND on an OrderedDict instance", b"\x80\x02ccollections\nOrderedDict\n)RK\x01a."),
        ("ADDITEMS on a __main__ record", b"\x80\x04c__main__\nTrainRecord\n)\x81(K\x01\x90."),
        ("REDUCE on a value built by the pickle", b"\x80\x02ccollections\nOrderedDict\n)R)R."),
        ("EXT1", b"\x80\x02\x82\x01."),
        ("EXT2 after a global", b"\x80\x02ccollections\nOrderedDict\n\x83\x01\x02."),
        ("NEXT_BUFFER without buffers", b"\x80\x05\x97."),
        ("PERSID protocol 0", b"P0\n."),
        ("BINPERSID of a storage tuple",
         b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ."),
        ("GLOBAL with a non-UTF-8 module", b"\x80\x02c\xff\xfe\nsystem\n."),
        ("STACK_GLOBAL with bytes names", b"\x80\x04C\x05posixC\x06system\x93."),
        ("unsupported protocol 6", b"\x80\x06N."),
        ("trailing bytes after STOP", b"\x80\x02N.cposix\nsystem\n."),
        ("empty", b""),
        ("STOP only", b"."),
    ]


# --- frame attacks on benign trees --------------------------------------------------------------------

def _dict_pickle(rng: random.Random, protocol: int) -> bytes:
    value = {f"k{i}": benign_value(rng, 1) for i in range(rng.randint(1, 3))}
    return pickle.dumps(value, protocol=protocol)


def _global_ops(data: bytes) -> list[tuple[int, str]]:
    try:
        return [(pos, arg) for op, arg, pos in pickletools.genops(data) if op.name == "GLOBAL"]
    except Exception:
        return []


def _frame_attacks(rng: random.Random) -> list[tuple[str, str, bytes]]:
    out = []
    for i in range(40):
        protocol = rng.choice([2, 3, 4, 5])
        base = _dict_pickle(rng, protocol)
        if protocol >= 4:
            base = unframed(base)
        out.append((f"frame-attack:string#{i}", "frame-attack:string",
                    builders._spliced(base, builders.frame_hidden_string_segment(COMMAND))))
        out.append((f"frame-attack:restart#{i}", "frame-attack:restart",
                    builders._spliced(base, builders.frame_restarted_segment(COMMAND))))
    for i in range(60):
        value = _embed(rng, collections.OrderedDict(a=benign_value(rng, 2)))
        base = pickle.dumps(value, protocol=rng.choice([0, 1, 2, 3]))
        globals_ = _global_ops(base)
        if not globals_:
            continue
        pos, arg = rng.choice(globals_)
        module = arg.split(" ")[0]
        if len(module) < 2:
            continue
        k = rng.randint(1, len(module) - 1)
        data = base[:pos] + builders._frame(1 + k) + base[pos:]
        out.append((f"frame-attack:global line#{i}", "frame-attack:global line", data))
    return out


# --- mutations ------------------------------------------------------------------------------------------

def _ops(data: bytes) -> list | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(pickletools.genops(data))
    except Exception:
        return None


def unframed(data: bytes) -> bytes:
    """``data`` without its FRAME opcodes (a well-formed pickle reads the same without them)."""
    ops = _ops(data)
    if ops is None:
        return data
    out, last = [], 0
    for op, _arg, pos in ops:
        if op.name == "FRAME":
            out.append(data[last:pos])
            last = pos + 9
    out.append(data[last:])
    return b"".join(out)


def _body_start(ops) -> int:
    return 2 if ops and ops[0][0].name == "PROTO" else 0


def _framed(data: bytes, cuts: list[int], start: int) -> bytes:
    """``data[start:]`` cut at ``cuts`` into frames, each behind its FRAME header."""
    points = sorted({c for c in cuts if start < c < len(data)} | {start, len(data)})
    out = [data[:start]]
    for a, b in zip(points, points[1:]):
        out.append(builders._frame(b - a) + data[a:b])
    return b"".join(out)


def _boundaries(ops) -> list[int]:
    return [pos for _op, _arg, pos in ops]


def m_reframe_clean(rng, data):
    u = unframed(data)
    ops = _ops(u)
    if not ops:
        return None
    bounds = _boundaries(ops)[1:]
    return _framed(u, rng.sample(bounds, min(len(bounds), rng.randint(1, 4))), _body_start(ops))


def m_reframe_cut(rng, data):
    u = unframed(data)
    ops = _ops(u)
    if not ops or len(u) < 6:
        return None
    start = _body_start(ops)
    return _framed(u, [rng.randrange(start + 1, len(u)) for _ in range(rng.randint(1, 3))], start)


def m_frame_early(rng, data):
    """A FRAME inside a frame, declaring more than the first frame has left (C drops the rest)."""
    u = unframed(data)
    ops = _ops(u)
    if not ops or len(ops) < 4:
        return None
    bounds = _boundaries(ops)
    start = _body_start(ops)
    i = rng.randrange(1, len(bounds) - 2)
    j = rng.randrange(i + 1, len(bounds) - 1)
    inner, end_a = bounds[i], bounds[j]
    rest = len(u) - end_a
    length = rng.randint(1, max(1, rest))
    a_content = u[start:inner] + builders._frame(length) + u[inner:end_a]
    return u[:start] + builders._frame(len(a_content)) + a_content + u[end_a:]


def m_frame_nested(rng, data):
    """A small FRAME wholly inside another (a no-op for C, an error for pickle.py)."""
    u = unframed(data)
    ops = _ops(u)
    if not ops or len(ops) < 3:
        return None
    start, bounds = _body_start(ops), _boundaries(ops)
    i = rng.randrange(1, len(bounds) - 1)
    room = len(u) - bounds[i]
    content = u[start:bounds[i]] + builders._frame(rng.randint(0, room)) + u[bounds[i]:]
    return u[:start] + builders._frame(len(content)) + content


def m_frame_long(rng, data):
    u = unframed(data)
    ops = _ops(u)
    if not ops:
        return None
    pos = rng.choice(_boundaries(ops))
    extra = rng.choice([1, 7, 2**31, 2**40])
    return u[:pos] + builders._frame(len(u) - pos + extra) + u[pos:]


def _memo_ops(data, names):
    ops = _ops(data)
    return [(op, arg, pos) for op, arg, pos in ops or () if op.name in names]


def m_memo_get(rng, data):
    gets = _memo_ops(data, ("GET", "BINGET", "LONG_BINGET"))
    if not gets:
        return None
    op, arg, pos = rng.choice(gets)
    new = max(0, arg + rng.choice([-2, -1, 1, 2, 100]))
    if op.name == "BINGET":
        return data[:pos + 1] + bytes([new % 256]) + data[pos + 2:]
    if op.name == "LONG_BINGET":
        return data[:pos + 1] + struct.pack("<I", new) + data[pos + 5:]
    end = data.index(b"\n", pos)
    return data[:pos + 1] + str(new).encode() + data[end:]


def m_memo_put(rng, data):
    puts = _memo_ops(data, ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"))
    if not puts:
        return None
    op, arg, pos = rng.choice(puts)
    if op.name == "MEMOIZE":
        return data[:pos] + data[pos + 1:] if rng.random() < 0.5 else data[:pos] + b"q\x00" + data[pos + 1:]
    new = max(0, arg + rng.choice([-1, 1, 3]))
    if op.name == "BINPUT":
        return data[:pos + 1] + bytes([new % 256]) + data[pos + 2:]
    if op.name == "LONG_BINPUT":
        return data[:pos + 1] + struct.pack("<I", new) + data[pos + 5:]
    end = data.index(b"\n", pos)
    return data[:pos + 1] + str(new).encode() + data[end:]


def m_flip(rng, data):
    if not data:
        return None
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def m_truncate(rng, data):
    return data[:rng.randrange(len(data))] if len(data) > 1 else None


def m_insert_delete(rng, data):
    if len(data) < 2:
        return None
    i = rng.randrange(1, len(data))
    return data[:i] + bytes([rng.randrange(256)]) + data[i:] if rng.random() < 0.5 else data[:i] + data[i + 1:]


MUTATIONS = {
    "reframe at opcode boundaries": m_reframe_clean,
    "frames cut mid-argument": m_reframe_cut,
    "new frame before the last is used up": m_frame_early,
    "frame inside a frame": m_frame_nested,
    "frame longer than the data": m_frame_long,
    "memo GET index": m_memo_get,
    "memo PUT index / MEMOIZE": m_memo_put,
    "bytes flipped": m_flip,
    "truncated": m_truncate,
    "byte inserted or deleted": m_insert_delete,
}
_FRAME_MUTATIONS = list(MUTATIONS)[:5]


# --- the corpus --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def corpus() -> tuple[Case, ...]:
    rng = random.Random(SEED)
    cases: list[Case] = []
    with posing_as("__main__", *_MAIN_CLASSES), posing_as(FOREIGN, *_FOREIGN_CLASSES), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(110):
            value = benign_value(rng)
            for p in range(6):
                cases.append(Case(f"benign#{i}/p{p}", "benign", pickle.dumps(value, protocol=p)))
        for i, value in enumerate(_torch_values()):
            for p in (2, 4, 5):
                cases.append(Case(f"torch#{i}/p{p}", "torch", _torch_pickle(value, p)))
        for i, value in enumerate(_numpy_values()):
            for p in range(6):
                cases.append(Case(f"numpy#{i}/p{p}", "numpy", pickle.dumps(value, protocol=p)))
        for technique, make in _hostile_values().items():
            for p in range(6):
                for k in range(2):
                    data = pickle.dumps(_embed(rng, make()), protocol=p)
                    cases.append(Case(f"hostile:{technique}#{k}/p{p}", f"hostile:{technique}", data))
    for name, data in _hand_written():
        cases.append(Case(f"names:{name}", "names", data))
    for name, family, data in _frame_attacks(rng):
        cases.append(Case(name, family, data))
    bases = list(cases)
    for base in bases:
        kinds = dict.fromkeys(rng.sample(list(MUTATIONS), 2) + [rng.choice(_FRAME_MUTATIONS)])
        for kind in kinds:
            data = MUTATIONS[kind](rng, base.data)
            if data is not None and data != base.data:
                cases.append(Case(f"{base.name} ~ {kind}", f"mutation:{kind}", data, base.name))
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    return tuple(cases)


def naive_names(data: bytes) -> list[str] | None:
    """The names a frame-blind reader (pickletools.genops) sees: GLOBAL/INST arguments, and the
    two strings before each STACK_GLOBAL. None if genops cannot read the bytes."""
    ops = _ops(data)
    if ops is None:
        return None
    names, strings = [], []
    for op, arg, _pos in ops:
        if op.name in ("GLOBAL", "INST"):
            names.append(arg.replace(" ", "."))
        elif isinstance(arg, str) and op.name.endswith("UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            names.append(".".join(strings[-2:]))
    return names
