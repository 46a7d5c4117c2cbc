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

from typing import Any, Callable

from .pickle_values import (DTYPE_ITEMSIZE, STORAGE_DTYPES, TORCH_DTYPE_ALIASES, CounterValue, DefaultDictValue,
                            GlobalRef, OrderedDictValue, PickledObject, UnreadableError, UnsafePickleError,
                            one_line)
from .pickle_checks import MAIN_MODULE, arguments, iterable_argument, check_no_records, named
from .pickle_torch import (TENSOR_CLASSES, torch_device, get_layout, torch_parameter, rebuild_from_type_v2,
                           rebuild_parameter, rebuild_parameter_with_state, rebuild_tensor, rebuild_tensor_v2,
                           rebuild_tensor_v3, torch_size, special_tensor, tensor_record)
from .pickle_numpy import (NUMPY_BIT_GENERATORS, bit_generator_ctor, legacy_randomstate_ctor, numpy_dtype,
                           numpy_frombuffer, numpy_names, numpy_reconstruct, numpy_scalar, rng_ctor,
                           seed_sequence)


# --- containers and plain values ---------------------------------------------------------------

def _pairs(m, items: Any, what: str) -> list[tuple]:
    items = iterable_argument(items, what)
    if isinstance(items, dict):
        return list(items.items())
    pairs = []
    for pair in items:
        if isinstance(pair, PickledObject):
            iterable_argument(pair, what)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise UnreadableError(f"{what} built from something that is not key/value pairs")
        pairs.append((pair[0], pair[1]))
    return pairs


def _ordered_dict(m, args: tuple) -> OrderedDictValue:
    (items,) = arguments(args, "collections.OrderedDict", 0, 1) or ((),)
    result = OrderedDictValue()
    for key, value in _pairs(m, items, "collections.OrderedDict"):
        result[m.key(key)] = value
    m.count(1, len(result))
    return result


def _counter(m, args: tuple) -> CounterValue:
    (items,) = arguments(args, "collections.Counter", 0, 1) or ({},)
    items = iterable_argument(items, "collections.Counter")
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
    args = arguments(args, "collections.defaultdict", 0, 2)
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
        (items,) = arguments(args, what, 0, 1) or ((),)
        items = iterable_argument(items, what)
        m.count(1, len(items))
        return kind(m.key(i) for i in items)
    return build


def _complex(m, args: tuple) -> complex:
    args = arguments(args, "builtins.complex", 0, 2)
    if not all(type(x) in (int, float) for x in args):
        raise UnreadableError("complex built from something that is not a number")
    return complex(*args)


def _bytes(m, args: tuple) -> bytes:
    (data,) = arguments(args, "builtins.bytes", 0, 1) or (b"",)
    if isinstance(data, bytes):
        return data
    if type(data) is int and 0 <= data <= m.limits.max_pickle_bytes:  # bytes(4): four zero bytes
        return bytes(data)
    if isinstance(data, (list, tuple)) and all(type(i) is int and 0 <= i < 256 for i in data):
        return bytes(data)
    raise UnreadableError("bytes built from something that is not bytes")


def _encode(m, args: tuple) -> bytes:
    # Protocol < 3 pickles bytes as _codecs.encode(str, "latin1").
    text, encoding = (arguments(args, "_codecs.encode", 1, 2) + ("utf-8",))[:2]
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnreadableError("_codecs.encode with arguments that are not a string and a text encoding")
    try:
        return text.encode(encoding)
    except UnicodeEncodeError as exc:
        raise UnreadableError(f"_codecs.encode: {exc.reason}") from None


def _bytearray(m, args: tuple) -> bytes:
    # Protocol 2 pickles bytearray(b) as bytearray(b.decode("latin-1"), "latin-1").
    args = arguments(args, "builtins.bytearray", 0, 2)
    return _encode(m, args) if len(args) == 2 else _bytes(m, args)


# --- torch values and tensors ------------------------------------------------------------------


# --- numpy values ------------------------------------------------------------------------------


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
    cls, base, state = arguments(args, "copyreg._reconstructor", 3, 3)
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
        return torch_parameter(m, args)
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
    "torch.device": torch_device,
    "torch.Size": torch_size,
    "torch.nn.parameter.Parameter": torch_parameter,
    "torch.serialization._get_layout": get_layout,
    "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
    "torch._utils._rebuild_tensor": rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": rebuild_parameter_with_state,
    "torch._utils._rebuild_sparse_tensor": special_tensor("sparse_tensor", 2, 2),
    "torch._utils._rebuild_nested_tensor": special_tensor("nested_tensor", 4, 4),
    "torch._utils._rebuild_meta_tensor_no_storage": special_tensor("meta_tensor_no_storage", 4, 4),
    "torch._utils._rebuild_qtensor": special_tensor("qtensor", 7, 7),
    "torch._utils._rebuild_wrapper_subclass": special_tensor("wrapper_subclass", 8, 8),
    "torch._utils._rebuild_device_tensor_from_numpy": special_tensor("device_tensor_from_numpy", 4, 4),
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": special_tensor("device_tensor_from_cpu_tensor", 4, 4),
    "numpy.dtype": numpy_dtype,
    **{name: numpy_reconstruct for name in numpy_names("_reconstruct")},
    **{name: numpy_scalar for name in numpy_names("scalar")},
    "numpy.core.numeric._frombuffer": numpy_frombuffer,
    "numpy._core.numeric._frombuffer": numpy_frombuffer,
    "numpy.random._pickle.__bit_generator_ctor": bit_generator_ctor,
    "numpy.random._pickle.__randomstate_ctor": rng_ctor("numpy.random._pickle.__randomstate_ctor",
                                                         "numpy.random.mtrand.RandomState"),
    "numpy.random._pickle.__generator_ctor": rng_ctor("numpy.random._pickle.__generator_ctor",
                                                       "numpy.random._generator.Generator"),
    "numpy.random.__RandomState_ctor": legacy_randomstate_ctor,
    "numpy.random.mtrand.__RandomState_ctor": legacy_randomstate_ctor,
    "numpy.random.bit_generator.__pyx_unpickle_SeedSequence": seed_sequence,
    **{name: _stdlib_record(name) for name in STDLIB_RECORDS},
    **{name: tensor_record(name) for name in TENSOR_CLASSES},
}

VALUES: set[str] = (
    {f"torch.{name}" for name in (*DTYPE_ITEMSIZE, *TORCH_DTYPE_ALIASES)}
    | {f"torch.{name}" for name in ("quint8", "qint8", "qint32", "quint4x2", "quint2x4", "complex32", "bits8",
                                    "bits16", "bits1x8", "bits2x4", "bits4x2", "float4_e2m1fn_x2",
                                    *(f"uint{i}" for i in range(1, 8)), *(f"int{i}" for i in range(1, 8)))}
    | {f"{module}.{name}" for module in ("torch", "torch.storage") for name in STORAGE_DTYPES}
    # what torch wrote for a GPU tensor's storage before typed storages went (torch's list has them)
    | {f"torch.cuda.{name}" for name in STORAGE_DTYPES if not name.startswith(("Q", "Untyped"))}
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
