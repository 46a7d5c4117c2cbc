"""Model semantics: the window/document mask rule, flex vs sdpa, and both families' parity.

How the references were checked against upstream: the mask rule below is compared with a
BlockMask built exactly as upstream's ``create_blockmasks`` builds it (378c4e30/06743860:
partial and full kv blocks ordered nearest-first, counts clamped by the window), rendered
with torch's own ``BlockMask.to_dense``. The full forwards were compared with upstream's
``GPT.forward`` loss on an H100 (docs/parity.md records the command and the numbers).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from ckpt_migrate.families import GPTConfig
from ckpt_migrate.models import GPTBatched, GPTFlexAttention, dense_mask

BS = 128


def upstream_block_mask(input_ids_1d: torch.Tensor, window_blocks: int, eot: int) -> torch.Tensor:
    """Admitted kv blocks (nb, nb) as upstream's create_blockmasks/build_bm would admit them."""
    docs = (input_ids_1d == eot).cumsum(0)
    nb = len(input_ids_1d) // BS
    blk = torch.arange(nb, dtype=torch.int32)
    low, high = docs.view(-1, BS)[:, 0], docs.view(-1, BS)[:, -1]
    any_ = (blk[:, None] >= blk) & (low[:, None] <= high) & (high[:, None] >= low)
    all_ = (blk[:, None] > blk) & (low[:, None] == high) & (high[:, None] == low)

    def ordered(dense):
        n = dense.sum(dim=-1, dtype=torch.int32)
        idx = dense.argsort(dim=-1, descending=False, stable=True).flip(-1).to(torch.int32)
        return n[None, None], idx[None, None]

    pn, pi = ordered(any_ & ~all_)
    fn, fi = ordered(all_)
    w = torch.tensor(window_blocks)
    bm = BlockMask.from_kv_blocks(torch.clamp_max(pn, torch.clamp_min(w - fn, 1)), pi,
                                  torch.clamp_max(fn, w - 1), fi, BLOCK_SIZE=BS)
    return bm.to_dense()[0, 0].bool()


@pytest.mark.parametrize("window_blocks", [1, 2, 3, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_and_document_rule_matches_upstream_block_masks(window_blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    T, eot = 1024, 5
    ids = torch.randint(0, 50, (T,), generator=gen)
    ids[torch.randint(0, T, (4 + seed,), generator=gen)] = eot  # a few documents, some mid-block
    blocks = upstream_block_mask(ids, window_blocks, eot)
    docs = (ids == eot).cumsum(0)
    pos = torch.arange(T)
    token_rule = (pos[:, None] >= pos[None, :]) & (docs[:, None] == docs[None, :])  # upstream mask_mod
    expected = blocks.repeat_interleave(BS, 0).repeat_interleave(BS, 1) & token_rule
    ours = dense_mask(ids[None], eot, window_blocks)[0, 0]
    assert torch.equal(ours, expected)


def tiny_config(family: str, window_blocks: int = 2, eot: int | None = 5) -> GPTConfig:
    L = 12 if family == "small" else 16
    return GPTConfig(family, L, 1, 128, 128, 512, 1000, 1024,
                            [i for i in range(L) if i != 7], window_blocks, "test", eot)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 * p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
                    + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def _tokens(T: int, eot: int | None, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (2, T), generator=gen)
    if eot is not None:
        ids[0, T // 3] = ids[0, 2 * T // 3] = ids[1, T // 2 + 3] = eot
    return ids


@pytest.mark.parametrize("family", ["small", "medium"])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_every_attention_agrees_with_upstream_flex_with_documents_and_windows(family, attention):
    cfg = tiny_config(family)
    flex = _randomize(GPTBatched(cfg, attention="flex"), 0)
    other = GPTBatched(cfg, attention=attention)
    other.load_state_dict(flex.state_dict())
    ids = _tokens(768, cfg.eot_token)
    with torch.no_grad():
        diff = (flex(ids) - other.eval()(ids)).abs().max().item()
    assert diff < 1e-4


def test_unknown_attention_is_refused_by_name():
    with pytest.raises(ValueError, match="'fused'"):
        GPTBatched(tiny_config("small"), attention="fused")


@pytest.mark.parametrize("family", ["small", "medium"])
def test_windows_bite_beyond_the_short_window(family):
    model = _randomize(GPTBatched(tiny_config(family, window_blocks=2, eot=None)), 1)
    wide = GPTBatched(tiny_config(family, window_blocks=64, eot=None))
    wide.load_state_dict(model.state_dict())
    ids = _tokens(512, None)
    with torch.no_grad():
        a, b = model(ids), wide.eval()(ids)
    # Inside the first block every window sees the same keys; far beyond it they differ.
    assert (a[:, :128] - b[:, :128]).abs().max().item() < 1e-5
    assert (a[:, 384:] - b[:, 384:]).abs().max().item() > 1e-3  # fp32 noise is ~1e-6


def test_documents_separate_attention():
    model = _randomize(GPTBatched(tiny_config("medium", window_blocks=64, eot=5)), 2)
    ids = _tokens(256, None)
    ids[:, 100] = 5
    changed = ids.clone()
    changed[:, :100] = (changed[:, :100] + 1) % 5  # rewrite the first document only
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # Tokens after the separator cannot see the first document at all.
    assert (a[:, 100:] - b[:, 100:]).abs().max().item() < 1e-5
    assert (a[:, :100] - b[:, :100]).abs().max().item() > 1e-3


def test_small_v1_and_v2_layouts_share_one_forward():
    cfg = tiny_config("small")
    v2 = _randomize(GPTFlexAttention(cfg, "v2", attention="sdpa"), 3)
    v1 = GPTFlexAttention(cfg, "v1", attention="sdpa")
    sd = {k: v for k, v in v2.state_dict().items() if k != "scalars"}
    s, L = v2.scalars.detach(), cfg.num_layers
    sd["skip_weights"] = s[: L // 2]
    for i in range(L):
        sd[f"blocks.{i}.lambdas"] = s[L + 2 * i: L + 2 * i + 2]
        if i != 7:
            sd[f"blocks.{i}.attn.lambdas"] = s[3 * L + 2 * i: 3 * L + 2 * i + 2]
    v1.load_state_dict(sd, strict=True)
    ids = _tokens(256, cfg.eot_token)
    with torch.no_grad():
        assert torch.equal(v1.eval()(ids), v2(ids))


def test_softcaps_bound_the_logits():
    for family, bound in (("small", 30.0), ("medium", 15.0)):
        model = _randomize(GPTBatched(tiny_config(family)), 4)
        with torch.no_grad():
            out = model(_tokens(128, None))
        assert out.dtype == torch.float32 and out.shape == (2, 128, 1024)
        assert out.abs().max().item() <= bound


def test_softcaps_take_known_values():
    """30·sigmoid(z / (7.5·sqrt(D))) for small, 15·z / sqrt(z² + 225) for medium, at points
    where the formulas give round numbers (D = 64: 7.5·sqrt(D) = 60)."""
    import math

    from ckpt_migrate.families import MEDIUM, SMALL
    from ckpt_migrate.models import softcap

    z = torch.tensor([0.0, 60 * math.log(3), -60 * math.log(3)])
    assert torch.allclose(softcap(z, SMALL, 64), torch.tensor([15.0, 22.5, 7.5]))
    z = torch.tensor([0.0, 20.0, -20.0, 1e6])
    assert torch.allclose(softcap(z, MEDIUM, 64), torch.tensor([0.0, 12.0, -12.0, 15.0]))


def test_input_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        GPTBatched(tiny_config("small"))(torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize("attention", ["math", "flex"])
def test_cpu_attention_one_head_at_a_time_gives_the_same_numbers(monkeypatch, attention):
    """Above SPLIT_HEADS_SCORE_BYTES the CPU runs the attentions that write out their scores one
    head at a time (for memory): the result must be the all-heads result, with documents and a
    window in the mask."""
    from ckpt_migrate import models

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 384, 32, generator=gen) for _ in range(3))
    ids = torch.randint(0, 50, (2, 384), generator=gen)
    ids[:, 100] = ids[:, 250] = 7  # document separators
    mask = models.MASK_BUILDERS[attention](ids, eot_token=7, window_blocks=2)
    whole = models.attend(q, k, v, mask)
    monkeypatch.setattr(models, "SPLIT_HEADS_SCORE_BYTES", 0)
    split = models.attend(q, k, v, mask)
    assert split.shape == whole.shape == (2, 4, 384, 32)
    assert torch.equal(split, whole)


def test_scalar_layout_slots():
    """[skips | residual pairs | value pairs], 5L long, with upstream's initial values."""
    from ckpt_migrate.families import ScalarLayout

    layout = ScalarLayout(4)
    values = layout.initial()
    assert layout.size == len(values) == 20
    assert values[layout.skips] == [1.0] * 4
    assert values[layout.residual_pair(2)] == [1.0, 0.0] and layout.residual_pair(2) == slice(8, 10)
    assert values[layout.value_pair(3)] == [0.5, 0.5] and layout.value_pair(3) == slice(18, 20)
    assert (layout.residual_pairs, layout.value_pairs) == (slice(4, 12), slice(12, 20))
