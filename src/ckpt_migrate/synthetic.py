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
                        num_iterations: int = 1000, optimizers: bool = True, eot_token: int = 50256) -> dict:
    """``dict(step, code, model, optimizers)`` with the torch.compile ``_orig_mod.`` prefix."""
    return {
        "step": step,
        "code": TRAINING_CODE.format(family=family, num_iterations=num_iterations, eot_token=eot_token),
        "model": {f"_orig_mod.{k}": v for k, v in state_dict.items()},
        "optimizers": optimizer_states(state_dict) if optimizers else [],
    }


def save(obj, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path)
    return path


# The built-in demo tree: (relative path, family, variant, step); one of each kind of file.
DEMO_TREE = [
    ("eng_spa_owt_run_1/best_state_1000.pt", "small", "v2", 1000),
    ("eng_spa_owt_run_2/best_state_800.pt", "small", "v1", 800),
    ("hin_urd_owt_run_1/best_state_1000.pt", "medium", "", 1000),
    ("rus_pol_owt_run_1/best_state_600.pt", "small", "v2", 600),
    ("tam_mal_owt_run_1/best_state_1000.pt", "medium", "", 1000),
]


def make_demo_tree(root: str, vocab: int = 1000, model_dim: int = 128, with_bad_files: bool = True) -> list[str]:
    """Write a small ``clean_bbpe_50k``-style tree under ``root``; returns the paths written."""
    paths = []
    for seed, (rel, family, variant, step) in enumerate(DEMO_TREE):
        if family == "small":
            sd = small_state_dict(variant, vocab=vocab, model_dim=model_dim, num_heads=model_dim // 128, seed=seed)
        else:
            sd = medium_state_dict(vocab=vocab, model_dim=model_dim, num_heads=model_dim // 128, seed=seed)
        paths.append(save(upstream_checkpoint(sd, family, step=step, num_iterations=1000), os.path.join(root, rel)))
    if with_bad_files:
        # A file cut off mid-write, as a run still saving would leave it.
        whole = open(paths[0], "rb").read()
        truncated = os.path.join(root, "rus_pol_owt_run_2", "best_state_200.pt")
        os.makedirs(os.path.dirname(truncated), exist_ok=True)
        with open(truncated, "wb") as f:
            f.write(whole[: len(whole) // 3])
        paths.append(truncated)
    return paths
