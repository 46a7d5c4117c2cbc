"""The two upstream checkpoint families and the GPTBatched config that describes either.

Torch-free: detection imports this to name the expected keys and shapes, and the models
import it to know the per-layer windows, skips and soft-caps. Facts come from
KellerJordan/modded-nanogpt at 378c4e30/345b2fb9 (train_gpt.py, "small") and 06743860
(train_gpt_medium.py, "medium"); see docs/upstream.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

HEAD_DIM = 128  # both scripts build attention with head_dim=128
WINDOW_BLOCK = 128  # flex-attention block size; windows are counted in these blocks
EOT_TOKEN = 50256  # upstream's document separator (GPT-2 <|endoftext|>)
NO_ATTENTION_LAYER = 7  # "skip attention of blocks.7" in both scripts
MAX_LAYERS = 1024  # a layer count beyond this is damage, not a model (and would cost a loop that long)
ATTN_SCALE = 0.12  # both families' attention scale (they replace head_dim ** -0.5 by this constant)
# The soft-caps a family's forward can take (forward_variant.SOFTCAPS says what each computes).
FAMILY_SOFTCAPS = {"small": ("sigmoid30_width", "sigmoid30_fixed"), "medium": ("rsqrt15",)}
SKIP_ORDERS = {"small": ("unet", "reversed"), "medium": ("unet",)}


def next_multiple(value: float, n: int) -> int:
    """Smallest positive multiple of n that is >= value (upstream's next_multiple_of_n)."""
    return max(1, math.ceil(value / n)) * n


@dataclass(frozen=True, kw_only=True)
class Family:
    """What distinguishes one training script's model."""

    name: str  # "small" or "medium"
    script: str  # the lab's training script that writes it
    num_layers: int  # depth the per-layer tables below are written for
    long_window_layers: tuple[int, ...]  # layers using the long window; the rest use long // 2
    final_window_blocks: int  # long window at the end of training, in 128-token blocks
    norm_attn_input: bool  # attention sees norm(x) (small) or raw x (medium)
    norm_v: bool  # v is RMS-normed before the lambda mix (medium)
    skip_map: dict[int, int] | None  # medium: layer -> earlier layer whose output is added
    softcap: str  # its own soft-cap: "sigmoid30_width" (small) or "rsqrt15" (medium); see forward_variant.SOFTCAPS

    @property
    def label(self) -> str:
        """How reports and the CLI name the format: ``small (from train_gpt_small.py)``."""
        return f"{self.name} (from {self.script})"


SMALL = Family(name="small", script="train_gpt_small.py", num_layers=12, long_window_layers=(0, 4, 7, 11),
               final_window_blocks=14, norm_attn_input=True, norm_v=False, skip_map=None, softcap="sigmoid30_width")
MEDIUM = Family(name="medium", script="train_gpt_medium.py", num_layers=16, long_window_layers=(0, 4, 11, 15),
                final_window_blocks=27, norm_attn_input=False, norm_v=True, skip_map={9: 6, 10: 4, 11: 2},
                softcap="rsqrt15")
FAMILIES = {f.name: f for f in (SMALL, MEDIUM)}


def window_blocks_at(family: Family, step: int | None, num_iterations: int | None) -> tuple[int, str]:
    """Long window (blocks) the model was validated with at ``step``, and where that came from.

    small: next multiple of 128 of 1728·x; medium: of 3456·(4x³ − 6x² + 3x); x = step/num_iterations.
    """
    if step is None or not num_iterations or step < 0 or step > num_iterations:
        return family.final_window_blocks, "end of training (family default)"
    x = step / num_iterations
    if family.name == "small":
        tokens = next_multiple(1728 * x, WINDOW_BLOCK)
    else:
        tokens = next_multiple(3456 * (4 * x**3 - 6 * x**2 + 3 * x), WINDOW_BLOCK)
    return tokens // WINDOW_BLOCK, f"schedule at step {step} of {num_iterations}"


# Horizontal whitespace only and bounded digits: ``\s*`` at every line start is quadratic on a
# long run of blank lines, and a digit run past Python's int limit would raise.
# train_gpt.py of 2025-02-02 (2680eb4e .. fd409b43) names it train_steps, and its schedule reads args.train_steps.
_NUM_ITERATIONS = re.compile(r"^[ \t]*(?:num_iterations|train_steps)[ \t]*(?::[ \t]*int[ \t]*)?=[ \t]*(\d{1,12})\b",
                             re.MULTILINE)


def num_iterations_from_code(code: str | None) -> int | None:
    """The training script's ``num_iterations`` (``train_steps`` in some upstream versions), as the
    checkpoint's ``code`` states it."""
    if not isinstance(code, str):
        return None
    match = _NUM_ITERATIONS.search(code)
    return int(match.group(1)) if match else None


_EOT_IN_CODE = re.compile(r"docs[ \t]{0,16}=[ \t]{0,16}\([ \t]{0,16}input_seq[ \t]{0,16}==[ \t]{0,16}"
                          r"(\d{1,12})[ \t]{0,16}\)")


def eot_token_from_code(code: str | None) -> int | None:
    """The document separator the training script split attention at (``input_seq == N``)."""
    if not isinstance(code, str):
        return None
    match = _EOT_IN_CODE.search(code)
    return int(match.group(1)) if match else None


@dataclass
class GPTConfig:
    """One model's dimensions and forward semantics: configures GPTFlexAttention (a small file in
    its own layout) and GPTBatched (the medium layout, either family's forward); stored in converted files."""

    family: str  # "small" or "medium": whose forward semantics to reproduce
    num_layers: int  # transformer blocks
    num_heads: int  # attention heads; hdim = num_heads * head_dim
    head_dim: int  # per-head width (128 upstream)
    model_dim: int  # residual width D
    mlp_dim: int  # MLP hidden width (4D upstream)
    vocab_size: int  # embedding rows
    padded_vocab: int  # lm-head rows (logit width)
    attn_layers: list[int]  # layers that have attention (all but 7 upstream)
    long_window_blocks: int  # long sliding window in 128-token blocks; short is long // 2
    window_source: str = ""  # why these windows: schedule at the step, or family default
    eot_token: int | None = EOT_TOKEN  # attention never crosses this token; None = no documents
    eot_source: str = ""  # where eot_token came from: config, code, default or none
    # The forward the file was trained with, read from its training code (forward_variant); the
    # defaults are each family's own, so a converted file written before these fields loads as before.
    softcap: str = ""  # "" = the family's; else a key of forward_variant.SOFTCAPS
    attn_scale: float = ATTN_SCALE  # attention logit scale (0.12 both families; 15/head_dim in Feb 2025 small)
    skip_order: str = "unet"  # small: "unet" (layer i >= L/2 adds layer L-1-i) or "reversed" (adds layer i-L/2)
    forward_source: str = ""  # where the forward came from: code lines, or "no code: assumed <family>"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def softcap_kind(self) -> str:
        """The soft-cap this model applies (the family's unless the config names another)."""
        return self.softcap or self.family_spec.softcap

    def forward_problem(self) -> str:
        """Why this config's forward parameters are not a forward the models reproduce ("" if they are)."""
        if self.family not in FAMILIES:
            return f"family {self.family!r} is not one of {sorted(FAMILIES)}"
        allowed = FAMILY_SOFTCAPS[self.family]
        if self.softcap_kind not in allowed:
            return f"soft-cap {self.softcap!r} is not one a {self.family} model takes ({', '.join(allowed)})"
        if self.skip_order not in SKIP_ORDERS[self.family]:
            return f"skip order {self.skip_order!r} is not one a {self.family} model takes"
        scale = self.attn_scale
        if type(scale) not in (int, float) or not math.isfinite(scale) or not 0 < scale <= 16:
            return f"attention scale {scale!r} is not a positive number"
        return ""

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def from_record(cls, record: dict) -> "GPTConfig":
        """The config of a checkpoint that detection found small or medium (its ManifestRecord)."""
        return cls(
            family=record["format"],
            num_layers=record["num_layers"],
            num_heads=record["num_heads"],
            head_dim=record["head_dim"],
            model_dim=record["model_dim"],
            mlp_dim=record["mlp_dim"],
            # GPTBatched keeps the source's embedding rows (small v2 pads them to 128).
            vocab_size=record["vocab_size"],
            padded_vocab=record["padded_vocab"],
            attn_layers=[i for i in range(record["num_layers"]) if i not in record["layers_without_attention"]],
            long_window_blocks=record["long_window_blocks"],
            window_source=record.get("window_source", ""),
            eot_token=record.get("eot_token", EOT_TOKEN),
            eot_source=record.get("eot_token_source", ""),
            softcap=record.get("softcap", ""),
            attn_scale=record.get("attn_scale", ATTN_SCALE),
            skip_order=record.get("skip_order", "unet"),
            forward_source=record.get("forward_source", ""),
        )

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family]

    def window_blocks(self, layer: int) -> int:
        """Sliding window of ``layer`` in blocks (short = long // 2, at least one block)."""
        if layer in self.family_spec.long_window_layers:
            return self.long_window_blocks
        return max(1, self.long_window_blocks // 2)

    def value_embed_index(self, layer: int) -> int | None:
        """Which of the three value embeddings layer ``layer`` mixes into v, if any."""
        if layer < 3:
            return layer
        if layer >= self.num_layers - 3:
            return layer - (self.num_layers - 3)
        return None


@dataclass(frozen=True)
class ScalarLayout:
    """GPTBatched's packed ``scalars`` [5L]: L U-net skip weights, then per layer the residual pair
    (λ·x + λ0·x0), then per layer the value pair (λ·v + λve·ve). Medium trains all of them; small
    trains only L/2 skip weights and stores the pairs per block (v1) or packs them the same way (v2)."""

    num_layers: int

    @property
    def size(self) -> int:
        return 5 * self.num_layers

    @property
    def skips(self) -> slice:
        return slice(0, self.num_layers)

    @property
    def residual_pairs(self) -> slice:  # view(-1, 2): one (λ, λ0) row per layer
        return slice(self.num_layers, 3 * self.num_layers)

    @property
    def value_pairs(self) -> slice:  # view(-1, 2): one (λ, λve) row per layer
        return slice(3 * self.num_layers, 5 * self.num_layers)

    def residual_pair(self, layer: int) -> slice:
        start = self.num_layers + 2 * layer
        return slice(start, start + 2)

    def value_pair(self, layer: int) -> slice:
        start = 3 * self.num_layers + 2 * layer
        return slice(start, start + 2)

    def initial(self) -> list[float]:
        """Upstream's initial values: skips 1, residual pairs (1, 0), value pairs (0.5, 0.5); what a
        slot the source never trained (small's unused skips, layer 7's value pair) keeps."""
        L = self.num_layers
        return [1.0] * L + [*RESIDUAL_PAIR_INIT] * L + [*VALUE_PAIR_INIT] * L


RESIDUAL_PAIR_INIT = (1.0, 0.0)  # x = 1·x + 0·x0 before training
VALUE_PAIR_INIT = (0.5, 0.5)  # v = 0.5·v + 0.5·ve before training


def gptbatched_expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """GPTBatched's parameter names and shapes (the medium layout)."""
    d, hdim, L = cfg.model_dim, cfg.num_heads * cfg.head_dim, cfg.num_layers
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, d)}
    for i in range(3):
        shapes[f"value_embeds.{i}.weight"] = (cfg.vocab_size, d)
    for i in range(L):
        if i in cfg.attn_layers:
            shapes[f"blocks.{i}.attn.qkvo_w"] = (4, hdim, d)
        shapes[f"blocks.{i}.mlp.fc_w"] = (cfg.mlp_dim, d)
        shapes[f"blocks.{i}.mlp.proj_w"] = (d, cfg.mlp_dim)
    shapes["lm_head_w"] = (cfg.padded_vocab, d)
    shapes["scalars"] = (ScalarLayout(L).size,)
    return shapes


def small_expected_shapes(variant: str, num_layers: int, num_heads: int, model_dim: int,
                          mlp_dim: int, vocab_rows: int, padded_vocab: int,
                          scalars_len: int | None = None) -> dict[str, tuple[int, ...]]:
    """train_gpt_small.py's state-dict names and shapes (v1: separate scalars, v2: packed)."""
    d, hdim, L = model_dim, num_heads * HEAD_DIM, num_layers
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab_rows, d)}
    for i in range(3):
        shapes[f"value_embeds.{i}.weight"] = (vocab_rows, d)
    for i in range(L):
        if i != NO_ATTENTION_LAYER:
            shapes[f"blocks.{i}.attn.qkv_w"] = (3, hdim, d)
            shapes[f"blocks.{i}.attn.c_proj.weight"] = (d, hdim)
            if variant == "v1":
                shapes[f"blocks.{i}.attn.lambdas"] = (2,)
        shapes[f"blocks.{i}.mlp.c_fc.weight"] = (mlp_dim, d)
        shapes[f"blocks.{i}.mlp.c_proj.weight"] = (d, mlp_dim)
        if variant == "v1":
            shapes[f"blocks.{i}.lambdas"] = (2,)
    shapes["lm_head.weight"] = (padded_vocab, d)
    if variant == "v1":
        shapes["skip_weights"] = (L // 2,)
    else:
        shapes["scalars"] = (scalars_len if scalars_len is not None else ScalarLayout(L).size,)
    return shapes


def shape_differences(actual: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
    """Human-readable differences between two name->shape tables (empty when equal)."""
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    wrong = [f"{k} {list(actual[k])} (expected {list(expected[k])})"
             for k in expected if k in actual and tuple(actual[k]) != tuple(expected[k])]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    return problems
