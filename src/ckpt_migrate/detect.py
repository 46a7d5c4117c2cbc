"""Classify a checkpoint as small, medium or unknown from its pickle alone (no torch).

:func:`detect` reads the object tree with :mod:`ckpt_migrate.safe_pickle`, finds the
state dict, strips the ``_orig_mod.``/``module.`` prefixes that ``torch.compile`` and DDP
add, derives the model's dimensions and compares every key and shape against the family
tables in :mod:`ckpt_migrate.families`. A checkpoint is a family only when it matches
exactly; otherwise it is ``unknown`` with a reason naming the keys or shapes that disagree.
"""

from __future__ import annotations

import os
import re
from typing import Any, TypedDict

from . import converted_format as converted
from .families import (
    EOT_TOKEN,
    FAMILIES,
    HEAD_DIM,
    MAX_LAYERS,
    NO_ATTENTION_LAYER,
    GPTConfig,
    gptbatched_expected_shapes,
    next_multiple,
    eot_token_from_code,
    num_iterations_from_code,
    shape_differences,
    small_expected_shapes,
    window_blocks_at,
)
from .forward_variant import describe_forward, family_default, forward_from_code
from .safe_pickle import DEFAULT_LIMITS, ArchiveInspection, ReaderLimits, TensorStub, inspect_archive, one_line

STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
PREFIXES = ("_orig_mod.", "module.")
OPTIMIZER_KEYS = ("optimizers", "optimizer", "optimizer_state_dict")
FORMAT_LABELS = {name: family.label for name, family in FAMILIES.items()}
_STEP_IN_NAME = re.compile(r"(?:best_state|state_step|step)_?(\d+)")
_BLOCK_KEY = re.compile(r"^blocks\.(\d{1,6})\.")  # bounded: a huge index is just an unexpected key
MAX_REASON = 300  # characters of a reason in a manifest or the report
MAX_LISTED_TENSORS = 20_000  # a manifest lists at most this many tensors


class ManifestRecord(TypedDict, total=False):
    """What is known about one checkpoint file: detection writes it (its manifest), the plan, the
    conversion and the report read it. Plain values only, so it always serializes. A test keeps
    every key that detection writes declared here, with its type."""

    # The file
    path: str  # absolute path as given (odd bytes escaped for display)
    realpath: str  # with links resolved
    relative_path: str  # under input_root (set by the pipeline)
    size_bytes: int
    mtime: float
    # The verdict
    format: str  # small, medium, gptbatched, unknown, unreadable or unsafe
    variant: str  # small: v1 (skip_weights) or v2 (packed scalars); else ""
    status: str  # what the pipeline does with it: to_convert, not_needed, failed, unknown, unreadable, unsafe
    reason: str  # one line: why not a family, why not convertible, what is malformed
    convertible: bool  # small only: can its attention be packed into qkvo_w (hdim == model_dim)
    notes: list  # lines for the report about values assumed
    # The pickle
    pickle_protocol: int
    pickle_objects: list  # the classes and functions it names (the first 20)
    wrapper: str  # where the state dict was: "model", "state_dict", ... or "(bare state dict)"
    prefixes_stripped: list  # "_orig_mod.", "module." as found on its keys
    has_code: bool  # the training script is stored beside the weights
    has_optimizer_state: bool
    # The model
    num_layers: int
    num_heads: int
    head_dim: int
    hdim: int  # attention width, num_heads * head_dim
    model_dim: int
    mlp_dim: int
    vocab_size: int  # embedding rows
    padded_vocab: int  # lm-head rows
    layers_without_attention: list
    attn_layers: list  # converted files: the layers that have attention
    num_value_embeds: int
    params: int
    weight_bytes: int
    dtypes: dict  # dtype -> number of tensors
    tensors: dict  # name -> {"shape": [...], "dtype": "..."} (the first MAX_LISTED_TENSORS)
    direct_load: dict  # medium only: {"ok": bool, "problems": [...]} for GPTBatched's strict load
    # Settings the forward needs, and where each came from
    step: int | None
    num_iterations: int | None
    num_iterations_source: str  # config, code or none
    long_window_blocks: int
    window_source: str
    eot_token: int | None
    eot_token_source: str  # config, code, default or none
    eot_source: str  # converted files: the same, as their config stores it
    # The forward it was trained with (small and medium: read from its training code; see forward_variant)
    forward_source: str  # "code: soft-cap l.N; ..." or "no code: assumed <family> (...)"
    softcap: str  # sigmoid30_width, sigmoid30_fixed or rsqrt15 ("" in a converted file: the family's)
    attn_scale: float  # attention logit scale
    skip_order: str  # small's U-net order: unet or reversed
    # Converted files
    converted_from: str  # the family the weights came from
    converter_version: str
    # Who detected it (set by the pipeline)
    detector_version: str
    detector_fingerprint: str
    overrides: dict  # eot_token / num_iterations as the run's config stated them
    detected_on: dict  # host, SLURM job
    source_identity: dict  # size, mtime_ns, ctime_ns, inode when detected (pipeline.file_identity)
    not_read_because: str  # why the file was not opened (a link out of the tree, a future mtime), or ""


def strip_prefixes(key: str) -> str:
    """Drop every leading ``_orig_mod.``/``module.`` (they may nest: DDP around compile)."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, TensorStub) for k, v in obj.items())


class AmbiguousStateDict(ValueError):
    """The checkpoint holds two different model state dicts: which one the lab trained is unknown."""


def find_state_dict(obj: Any) -> tuple[dict | None, str]:
    """The model state dict in an inspected checkpoint object, and where it was ("" for a bare one).

    Raises :class:`AmbiguousStateDict` when two of the usual keys hold state dicts that differ."""
    if _is_state_dict(obj):
        return obj, ""
    if not isinstance(obj, dict):
        return None, ""
    found = [key for key in STATE_DICT_KEYS if _is_state_dict(obj.get(key))]
    for other in found[1:]:
        if obj[other] != obj[found[0]]:
            raise AmbiguousStateDict(f"'{found[0]}' and '{other}' both hold a model state dict, and they differ: "
                                     f"which one to convert is ambiguous")
    return (obj[found[0]], found[0]) if found else (None, "")


BARE_STATE_DICT = "(bare state dict)"  # the record's wrapper when the file is the state dict itself


def state_dict_of(obj: Any, record: ManifestRecord) -> dict:
    """The state dict detection found in ``obj``, where its record says it is (not searched again)."""
    wrapper = record.get("wrapper")
    return obj if wrapper == BARE_STATE_DICT else obj[wrapper]


def _guess_family(keys: set[str]) -> tuple[str, str]:
    """Which family the key names point at: (family, variant); ("", "") if neither."""
    if "lm_head_w" in keys or any(k.endswith(".attn.qkvo_w") for k in keys):
        return "medium", ""
    if "lm_head.weight" in keys or any(k.endswith(".attn.qkv_w") for k in keys):
        return "small", ("v1" if "skip_weights" in keys else "v2")
    return "", ""


def _shape(shapes: dict[str, tuple], key: str, ndim: int) -> tuple | None:
    s = shapes.get(key)
    return s if s is not None and len(s) == ndim else None


def classify(state_dict: dict[str, TensorStub]) -> dict[str, Any]:
    """Format, variant, reason and derived dimensions of a (prefix-stripped) state dict."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    result: dict[str, Any] = {"format": "unknown", "variant": "", "reason": ""}
    family, variant = _guess_family(set(shapes))
    if not family:
        result["reason"] = "neither layout: no lm_head_w/qkvo_w (medium) nor lm_head.weight/qkv_w (small)"
        return result
    bad_dtypes = sorted({f"{k}:{v.dtype}" for k, v in state_dict.items()
                         if not v.dtype.startswith(("float", "bfloat"))})
    if bad_dtypes:
        result["reason"] = f"non-floating tensors: {', '.join(bad_dtypes[:3])}"
        return result

    embed = _shape(shapes, "embed.weight", 2)
    head = _shape(shapes, "lm_head_w" if family == "medium" else "lm_head.weight", 2)
    if embed is None or head is None:
        near = _near_layout(set(shapes), family, variant)
        result["reason"] = "; ".join([*near, f"{family} layout without a 2-d embed.weight and lm-head"])
        return result
    vocab_rows, model_dim = embed
    if not vocab_rows or not model_dim:
        result["reason"] = f"{family} layout with an empty embedding ({vocab_rows} x {model_dim})"
        return result
    num_layers = 1 + max((int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))), default=-1)
    if num_layers > MAX_LAYERS:
        result["reason"] = f"block index {num_layers - 1} is beyond any model this tool knows ({MAX_LAYERS} layers)"
        return result
    attn_key = "attn.qkvo_w" if family == "medium" else "attn.qkv_w"
    fc_key = "mlp.fc_w" if family == "medium" else "mlp.c_fc.weight"
    attn_shapes = [shapes[f"blocks.{i}.{attn_key}"] for i in range(num_layers)
                   if f"blocks.{i}.{attn_key}" in shapes]
    hdim = attn_shapes[0][1] if attn_shapes and len(attn_shapes[0]) == 3 else 0
    fc = _shape(shapes, f"blocks.0.{fc_key}", 2)
    mlp_dim = fc[0] if fc else 4 * model_dim
    derived = {
        "num_layers": num_layers,
        "num_heads": hdim // HEAD_DIM if hdim else 0,
        "head_dim": HEAD_DIM,
        "hdim": hdim,
        "model_dim": model_dim,
        "mlp_dim": mlp_dim,
        "vocab_size": vocab_rows,
        "padded_vocab": head[0],
        "layers_without_attention": [i for i in range(num_layers)
                                     if f"blocks.{i}.{attn_key}" not in shapes],
        "num_value_embeds": sum(1 for k in shapes if re.fullmatch(r"value_embeds\.\d+\.weight", k)),
    }
    result.update(derived)

    spec = FAMILIES[family]
    problems: list[str] = []
    if num_layers != spec.num_layers:
        problems.append(f"{num_layers} layers, but the {family} family's windows and skips are "
                        f"defined for {spec.num_layers}")
    if hdim % HEAD_DIM:
        problems.append(f"attention width {hdim} is not a multiple of head_dim {HEAD_DIM}")
    if head[0] != next_multiple(vocab_rows, 128):
        problems.append(f"lm-head rows {head[0]} != embedding rows {vocab_rows} rounded up to 128")
    if family == "medium":
        cfg = GPTConfig("medium", num_layers, hdim // HEAD_DIM, HEAD_DIM, model_dim, mlp_dim,
                        vocab_rows, head[0], [i for i in range(num_layers) if i != NO_ATTENTION_LAYER], 1)
        expected = gptbatched_expected_shapes(cfg)
    else:
        scalars = _shape(shapes, "scalars", 1)
        scalars_len = scalars[0] if scalars and scalars[0] >= 5 * num_layers else None
        expected = small_expected_shapes(variant, num_layers, hdim // HEAD_DIM, model_dim, mlp_dim,
                                         vocab_rows, head[0], scalars_len)
        # v2 at 345b2fb9 pads the embeddings to a multiple of 128; train_gpt.py of 2025-05-30 .. 07-14
        # (afe0141e, 16e2da07, 72f449c1, 1f2e9c78) packs the scalars but does not: the same forward
        # (padding rows are never looked up), and GPTBatched keeps the source's embedding rows.
    problems += shape_differences(shapes, expected)
    if problems:
        near = _near_layout(set(shapes), family, variant)
        result["reason"] = f"not {family}{('/' + variant) if variant else ''}: " + "; ".join([*near, *problems])
        return result
    result.update(format=family, variant=variant)
    if family == "small" and hdim != model_dim:
        result["convertible"] = False
        result["reason"] = (f"small checkpoint with hdim {hdim} != model_dim {model_dim}: the output "
                            f"projection cannot be stacked into qkvo_w")
    elif family == "small":
        result["convertible"] = True
    return result


_NESTED_VALUE_EMBED = re.compile(r"value_embeds\.embed\.\d{1,6}\.weight")
_VALUE_EMBED = re.compile(r"value_embeds\.\d{1,6}\.weight")


def _near_layout(keys: set[str], family: str, variant: str) -> list[str]:
    """What sets a layout close to ``family``'s apart, in the lab's terms (the upstream versions
    that write it, docs/upstream.md), to lead a reason; empty when it is none of the known ones."""
    said = []
    nested = sum(1 for k in keys if _NESTED_VALUE_EMBED.fullmatch(k))
    if nested:
        said.append(f"its {nested} value embeddings are nested (value_embeds.embed.N.weight, upstream's "
                    f"ValueEmbedding module of train_gpt.py 2024-12-31 .. 2025-02-02) where the {family} layout "
                    f"has value_embeds.N.weight; a forward this tool does not convert")
    if "embed1.weight" in keys or "embed2.weight" in keys:
        said.append(f"it has two token embeddings (embed1/embed2: train_gpt_medium.py from 34f5696a, 2025-12-02, "
                    f"a second input embedding) where the {family} layout has one embed.weight")
    flat = sum(1 for k in keys if _VALUE_EMBED.fullmatch(k))
    if flat and flat != 3:
        said.append(f"it has {flat} value embeddings where the {family} layout has 3"
                    + (" (train_gpt_medium.py from 3fe7e76b, 2025-12-02, mixes 5 into v)" if flat == 5 else ""))
    if (family == "small" and variant == "v2" and "scalars" not in keys
            and any(k.endswith(".lambdas") for k in keys)):
        said.append("it keeps per-block lambdas as small v1 does but has no skip_weights (no U-net skip "
                    "weights: train_gpt.py experiments of 2025-02-01)")
    return said


def step_from_name(path: str) -> int | None:
    match = _STEP_IN_NAME.search(os.path.basename(path))
    return int(match.group(1)) if match else None


def detect(path: str, limits: ReaderLimits = DEFAULT_LIMITS, overrides: dict[str, Any] | None = None) -> ManifestRecord:
    """Everything a manifest records about the checkpoint at ``path``; never raises for bad input."""
    return record_from_inspection(path, inspect_archive(path, limits), overrides)


def record_from_inspection(path: str, inspection: ArchiveInspection,
                           overrides: dict[str, Any] | None = None) -> ManifestRecord:
    """The manifest record of ``path`` from what the reader found in it.

    ``overrides`` (``eot_token``, ``num_iterations``) are what the user states for this run;
    they win over what is read from the file, and the record says where each value came from.

    Values taken from inside the file are data: validated, bounded, and never allowed to set
    the record's own fields (path, status, ...)."""
    record: ManifestRecord = {"path": os.path.abspath(path), "realpath": os.path.realpath(path),
                              "format": "unknown", "variant": "", "reason": "", "status": ""}
    try:
        st = os.stat(path)
        record.update(size_bytes=st.st_size, mtime=st.st_mtime)
    except OSError:
        pass
    if inspection.status != "ok":
        record.update(format=inspection.status, status=inspection.status,
                      reason=one_line(inspection.reason, MAX_REASON))
        return record
    record["pickle_protocol"] = inspection.protocol
    record["pickle_objects"] = [one_line(name, 80) for name in inspection.objects[:20]]
    obj = inspection.obj
    if converted.is_converted(obj):
        record.update(converted.describe(obj))
        record["reason"] = one_line(record["reason"], MAX_REASON)
        return record
    try:
        state_dict, wrapper = find_state_dict(obj)
    except AmbiguousStateDict as exc:
        record.update(status="unknown", reason=one_line(exc, MAX_REASON))
        return record
    if state_dict is None:
        top = (sorted(one_line(k, 40) for k in obj if isinstance(k, str))[:6] if isinstance(obj, dict)
               else [type(obj).__name__])
        record.update(status="unknown", reason=one_line(f"no model state dict found (top-level: {', '.join(top)})",
                                                        MAX_REASON))
        return record
    stripped = {strip_prefixes(k): v for k, v in state_dict.items()}
    if len(stripped) != len(state_dict):
        record.update(status="unknown", reason="two keys collide once _orig_mod./module. prefixes are stripped")
        return record
    record["wrapper"] = wrapper or BARE_STATE_DICT
    record["prefixes_stripped"] = sorted({k[: len(k) - len(strip_prefixes(k))] for k in state_dict} - {""})[:4]
    record.update(classify(stripped))
    record["reason"] = one_line(record["reason"], MAX_REASON)
    step = obj.get("step") if isinstance(obj, dict) and wrapper else None
    valid_step = type(step) is int and 0 <= step < 2**62
    record["step"] = step if valid_step else step_from_name(path)
    code = obj.get("code") if isinstance(obj, dict) else None
    record["has_code"] = isinstance(code, str)
    if record["format"] in FAMILIES:
        _infer_settings(record, code, overrides or {})
        _read_forward(record, code)
    record["has_optimizer_state"] = isinstance(obj, dict) and any(
        obj.get(k) not in (None, [], {}) for k in OPTIMIZER_KEYS)
    record["params"] = sum(v.numel for v in stripped.values())
    record["weight_bytes"] = sum(v.nbytes for v in stripped.values())
    record["dtypes"] = dict(sorted(_count_dtypes(stripped).items()))
    record["tensors"] = {one_line(k, 200): {"shape": list(v.shape), "dtype": v.dtype}
                         for k, v in list(stripped.items())[:MAX_LISTED_TENSORS]}
    if record["format"] in FAMILIES:
        spec = FAMILIES[record["format"]]
        record["long_window_blocks"], record["window_source"] = window_blocks_at(
            spec, record["step"], record["num_iterations"])
    if record["format"] == "medium":
        problems = shape_differences({k: tuple(v["shape"]) for k, v in record["tensors"].items()},
                                     gptbatched_expected_shapes(GPTConfig.from_record(record)))
        record["direct_load"] = {"ok": not problems, "problems": problems}
    record["status"] = status_for(record)
    return record


def _infer_settings(record: dict, code: Any, overrides: dict[str, Any]) -> None:
    """Document separator and schedule length: the user's setting, else the training code, else a
    default that is used only where it can be right. Each value is recorded with its source."""
    notes = record.setdefault("notes", [])
    if overrides.get("num_iterations") is not None:
        record["num_iterations"], record["num_iterations_source"] = int(overrides["num_iterations"]), "config"
    else:
        record["num_iterations"] = num_iterations_from_code(code)
        record["num_iterations_source"] = "code" if record["num_iterations"] is not None else "none"
    code_eot = eot_token_from_code(code)
    vocab = record.get("vocab_size") or 0
    if overrides.get("eot_token") is not None:
        record["eot_token"], record["eot_token_source"] = int(overrides["eot_token"]), "config"
    elif code_eot is not None:  # 0 is a separator like any other
        record["eot_token"], record["eot_token_source"] = code_eot, "code"
    elif EOT_TOKEN < vocab:
        record["eot_token"], record["eot_token_source"] = EOT_TOKEN, "default"
        notes.append(f"document separator not in the file: assumed {EOT_TOKEN} (GPT-2's); set eot_token if wrong")
    else:
        record["eot_token"], record["eot_token_source"] = None, "none"
        notes.append(f"document separator not in the file, and the default {EOT_TOKEN} is outside the vocabulary "
                     f"({vocab}): no document masking; set eot_token in the config")
    if record["eot_token"] is not None and vocab and not 0 <= record["eot_token"] < vocab:
        notes.append(f"eot_token {record['eot_token']} ({record['eot_token_source']}) is outside the vocabulary "
                     f"({vocab}): it never occurs, so no document masking")


def _read_forward(record: dict, code: Any) -> None:
    """The forward the file was trained with, from the training code it carries: a small or medium
    file whose code states a forward this tool does not reproduce becomes ``unknown``, naming the line."""
    family = FAMILIES[record["format"]]
    forward, source, problem = forward_from_code(code, family)
    record["forward_source"] = one_line(source, 200)
    if problem:
        layout = record["format"] + (f"/{record['variant']}" if record.get("variant") else "")
        record.pop("convertible", None)
        record.update(format="unknown", variant="", status="unknown",
                      reason=one_line(f"{layout} keys, but {problem}: its forward is not one this tool converts",
                                      MAX_REASON))
        return
    record.update(forward)
    if not source.startswith("code:"):
        record.setdefault("notes", []).append(f"forward not read from the file ({source})")
    elif forward != family_default(family):
        record.setdefault("notes", []).append(f"forward read from its training code: {describe_forward(forward)}")


def _count_dtypes(state_dict: dict[str, TensorStub]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in state_dict.values():
        counts[v.dtype] = counts.get(v.dtype, 0) + 1
    return counts


def status_for(record: ManifestRecord) -> str:
    """Pipeline status before any conversion: what should happen to this file."""
    if record["format"] == "medium":
        return "not_needed"
    if record["format"] == "small":
        return "to_convert" if record.get("convertible") else "failed"
    return record.get("status") or "unknown"
