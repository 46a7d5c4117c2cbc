"""ckpt-migrate: detect, convert and verify the lab's modded-nanogpt checkpoints.

Importing the package is cheap (no torch); the torch-using parts load on first use.
"""

from .version import __version__


def load_pretrained_checkpoint(path, device="cpu", dtype=None):
    """``model, info, checkpoint`` for any small, medium or converted checkpoint (see one_file)."""
    import torch

    from .one_file import load_pretrained_checkpoint as _load

    return _load(path, device=device, dtype=dtype if dtype is not None else torch.float32)


__all__ = ["__version__", "load_pretrained_checkpoint"]
