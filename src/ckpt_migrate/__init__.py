"""ckpt-migrate: detect, convert and verify the lab's modded-nanogpt checkpoints.

Importing the package is cheap (no torch); the torch-using parts load on first use.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ckpt-migrate")  # one place: pyproject.toml
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"


def load_pretrained_checkpoint(path, device="cpu", dtype=None):
    """``model, info, checkpoint`` for any small, medium or converted checkpoint (see conversion)."""
    import torch

    from .conversion import load_pretrained_checkpoint as _load

    return _load(path, device=device, dtype=dtype if dtype is not None else torch.float32)


__all__ = ["__version__", "load_pretrained_checkpoint"]
