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


def _nan_small(path, seed):
    sd = synthetic.small_state_dict("v2", vocab=VOCAB, seed=seed)
    sd["blocks.1.mlp.c_fc.weight"][0, 0] = float("nan")  # converts, then fails its logit check
    synthetic.save(synthetic.upstream_checkpoint(sd, "small", step=_step(path)), str(path))


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


def build_tree(root, files: dict[str, str]):
    """A clean_bbpe_50k-like tree: ``{relative path: kind}``, kinds from :data:`KINDS`; each
    checkpoint gets its own seed (its place in ``files``) and its step from its name."""
    for seed, (relative, kind) in enumerate(files.items()):
        KINDS[kind](os.path.join(str(root), relative), seed)
    return root
