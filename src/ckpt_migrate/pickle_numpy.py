"""numpy's values in a pickle (dtypes, arrays, scalars, RNG state), each callable checking its
arguments: numpy's RNG helpers call or instantiate what they are given, so only numpy's own bit
generators pass."""

from __future__ import annotations

import struct
from typing import Any, Callable
from .pickle_values import GlobalRef, PickledObject, UnreadableError, UnsafePickleError, one_line
from .pickle_checks import arguments, check_no_records, named


_NUMPY_SCALAR_FORMATS = {"b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I",
                         "i8": "q", "u8": "Q", "f2": "e", "f4": "f", "f8": "d"}


NUMPY_BIT_GENERATORS = {"numpy.random._mt19937.MT19937", "numpy.random._pcg64.PCG64",
                        "numpy.random._pcg64.PCG64DXSM", "numpy.random._philox.Philox", "numpy.random._sfc64.SFC64"}


_BIT_GENERATOR_NAMES = {name.rsplit(".", 1)[1] for name in NUMPY_BIT_GENERATORS}


def numpy_dtype(m, args: tuple) -> PickledObject:
    args = arguments(args, "numpy.dtype", 1, 3)
    if not isinstance(args[0], str) or not all(type(a) in (bool, int) for a in args[1:]):
        raise UnreadableError("numpy.dtype built from something that is not a type code")
    return m.record("numpy.dtype", args)


def numpy_reconstruct(m, args: tuple) -> PickledObject:
    cls, shape, typecode = arguments(args, "numpy.core.multiarray._reconstruct", 3, 3)
    if not named(cls, "numpy.ndarray"):
        raise UnsafePickleError(f"numpy.core.multiarray._reconstruct would create a {one_line(cls, 80)}")
    check_no_records((shape, typecode), "numpy.core.multiarray._reconstruct")
    return m.record("numpy.ndarray", args)


def numpy_frombuffer(m, args: tuple) -> PickledObject:
    buffer, dtype, shape, order = arguments(args, "numpy.core.numeric._frombuffer", 4, 4)
    if not isinstance(buffer, bytes) or not (isinstance(dtype, PickledObject) and dtype.cls == "numpy.dtype"):
        raise UnreadableError("numpy.core.numeric._frombuffer without bytes and a numpy dtype")
    return m.record("numpy.ndarray", (shape, order))


def numpy_scalar(m, args: tuple) -> Any:
    dtype, data = (arguments(args, "numpy.core.multiarray.scalar", 1, 2) + (None,))[:2]
    if not (isinstance(dtype, PickledObject) and dtype.cls == "numpy.dtype"):
        raise UnreadableError("numpy.core.multiarray.scalar without a numpy dtype")
    check_no_records(data, "numpy.core.multiarray.scalar")
    m.objects.add("numpy.scalar")
    fmt = _NUMPY_SCALAR_FORMATS.get(str(dtype.args[0]).lstrip("<>=|"))
    order = _byte_order(dtype)
    if fmt and order and isinstance(data, bytes) and struct.calcsize(fmt) == len(data):
        return struct.unpack(order + fmt, data)[0]  # a step, a loss: its Python number
    return m.record("numpy.scalar", args)


def _byte_order(dtype: PickledObject) -> str:
    """The struct byte order of a pickled numpy dtype: its BUILD state's (numpy's __setstate__
    sets it after construction), else its type code's prefix; native is little-endian here.
    "" if the state holds something numpy would refuse."""
    if isinstance(dtype.state, tuple) and len(dtype.state) > 1:
        order = dtype.state[1]
    else:
        code = str(dtype.args[0]) if dtype.args else ""
        order = code[:1] if code[:1] in (">", "<", "=", "|") else "="
    return {">": ">", "<": "<", "=": "<", "|": "<"}.get(order, "") if isinstance(order, str) else ""


def _bit_generator_spec(value: Any, what: str) -> None:
    """numpy's own bit generators only, by name, by class, or as an instance numpy made."""
    if isinstance(value, str) and value in _BIT_GENERATOR_NAMES:
        return
    if isinstance(value, GlobalRef) and str(value) in NUMPY_BIT_GENERATORS:
        return
    if isinstance(value, PickledObject) and value.cls in NUMPY_BIT_GENERATORS:
        return
    raise UnsafePickleError(f"{what} would make a bit generator of {one_line(value, 80)}")


def bit_generator_ctor(m, args: tuple) -> PickledObject:
    what = "numpy.random._pickle.__bit_generator_ctor"
    (spec,) = arguments(args, what, 0, 1) or ("MT19937",)
    _bit_generator_spec(spec, what)
    name = spec if isinstance(spec, str) else str(spec).rsplit(".", 1)[1] if isinstance(spec, GlobalRef) else spec.cls
    cls = next(c for c in NUMPY_BIT_GENERATORS if c.endswith("." + name.rsplit(".", 1)[-1]))
    return m.record(cls, args)


def rng_ctor(what: str, record: str) -> Callable:
    # __randomstate_ctor / __generator_ctor(bit_generator_name, bit_generator_ctor): the second
    # argument is called, so it may only be numpy's own __bit_generator_ctor.
    def build(m, args: tuple) -> PickledObject:
        args = arguments(args, what, 0, 2)
        if args:
            _bit_generator_spec(args[0], what)
        if len(args) == 2 and not named(args[1], "numpy.random._pickle.__bit_generator_ctor"):
            raise UnsafePickleError(f"{what} would call {one_line(args[1], 80)}")
        return m.record(record, args[:1])
    return build


def legacy_randomstate_ctor(m, args: tuple) -> PickledObject:
    arguments(args, "numpy.random.__RandomState_ctor", 0, 0)
    return m.record("numpy.random.mtrand.RandomState")


def seed_sequence(m, args: tuple) -> PickledObject:
    # Cython's __pyx_unpickle_X(cls, checksum, state) creates cls.__new__(cls): only SeedSequence.
    what = "numpy.random.bit_generator.__pyx_unpickle_SeedSequence"
    cls, checksum, state = arguments(args, what, 3, 3)
    if not named(cls, "numpy.random.bit_generator.SeedSequence"):
        raise UnsafePickleError(f"{what} would create a {one_line(cls, 80)}")
    if type(checksum) is not int:
        raise UnreadableError(f"{what} without an integer checksum")
    check_no_records(state, what)
    return m.record("numpy.random.bit_generator.SeedSequence", (), state)


def numpy_names(name: str) -> list[str]:
    return [f"{module}.{name}" for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
