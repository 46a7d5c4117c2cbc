"""ckpt-migrate: detect, convert and verify the lab's modded-nanogpt checkpoints.

Importing the package is cheap (no torch); the torch-using parts load on first use.
"""

from .version import package_version


def __getattr__(name: str):
    if name == "__version__":  # read when asked for (see version.py)
        return package_version()
    raise AttributeError(f"module 'ckpt_migrate' has no attribute {name!r}")


def load_pretrained_checkpoint(path, device="cpu", dtype=None):
    """``model, info, checkpoint`` for any small, medium or converted checkpoint (see one_file)."""
    import torch

    from .one_file import load_pretrained_checkpoint as _load

    return _load(path, device=device, dtype=dtype if dtype is not None else torch.float32)


__all__ = ["__version__", "load_pretrained_checkpoint"]
