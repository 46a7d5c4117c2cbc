"""How the logit check runs: its settings, their defaults and the tolerance by dtype.

Torch-free, so that the CLI's options, the pipeline's schema and the login-node commands
(``inspect``, ``report``, ``verify-outputs``, ``doctor``) can name the defaults without loading
torch (~3.5 s and ~220 MB per call); the two methods that need torch import it when called.
:mod:`ckpt_migrate.check` re-exports everything here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5}  # absolute, on soft-capped logits


class CheckDeviceError(ValueError):
    """The check's device is not a device, or this process cannot see it."""


@dataclass
class CheckSettings:
    """How the logit check runs."""

    batch: int = 2  # sequences per batch
    length: int = 2048  # tokens per sequence: long enough that both families' end-of-training windows bite
    seed: int = 1234  # token generator seed
    dtype: str = "float32"  # "float32" (TF32 off) or "bfloat16" (training-time dtype flow)
    tolerance: float | None = None  # max |logit diff|; None = DEFAULT_TOLERANCE[dtype]
    device: str = "auto"  # "auto" = cuda when available, else cpu

    def resolved_device(self) -> str:
        """The device the check runs on; :class:`CheckDeviceError` names what is wrong with one
        that is not a device or not there."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise CheckDeviceError(f"check device {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.device != "cpu":
            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(self.device.partition(":")[2] or 0)
            if index >= visible:
                raise CheckDeviceError(f"check device {self.device!r}: this process sees {visible} CUDA GPU(s) "
                                       f"(torch {torch.__version__}); use cpu or auto")
        return self.device

    def resolved_tolerance(self) -> float:
        return float(self.tolerance) if self.tolerance is not None else DEFAULT_TOLERANCE[self.dtype]

    def torch_dtype(self):
        """The check's ``torch.dtype``."""
        import torch

        if self.dtype not in DEFAULT_TOLERANCE:
            raise ValueError(f"check dtype must be one of {sorted(DEFAULT_TOLERANCE)}, not {self.dtype!r}")
        return getattr(torch, self.dtype)
