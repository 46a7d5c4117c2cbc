"""What counts as data: the allow-list of globals a checkpoint's pickle may name, each with the
shapes of arguments it may be given.

The model is torch's weights-only unpickler (``torch/_weights_only_unpickler.py``): every name
a ``GLOBAL``/``STACK_GLOBAL``/``INST`` resolves must be on this list, because the real unpickler
imports its module (an import runs code). We are at least as strict, and add the values the
lab's training scripts save, each with an argument schema:

- :data:`CALLS`: the callables a ``REDUCE`` (or ``INST``/``OBJ``/``NEWOBJ``) may call, each a
  function of ``(machine, args)`` that checks the arguments and returns an inert value;
- :data:`VALUES`: names that are data as they are (dtypes, storage and tensor classes,
  qschemes, numpy's classes) and may only be passed along, never called;
- :data:`RECORD_CLASSES` and any class of ``__main__`` (the training script's own classes,
  resolved by the real unpickler in the running program, never imported): instances created
  without calling anything of theirs (``NEWOBJ``, ``copyreg._reconstructor``) and given state
  by ``BUILD``; they are kept as :class:`PickledObject` records.

An object that is not plain data never reaches a callable's iterated argument or a dict key
(its ``__iter__``/``__hash__`` would run): that is ``unsafe``, naming the object.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from .pickle_values import (DTYPE_ITEMSIZE, STORAGE_DTYPES, TORCH_DTYPE_ALIASES, CounterValue, DefaultDictValue,
                            GlobalRef, LegacyRef, OrderedDictValue, PickledObject, StorageStub, TensorStub,
                            UnreadableError, UnsafePickleError, one_line)

MAIN_MODULE = "__main__"


def is_main_record(value: Any) -> bool:
    return isinstance(value, PickledObject) and value.cls.startswith(MAIN_MODULE + ".")


def named(value: Any, *names: str) -> bool:
    """``value`` is the allowed global ``names`` name (a string that spells it is not)."""
    return isinstance(value, GlobalRef) and str(value) in names


def check_no_records(value: Any, what: str) -> None:
    """``value`` holds no ``__main__`` instance, whose methods would run when ``what`` uses it.

    Each container is visited once: a pickle can share one list at every level (by memo), and
    a walk that followed every path would take exponential time."""
    seen: set[int] = set()
    pending = [value]
    while pending:
        v = pending.pop()
        if is_main_record(v):
            raise UnsafePickleError(f"{what} would be given a {v.cls} instance (its methods would run)")
        if id(v) in seen or not isinstance(v, (list, tuple, set, frozenset, dict)):
            continue
        seen.add(id(v))
        if isinstance(v, dict):
            pending.extend(v.keys())
            pending.extend(v.values())
        else:
            pending.extend(v)


def _iterable(value: Any, what: str) -> list | tuple | set | frozenset | dict:
    """An argument that ``what`` iterates: a real container (a record's __iter__ would run)."""
    if isinstance(value, PickledObject):
        raise UnsafePickleError(f"{what} would iterate a {value.cls} instance (its methods would run)")
    if not isinstance(value, (list, tuple, set, frozenset, dict, str, bytes)):
        raise UnreadableError(f"{what} given a {type(value).__name__} to iterate")
    return value


def _args(args: tuple, what: str, low: int, high: int) -> tuple:
    if not low <= len(args) <= high:
        raise UnreadableError(f"{what} called with {len(args)} argument(s)")
    return args


# --- containers and plain values ---------------------------------------------------------------

def _pairs(m, items: Any, what: str) -> list[tuple]:
    items = _iterable(items, what)
    if isinstance(items, dict):
        return list(items.items())
    pairs = []
    for pair in items:
        if isinstance(pair, PickledObject):
            _iterable(pair, what)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise UnreadableError(f"{what} built from something that is not key/value pairs")
        pairs.append((pair[0], pair[1]))
    return pairs


def _ordered_dict(m, args: tuple) -> OrderedDictValue:
    (items,) = _args(args, "collections.OrderedDict", 0, 1) or ((),)
    result = OrderedDictValue()
    for key, value in _pairs(m, items, "collections.OrderedDict"):
        result[m.key(key)] = value
    m.count(1, len(result))
    return result


def _counter(m, args: tuple) -> CounterValue:
    (items,) = _args(args, "collections.Counter", 0, 1) or ({},)
    items = _iterable(items, "collections.Counter")
    m.objects.add("collections.Counter")
    result = CounterValue()
    if isinstance(items, dict):
        for key, value in items.items():
            result[m.key(key)] = value
    else:
        for key in items:
            result[m.key(key)] = result.get(key, 0) + 1
    m.count(1, len(result))
    return result


# Default factories a defaultdict may name: kept as names, never called while reading.
_FACTORIES = {"builtins." + n for n in ("list", "dict", "int", "float", "set", "str", "tuple")}


def _defaultdict(m, args: tuple) -> DefaultDictValue:
    args = _args(args, "collections.defaultdict", 0, 2)
    factory = args[0] if args else None
    if factory is not None and not named(factory, *_FACTORIES):
        raise UnsafePickleError(f"collections.defaultdict with the default factory {one_line(factory, 80)}")
    result = DefaultDictValue()
    if len(args) == 2:
        for key, value in _pairs(m, args[1], "collections.defaultdict"):
            result[m.key(key)] = value
    m.count(1, len(result))
    return result


def _set_of(kind: type) -> Callable:
    what = f"builtins.{kind.__name__}"

    def build(m, args: tuple):
        (items,) = _args(args, what, 0, 1) or ((),)
        items = _iterable(items, what)
        m.count(1, len(items))
        return kind(m.key(i) for i in items)
    return build


def _complex(m, args: tuple) -> complex:
    args = _args(args, "builtins.complex", 0, 2)
    if not all(type(x) in (int, float) for x in args):
        raise UnreadableError("complex built from something that is not a number")
    return complex(*args)


def _bytes(m, args: tuple) -> bytes:
    (data,) = _args(args, "builtins.bytes", 0, 1) or (b"",)
    if isinstance(data, bytes):
        return data
    if type(data) is int and 0 <= data <= m.limits.max_pickle_bytes:  # bytes(4): four zero bytes
        return bytes(data)
    if isinstance(data, (list, tuple)) and all(type(i) is int and 0 <= i < 256 for i in data):
        return bytes(data)
    raise UnreadableError("bytes built from something that is not bytes")


def _encode(m, args: tuple) -> bytes:
    # Protocol < 3 pickles bytes as _codecs.encode(str, "latin1").
    text, encoding = (_args(args, "_codecs.encode", 1, 2) + ("utf-8",))[:2]
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnreadableError("_codecs.encode with arguments that are not a string and a text encoding")
    try:
        return text.encode(encoding)
    except UnicodeEncodeError as exc:
        raise UnreadableError(f"_codecs.encode: {exc.reason}") from None


def _bytearray(m, args: tuple) -> bytes:
    # Protocol 2 pickles bytearray(b) as bytearray(b.decode("latin-1"), "latin-1").
    args = _args(args, "builtins.bytearray", 0, 2)
    return _encode(m, args) if len(args) == 2 else _bytes(m, args)


# --- torch values and tensors ------------------------------------------------------------------

def _device(m, args: tuple) -> str:
    kind, index = (_args(args, "torch.device", 1, 2) + (None,))[:2]
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise UnreadableError("torch.device with arguments that are not a name and an index")
    m.objects.add("torch.device")
    return one_line(kind if index is None else f"{kind}:{index}", 40)


def ints(m, value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or len(value) > m.limits.max_rank:
        raise UnreadableError(f"{what} is not a tuple of at most {m.limits.max_rank} integers")
    if not all(type(v) is int and 0 <= v <= m.limits.max_dim for v in value):
        raise UnreadableError(f"{what} has an entry that is not an integer in [0, 2**48]")
    return value


def _size(m, args: tuple) -> tuple:
    (dims,) = _args(args, "torch.Size", 0, 1) or ((),)
    return ints(m, dims, "torch.Size")


def dtype_name(value: Any) -> str:
    if isinstance(value, GlobalRef) and value.module == "torch":
        name = TORCH_DTYPE_ALIASES.get(value.name, value.name)
        if name in DTYPE_ITEMSIZE:
            return name
    raise UnreadableError(f"unsupported tensor dtype {one_line(value, 60)}")


def _tensor(m, storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> TensorStub | LegacyRef:
    if isinstance(storage, LegacyRef):  # a pre-1.6 file: read only to name its calls
        return storage
    if not isinstance(storage, StorageStub):
        raise UnreadableError("tensor rebuilt from something that is not a storage")
    dtype = dtype or storage.dtype
    shape, strides = ints(m, size, "tensor size"), ints(m, stride, "tensor stride")
    if type(offset) is not int or offset < 0 or len(shape) != len(strides):
        raise UnreadableError(f"tensor of shape {list(shape)} has a malformed layout")
    stub = TensorStub(dtype, shape, storage.key, offset, strides)
    capacity = storage.nbytes // DTYPE_ITEMSIZE[dtype]
    if stub.numel and offset + sum((d - 1) * s for d, s in zip(shape, strides)) >= capacity:
        raise UnreadableError(f"tensor of shape {list(shape)} reaches past its storage of {capacity} elements")
    m.count()
    return stub


def _flags(requires_grad: Any, hooks: Any, metadata: Any) -> None:
    """What a rebuild carries beside its bytes: accepted only where the loaded values are the bytes."""
    if type(requires_grad) is not bool:
        raise UnreadableError("tensor requires_grad is not a boolean")
    if hooks not in (None,) and not isinstance(hooks, dict):
        raise UnreadableError("tensor backward hooks are not a dict")
    if hooks:
        raise UnreadableError("tensor carries pickled backward hooks")
    if metadata is None or metadata == {}:
        return
    if not isinstance(metadata, dict):
        raise UnreadableError("tensor metadata is not a dict")
    set_flags = sorted(str(k) for k, v in metadata.items() if v is not False)
    if set_flags:
        # torch.load would apply them (neg: the values read are negated; conj: conjugated).
        raise UnreadableError(f"tensor with the {', '.join(one_line(f, 20) for f in set_flags[:3])} bit set "
                              f"(torch.load would not return its stored values)")


def _rebuild_tensor(m, args: tuple):
    storage, offset, size, stride = _args(args, "torch._utils._rebuild_tensor", 4, 4)
    return _tensor(m, storage, offset, size, stride, None)


def _rebuild_tensor_v2(m, args: tuple):
    storage, offset, size, stride, requires_grad, hooks, metadata = (
        _args(args, "torch._utils._rebuild_tensor_v2", 6, 7) + (None,))[:7]
    _flags(requires_grad, hooks, metadata)
    return _tensor(m, storage, offset, size, stride, None)


def _rebuild_tensor_v3(m, args: tuple):
    storage, offset, size, stride, requires_grad, hooks, dtype, metadata = (
        _args(args, "torch._utils._rebuild_tensor_v3", 7, 8) + (None,))[:8]
    _flags(requires_grad, hooks, metadata)
    return _tensor(m, storage, offset, size, stride, dtype_name(dtype))


def _parameter_data(data: Any, requires_grad: Any) -> Any:
    if not isinstance(data, (TensorStub, LegacyRef)):
        raise UnreadableError("parameter rebuilt from something that is not a tensor")
    if type(requires_grad) is not bool:
        raise UnreadableError("parameter requires_grad is not a boolean")
    return data


def _rebuild_parameter(m, args: tuple):
    data, requires_grad, hooks = (_args(args, "torch._utils._rebuild_parameter", 1, 3) + (True, None))[:3]
    _flags(True, hooks, None)
    return _parameter_data(data, requires_grad)


def _rebuild_parameter_with_state(m, args: tuple):
    data, requires_grad, hooks, state = _args(args, "torch._utils._rebuild_parameter_with_state", 4, 4)
    _flags(True, hooks, None)
    if state not in (None, {}, (None, None), ({}, None), (None, {}), ({}, {})):
        check_no_records(state, "torch._utils._rebuild_parameter_with_state")
        # torch.load sets these attributes on the parameter; "data" among them replaces its values.
        raise UnreadableError("parameter carries pickled attributes (torch.load would set them, and they may "
                              "replace its data)")
    return _parameter_data(data, requires_grad)


def _parameter(m, args: tuple):
    data, requires_grad = (_args(args, "torch.nn.parameter.Parameter", 0, 2) + (None, True))[:2]
    return _parameter_data(data, requires_grad)


def _special_tensor(kind: str, low: int, high: int) -> Callable:
    """Sparse, nested, meta, quantized and device tensors: data torch's weights-only loader reads,
    kept as records (a state dict holding one is not one this tool converts)."""
    what = f"torch._utils._rebuild_{kind}"

    def build(m, args: tuple) -> PickledObject:
        _args(args, what, low, high)
        check_no_records(args, what)
        if kind == "wrapper_subclass" and not named(args[0], "torch.Tensor", "torch.nn.parameter.Parameter"):
            raise UnsafePickleError(f"{what} would create a {one_line(args[0], 80)}")
        m.objects.add(f"torch.Tensor ({kind})")
        return m.record(f"torch.Tensor ({kind})", args)
    return build


def _rebuild_from_type_v2(m, args: tuple):
    # torch._tensor._rebuild_from_type_v2(func, new_type, args, state): func(*args), then the type.
    func, new_type, func_args, state = _args(args, "torch._tensor._rebuild_from_type_v2", 4, 4)
    if not isinstance(func, GlobalRef) or str(func) not in CALLS or not str(func).startswith("torch._utils._rebuild"):
        raise UnsafePickleError(f"torch._tensor._rebuild_from_type_v2 would call {one_line(func, 80)}")
    if not named(new_type, "torch.Tensor", "torch.nn.parameter.Parameter"):
        raise UnsafePickleError(f"torch._tensor._rebuild_from_type_v2 would make a {one_line(new_type, 80)}")
    if not isinstance(func_args, tuple):
        raise UnreadableError("torch._tensor._rebuild_from_type_v2 with arguments that are not a tuple")
    value = CALLS[str(func)](m, func_args)
    if state not in (None, {}):
        check_no_records(state, "torch._tensor._rebuild_from_type_v2")
        raise UnreadableError("tensor carries pickled attributes (torch.load would set them)")
    return value


def _get_layout(m, args: tuple) -> GlobalRef:
    (name,) = _args(args, "torch.serialization._get_layout", 1, 1)
    if not isinstance(name, str) or not name.startswith("torch.") or not name[6:].isidentifier():
        raise UnreadableError("torch.serialization._get_layout of something that is not a layout name")
    return GlobalRef("torch", name[6:])


# --- numpy values ------------------------------------------------------------------------------

_NUMPY_SCALAR_FORMATS = {"b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I",
                         "i8": "q", "u8": "Q", "f2": "e", "f4": "f", "f8": "d"}
NUMPY_BIT_GENERATORS = {"numpy.random._mt19937.MT19937", "numpy.random._pcg64.PCG64",
                        "numpy.random._pcg64.PCG64DXSM", "numpy.random._philox.Philox", "numpy.random._sfc64.SFC64"}
_BIT_GENERATOR_NAMES = {name.rsplit(".", 1)[1] for name in NUMPY_BIT_GENERATORS}


def _numpy_dtype(m, args: tuple) -> PickledObject:
    args = _args(args, "numpy.dtype", 1, 3)
    if not isinstance(args[0], str) or not all(type(a) in (bool, int) for a in args[1:]):
        raise UnreadableError("numpy.dtype built from something that is not a type code")
    return m.record("numpy.dtype", args)


def _numpy_reconstruct(m, args: tuple) -> PickledObject:
    cls, shape, typecode = _args(args, "numpy.core.multiarray._reconstruct", 3, 3)
    if not named(cls, "numpy.ndarray"):
        raise UnsafePickleError(f"numpy.core.multiarray._reconstruct would create a {one_line(cls, 80)}")
    check_no_records((shape, typecode), "numpy.core.multiarray._reconstruct")
    return m.record("numpy.ndarray", args)


def _numpy_frombuffer(m, args: tuple) -> PickledObject:
    buffer, dtype, shape, order = _args(args, "numpy.core.numeric._frombuffer", 4, 4)
    if not isinstance(buffer, bytes) or not (isinstance(dtype, PickledObject) and dtype.cls == "numpy.dtype"):
        raise UnreadableError("numpy.core.numeric._frombuffer without bytes and a numpy dtype")
    return m.record("numpy.ndarray", (shape, order))


def _numpy_scalar(m, args: tuple) -> Any:
    dtype, data = (_args(args, "numpy.core.multiarray.scalar", 1, 2) + (None,))[:2]
    if not (isinstance(dtype, PickledObject) and dtype.cls == "numpy.dtype"):
        raise UnreadableError("numpy.core.multiarray.scalar without a numpy dtype")
    check_no_records(data, "numpy.core.multiarray.scalar")
    m.objects.add("numpy.scalar")
    fmt = _NUMPY_SCALAR_FORMATS.get(str(dtype.args[0]).lstrip("<>=|"))
    if fmt and isinstance(data, bytes) and struct.calcsize(fmt) == len(data):
        return struct.unpack("<" + fmt, data)[0]  # a step, a loss: its Python number
    return m.record("numpy.scalar", args)


def _bit_generator_spec(value: Any, what: str) -> None:
    """numpy's own bit generators only, by name, by class, or as an instance numpy made."""
    if isinstance(value, str) and value in _BIT_GENERATOR_NAMES:
        return
    if isinstance(value, GlobalRef) and str(value) in NUMPY_BIT_GENERATORS:
        return
    if isinstance(value, PickledObject) and value.cls in NUMPY_BIT_GENERATORS:
        return
    raise UnsafePickleError(f"{what} would make a bit generator of {one_line(value, 80)}")


def _bit_generator_ctor(m, args: tuple) -> PickledObject:
    what = "numpy.random._pickle.__bit_generator_ctor"
    (spec,) = _args(args, what, 0, 1) or ("MT19937",)
    _bit_generator_spec(spec, what)
    name = spec if isinstance(spec, str) else str(spec).rsplit(".", 1)[1] if isinstance(spec, GlobalRef) else spec.cls
    cls = next(c for c in NUMPY_BIT_GENERATORS if c.endswith("." + name.rsplit(".", 1)[-1]))
    return m.record(cls, args)


def _rng_ctor(what: str, record: str) -> Callable:
    # __randomstate_ctor / __generator_ctor(bit_generator_name, bit_generator_ctor): the second
    # argument is called, so it may only be numpy's own __bit_generator_ctor.
    def build(m, args: tuple) -> PickledObject:
        args = _args(args, what, 0, 2)
        if args:
            _bit_generator_spec(args[0], what)
        if len(args) == 2 and not named(args[1], "numpy.random._pickle.__bit_generator_ctor"):
            raise UnsafePickleError(f"{what} would call {one_line(args[1], 80)}")
        return m.record(record, args[:1])
    return build


def _legacy_randomstate_ctor(m, args: tuple) -> PickledObject:
    _args(args, "numpy.random.__RandomState_ctor", 0, 0)
    return m.record("numpy.random.mtrand.RandomState")


def _seed_sequence(m, args: tuple) -> PickledObject:
    # Cython's __pyx_unpickle_X(cls, checksum, state) creates cls.__new__(cls): only SeedSequence.
    what = "numpy.random.bit_generator.__pyx_unpickle_SeedSequence"
    cls, checksum, state = _args(args, what, 3, 3)
    if not named(cls, "numpy.random.bit_generator.SeedSequence"):
        raise UnsafePickleError(f"{what} would create a {one_line(cls, 80)}")
    if type(checksum) is not int:
        raise UnreadableError(f"{what} without an integer checksum")
    check_no_records(state, what)
    return m.record("numpy.random.bit_generator.SeedSequence", (), state)


# --- standard-library values ---------------------------------------------------------------------

def _stdlib_record(name: str) -> Callable:
    def build(m, args: tuple) -> PickledObject:
        check_no_records(args, name)
        for arg in args:
            if isinstance(arg, PickledObject) and arg.cls not in STDLIB_RECORDS:
                raise UnreadableError(f"{name} built from a {arg.cls}")
        return m.record(name, args)
    return build


STDLIB_RECORDS = ({f"datetime.{n}" for n in ("datetime", "date", "time", "timedelta", "timezone")}
                  | {f"pathlib.{n}" for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                              "PureWindowsPath")}
                  | {"decimal.Decimal", "fractions.Fraction"})

# Classes whose instances a pickle may create without calling anything of theirs (NEWOBJ,
# copyreg._reconstructor) and fill by BUILD; any class of __main__ is one too.
RECORD_CLASSES = {"argparse.Namespace", "uuid.UUID"}
# Built-in classes NEWOBJ may create empty (object: a plain instance; the others: containers).
_NEW_EMPTY = {"builtins.object": None, "builtins.dict": dict, "builtins.list": list, "builtins.set": set,
              "builtins.frozenset": frozenset, "builtins.tuple": tuple}


def _reconstructor(m, args: tuple) -> PickledObject:
    # copyreg._reconstructor(cls, base, state): base.__new__(cls, state), then base.__init__(obj, state)
    # unless base is object. How protocols 0 and 1 create instances.
    cls, base, state = _args(args, "copyreg._reconstructor", 3, 3)
    if not (isinstance(cls, GlobalRef) and is_record_class(cls)):
        raise UnsafePickleError(f"copyreg._reconstructor would create a {one_line(cls, 80)}")
    if named(base, "builtins.object"):
        if state is not None:
            raise UnreadableError("copyreg._reconstructor with base object and a state")
    elif named(base, *_NEW_EMPTY, "builtins.int", "builtins.float", "builtins.str", "builtins.bytes"):
        check_no_records(state, f"copyreg._reconstructor with base {base}")
    else:
        raise UnsafePickleError(f"copyreg._reconstructor would run {one_line(base, 80)}.__init__")
    return m.record(str(cls), () if state is None else (state,))


def is_record_class(cls: GlobalRef) -> bool:
    return cls.module == MAIN_MODULE or str(cls) in RECORD_CLASSES


def new_instance(m, cls: GlobalRef, args: tuple) -> Any:
    """What ``NEWOBJ`` (``cls.__new__(cls, *args)``) makes of an allowed class."""
    check_no_records(args, f"{cls}.__new__")
    name = str(cls)
    if is_record_class(cls):
        return m.record(name, args)
    if name == "torch.nn.parameter.Parameter":
        return _parameter(m, args)
    if name in _NEW_EMPTY:
        if args:
            raise UnreadableError(f"NEWOBJ {name} with arguments")
        return m.record(name) if _NEW_EMPTY[name] is None else _NEW_EMPTY[name]()
    if name in ("collections.OrderedDict", "collections.Counter", "collections.defaultdict") and not args:
        return CALLS[name](m, ())
    if name in _NEW_BUILDS or name in TENSOR_CLASSES:
        return CALLS[name](m, args)
    raise UnsafePickleError(f"NEWOBJ creates {name}")


# Immutable values whose __new__ builds them from its arguments as calling the class would.
_NEW_BUILDS = {"torch.Size", "builtins.complex", "builtins.bytes", "builtins.frozenset"}
_TENSOR_TYPES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
# Tensor and storage classes torch's weights-only loader also lets a pickle call or create
# (torch.FloatTensor([1.0, 2.0]), torch.storage.UntypedStorage(4)): a tensor made from plain
# values, kept as a record; it is never a model weight.
TENSOR_CLASSES = ({f"{module}.{t}Tensor" for module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse")
                   for t in _TENSOR_TYPES} | {"torch.Tensor", "torch.storage.UntypedStorage"})


def _tensor_record(name: str) -> Callable:
    def build(m, args: tuple) -> PickledObject:
        check_no_records(args, name)  # the constructor iterates and converts its arguments
        return m.record(name, args)
    return build


def _numpy_names(name: str) -> list[str]:
    return [f"{module}.{name}" for module in ("numpy.core.multiarray", "numpy._core.multiarray")]


CALLS: dict[str, Callable[[Any, tuple], Any]] = {
    "collections.OrderedDict": _ordered_dict,
    "collections.Counter": _counter,
    "collections.defaultdict": _defaultdict,
    "builtins.set": _set_of(set),
    "builtins.frozenset": _set_of(frozenset),
    "builtins.complex": _complex,
    "builtins.bytes": _bytes,
    "builtins.bytearray": _bytearray,
    "_codecs.encode": _encode,
    "copyreg._reconstructor": _reconstructor,
    "torch.device": _device,
    "torch.Size": _size,
    "torch.nn.parameter.Parameter": _parameter,
    "torch.serialization._get_layout": _get_layout,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._utils._rebuild_sparse_tensor": _special_tensor("sparse_tensor", 2, 2),
    "torch._utils._rebuild_nested_tensor": _special_tensor("nested_tensor", 4, 4),
    "torch._utils._rebuild_meta_tensor_no_storage": _special_tensor("meta_tensor_no_storage", 4, 4),
    "torch._utils._rebuild_qtensor": _special_tensor("qtensor", 7, 7),
    "torch._utils._rebuild_wrapper_subclass": _special_tensor("wrapper_subclass", 8, 8),
    "torch._utils._rebuild_device_tensor_from_numpy": _special_tensor("device_tensor_from_numpy", 4, 4),
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _special_tensor("device_tensor_from_cpu_tensor", 4, 4),
    "numpy.dtype": _numpy_dtype,
    **{name: _numpy_reconstruct for name in _numpy_names("_reconstruct")},
    **{name: _numpy_scalar for name in _numpy_names("scalar")},
    "numpy.core.numeric._frombuffer": _numpy_frombuffer,
    "numpy._core.numeric._frombuffer": _numpy_frombuffer,
    "numpy.random._pickle.__bit_generator_ctor": _bit_generator_ctor,
    "numpy.random._pickle.__randomstate_ctor": _rng_ctor("numpy.random._pickle.__randomstate_ctor",
                                                         "numpy.random.mtrand.RandomState"),
    "numpy.random._pickle.__generator_ctor": _rng_ctor("numpy.random._pickle.__generator_ctor",
                                                       "numpy.random._generator.Generator"),
    "numpy.random.__RandomState_ctor": _legacy_randomstate_ctor,
    "numpy.random.mtrand.__RandomState_ctor": _legacy_randomstate_ctor,
    "numpy.random.bit_generator.__pyx_unpickle_SeedSequence": _seed_sequence,
    **{name: _stdlib_record(name) for name in STDLIB_RECORDS},
    **{name: _tensor_record(name) for name in TENSOR_CLASSES},
}

VALUES: set[str] = (
    {f"torch.{name}" for name in (*DTYPE_ITEMSIZE, *TORCH_DTYPE_ALIASES)}
    | {f"torch.{name}" for name in ("quint8", "qint8", "qint32", "quint4x2", "quint2x4", "complex32", "bits8",
                                    "bits16", "bits1x8", "bits2x4", "bits4x2", "float4_e2m1fn_x2",
                                    *(f"uint{i}" for i in range(1, 8)), *(f"int{i}" for i in range(1, 8)))}
    | {f"{module}.{name}" for module in ("torch", "torch.storage") for name in STORAGE_DTYPES}
    | {"torch.storage.TypedStorage"}
    | {f"torch.{q}" for q in ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
                              "per_channel_symmetric", "per_channel_affine_float_qparams")}
    | {"numpy.ndarray", "numpy.random.bit_generator.SeedSequence"}
    | NUMPY_BIT_GENERATORS | set(_NEW_EMPTY) | _FACTORIES | {"builtins.bytes"}
)

# Every name a pickle may make the unpickler resolve, besides classes of __main__.
ALLOWED_GLOBALS: frozenset[str] = frozenset(CALLS) | frozenset(VALUES) | frozenset(RECORD_CLASSES)
# State BUILD may give a record: numpy's values take their own state tuples.
NUMPY_RECORDS = {"numpy.dtype", "numpy.ndarray", "numpy.scalar", "numpy.random.mtrand.RandomState",
                 "numpy.random._generator.Generator", "numpy.random.bit_generator.SeedSequence",
                 *NUMPY_BIT_GENERATORS}
