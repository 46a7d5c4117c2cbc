"""Format detection: the three upstream layouts, their wrappers, and what must come out unknown."""

from __future__ import annotations

import pytest
import torch

from ckpt_migrate import synthetic
from ckpt_migrate.detect import detect

from .conftest import VOCAB, write


def test_small_v2_fields(small_v2_path):
    r = detect(small_v2_path)
    assert (r["format"], r["variant"], r["status"]) == ("small", "v2", "to_convert")
    assert r["num_layers"] == 12 and r["num_heads"] == 1 and r["head_dim"] == 128
    assert r["model_dim"] == 128 and r["mlp_dim"] == 512
    assert r["vocab_size"] == 1024 and r["padded_vocab"] == 1024  # v2 pads the embeddings
    assert r["layers_without_attention"] == [7] and r["num_value_embeds"] == 3
    assert r["step"] == 100 and r["num_iterations"] == 1000 and r["has_optimizer_state"] is True
    assert r["dtypes"] == {"bfloat16": 4, "float32": 48}  # 22 attention, 24 MLP, head, scalars
    assert r["tensors"]["scalars"] == {"shape": [64], "dtype": "float32"}  # 5L + pad to world size 8
    # 1728 * 0.1 -> 256 tokens -> 2 blocks, as upstream's schedule gives at step 100 of 1000
    assert r["long_window_blocks"] == 2 and "step 100 of 1000" in r["window_source"]
    expected_params = sum(t.numel() for t in synthetic.small_state_dict("v2", vocab=VOCAB).values())
    assert r["params"] == expected_params


def test_small_v1_fields(small_v1_path):
    r = detect(small_v1_path)
    assert (r["format"], r["variant"]) == ("small", "v1")
    assert r["vocab_size"] == VOCAB and r["padded_vocab"] == 1024
    assert r["tensors"]["skip_weights"]["shape"] == [6]


def test_medium_fields_and_direct_load(medium_path):
    r = detect(medium_path)
    assert (r["format"], r["status"]) == ("medium", "not_needed")
    assert r["num_layers"] == 16 and r["vocab_size"] == VOCAB and r["padded_vocab"] == 1024
    assert r["direct_load"] == {"ok": True, "problems": []}
    assert r["tensors"]["lm_head_w"]["dtype"] == "float32"
    assert r["tensors"]["blocks.0.attn.qkvo_w"] == {"shape": [4, 128, 128], "dtype": "bfloat16"}
    # medium: 3456 * (4x^3 - 6x^2 + 3x) at x = 0.1 -> 884.7 -> 896 tokens -> 7 blocks
    assert r["long_window_blocks"] == 7


@pytest.mark.parametrize("wrapper", ["bare", "state_dict", "model_state_dict", "module"])
def test_wrappers_and_prefixes(tmp_path, wrapper):
    sd = synthetic.small_state_dict("v2", vocab=VOCAB)
    if wrapper == "bare":
        obj = sd
    elif wrapper == "module":
        obj = {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}
    else:
        obj = {wrapper: sd}
    r = detect(write(tmp_path, "best_state_1234.pt", obj))
    assert (r["format"], r["variant"]) == ("small", "v2")
    assert r["step"] == 1234  # from the file name when the checkpoint has none
    assert r["has_optimizer_state"] is False
    assert r["long_window_blocks"] == 14 and "family default" in r["window_source"]


def _later_upstream_layout() -> dict:
    """9d9dc969-style: qkvo_w beside raw mlp.c_fc/c_proj stored [D, 4D], plus attn_gate."""
    sd = {}
    for k, v in synthetic.medium_state_dict(vocab=VOCAB).items():
        if k.endswith("mlp.fc_w"):
            sd[k.replace("mlp.fc_w", "mlp.c_fc")] = v.T.contiguous()
        elif k.endswith("mlp.proj_w"):
            sd[k.replace("mlp.proj_w", "mlp.c_proj")] = v.contiguous()
        else:
            sd[k] = v
        if k.endswith("attn.qkvo_w"):
            sd[k.replace("qkvo_w", "attn_gate.weight")] = torch.zeros(1, 12)
    return sd


def test_later_upstream_layout_is_unknown(tmp_path):
    r = detect(write(tmp_path, "later.pt", {"model": _later_upstream_layout()}))
    assert r["format"] == "unknown" and r["status"] == "unknown"
    assert "blocks.0.mlp.fc_w" in r["reason"] and "blocks.0.mlp.c_fc" in r["reason"]


def test_hdim_not_model_dim_is_small_but_not_convertible(tmp_path):
    sd = synthetic.small_state_dict("v2", vocab=VOCAB, num_heads=2, model_dim=128)
    r = detect(write(tmp_path, "wide.pt", {"model": sd}))
    assert r["format"] == "small" and r["convertible"] is False and r["status"] == "failed"
    assert "hdim 256 != model_dim 128" in r["reason"]


@pytest.mark.parametrize("damage,named", [
    ("missing_block", "blocks.3.mlp.c_fc.weight"),
    ("extra_key", "blocks.2.attn.extra"),
    ("wrong_shape", "blocks.5.mlp.c_proj.weight"),
    ("attention_in_layer_7", "blocks.7.attn.qkv_w"),
])
def test_damaged_state_dicts_are_unknown_naming_the_key(tmp_path, damage, named):
    sd = synthetic.small_state_dict("v2", vocab=VOCAB)
    if damage == "missing_block":
        del sd["blocks.3.mlp.c_fc.weight"]
    elif damage == "extra_key":
        sd["blocks.2.attn.extra"] = torch.zeros(3)
    elif damage == "wrong_shape":
        sd["blocks.5.mlp.c_proj.weight"] = torch.zeros(128, 256)
    else:
        sd["blocks.7.attn.qkv_w"] = torch.zeros(3, 128, 128)
        sd["blocks.7.attn.c_proj.weight"] = torch.zeros(128, 128)
    r = detect(write(tmp_path, f"{damage}.pt", {"model": sd}))
    assert r["format"] == "unknown", r
    assert named in r["reason"] and "\n" not in r["reason"]


def test_unexpected_wrapper_key_is_unknown(tmp_path):
    r = detect(write(tmp_path, "weird.pt", {"weights": synthetic.small_state_dict("v2", vocab=VOCAB)}))
    assert r["format"] == "unknown" and "no model state dict" in r["reason"] and "weights" in r["reason"]


def _conforms(value, annotation) -> bool:
    """Whether a manifest value has the type ManifestRecord declares (int counts as a float)."""
    import types
    import typing

    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_conforms(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def test_every_manifest_key_is_declared_with_its_type(small_v1_path, small_v2_path, medium_path, tmp_path):
    """ManifestRecord is the one list of what a manifest holds: every key that detection writes,
    for every kind of file, is declared there with the type it has."""
    import typing

    from ckpt_migrate.check import CheckSettings
    from ckpt_migrate.one_file import convert_file
    from ckpt_migrate.detect import ManifestRecord
    from ckpt_migrate.pipeline import read_yaml, write_manifest

    converted = str(tmp_path / "converted.pt")
    assert convert_file(small_v2_path, converted, CheckSettings(length=64, device="cpu"))["status"] == "converted"
    files = {"small v1": small_v1_path, "small v2": small_v2_path, "medium": medium_path, "converted": converted,
             "unknown": write(tmp_path, "unknown.pt", {"x": 1})}
    (tmp_path / "empty.pt").write_bytes(b"")
    files["empty"] = str(tmp_path / "empty.pt")
    (tmp_path / "unsafe.pt").write_bytes(b"\x80\x04cos\nsystem\n(S'true'\ntR.")
    files["unsafe"] = str(tmp_path / "unsafe.pt")
    declared = typing.get_type_hints(ManifestRecord)
    formats = set()
    for name, path in files.items():
        record = write_manifest(path, name, str(tmp_path / f"{name}.yaml"))
        assert read_yaml(str(tmp_path / f"{name}.yaml")) == record
        formats.add(record["format"])
        for key, value in record.items():
            assert key in declared, f"{name}: {key} is not declared in ManifestRecord"
            assert _conforms(value, declared[key]), f"{name}: {key}={value!r} is not {declared[key]}"
    assert formats == {"small", "medium", "gptbatched", "unreadable", "unknown", "unsafe"}


def test_two_different_state_dicts_are_ambiguous(tmp_path):
    one = synthetic.small_state_dict("v2", vocab=VOCAB, seed=1)
    two = synthetic.small_state_dict("v2", vocab=VOCAB, seed=2)
    two["blocks.0.mlp.c_fc.weight"] = two["blocks.0.mlp.c_fc.weight"][:, :64].contiguous()  # another shape
    r = detect(write(tmp_path, "a.pt", {"model": one, "state_dict": two, "step": 1}))
    assert r["status"] == "unknown" and "'model' and 'state_dict'" in r["reason"] and "ambiguous" in r["reason"]
    # The same tensors under both keys (torch.save stores them once) are one state dict.
    r = detect(write(tmp_path, "b.pt", {"model": one, "state_dict": one, "step": 1}))
    assert r["status"] == "to_convert", r["reason"]


def test_an_empty_embedding_is_a_detection_verdict(tmp_path):
    sd = synthetic.small_state_dict("v2", vocab=VOCAB)
    sd["embed.weight"] = sd["embed.weight"][:0]
    r = detect(write(tmp_path, "e.pt", {"model": sd}))
    assert r["status"] == "unknown" and "empty embedding" in r["reason"], r["reason"]
