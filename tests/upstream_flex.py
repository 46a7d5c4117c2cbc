"""Upstream's own attention, for the tests that hold the library's forwards to it: flex attention
with a BlockMask whose ``mask_mod`` carries the window and documents (eager flex ignores a block
mask's block counts, where upstream put the window, so the mask_mod must). Importing this module
adds ``attention="flex"`` to the models (the library itself never runs flex: it loads dynamo and
inductor, seconds of start-up and ~0.45x a full-size file's weights in host memory)."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

from ckpt_migrate import models


class FlexMask(NamedTuple):
    """A flex BlockMask that :func:`ckpt_migrate.models.attend` runs with eager flex attention."""

    block_mask: Any

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        with warnings.catch_warnings():  # eager flex warns that it is unfused; that is intended here
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=self.block_mask, scale=scale)


def flex_block_mask(input_ids: torch.Tensor, eot_token: int | None, window_blocks: int) -> FlexMask:
    """The BlockMask upstream builds for the rule :func:`ckpt_migrate.models.dense_mask` states."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = models.document_ids(input_ids, eot_token)

    def mask_mod(b, h, q_idx, kv_idx):
        return models.allowed(q_idx, kv_idx, docs[b, q_idx] == docs[b, kv_idx], window_blocks)

    B, T = input_ids.shape
    return FlexMask(create_block_mask(mask_mod, B, None, T, T, device=input_ids.device))


models.MASK_BUILDERS.setdefault("flex", flex_block_mask)
