"""Convert a train_gpt_small.py state dict to GPTBatched's layout.

Every small key must match exactly one row of :data:`KEY_MAP`; an unmatched key raises
:class:`UnmappedKeyError` with its name. Each copy checks shapes first. Tensors that are
copied whole are passed through (no copy, dtype kept); ``qkvo_w`` and ``scalars`` are built
in the promoted dtype of their sources, so nothing is silently downcast, on the device asked
for (the check's: on a GPU host the built tensors then never take host memory, see
:func:`ckpt_migrate.converted_format.save`).
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import torch

from .families import GPTConfig, ScalarLayout, gptbatched_expected_shapes

log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """The state dict cannot be converted; the message says which key or shape."""


class UnmappedKeyError(ConversionError):
    pass


class NonFiniteWeightsError(ConversionError):
    """A weight holds NaN or Inf: never certified, whether or not the logit check's tokens reach it."""


# --- where a small tensor lands in a GPTBatched tensor built from several (the key table's third
# column): each checks the source's shape, then copies it into its slot of ``result``.

def _expect_shape(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"{key}: shape {list(tensor.shape)} does not fit {list(shape)}")


def qkv_slots(result, key, tensor, layer, layout) -> None:
    """small's [3, hdim, D] q/k/v weight: slots 0..2 of qkvo_w."""
    _expect_shape(key, tensor, (3, *result.shape[1:]))
    result[0:3].copy_(tensor)


def out_proj_slot(result, key, tensor, layer, layout) -> None:
    """small's c_proj.weight [D, hdim]: slot 3 of qkvo_w, as stored (both apply it with F.linear)."""
    _expect_shape(key, tensor, result.shape[1:])
    result[3].copy_(tensor)


def _scalars(result, key, tensor, src: slice, dst: slice) -> None:
    if tensor.dim() != 1:
        raise ConversionError(f"{key}: expected a vector, got shape {list(tensor.shape)}")
    _expect_shape(key, tensor[src], result[dst].shape)
    result[dst].copy_(tensor[src])


def skip_weights(result, key, tensor, layer, layout) -> None:
    """v1's [L/2] U-net skip weights: the first skip slots of the packed scalars."""
    if tensor.dim() == 1 and tensor.numel() != layout.num_layers // 2:
        raise ConversionError(f"{key}: {tensor.numel()} skip weights, expected {layout.num_layers // 2}")
    _scalars(result, key, tensor, slice(0, tensor.numel()), slice(0, tensor.numel()))


def residual_lambdas(result, key, tensor, layer, layout) -> None:
    """v1's blocks.i.lambdas [2]: layer i's residual mix."""
    _scalars(result, key, tensor, slice(0, 2), layout.residual_pair(layer))


def value_lambdas(result, key, tensor, layer, layout) -> None:
    """v1's blocks.i.attn.lambdas [2]: layer i's value mix."""
    _scalars(result, key, tensor, slice(0, 2), layout.value_pair(layer))


def packed_scalars(result, key, tensor, layer, layout) -> None:
    """v2's scalars [5L + pad], packed as GPTBatched packs them: the padding dropped."""
    if tensor.dim() == 1 and tensor.numel() < layout.size:
        raise ConversionError(f"{key}: {tensor.numel()} scalars, expected at least {layout.size}")
    _scalars(result, key, tensor, slice(0, layout.size), slice(0, layout.size))


WHOLE = None  # the tensor is the target, passed through (no copy, dtype kept)

# (small key pattern, GPTBatched key template, where the tensor lands: WHOLE, or one of the
# functions above). No slot is transposed: stacking c_proj.weight [D, hdim] with the [hdim, D]
# q/k/v slots needs hdim == D, which convert_state_dict checks first.
KEY_MAP: list[tuple[str, str, Callable | None]] = [
    (r"embed\.weight", "embed.weight", WHOLE),
    (r"value_embeds\.(\d+)\.weight", r"value_embeds.\1.weight", WHOLE),
    (r"blocks\.(\d+)\.attn\.qkv_w", r"blocks.\1.attn.qkvo_w", qkv_slots),
    (r"blocks\.(\d+)\.attn\.c_proj\.weight", r"blocks.\1.attn.qkvo_w", out_proj_slot),
    (r"blocks\.(\d+)\.mlp\.c_fc\.weight", r"blocks.\1.mlp.fc_w", WHOLE),
    (r"blocks\.(\d+)\.mlp\.c_proj\.weight", r"blocks.\1.mlp.proj_w", WHOLE),
    (r"lm_head\.weight", "lm_head_w", WHOLE),
    (r"skip_weights", "scalars", skip_weights),  # v1
    (r"blocks\.(\d+)\.lambdas", "scalars", residual_lambdas),  # v1
    (r"blocks\.(\d+)\.attn\.lambdas", "scalars", value_lambdas),  # v1
    (r"scalars", "scalars", packed_scalars),  # v2
]
_COMPILED = [(re.compile(src), dst, place) for src, dst, place in KEY_MAP]


# Elements tested at a time: what a test allocates (a boolean mask when NaNs and Infs are counted)
# stays at 4 MiB whatever the tensor.
FINITE_CHUNK_ELEMENTS = 1 << 22


def _chunks(tensor: torch.Tensor):
    """``tensor`` in pieces of about FINITE_CHUNK_ELEMENTS elements (views, nothing copied)."""
    if tensor.dim() == 0 or tensor.numel() <= FINITE_CHUNK_ELEMENTS:
        yield tensor
    elif tensor.is_contiguous():
        flat = tensor.view(-1)
        for start in range(0, flat.numel(), FINITE_CHUNK_ELEMENTS):
            yield flat[start:start + FINITE_CHUNK_ELEMENTS]
    else:
        for row in tensor:  # a strided view: one slice of the first dimension at a time
            yield from _chunks(row)


def _test(fn, chunk: torch.Tensor) -> torch.Tensor:
    try:
        return fn(chunk)
    except (NotImplementedError, RuntimeError):  # float8_e4m3fn has isnan but no isfinite/isinf kernel
        return fn(chunk.float())


def _finite(chunk: torch.Tensor) -> bool:
    """Whether every element is finite: from the chunk's min and max, which a NaN anywhere turns
    NaN (one pass, nothing allocated: ~4x torch.isfinite(chunk).all()), else element by element
    (complex, float8, empty)."""
    try:
        low, high = torch.aminmax(chunk)
    except (NotImplementedError, RuntimeError):
        return bool(_test(torch.isfinite, chunk).all())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def non_finite_counts(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, Inf count) of a tensor that holds any, else None; chunked, so its memory is
    bounded, and a clean tensor (every one, normally) is read once."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    if all(_finite(chunk) for chunk in _chunks(tensor)):
        return None
    nan = sum(int(_test(torch.isnan, chunk).sum()) for chunk in _chunks(tensor))
    inf = sum(int(_test(torch.isinf, chunk).sum()) for chunk in _chunks(tensor))
    return nan, inf


def check_finite(state_dict: dict[str, torch.Tensor], where: str = "") -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first tensor of ``state_dict`` that holds
    a NaN or an Inf (and how many others do). Every tensor is tested, since the logit check
    cannot see a weight its random tokens never reach (an embedding row), nor one that the
    soft-cap turns finite (an Inf in the head). ``where`` prefixes the message (a file's path)."""
    bad: list[tuple[str, tuple[int, int]]] = []
    for key, tensor in state_dict.items():
        counts = non_finite_counts(tensor)
        if counts is not None:
            bad.append((key, counts))
    if bad:
        (key, (nan, inf)), others = bad[0], [k for k, _ in bad[1:]]
        more = ""
        if others:
            more = f"; also in {', '.join(others[:3])}" + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise NonFiniteWeightsError(f"{where}non-finite values in {key} ({nan} NaN, {inf} Inf){more}")


def convert_state_dict(small: dict[str, torch.Tensor], cfg: GPTConfig,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """GPTBatched state dict from a prefix-stripped small (v1 or v2) state dict; the tensors it
    builds (``qkvo_w``, ``scalars``) are allocated on ``device``."""
    hdim = cfg.num_heads * cfg.head_dim
    if hdim != cfg.model_dim:
        raise ConversionError(f"hdim {hdim} != model_dim {cfg.model_dim}: c_proj.weight [D, hdim] "
                              f"cannot be stacked as slot 3 of qkvo_w [4, hdim, D]")
    expected = gptbatched_expected_shapes(cfg)
    layout = ScalarLayout(cfg.num_layers)
    # Group source tensors by target so each target is allocated once in its promoted dtype.
    plan: dict[str, list[tuple[str, Callable | None, int | None, torch.Tensor]]] = {}
    for key, tensor in small.items():
        for pattern, dst, place in _COMPILED:
            match = pattern.fullmatch(key)
            if match:
                target = match.expand(dst)
                layer = int(match.group(1)) if match.groups() else None
                plan.setdefault(target, []).append((key, place, layer, tensor))
                break
        else:
            raise UnmappedKeyError(f"unmapped key {key!r}: no GPTBatched counterpart")
    unknown_targets = sorted(set(plan) - set(expected))
    if unknown_targets:
        raise ConversionError(f"source keys map to {unknown_targets[0]!r}, which GPTBatched does not have "
                              f"(layer without attention or beyond num_layers?)")
    missing = sorted(set(expected) - set(plan))
    if missing:
        raise ConversionError(f"nothing in the source maps to {missing[0]!r}")

    out: dict[str, torch.Tensor] = {}
    for target, sources in plan.items():
        shape = expected[target]
        if len(sources) == 1 and sources[0][1] is WHOLE:
            key, _, _, tensor = sources[0]
            _expect_shape(key, tensor, shape)
            out[target] = tensor
            continue
        dtype = sources[0][3].dtype
        for _, _, _, tensor in sources[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        if target == "scalars":
            # Slots that the small family never reads keep upstream's initial values.
            result = torch.tensor(layout.initial(), dtype=dtype, device=device)
        else:
            result = torch.empty(shape, dtype=dtype, device=device)
        filled = set()
        for key, place, layer, tensor in sources:
            if place is WHOLE:
                raise ConversionError(f"{key}: a whole tensor cannot share target {target!r} with other keys")
            place(result, key, tensor, layer, layout)
            filled.add(place)
        if packed_scalars in filled and len(filled) > 1:
            raise ConversionError("both v2 packed scalars and v1 separate scalars are present")
        if target.endswith("qkvo_w") and filled != {qkv_slots, out_proj_slot}:
            raise ConversionError(f"{target}: needs both qkv_w and c_proj.weight of that layer")
        out[target] = result
    log.debug("converted %d small tensors into %d GPTBatched tensors", len(small), len(out))
    return out
