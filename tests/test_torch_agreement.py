"""Differential test against torch itself: every kind of file the tests convert is converted by
the project's own path (convert_file: our reader, our memory map, our conversion, our writer),
and the converted file's weights, as ``torch.load(weights_only=True)`` reads them, must equal
bit for bit the source's weights as ``torch.load(weights_only=True, mmap=True)`` reads them,
mapped through the conversion key table (:data:`ckpt_migrate.key_mapping.KEY_MAP`). (torch 2.13's
weights-only loader refuses pickle protocols 1, 4 and 5, which the project converts: those
sources are read with weights_only=False; see REFUSED_BY_TORCH_WEIGHTS_ONLY.)

Bit for bit: both sides are compared as their raw bytes (``.view(torch.uint8)``), so a NaN equals
the same NaN and -0.0 differs from 0.0. The only cast allowed is the converter's own: a target
it builds from several sources (``qkvo_w`` from qkv_w and c_proj.weight, v1's packed ``scalars``)
is allocated in their promoted dtype and the sources are copied in, so there the source is cast
to the target's dtype before the comparison (a widening cast, which the test also asserts); a
tensor that lands whole must keep its dtype. Every element of every converted tensor is accounted
for: mapped from a source slice, or (the scalars slots small never trains) upstream's initial value.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings

import pytest
import torch

from ckpt_migrate.check import CheckSettings
from ckpt_migrate.one_file import convert_file
from ckpt_migrate.key_mapping import (KEY_MAP, WHOLE, out_proj_slot, packed_scalars, qkv_slots, residual_lambdas,
                                      skip_weights, value_lambdas)
from ckpt_migrate.families import ScalarLayout

from .builders import CONVERTED_KINDS

SETTINGS = CheckSettings(length=64, device="cpu")
WRAPPERS = ("_orig_mod.", "module.")  # torch.compile's and DDP's prefixes, as upstream saves them
_TABLE = [(re.compile(src), dst, how) for src, dst, how in KEY_MAP]


def _strip(key: str) -> str:
    while key.startswith(WRAPPERS):
        key = key[len(next(p for p in WRAPPERS if key.startswith(p))):]
    return key


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def differences(pieces) -> list[str]:
    """What differs, bit for bit, in each (label, converted piece, expected piece)."""
    found = []
    for label, actual, expected in pieces:
        if actual.dtype != expected.dtype:
            found.append(f"{label}: dtype {actual.dtype} != {expected.dtype}")
        elif tuple(actual.shape) != tuple(expected.shape):
            found.append(f"{label}: shape {list(actual.shape)} != {list(expected.shape)}")
        elif not torch.equal(_raw(actual), _raw(expected)):
            bad = (_raw(actual).view(-1, actual.element_size()) != _raw(expected).view(-1, expected.element_size()))
            found.append(f"{label}: {int(bad.any(1).sum())} of {actual.numel()} elements differ")
    return found


def mapped_pieces(source: dict, converted: dict, num_layers: int):
    """Pair every part of ``converted`` with what the key table maps there from ``source``.

    Returns (pieces, casts, problems): the (label, converted piece, expected piece) triples; the
    casts applied to a source (``"key dtype -> dtype"``); and anything the table cannot account
    for (a source key no row maps, a target slot filled twice or never, a converted key nothing
    maps to, a target missing from the converted file)."""
    layout = ScalarLayout(num_layers)
    pieces, casts, problems = [], [], []
    covered: dict[str, torch.Tensor] = {k: torch.zeros(v.shape[0] if v.dim() else 1, dtype=torch.bool)
                                        for k, v in converted.items()}

    def place(label, target, rows, src_key, src, built=True):
        if target not in converted:
            problems.append(f"{src_key} maps to {target}, which the converted file does not have")
            return
        actual = converted[target]
        if covered[target][rows].any():
            problems.append(f"{label}: filled twice")
        covered[target][rows] = True
        expected = src
        if src.dtype != actual.dtype and built:  # a tensor that lands whole keeps its dtype: not cast
            casts.append(f"{src_key} {src.dtype} -> {actual.dtype}")
            expected = src.to(actual.dtype)  # what the converter's copy_ into the built target does
        pieces.append((label, actual[rows], expected))

    for key, tensor in source.items():
        row = next(((p.fullmatch(key), dst, how) for p, dst, how in _TABLE if p.fullmatch(key)), None)
        if row is None:
            problems.append(f"source key {key} matches no row of KEY_MAP")
            continue
        match, dst, how = row
        target = match.expand(dst)
        layer = int(match.group(1)) if match.groups() else None
        if how is WHOLE:
            place(f"{target} <- {key}", target, slice(None), key, tensor, built=False)
        elif how is qkv_slots:
            place(f"{target}[0:3] <- {key}", target, slice(0, 3), key, tensor)
        elif how is out_proj_slot:
            place(f"{target}[3] <- {key}", target, slice(3, 4), key, tensor[None])
        elif how is skip_weights:  # small's L/2 U-net skips, first in the L skip slots
            place(f"scalars[0:{tensor.numel()}] <- {key}", target, slice(0, tensor.numel()), key, tensor)
        elif how is residual_lambdas:
            place(f"scalars residual pair {layer} <- {key}", target, layout.residual_pair(layer), key, tensor[0:2])
        elif how is value_lambdas:
            place(f"scalars value pair {layer} <- {key}", target, layout.value_pair(layer), key, tensor[0:2])
        elif how is packed_scalars:  # v2: the same packing, world-size padding dropped
            place(f"scalars <- {key}[0:{layout.size}]", target, slice(0, layout.size), key, tensor[:layout.size])
        else:
            problems.append(f"{key}: KEY_MAP row {how!r} is not known to this test")

    if "scalars" in converted:  # slots the small family never trains keep upstream's initial values
        initial = torch.tensor(layout.initial(), dtype=converted["scalars"].dtype)
        for i in torch.nonzero(~covered["scalars"]).flatten().tolist():
            pieces.append((f"scalars[{i}] (untrained slot) = initial", converted["scalars"][i:i + 1], initial[i:i + 1]))
            covered["scalars"][i] = True
    for target, mask in covered.items():
        if not mask.all():
            problems.append(f"{target}: rows {torch.nonzero(~mask).flatten().tolist()} map from no source tensor")
    return pieces, casts, problems


# Files torch's own weights-only unpickler refuses (torch 2.13: protocol 1 uses opcodes such as
# INT and DICT that it does not implement, protocols 4 and 5 open with FRAME). The project reads
# and converts them; torch reads them with weights_only=False, which is safe here because this
# test wrote each file itself with torch.save (plain data, no payload).
REFUSED_BY_TORCH_WEIGHTS_ONLY = {f"small v2, pickle protocol {n}" for n in (1, 4, 5)}


def _torch_load_source(kind: str, src: str):
    """The source as torch.load(weights_only=True, mmap=True) returns it, else as explained above."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Detected pickle protocol 4 in the checkpoint ..."
        try:
            return torch.load(src, weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            assert kind in REFUSED_BY_TORCH_WEIGHTS_ONLY, f"torch's weights-only loader refuses {kind}"
        return torch.load(src, weights_only=False, mmap=True)


def _torch_views(kind: str, src: str, out: str):
    """The source's model state dict and the converted file's, as torch reads them."""
    source = {_strip(k): v for k, v in _torch_load_source(kind, src)["model"].items()}
    converted = torch.load(out, weights_only=True)  # a converted file must always load this way
    return source, converted["model"], converted["config"]["num_layers"]


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """Each kind converted once, by the project's own path: {kind: (source, converted file, record)}."""
    base = tmp_path_factory.mktemp("agreement")
    done = {}
    for seed, (kind, build) in enumerate(CONVERTED_KINDS.items()):
        folder = base / re.sub(r"\W+", "_", kind)
        src, out = str(folder / "best_state_100.pt"), str(folder / "converted.pt")
        build(src, seed)
        done[kind] = (src, out, convert_file(src, out, SETTINGS))
    return done


@pytest.mark.parametrize("kind", list(CONVERTED_KINDS))
def test_converted_weights_are_the_sources_as_torch_reads_them(conversions, kind):
    src, out, result = conversions[kind]
    assert result["status"] == "converted", result.get("reason")
    source, converted, num_layers = _torch_views(kind, src, out)
    pieces, casts, problems = mapped_pieces(source, converted, num_layers)
    assert problems == []
    assert differences(pieces) == []
    # Casts happen only where the converter builds a target from several sources, and only widen.
    for cast in casts:
        key, _, rest = cast.partition(" ")
        assert re.search(r"(attn\.qkv_w|attn\.c_proj\.weight|lambdas|skip_weights|scalars)$", key), cast
        before, after = (getattr(torch, s.split(".")[-1]) for s in rest.split(" -> "))
        assert torch.promote_types(before, after) == after, cast
    if "bf16" in kind:
        assert casts, "this kind exists to exercise the converter's promoting copy"
    else:
        assert casts == []
    # And the converted file is the one the record describes.
    assert hashlib.sha256(open(out, "rb").read()).hexdigest() == result["sha256"]


@pytest.mark.parametrize("kind", ["small v1", "small v2"])
def test_negative_control_a_wrong_mapping_is_reported(conversions, kind):
    """The comparison finds a mapping that is wrong: two layers' tensors swapped, two attention
    slots swapped, one scalar pair moved, one element off by one ulp, a dtype changed."""
    src, out, _ = conversions[kind]
    source, converted, num_layers = _torch_views(kind, src, out)

    def found(mutate) -> list[str]:
        wrong = dict(converted)
        mutate(wrong)
        pieces, _, problems = mapped_pieces(source, wrong, num_layers)
        return problems + differences(pieces)

    def swap_layers(sd):
        sd["blocks.0.mlp.fc_w"], sd["blocks.1.mlp.fc_w"] = sd["blocks.1.mlp.fc_w"], sd["blocks.0.mlp.fc_w"]

    report = found(swap_layers)
    assert len(report) == 2 and all(r.startswith(("blocks.0.mlp.fc_w", "blocks.1.mlp.fc_w")) for r in report), report

    def swap_q_and_o(sd):
        w = sd["blocks.2.attn.qkvo_w"].clone()
        w[[0, 3]] = w[[3, 0]]
        sd["blocks.2.attn.qkvo_w"] = w

    report = found(swap_q_and_o)
    assert report and all(r.startswith("blocks.2.attn.qkvo_w") for r in report), report

    def move_a_pair(sd):
        layout, s = ScalarLayout(num_layers), sd["scalars"].clone()
        residual, value = layout.residual_pair(3), layout.value_pair(3)
        s[residual], s[value] = sd["scalars"][value], sd["scalars"][residual]
        sd["scalars"] = s

    report = found(move_a_pair)
    if kind == "small v1":  # per-block lambdas: the two pairs of layer 3 are named
        assert sorted(report) == ["scalars residual pair 3 <- blocks.3.lambdas: 2 of 2 elements differ",
                                  "scalars value pair 3 <- blocks.3.attn.lambdas: 2 of 2 elements differ"], report
    else:  # v2 packs them the same way: one packed tensor, the four moved elements
        assert report == ["scalars <- scalars[0:60]: 4 of 60 elements differ"], report

    def one_ulp(sd):
        e = sd["embed.weight"].clone()
        e.view(torch.int16)[5, 7] += 1  # bf16: the next representable value
        sd["embed.weight"] = e

    assert found(one_ulp) == [f"embed.weight <- embed.weight: 1 of {converted['embed.weight'].numel()} elements differ"]

    def wider(sd):
        sd["embed.weight"] = sd["embed.weight"].float()  # same values, another dtype

    assert found(wider) == ["embed.weight <- embed.weight: dtype torch.float32 != torch.bfloat16"]

    def dropped(sd):
        del sd["blocks.3.mlp.proj_w"]

    assert found(dropped) == [
        "blocks.3.mlp.c_proj.weight maps to blocks.3.mlp.proj_w, which the converted file does not have"]


def test_the_comparison_is_bitwise():
    """NaNs with the same bits are equal, a NaN with other bits is not, -0.0 is not 0.0."""
    nan = torch.tensor([float("nan"), 1.0])
    other_nan = nan.clone()
    other_nan.view(torch.int32)[0] ^= 1  # still a NaN, another payload
    assert differences([("same NaN", nan, nan.clone())]) == []
    assert differences([("other NaN", nan, other_nan)]) == ["other NaN: 1 of 2 elements differ"]
    assert differences([("signed zero", torch.tensor([0.0]), torch.tensor([-0.0]))]) == [
        "signed zero: 1 of 1 elements differ"]
