"""The torch callables a checkpoint's pickle may call, each checking its arguments: tensors and
parameters rebuilt as stubs validated against their storage, devices, sizes, layouts, and the
tensor kinds torch's weights-only loader reads."""

from __future__ import annotations

from typing import Any, Callable
from .pickle_values import (DTYPE_ITEMSIZE, TORCH_DTYPE_ALIASES, GlobalRef, LegacyRef, PickledObject, StorageStub,
                            TensorStub, UnreadableError, UnsafePickleError, one_line)
from .pickle_checks import arguments, check_no_records, named


def torch_device(m, args: tuple) -> str:
    kind, index = (arguments(args, "torch.device", 1, 2) + (None,))[:2]
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


def torch_size(m, args: tuple) -> tuple:
    (dims,) = arguments(args, "torch.Size", 0, 1) or ((),)
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
    if dtype.startswith(("qint", "quint")):  # torch.load makes it a quantized tensor, not these bytes
        raise UnreadableError(f"a plain tensor rebuilt with the quantized dtype {dtype}")
    shape, strides = ints(m, size, "tensor size"), ints(m, stride, "tensor stride")
    if type(offset) is not int or offset < 0 or len(shape) != len(strides):
        raise UnreadableError(f"tensor of shape {list(shape)} has a malformed layout")
    if offset >= 2**63 or not _numel_fits_int64(shape):
        # torch holds these in 64 bits, and refuses what overflows even where no element is read
        raise UnreadableError(f"tensor of shape {list(shape)} at offset {offset}: overflows 64 bits "
                              f"(torch.load refuses it)")
    stub = TensorStub(dtype, shape, storage.key, offset, strides)
    capacity = storage.nbytes // DTYPE_ITEMSIZE[dtype]
    if stub.numel and offset + sum((d - 1) * s for d, s in zip(shape, strides)) >= capacity:
        raise UnreadableError(f"tensor of shape {list(shape)} reaches past its storage of {capacity} elements")
    m.count()
    return stub


def _numel_fits_int64(shape: tuple[int, ...]) -> bool:
    """Whether every running product of the dimensions, in order, stays below 2**63 (so a zero
    dimension after two of 2**48 does not save it)."""
    product = 1
    for dim in shape:
        product *= dim
        if product >= 2**63:
            return False
    return True


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


def rebuild_tensor(m, args: tuple):
    storage, offset, size, stride = arguments(args, "torch._utils._rebuild_tensor", 4, 4)
    return _tensor(m, storage, offset, size, stride, None)


def rebuild_tensor_v2(m, args: tuple):
    storage, offset, size, stride, requires_grad, hooks, metadata = (
        arguments(args, "torch._utils._rebuild_tensor_v2", 6, 7) + (None,))[:7]
    _flags(requires_grad, hooks, metadata)
    return _gradient_allowed(_tensor(m, storage, offset, size, stride, None), requires_grad)


def rebuild_tensor_v3(m, args: tuple):
    storage, offset, size, stride, requires_grad, hooks, dtype, metadata = (
        arguments(args, "torch._utils._rebuild_tensor_v3", 7, 8) + (None,))[:8]
    _flags(requires_grad, hooks, metadata)
    return _gradient_allowed(_tensor(m, storage, offset, size, stride, dtype_name(dtype)), requires_grad)


def _gradient_allowed(tensor: TensorStub | LegacyRef, requires_grad: Any) -> TensorStub | LegacyRef:
    """torch.load refuses requires_grad on a tensor that is not floating point or complex."""
    if requires_grad is True and isinstance(tensor, TensorStub) and not tensor.dtype.startswith(("float", "bfloat",
                                                                                                 "complex")):
        raise UnreadableError(f"a {tensor.dtype} tensor that requires grad (torch.load refuses it: only "
                              f"floating-point and complex tensors can)")
    return tensor


def _parameter_data(data: Any, requires_grad: Any) -> Any:
    if not isinstance(data, (TensorStub, LegacyRef)):
        raise UnreadableError("parameter rebuilt from something that is not a tensor")
    if type(requires_grad) is not bool:
        raise UnreadableError("parameter requires_grad is not a boolean")
    return _gradient_allowed(data, requires_grad)


def rebuild_parameter(m, args: tuple):
    data, requires_grad, hooks = (arguments(args, "torch._utils._rebuild_parameter", 1, 3) + (True, None))[:3]
    _flags(True, hooks, None)
    return _parameter_data(data, requires_grad)


def rebuild_parameter_with_state(m, args: tuple):
    data, requires_grad, hooks, state = arguments(args, "torch._utils._rebuild_parameter_with_state", 4, 4)
    _flags(True, hooks, None)
    if state not in (None, {}, (None, None), ({}, None), (None, {}), ({}, {})):
        check_no_records(state, "torch._utils._rebuild_parameter_with_state")
        # torch.load sets these attributes on the parameter; "data" among them replaces its values.
        raise UnreadableError("parameter carries pickled attributes (torch.load would set them, and they may "
                              "replace its data)")
    return _parameter_data(data, requires_grad)


def torch_parameter(m, args: tuple):
    data, requires_grad = (arguments(args, "torch.nn.parameter.Parameter", 0, 2) + (None, True))[:2]
    return _parameter_data(data, requires_grad)


def special_tensor(kind: str, low: int, high: int) -> Callable:
    """Sparse, nested, meta, quantized and device tensors: data torch's weights-only loader reads,
    kept as records (a state dict holding one is not one this tool converts)."""
    what = f"torch._utils._rebuild_{kind}"

    def build(m, args: tuple) -> PickledObject:
        arguments(args, what, low, high)
        check_no_records(args, what)
        if kind == "wrapper_subclass" and not named(args[0], "torch.Tensor", "torch.nn.parameter.Parameter"):
            raise UnsafePickleError(f"{what} would create a {one_line(args[0], 80)}")
        m.objects.add(f"torch.Tensor ({kind})")
        return m.record(f"torch.Tensor ({kind})", args)
    return build


def rebuild_from_type_v2(m, args: tuple):
    # torch._tensor._rebuild_from_type_v2(func, new_type, args, state): func(*args), then the type.
    from .pickle_allowlist import CALLS  # the table holds this function too

    func, new_type, func_args, state = arguments(args, "torch._tensor._rebuild_from_type_v2", 4, 4)
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


def get_layout(m, args: tuple) -> GlobalRef:
    (name,) = arguments(args, "torch.serialization._get_layout", 1, 1)
    if not isinstance(name, str) or not name.startswith("torch.") or not name[6:].isidentifier():
        raise UnreadableError("torch.serialization._get_layout of something that is not a layout name")
    return GlobalRef("torch", name[6:])


_TENSOR_TYPES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")


# Tensor and storage classes torch's weights-only loader also lets a pickle call or create
# (torch.FloatTensor([1.0, 2.0]), torch.storage.UntypedStorage(4)): a tensor made from plain
# values, kept as a record; it is never a model weight.
TENSOR_CLASSES = ({f"{module}.{t}Tensor" for module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse")
                   for t in _TENSOR_TYPES} | {"torch.Tensor", "torch.storage.UntypedStorage"})


def tensor_record(name: str) -> Callable:
    def build(m, args: tuple) -> PickledObject:
        check_no_records(args, name)  # the constructor iterates and converts its arguments
        return m.record(name, args)
    return build
