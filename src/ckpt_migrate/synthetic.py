"""Checkpoints in the exact upstream layouts, with random weights, for tests, the demo and benchmarks.

Written out by hand from the upstream scripts (not from this package's own tables, so a
mistake there cannot hide here): train_gpt.py at 378c4e30 (small v1) and 345b2fb9 (small
v2), train_gpt_medium.py at 06743860 (medium). Like upstream, the file holds
``dict(step, code, model, optimizers)`` with every key under ``_orig_mod.`` (torch.compile),
embeddings in bf16 and the rest as each script keeps it. Weights are random and non-zero
(upstream zero-inits c_proj and the head; trained checkpoints are not zero).
"""

from __future__ import annotations

import os

import torch

TRAINING_CODE = """# train_gpt_{family}.py (synthetic stand-in for the training script text)
class Hyperparameters:
    num_iterations = {num_iterations} # number of iterations to run

def create_blockmasks(self, input_seq, sliding_window_num_blocks):
    docs = (input_seq == {eot_token}).cumsum(0)
"""


# Upstream-shaped training code per forward: the lines that decide the forward, spelled as the
# upstream script of each version spells them (written out here for the tests, not copied: only
# the deciding lines, in the places they take in upstream's classes). The reader
# (ckpt_migrate.forward_variant) is held to these, and the models to what each one computes.
# name -> (family, softcap line, attention-scale assignment or "", scale= argument, reverse the skips)
FORWARDS = {
    # train_gpt.py at 378c4e30 (2025-05-25), and 2025-02-17 .. 05-25: small v1
    "small_v1": ("small", "logits = 30 * torch.sigmoid(logits / (7.5 * x.size(-1)**0.5))", "", "0.12", False),
    # train_gpt.py at 345b2fb9 (2025-07-14): small v2 (packed scalars)
    "small_v2": ("small", "logits = 30 * torch.sigmoid(logits / (7.5 * x.size(-1)**0.5))",
                 "self.attn_scale = 0.12", "self.attn_scale", False),
    # train_gpt.py at 27b4138b .. 370211a0 (2025-02-01 .. 02-02): soft-cap / 7.5, skips taken in reverse
    "small_2025_02_01": ("small", "logits = 30 * torch.sigmoid(logits.float() / 7.5)", "self.attn_scale = 0.12",
                         "self.attn_scale", True),
    # train_gpt.py 2025-02-02 .. 02-09 (13156aa7 .. 7cfe441a): soft-cap / 7.5
    "small_2025_02_02": ("small", "logits = 30 * torch.sigmoid(logits.float() / 7.5)", "self.attn_scale = 0.12",
                         "self.attn_scale", False),
    # train_gpt.py at fd6f6af0 (2025-02-09): soft-cap / 7.5, attention scale 15 / head_dim
    "small_2025_02_09": ("small", "logits = 30 * torch.sigmoid(logits / 7.5)", "self.attn_scale = 15/head_dim",
                         "self.attn_scale", False),
    # train_gpt.py at 85a0a520 (2025-02-10): v1's soft-cap, attention scale 15 / head_dim
    "small_2025_02_10": ("small", "logits = 30 * torch.sigmoid(logits / (7.5 * x.size(-1)**0.5))", "",
                         "15/self.head_dim", False),
    # train_gpt_medium.py at 06743860 (2025-05-25)
    "medium": ("medium", "", "self.attn_scale = 0.12", "self.attn_scale", False),
}

_ROTARY = """class Rotary(nn.Module):
    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        angular_freq = (1 / 1024) ** torch.linspace(0, 1, steps=dim//4, dtype=torch.float32) # base 1024
        angular_freq = torch.cat([angular_freq, angular_freq.new_zeros(dim//4)])
        t = torch.arange(max_seq_len, dtype=torch.float32)
        theta = torch.einsum("i,j -> ij", t, angular_freq)
"""


def training_code(forward: str, num_iterations: int = 1000, eot_token: int = 50256) -> str:
    """The training-script text a checkpoint of ``forward`` (a key of :data:`FORWARDS`) carries."""
    family, softcap_line, scale_assign, scale_arg, reverse = FORWARDS[forward]
    packed = forward in ("small_v2", "medium")
    lam = "" if packed else "self."
    attn_input = "x" if family == "medium" else "norm(x)"
    if family == "medium":
        attn_call = "x = x + self.attn(x, ve, block_mask, sa_lambdas)"
    elif packed:
        attn_call = "x = x + self.attn(norm(x), ve, sa_lambdas, block_mask)"
    else:
        attn_call = f"x = x + self.attn({attn_input}, ve, block_mask)"
    long_layers = (0, 4, 11, 15) if family == "medium" else (0, 4, 7, 11)
    masks = ", ".join("long_bm" if i in long_layers else "short_bm" for i in range(16 if family == "medium" else 12))
    if family == "medium":
        skips = """        skip_connections = []
        skip_map = {
            9: 6,
            10: 4,
            11: 2,
        }
        skip_weights = self.scalars[:len(self.blocks)]
        lambdas = self.scalars[1 * len(self.blocks): 3 * len(self.blocks)].view(-1, 2)
        sa_lambdas = self.scalars[3 * len(self.blocks): 5 * len(self.blocks)].view(-1, 2)
        for i in range(len(self.blocks)):
            if i in skip_map:
                x = x + skip_weights[skip_map[i]] * skip_connections[skip_map[i]]
            x = self.blocks[i](x, ve[i], x0, block_masks[i], lambdas[i], sa_lambdas[i])
            skip_connections.append(x)
        x = norm(x)
        logits = F.linear(x.flatten(end_dim=1), self.lm_head_w.bfloat16()).float()
        loss = F.cross_entropy(15 * logits * torch.rsqrt(logits.square() + 225), target_seq)
"""
        schedule = """    factor = 4 * x ** 3 - 6 * x ** 2 + 3 * x # cubic
    window_size = next_multiple_of_n(3456 * factor, n=128)
"""
    else:
        weights = "skip_weights" if packed else "self.skip_weights"
        head = ("        skip_weights = self.scalars[:(len(self.blocks) // 2)]\n"
                "        lambdas = self.scalars[1 * len(self.blocks): 3 * len(self.blocks)].view(-1, 2)\n"
                "        sa_lambdas = self.scalars[3 * len(self.blocks): 5 * len(self.blocks)].view(-1, 2)\n"
                "        n = len(self.blocks) // 2\n") if packed else "        n = len(self.skip_weights)\n"
        call = ("x = self.blocks[i](x, ve[i], x0, lambdas[i], sa_lambdas[i], block_masks[i])" if packed
                else "x = self.blocks[i](x, ve[i], x0, block_masks[i])")
        reverse_lines = ("                if i == n:\n                    skip_connections.reverse()\n"
                         if reverse else "")
        skips = f"""        skip_connections = []
{head}        for i in range(len(self.blocks)):
            if i >= n:
{reverse_lines}                x = x + {weights}[i - n] * skip_connections.pop()
            {call}
            if i < n:
                skip_connections.append(x)
        x = norm(x)
        logits = self.lm_head(x)
        {softcap_line}
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), target_seq)
"""
        schedule = "    window_size = next_multiple_of_n(1728 * x, n=128)\n"
    return f"""# train_gpt_{family}.py: synthetic stand-in ({forward}), the forward's lines in upstream's spelling
class Hyperparameters:
    num_iterations = {num_iterations} # number of iterations to run

def norm(x: Tensor):
    return F.rms_norm(x, (x.size(-1),))

{_ROTARY}
class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, max_seq_len: int, head_dim=128):
        super().__init__()
        self.head_dim = head_dim
        {scale_assign}

    def forward(self, x: Tensor, ve: Tensor | None, block_mask: BlockMask, lambdas: Tensor):
        q, k = norm(q), norm(k) # QK norm
        q, k = self.rotary(q), self.rotary(k)
{"        v = norm(v)" + chr(10) if family == "medium" else ""}        if ve is not None:
            v = {lam if not packed else ""}lambdas[0] * v + {lam if not packed else ""}lambdas[1] * ve.view_as(v)
        else:
            v = {lam if not packed else ""}lambdas[0] * v
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale={scale_arg}).transpose(1, 2)

class MLP(nn.Module):
    def forward(self, x: Tensor):
        x = self.c_fc(x)
        x = F.relu(x).square() # relu squared
        return self.c_proj(x)

class Block(nn.Module):
    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, block_mask: BlockMask):
        x = {lam}lambdas[0] * x + {lam}lambdas[1] * x0
        if self.attn is not None:
            {attn_call}
        x = x + self.mlp(norm(x))
        return x

class GPT(nn.Module):
    def create_blockmasks(self, input_seq: Tensor, sliding_window_num_blocks: Tensor):
        docs = (input_seq == {eot_token}).cumsum(0)

        def build_bm(window_size_blocks: Tensor) -> BlockMask:
            return BlockMask.from_kv_blocks(...)
        return build_bm(sliding_window_num_blocks), build_bm(sliding_window_num_blocks // 2)

    def forward(self, input_seq: Tensor, target_seq: Tensor, sliding_window_num_blocks: Tensor):
        ve = [value_embed(input_seq) for value_embed in self.value_embeds]
        ve = [ve[0], ve[1], ve[2]] + [None] * (len(self.blocks) - 6) + [ve[0], ve[1], ve[2]]
        long_bm, short_bm = self.create_blockmasks(input_seq, sliding_window_num_blocks)
        block_masks = [{masks}]
        x = x0 = norm(self.embed(input_seq)[None])
{skips}        return loss

def get_window_size_blocks(step: int):
    x = step / args.num_iterations # progress in training
{schedule}    return get_window_size_blocks_helper(window_size)
"""


def _pad128(n: int) -> int:
    return -(-n // 128) * 128


def _w(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    std = 0.5 * shape[-1] ** -0.5 * scale
    return torch.randn(*shape, generator=gen) * std


def small_state_dict(variant: str = "v2", vocab: int = 1000, num_layers: int = 12, num_heads: int = 1,
                     model_dim: int = 128, seed: int = 0, world_size: int = 8) -> dict[str, torch.Tensor]:
    """train_gpt_small.py's ``model.state_dict()`` (without the _orig_mod. prefix)."""
    gen = torch.Generator().manual_seed(seed)
    d, hdim = model_dim, num_heads * 128
    rows = vocab if variant == "v1" else _pad128(vocab)  # v2 pads the embeddings too
    sd: dict[str, torch.Tensor] = {"embed.weight": torch.randn(rows, d, generator=gen).bfloat16()}
    for i in range(3):
        sd[f"value_embeds.{i}.weight"] = torch.randn(rows, d, generator=gen).bfloat16()
    for i in range(num_layers):
        if i != 7:
            sd[f"blocks.{i}.attn.qkv_w"] = _w(gen, 3, hdim, d)
            if variant == "v1":
                sd[f"blocks.{i}.attn.lambdas"] = torch.tensor([0.5, 0.5]) + 0.1 * torch.randn(2, generator=gen)
            sd[f"blocks.{i}.attn.c_proj.weight"] = _w(gen, d, hdim)
        sd[f"blocks.{i}.mlp.c_fc.weight"] = _w(gen, 4 * d, d)
        sd[f"blocks.{i}.mlp.c_proj.weight"] = _w(gen, d, 4 * d)
        if variant == "v1":
            sd[f"blocks.{i}.lambdas"] = torch.tensor([1.0, 0.0]) + 0.1 * torch.randn(2, generator=gen)
    sd["lm_head.weight"] = _w(gen, _pad128(vocab), d, scale=8.0)
    if variant == "v1":
        sd["skip_weights"] = 1.0 + 0.1 * torch.randn(num_layers // 2, generator=gen)
    else:
        L = num_layers
        pad = (-5 * L) % world_size
        sd["scalars"] = torch.cat([
            torch.ones(L), torch.tensor([1.0, 0.0]).repeat(L), torch.tensor([0.5, 0.5]).repeat(L),
            torch.ones(pad)]) + 0.1 * torch.randn(5 * L + pad, generator=gen)
    return sd


def medium_state_dict(vocab: int = 1000, num_layers: int = 16, num_heads: int = 1, model_dim: int = 128,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """train_gpt_medium.py's ``model.state_dict()`` (without the _orig_mod. prefix)."""
    gen = torch.Generator().manual_seed(seed)
    d, hdim = model_dim, num_heads * 128
    sd: dict[str, torch.Tensor] = {"embed.weight": torch.randn(vocab, d, generator=gen).bfloat16()}
    for i in range(3):
        sd[f"value_embeds.{i}.weight"] = torch.randn(vocab, d, generator=gen).bfloat16()
    for i in range(num_layers):
        if i != 7:
            sd[f"blocks.{i}.attn.qkvo_w"] = _w(gen, 4, hdim, d).bfloat16()
        sd[f"blocks.{i}.mlp.fc_w"] = _w(gen, 4 * d, d).bfloat16()
        sd[f"blocks.{i}.mlp.proj_w"] = _w(gen, d, 4 * d).bfloat16()
    sd["lm_head_w"] = _w(gen, _pad128(vocab), d, scale=8.0)
    L = num_layers
    sd["scalars"] = torch.cat([torch.ones(L), torch.tensor([1.0, 0.0]).repeat(L),
                               torch.tensor([0.5, 0.5]).repeat(L)]) + 0.1 * torch.randn(5 * L, generator=gen)
    return sd


def optimizer_states(state_dict: dict[str, torch.Tensor]) -> list[dict]:
    """Adam state for embeddings/head/scalars and Muon momentum for the matrices, as upstream saves."""
    names = list(state_dict)
    hidden = [i for i, n in enumerate(names) if n.startswith("blocks.") and state_dict[n].dim() >= 2]
    other = [i for i in range(len(names)) if i not in hidden]
    adam = {"state": {i: {"step": torch.tensor(1000.0),
                          "exp_avg": torch.zeros_like(state_dict[names[i]], dtype=torch.float32),
                          "exp_avg_sq": torch.zeros_like(state_dict[names[i]], dtype=torch.float32)}
                      for i in other},
            "param_groups": [{"lr": 0.008, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0,
                              "initial_lr": 0.008, "params": other}]}
    muon = {"state": {i: {"momentum_buffer": torch.zeros_like(state_dict[names[i]], dtype=torch.float32)}
                      for i in hidden},
            "param_groups": [{"lr": 0.05, "momentum": 0.95, "initial_lr": 0.05, "params": hidden}]}
    return [adam, muon]


def upstream_checkpoint(state_dict: dict[str, torch.Tensor], family: str, step: int = 1000,
                        num_iterations: int = 1000, optimizers: bool = True, eot_token: int = 50256,
                        forward: str | None = None) -> dict:
    """``dict(step, code, model, optimizers)`` with the torch.compile ``_orig_mod.`` prefix.

    ``code`` is a stand-in without model lines, or, with ``forward`` (a key of :data:`FORWARDS`),
    the lines of that upstream version that decide the forward (:func:`training_code`)."""
    code = (training_code(forward, num_iterations, eot_token) if forward else
            TRAINING_CODE.format(family=family, num_iterations=num_iterations, eot_token=eot_token))
    return {
        "step": step,
        "code": code,
        "model": {f"_orig_mod.{k}": v for k, v in state_dict.items()},
        "optimizers": optimizer_states(state_dict) if optimizers else [],
    }


def save(obj, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path)
    return path


def documents(vocab: int, count: int, eot_token: int, seed: int = 0) -> torch.Tensor:
    """``count`` random token ids in documents of 20 to 600 tokens, each starting with ``eot_token``."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (count,), generator=gen)
    tokens[tokens == eot_token] = (eot_token + 1) % vocab
    position = 0
    while position < count:
        tokens[position] = eot_token
        position += int(torch.randint(20, 600, (1,), generator=gen))
    return tokens


def write_token_shard(path: str, tokens) -> str:
    """``tokens`` as a modded-nanogpt ``.bin`` shard: 256 int32 of header (magic, version, count), uint16 ids."""
    import numpy as np

    from .validation import HEADER_INT32, SHARD_MAGIC, SHARD_VERSION

    header = np.zeros(HEADER_INT32, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())
    return path


# The built-in demo tree: (relative path, family, variant, step); one of each kind of file.
DEMO_TREE = [
    ("eng_spa_owt_run_1/best_state_1000.pt", "small", "v2", 1000),
    ("eng_spa_owt_run_2/best_state_800.pt", "small", "v1", 800),
    ("hin_urd_owt_run_1/best_state_1000.pt", "medium", "", 1000),
    ("rus_pol_owt_run_1/best_state_600.pt", "small", "v2", 600),
    ("tam_mal_owt_run_1/best_state_1000.pt", "medium", "", 1000),
]


DEMO_EOT_TOKEN = 1  # the demo's document separator, inside its 1,000-token vocabulary
DEMO_HELD_OUT = ("eng_spa", "hin_urd")  # language pairs the demo has held-out tokens for


def make_demo_tree(root: str, vocab: int = 1000, model_dim: int = 128, with_bad_files: bool = True) -> list[str]:
    """Write a small ``clean_bbpe_50k``-style tree under ``root``, and a held-out token shard per
    pair of :data:`DEMO_HELD_OUT` beside it (``<root>/../held_out/<lang>_val_000000.bin``);
    returns the checkpoint paths written."""
    paths = []
    for seed, (rel, family, variant, step) in enumerate(DEMO_TREE):
        if family == "small":
            sd = small_state_dict(variant, vocab=vocab, model_dim=model_dim, num_heads=model_dim // 128, seed=seed)
        else:
            sd = medium_state_dict(vocab=vocab, model_dim=model_dim, num_heads=model_dim // 128, seed=seed)
        paths.append(save(upstream_checkpoint(sd, family, step=step, num_iterations=1000, eot_token=DEMO_EOT_TOKEN),
                          os.path.join(root, rel)))
    for seed, lang in enumerate(DEMO_HELD_OUT):
        write_token_shard(os.path.join(os.path.dirname(os.path.abspath(root)), "held_out", f"{lang}_val_000000.bin"),
                          documents(vocab, 8193, DEMO_EOT_TOKEN, seed))
    if with_bad_files:
        # A file cut off mid-write, as a run still saving would leave it.
        whole = open(paths[0], "rb").read()
        truncated = os.path.join(root, "rus_pol_owt_run_2", "best_state_200.pt")
        os.makedirs(os.path.dirname(truncated), exist_ok=True)
        with open(truncated, "wb") as f:
            f.write(whole[: len(whole) // 3])
        paths.append(truncated)
    return paths
