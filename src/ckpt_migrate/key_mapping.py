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

import torch

from .families import GPTConfig, ScalarLayout, gptbatched_expected_shapes

log = logging.getLogger(__name__)

# (small key pattern, GPTBatched key template, how the tensor lands there).
# "whole": the tensor is the target; "qkvo[0:3]"/"qkvo[3]": slots of the stacked attention
# weight; "scalars[...]": a slice of the packed [5L] scalars (families.ScalarLayout).
# No slot is transposed: GPTBatched applies qkvo_w[3] with F.linear, as small applies
# c_proj.weight ([D, hdim], out x in), so the same matrix goes in as stored; stacking it with
# the [hdim, D] q/k/v slots needs hdim == D, which convert_state_dict checks first.
KEY_MAP: list[tuple[str, str, str]] = [
    (r"embed\.weight", "embed.weight", "whole"),
    (r"value_embeds\.(\d+)\.weight", r"value_embeds.\1.weight", "whole"),
    (r"blocks\.(\d+)\.attn\.qkv_w", r"blocks.\1.attn.qkvo_w", "qkvo[0:3]"),
    (r"blocks\.(\d+)\.attn\.c_proj\.weight", r"blocks.\1.attn.qkvo_w", "qkvo[3]"),
    (r"blocks\.(\d+)\.mlp\.c_fc\.weight", r"blocks.\1.mlp.fc_w", "whole"),
    (r"blocks\.(\d+)\.mlp\.c_proj\.weight", r"blocks.\1.mlp.proj_w", "whole"),
    (r"lm_head\.weight", "lm_head_w", "whole"),
    (r"skip_weights", "scalars", "scalars[skip]"),  # v1: [L/2] U-net skip weights
    (r"blocks\.(\d+)\.lambdas", "scalars", "scalars[block]"),  # v1: [2] residual mix of layer i
    (r"blocks\.(\d+)\.attn\.lambdas", "scalars", "scalars[attn]"),  # v1: [2] value mix of layer i
    (r"scalars", "scalars", "scalars[packed]"),  # v2: [5L + pad], pad dropped
]
_COMPILED = [(re.compile(src), dst, how) for src, dst, how in KEY_MAP]


class ConversionError(ValueError):
    """The state dict cannot be converted; the message says which key or shape."""


class UnmappedKeyError(ConversionError):
    pass


class NonFiniteWeightsError(ConversionError):
    """A weight holds NaN or Inf: never certified, whether or not the logit check's tokens reach it."""


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


def _scalar_slice(how: str, layer: int | None, layout: ScalarLayout, src_len: int) -> tuple[slice, slice]:
    """(source slice, target slice) of a small scalar tensor in GPTBatched's packed scalars."""
    if how == "scalars[skip]":
        return slice(0, src_len), slice(0, src_len)  # small's L/2 skips, first in the skip slots
    if how == "scalars[block]":
        return slice(0, 2), layout.residual_pair(layer)
    if how == "scalars[attn]":
        return slice(0, 2), layout.value_pair(layer)
    return slice(0, layout.size), slice(0, layout.size)  # v2: packed the same way, padding dropped


def _expect_shape(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"{key}: shape {list(tensor.shape)} does not fit {list(shape)}")


def convert_state_dict(small: dict[str, torch.Tensor], cfg: GPTConfig,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """GPTBatched state dict from a prefix-stripped small (v1 or v2) state dict; the tensors it
    builds (``qkvo_w``, ``scalars``) are allocated on ``device``."""
    hdim = cfg.num_heads * cfg.head_dim
    if hdim != cfg.model_dim:
        raise ConversionError(f"hdim {hdim} != model_dim {cfg.model_dim}: c_proj.weight [D, hdim] "
                              f"cannot be stacked as slot 3 of qkvo_w [4, hdim, D]")
    expected = gptbatched_expected_shapes(cfg)
    L, layout = cfg.num_layers, ScalarLayout(cfg.num_layers)
    # Group source tensors by target so each target is allocated once in its promoted dtype.
    plan: dict[str, list[tuple[str, str, int | None, torch.Tensor]]] = {}
    for key, tensor in small.items():
        for pattern, dst, how in _COMPILED:
            match = pattern.fullmatch(key)
            if match:
                target = match.expand(dst)
                layer = int(match.group(1)) if match.groups() else None
                plan.setdefault(target, []).append((key, how, layer, tensor))
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
        if len(sources) == 1 and sources[0][1] == "whole":
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
        for key, how, layer, tensor in sources:
            if how == "qkvo[0:3]":
                _expect_shape(key, tensor, (3, *shape[1:]))
                result[0:3].copy_(tensor)
                filled.add(how)
            elif how == "qkvo[3]":
                _expect_shape(key, tensor, shape[1:])
                result[3].copy_(tensor)
                filled.add(how)
            elif how.startswith("scalars"):
                if tensor.dim() != 1:
                    raise ConversionError(f"{key}: expected a vector, got shape {list(tensor.shape)}")
                if how == "scalars[skip]" and tensor.numel() != L // 2:
                    raise ConversionError(f"{key}: {tensor.numel()} skip weights, expected {L // 2}")
                if how == "scalars[packed]" and tensor.numel() < layout.size:
                    raise ConversionError(f"{key}: {tensor.numel()} scalars, expected at least {layout.size}")
                src, dst = _scalar_slice(how, layer, layout, tensor.numel())
                _expect_shape(key, tensor[src], result[dst].shape)
                result[dst].copy_(tensor[src])
                filled.add(how)
            else:
                raise ConversionError(f"{key}: {how} cannot share target {target!r} with other keys")
        if "scalars[packed]" in filled and len(filled) > 1:
            raise ConversionError("both v2 packed scalars and v1 separate scalars are present")
        if target.endswith("qkvo_w") and filled != {"qkvo[0:3]", "qkvo[3]"}:
            raise ConversionError(f"{target}: needs both qkv_w and c_proj.weight of that layer")
        out[target] = result
    log.debug("converted %d small tensors into %d GPTBatched tensors", len(small), len(out))
    return out
