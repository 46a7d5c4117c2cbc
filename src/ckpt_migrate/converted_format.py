"""The converted-file format: what this tool writes, and how such a file is read back.

A converted file is a plain dict that ``torch.load(weights_only=True)`` accepts: the model's
weights in the GPTBatched (medium) layout, the model config, and where the weights came from.
Every field read back from one is validated, since a file that claims this format may lie.
"""

from __future__ import annotations

from typing import IO, Any

from .version import package_version
from .families import FAMILIES, MAX_LAYERS, GPTConfig, gptbatched_expected_shapes, shape_differences
from .fingerprint import converter_fingerprint
from .safe_pickle import TensorStub, one_line

FORMAT = "gptbatched"  # the "format" marker of a converted file

_INT_FIELDS = ("num_layers", "num_heads", "head_dim", "model_dim", "mlp_dim", "vocab_size", "padded_vocab",
               "long_window_blocks")


def payload(source: dict, state_dict: dict, cfg: GPTConfig, had_optimizer: bool) -> dict:
    """The content of the converted file for ``state_dict`` (GPTBatched keys), converted from the
    checkpoint that the manifest record ``source`` describes."""
    return {
        "format": FORMAT,
        "model": state_dict,
        "config": cfg.to_dict(),
        "step": source.get("step"),
        "source": {
            "path": source["path"],
            "size_bytes": source.get("size_bytes"),
            "mtime": source.get("mtime"),
            "format": source["format"],
            "variant": source.get("variant", ""),
        },
        "converter_version": package_version(),
        "converter_fingerprint": converter_fingerprint(),
        "optimizer_state": ("not carried (the source has optimizer state)" if had_optimizer
                            else "not carried (the source has none)"),
    }


def save(content: dict, file: IO[bytes]) -> None:
    """torch.save of a :func:`payload`, every weight as a CPU tensor: a file that records
    "cuda:0" would not load on a CPU node without map_location. Weights built on the check's GPU
    are copied to the host here (the host holds them once, as a batch process holds its model)."""
    import torch

    content = {**content, "model": {k: v.cpu() for k, v in content["model"].items()}}
    torch.save(content, file)


def is_converted(obj: Any) -> bool:
    """Whether an inspected object claims to be a converted file (checked by :func:`describe`)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_config(obj: Any) -> GPTConfig | None:
    """The model config a converted file carries, or None unless every field is well-typed."""
    cfg = obj.get("config") if isinstance(obj, dict) else None
    if not isinstance(cfg, dict):
        return None
    ok = (cfg.get("family") in FAMILIES
          and all(type(cfg.get(k)) is int and 0 < cfg[k] <= 2**31 for k in _INT_FIELDS)
          and cfg["num_layers"] <= MAX_LAYERS
          and isinstance(cfg.get("attn_layers"), list)
          and all(type(i) is int and 0 <= i < cfg["num_layers"] for i in cfg["attn_layers"])
          and (cfg.get("eot_token") is None or type(cfg.get("eot_token")) is int)
          and isinstance(cfg.get("window_source", ""), str) and isinstance(cfg.get("eot_source", ""), str)
          # the forward read from the source's code; a file written before these fields has the family's
          and isinstance(cfg.get("softcap", ""), str) and isinstance(cfg.get("skip_order", "unet"), str)
          and type(cfg.get("attn_scale", 0.12)) in (int, float) and isinstance(cfg.get("forward_source", ""), str))
    if not ok:
        return None
    config = GPTConfig.from_dict(cfg)
    if config.forward_problem():
        return None
    config.window_source = one_line(config.window_source, 120)
    config.eot_source = one_line(config.eot_source, 20)
    config.forward_source = one_line(config.forward_source, 200)
    return config


def describe(obj: dict) -> dict[str, Any]:
    """What a manifest records about a converted file (from validated fields only): a
    ``not_needed`` row with its config, or an ``unknown`` one saying what is malformed."""
    cfg = read_config(obj)
    tensors = obj.get("model") if isinstance(obj.get("model"), dict) else {}
    stubs = {k: v for k, v in tensors.items() if isinstance(k, str) and isinstance(v, TensorStub)}
    if cfg is None or not stubs or len(stubs) != len(tensors):
        return {"status": "unknown", "reason": "claims the GPTBatched format, but its config or model is malformed"}
    problems = shape_differences({k: tuple(v.shape) for k, v in stubs.items()}, gptbatched_expected_shapes(cfg))
    if problems:
        return {"status": "unknown", "reason": "claims the GPTBatched format, but " + "; ".join(problems)}
    source = obj.get("source") if isinstance(obj.get("source"), dict) else {}
    step = obj.get("step")
    return {
        **{k: v for k, v in cfg.to_dict().items() if k != "family"},
        "format": FORMAT,
        "status": "not_needed",
        "converted_from": cfg.family,
        "variant": one_line(source.get("variant", ""), 8),
        "reason": "already in the GPTBatched layout (a converted file)",
        "step": step if type(step) is int and 0 <= step < 2**62 else None,
        "converter_version": one_line(obj.get("converter_version", ""), 40),
        "params": sum(v.numel for v in stubs.values()),
        "weight_bytes": sum(v.nbytes for v in stubs.values()),
        "tensors": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in stubs.items()},
    }
