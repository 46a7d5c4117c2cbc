"""Faithful forwards of the lab's two GPT families, and GPTBatched, which runs either.

- :class:`GPTFlexAttention`: train_gpt_small.py's model in its own parameter layout
  (``qkv_w`` + ``c_proj``, ``c_fc``/``c_proj``, ``lm_head``; v1 separate scalars or v2 packed).
- :class:`GPTBatched`: the lab's evaluation layout (train_gpt_medium.py's names: ``qkvo_w``,
  ``fc_w``, ``proj_w``, ``lm_head_w``, packed ``scalars``), configured by
  :class:`~ckpt_migrate.families.GPTConfig` to reproduce either family.

Both take token ids ``[B, T]`` and return float32 logits ``[B, T, padded_vocab]`` after the
family's soft-cap: the numbers the validation loss saw. Attention takes one mask rule (causal,
same document, key block within the layer's window) two ways: ``"sdpa"`` (a dense boolean
mask, the evaluation model's) and ``"math"`` (the same mask, softmax written out: what eager flex
computes, used by the check's reference forward). The tests hold both to upstream's own flex
attention (``tests/upstream_flex.py`` adds it as a third way).
Computation runs in the embedding dtype and every weight is cast to it at use, as upstream does:
fp32 models compute in fp32 throughout, bf16 embeddings give the training-time bf16 flow.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .families import (
    ATTN_SCALE,
    HEAD_DIM,
    RESIDUAL_PAIR_INIT,
    VALUE_PAIR_INIT,
    WINDOW_BLOCK,
    Family,
    GPTConfig,
    ScalarLayout,
)



def norm(x: torch.Tensor) -> torch.Tensor:
    """RMS norm over the last dim, no weight (upstream's ``norm``)."""
    return F.rms_norm(x, (x.size(-1),))


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Half-truncated RoPE on ``x`` (B, T, H, hd), computed in fp32 as upstream does."""
    T, hd = x.size(1), x.size(3)
    freq = (1 / 1024) ** torch.linspace(0, 1, steps=hd // 4, dtype=torch.float32, device=x.device)
    freq = torch.cat([freq, freq.new_zeros(hd // 4)])
    theta = torch.outer(torch.arange(T, dtype=torch.float32, device=x.device), freq)
    cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1).type_as(x)


def document_ids(input_ids: torch.Tensor, eot_token: int | None) -> torch.Tensor:
    """Per-token document index (B, T): attention never crosses an end-of-text token."""
    if eot_token is None:
        return torch.zeros_like(input_ids)
    return (input_ids == eot_token).cumsum(-1)


def allowed(q_idx, kv_idx, same_doc, window_blocks: int):
    """Upstream's attention rule: causal, same document, key block within the window."""
    in_window = (q_idx // WINDOW_BLOCK) - (kv_idx // WINDOW_BLOCK) < window_blocks
    return (q_idx >= kv_idx) & same_doc & in_window


def dense_mask(input_ids: torch.Tensor, eot_token: int | None, window_blocks: int) -> torch.Tensor:
    """(B, 1, T, T) boolean mask for scaled_dot_product_attention."""
    docs = document_ids(input_ids, eot_token)  # (B, T)
    pos = torch.arange(input_ids.size(1), device=input_ids.device)
    same_doc = docs[:, :, None] == docs[:, None, :]  # (B, T, T)
    return allowed(pos[:, None], pos[None, :], same_doc, window_blocks)[:, None]


class MathMask(NamedTuple):
    """A dense boolean mask that asks :func:`attend` for attention written out step by step."""

    allowed: torch.Tensor  # (B, 1, T, T)

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        return math_attention(q, k, v, self.allowed, scale)


def math_mask(input_ids: torch.Tensor, eot_token: int | None, window_blocks: int) -> MathMask:
    return MathMask(dense_mask(input_ids, eot_token, window_blocks))


def math_attention(q, k, v, allowed, scale: float = ATTN_SCALE) -> torch.Tensor:
    """softmax(q kᵀ · scale | mask) v over (B, H, T, hd), scores and softmax in fp32: what eager
    flex attention computes, without its tracing machinery (dynamo and inductor, which flex
    imports and runs on every call: ~0.45x a full-size file's weights in host memory on a GPU
    host, and seconds of start-up)."""
    scores = (q @ k.transpose(-2, -1)).float().mul_(scale)  # (B, H, T, T)
    scores.masked_fill_(~allowed, float("-inf"))  # every row keeps its own position
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v  # (B, H, T, hd)


# Above this size of fp32 attention scores, the attention that writes out its scores (math, eager
# flex) runs one head at a time on the CPU (T = 2048 with 6 heads: 100 MB, and several copies of it;
# at T = 256 a split would only add per-call overhead).
SPLIT_HEADS_SCORE_BYTES = 64 << 20


def attend(q, k, v, mask, scale: float = ATTN_SCALE) -> torch.Tensor:
    """Attention over (B, H, T, hd) with logits scaled by ``scale``: sdpa for a dense boolean mask,
    else the mask's own ``attend`` (:func:`math_attention` for a :class:`MathMask`)."""
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    B, H, T, _ = q.shape
    if q.device.type == "cpu" and H > 1 and B * H * T * T * 4 > SPLIT_HEADS_SCORE_BYTES:
        # Heads are independent and share the mask: one at a time gives the same numbers with a
        # sixth of the memory, and is faster on the CPU too.
        return torch.cat([attend(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], mask, scale) for h in range(H)], dim=1)
    return mask.attend(q, k, v, scale)


# How each attention implementation takes the mask rule (see attend).
MASK_BUILDERS = {"sdpa": dense_mask, "math": math_mask}


def softcap(z: torch.Tensor, family: Family, model_dim: int, kind: str = "") -> torch.Tensor:
    """A logit soft-cap applied to fp32 logits: ``kind`` (``GPTConfig.softcap_kind``), else the
    family's own (``Family.softcap``). See ``forward_variant.SOFTCAPS`` for the upstream commits."""
    kind = kind or family.softcap
    if kind == "sigmoid30_width":  # small v1/v2: 30·sigmoid(z / (7.5·√D))
        return 30 * torch.sigmoid(z / (7.5 * model_dim**0.5))
    if kind == "sigmoid30_fixed":  # train_gpt.py 2025-02-01 .. 02-09: 30·sigmoid(z / 7.5)
        return 30 * torch.sigmoid(z / 7.5)
    if kind == "rsqrt15":  # medium: 15·z / √(z² + 225)
        return 15 * z * torch.rsqrt(z.square() + 225)
    raise ValueError(f"unknown soft-cap {kind!r} (family {family.name!r})")


def _uniform(*shape: int, device=None) -> nn.Parameter:
    """A parameter with upstream's init scale (0.5 / sqrt(fan_in) std, uniform)."""
    bound = math.sqrt(3) * 0.5 * shape[-1] ** -0.5
    return nn.Parameter(torch.empty(*shape, device=device).uniform_(-bound, bound))


def _zeros(cfg: GPTConfig, device) -> torch.Tensor:
    return torch.zeros(cfg.vocab_size, cfg.model_dim, device=device)


class Attention(nn.Module):
    """Attention shared by both layouts; subclasses say where q, k, v and out live."""

    def __init__(self, num_heads: int, head_dim: int, norm_v: bool, scale: float = ATTN_SCALE):
        super().__init__()
        self.num_heads, self.head_dim, self.norm_v, self.scale = num_heads, head_dim, norm_v, scale

    def qkv_weight(self) -> torch.Tensor:  # (3 * hdim, D)
        raise NotImplementedError

    def out_weight(self) -> torch.Tensor:  # (D, hdim)
        raise NotImplementedError

    def forward(self, x, ve, sa_lambdas, mask):
        B, T, _ = x.shape  # (B, T, D)
        qkv = F.linear(x, self.qkv_weight().to(x.dtype))  # (B, T, 3 * hdim)
        q, k, v = qkv.view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)  # (B, T, H, hd)
        q, k = rotary(norm(q)), rotary(norm(k))
        if self.norm_v:
            v = norm(v)
        v = sa_lambdas[0] * v + sa_lambdas[1] * ve.view_as(v) if ve is not None else sa_lambdas[0] * v
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, hdim)
        return F.linear(y, self.out_weight().to(x.dtype))  # (B, T, D)


class SmallAttention(Attention):
    """train_gpt_small.py's attention: ``qkv_w`` [3, hdim, D] and ``c_proj.weight`` [D, hdim]."""

    def __init__(self, dim: int, num_heads: int, separate_lambdas: bool, device=None, scale: float = ATTN_SCALE):
        super().__init__(num_heads, HEAD_DIM, norm_v=False, scale=scale)
        hdim = num_heads * HEAD_DIM
        self.qkv_w = _uniform(3, hdim, dim, device=device)
        self.c_proj = nn.Linear(hdim, dim, bias=False, device=device)
        if separate_lambdas:  # v1 keeps the value-mix lambdas here; v2 packs them into scalars
            self.lambdas = nn.Parameter(torch.tensor(VALUE_PAIR_INIT, device=device))

    def qkv_weight(self):
        return self.qkv_w.flatten(end_dim=1)

    def out_weight(self):
        return self.c_proj.weight


class PackedAttention(Attention):
    """train_gpt_medium.py's (and GPTBatched's) attention: ``qkvo_w`` [4, hdim, D], slot 3 = out."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, norm_v: bool, device=None,
                 scale: float = ATTN_SCALE):
        super().__init__(num_heads, head_dim, norm_v, scale)
        self.qkvo_w = _uniform(4, num_heads * head_dim, dim, device=device)

    def qkv_weight(self):
        return self.qkvo_w[:3].flatten(end_dim=1)

    def out_weight(self):
        return self.qkvo_w[3]


class SmallMLP(nn.Module):
    """proj(relu(fc(x))²) with ``c_fc``/``c_proj`` linear layers (small layout)."""

    def __init__(self, dim: int, hidden: int, device=None):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=False, device=device)
        self.c_proj = nn.Linear(hidden, dim, bias=False, device=device)

    def forward(self, x):  # (B, T, D)
        h = F.relu(F.linear(x, self.c_fc.weight.to(x.dtype))).square()  # (B, T, hidden)
        return F.linear(h, self.c_proj.weight.to(x.dtype))


class PackedMLP(nn.Module):
    """proj(relu(fc(x))²) with raw ``fc_w``/``proj_w`` parameters (medium layout)."""

    def __init__(self, dim: int, hidden: int, device=None):
        super().__init__()
        self.fc_w = _uniform(hidden, dim, device=device)
        self.proj_w = _uniform(dim, hidden, device=device)

    def forward(self, x):  # (B, T, D)
        h = F.relu(F.linear(x, self.fc_w.to(x.dtype))).square()  # (B, T, hidden)
        return F.linear(h, self.proj_w.to(x.dtype))


class Block(nn.Module):
    """x = l0·x + l1·x0; x += attn(norm(x) or x); x += mlp(norm(x))."""

    def __init__(self, attn: Attention | None, mlp: nn.Module, norm_attn_input: bool,
                 separate_lambdas: bool = False, device=None):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.norm_attn_input = norm_attn_input
        if separate_lambdas:  # small v1 keeps the residual-mix lambdas per block
            self.lambdas = nn.Parameter(torch.tensor(RESIDUAL_PAIR_INIT, device=device))

    def forward(self, x, x0, ve, lambdas, sa_lambdas, mask):  # x, x0: (B, T, D)
        x = lambdas[0] * x + lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x) if self.norm_attn_input else x, ve, sa_lambdas, mask)
        return x + self.mlp(norm(x))


class _GPT(nn.Module):
    """Embeddings, the layer loop with the family's skips, and the soft-capped head."""

    def __init__(self, cfg: GPTConfig, attention: str, device=None):
        super().__init__()
        if attention not in MASK_BUILDERS:
            raise ValueError(f"attention must be one of {sorted(MASK_BUILDERS)}, not {attention!r}")
        problem = cfg.forward_problem()
        if problem:
            raise ValueError(f"cannot build this model: {problem}")
        self.cfg = cfg
        self.attention = attention
        # Activations' dtype; None = the embeddings' (upstream: bf16 embeddings, bf16 activations).
        # Setting fp32 computes in fp32 from bf16 tables without copying them (bf16 -> fp32 is exact).
        self.compute_dtype: torch.dtype | None = None
        # Zero tables passed in: nn.Embedding's own normal_ init runs as a slow Python
        # decomposition on the meta device, and the weights are always loaded anyway.
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim, _weight=_zeros(cfg, device))
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.model_dim, _weight=_zeros(cfg, device))
                                          for _ in range(3))

    def head_weight(self) -> torch.Tensor:  # (padded_vocab, D)
        raise NotImplementedError

    def packed_scalars(self) -> torch.Tensor:  # (5L,) in GPTBatched's layout
        raise NotImplementedError

    def _masks(self, input_ids):
        make = MASK_BUILDERS[self.attention]
        windows = {self.cfg.window_blocks(i) for i in range(self.cfg.num_layers)}
        return {w: make(input_ids, self.cfg.eot_token, w) for w in windows}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> fp32 soft-capped logits [B, T, padded_vocab]."""
        return self.logits(self.hidden(input_ids))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [..., D] -> fp32 soft-capped logits [..., padded_vocab]; row by
        row, so a check can take them a few rows at a time instead of materializing [B, T, V]."""
        z = F.linear(hidden, self.head_weight().to(hidden.dtype)).float()  # (..., padded_vocab)
        return softcap(z, self.cfg.family_spec, self.cfg.model_dim, self.cfg.softcap_kind)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> final-normed hidden states [B, T, D] (everything but the head)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        cfg, L = self.cfg, self.cfg.num_layers
        masks = self._masks(input_ids)
        dtype = self.compute_dtype or self.embed.weight.dtype
        ve = [emb(input_ids).to(dtype) for emb in self.value_embeds]  # 3 x (B, T, D)
        scalars, layout = self.packed_scalars().float(), ScalarLayout(L)
        skip_w = scalars[layout.skips]
        lambdas, sa_lambdas = scalars[layout.residual_pairs].view(-1, 2), scalars[layout.value_pairs].view(-1, 2)
        x = x0 = norm(self.embed(input_ids).to(dtype))  # (B, T, D)
        outputs: list[torch.Tensor] = []
        skip_map = cfg.family_spec.skip_map  # None: small's U-net; else medium's layer -> earlier layer
        reversed_skips = cfg.skip_order == "reversed"
        for i, block in enumerate(self.blocks):
            if skip_map is None and i >= L // 2:
                # small: U-net, layer i reads layer L-1-i; or, reversed (train_gpt.py 2025-02-01 .. 02-02,
                # skip_connections.reverse() before the first pop), layer i reads layer i - L/2
                source = i - L // 2 if reversed_skips else L - 1 - i
                x = x + skip_w[i - L // 2] * outputs[source]
            elif skip_map is not None and i in skip_map:
                x = x + skip_w[skip_map[i]] * outputs[skip_map[i]]
            idx = cfg.value_embed_index(i)
            x = block(x, x0, ve[idx] if idx is not None else None, lambdas[i], sa_lambdas[i],
                      masks[cfg.window_blocks(i)])
            outputs.append(x)
        return norm(x)  # (B, T, D)


class GPTFlexAttention(_GPT):
    """train_gpt_small.py's model in its original layout (v1 or v2)."""

    def __init__(self, cfg: GPTConfig, variant: str, attention: str = "math",
                 scalars_len: int | None = None, device=None):
        super().__init__(cfg, attention, device)
        if cfg.family != "small" or variant not in ("v1", "v2"):
            raise ValueError(f"GPTFlexAttention takes the small family, v1 or v2 (got {cfg.family}/{variant})")
        self.variant = variant
        v1 = variant == "v1"
        self.blocks = nn.ModuleList(
            Block(SmallAttention(cfg.model_dim, cfg.num_heads, v1, device, scale=cfg.attn_scale)
                  if i in cfg.attn_layers else None,
                  SmallMLP(cfg.model_dim, cfg.mlp_dim, device), norm_attn_input=True, separate_lambdas=v1,
                  device=device)
            for i in range(cfg.num_layers))
        self.lm_head = nn.Linear(cfg.model_dim, cfg.padded_vocab, bias=False, device=device)
        if v1:
            self.skip_weights = nn.Parameter(torch.ones(cfg.num_layers // 2, device=device))
        else:
            # v2 pads the packed scalars to a multiple of the training world size.
            self.scalars = nn.Parameter(torch.ones(scalars_len or ScalarLayout(cfg.num_layers).size, device=device))

    def head_weight(self):
        return self.lm_head.weight

    def packed_scalars(self):
        layout = ScalarLayout(self.cfg.num_layers)
        if self.variant == "v2":
            return self.scalars[: layout.size]  # drop v2's world-size padding
        L = self.cfg.num_layers
        unused = torch.ones(L - L // 2, device=self.skip_weights.device)  # small reads only L/2 skips
        no_attn = torch.tensor(VALUE_PAIR_INIT, device=self.skip_weights.device)  # layer 7 has no attention
        return torch.cat([
            self.skip_weights.float(), unused,
            *[b.lambdas.float() for b in self.blocks],
            *[b.attn.lambdas.float() if b.attn is not None else no_attn for b in self.blocks],
        ])


class GPTBatched(_GPT):
    """The evaluation model: medium layout, either family's forward, batched sdpa attention."""

    def __init__(self, cfg: GPTConfig, attention: str = "sdpa", device=None):
        super().__init__(cfg, attention, device)
        spec = cfg.family_spec
        self.blocks = nn.ModuleList(
            Block(PackedAttention(cfg.model_dim, cfg.num_heads, cfg.head_dim, spec.norm_v, device,
                                  scale=cfg.attn_scale)
                  if i in cfg.attn_layers else None,
                  PackedMLP(cfg.model_dim, cfg.mlp_dim, device), norm_attn_input=spec.norm_attn_input)
            for i in range(cfg.num_layers))
        self.lm_head_w = nn.Parameter(torch.zeros(cfg.padded_vocab, cfg.model_dim, device=device))
        self.scalars = nn.Parameter(torch.ones(ScalarLayout(cfg.num_layers).size, device=device))

    def head_weight(self):
        return self.lm_head_w

    def packed_scalars(self):
        return self.scalars

