"""Conversion small -> GPTBatched: mapping, refusals, logit parity, atomic output, loader API."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess

import pytest
import torch

from ckpt_migrate import load_pretrained_checkpoint, synthetic
from ckpt_migrate.check import CheckSettings
from ckpt_migrate.key_mapping import ConversionError, UnmappedKeyError, convert_state_dict
from ckpt_migrate.families import GPTConfig
from ckpt_migrate.one_file import build_model, check_file, convert_file, load_source, reference_model
from ckpt_migrate.models import GPTBatched
from ckpt_migrate.check import logit_check

from .builders import Call
from .conftest import VOCAB, write

DOCUMENT_FIELDS = ("check_separators", "check_documents")

# 512 tokens = 4 blocks: beyond the step-100 windows (2 long, 1 short), so the windows bite.
SETTINGS = CheckSettings(batch=2, length=512, seed=7)


def _converted(path):
    record, _, small = load_source(path)
    cfg = GPTConfig.from_record(record)
    return record, small, cfg, convert_state_dict(small, cfg)


def test_mapping_v2(small_v2_path):
    _, small, cfg, out = _converted(small_v2_path)
    assert torch.equal(out["blocks.0.attn.qkvo_w"][:3], small["blocks.0.attn.qkv_w"])
    assert torch.equal(out["blocks.0.attn.qkvo_w"][3], small["blocks.0.attn.c_proj.weight"])
    assert torch.equal(out["blocks.4.mlp.fc_w"], small["blocks.4.mlp.c_fc.weight"])
    assert torch.equal(out["blocks.4.mlp.proj_w"], small["blocks.4.mlp.c_proj.weight"])
    assert torch.equal(out["lm_head_w"], small["lm_head.weight"])
    assert torch.equal(out["scalars"], small["scalars"][:60])  # world-size padding dropped
    assert "blocks.7.attn.qkvo_w" not in out
    # dtypes kept: bf16 embeddings, fp32 linears (no silent downcast to medium's bf16)
    assert out["embed.weight"].dtype == torch.bfloat16 and out["blocks.0.attn.qkvo_w"].dtype == torch.float32


def test_mapping_v1_packs_scalars(small_v1_path):
    _, small, cfg, out = _converted(small_v1_path)
    L, s = 12, out["scalars"]
    assert s.shape == (60,)
    assert torch.equal(s[:6], small["skip_weights"]) and torch.equal(s[6:12], torch.ones(6))
    assert torch.equal(s[L + 2 * 3: L + 2 * 3 + 2], small["blocks.3.lambdas"])
    assert torch.equal(s[3 * L + 2 * 9: 3 * L + 2 * 9 + 2], small["blocks.9.attn.lambdas"])
    assert torch.equal(s[3 * L + 14: 3 * L + 16], torch.tensor([0.5, 0.5]))  # layer 7: unused default


def test_built_tensors_are_made_on_the_device_asked_for(small_v2_path):
    """qkvo_w and scalars are built where the check runs (on a GPU host: not in host memory);
    tensors copied whole stay the source's own."""
    record, small = _converted(small_v2_path)[:2]
    out = convert_state_dict(small, GPTConfig.from_record(record), device="meta")
    assert {k for k, v in out.items() if v.device.type == "meta"} == (
        {"scalars"} | {k for k in out if k.endswith("qkvo_w")})
    assert out["lm_head_w"] is small["lm_head.weight"]


@pytest.mark.parametrize("device, reason", [
    ("gpu", "check device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("cuda:64", "check device 'cuda:64': this process sees"),
])
def test_a_device_that_is_not_there_is_a_failed_record(small_v2_path, tmp_path, python, device, reason):
    dst = tmp_path / "out.pt"
    result = convert_file(small_v2_path, str(dst), dataclasses.replace(SETTINGS, device=device))
    assert result["status"] == "failed" and result["reason"].startswith(reason)
    assert os.listdir(tmp_path) == []
    out = subprocess.run([python, "-m", "ckpt_migrate.cli", "check", small_v2_path, "--device", device],
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.startswith(f"error: {reason}") and "Traceback" not in out.stderr


def test_unmapped_key_raises_with_its_name(small_v2_path):
    _, small, cfg, _ = _converted(small_v2_path)
    with pytest.raises(UnmappedKeyError, match="blocks.1.attn.rotary.cos"):
        convert_state_dict({**small, "blocks.1.attn.rotary.cos": torch.zeros(4)}, cfg)


def test_wrong_shape_raises_before_copy(small_v2_path):
    _, small, cfg, _ = _converted(small_v2_path)
    bad = {**small, "blocks.2.attn.c_proj.weight": torch.zeros(128, 64)}
    with pytest.raises(ConversionError, match=r"blocks.2.attn.c_proj.weight: shape \[128, 64\]"):
        convert_state_dict(bad, cfg)


def test_hdim_not_model_dim_is_refused(tmp_path):
    sd = synthetic.small_state_dict("v2", vocab=VOCAB, num_heads=2, model_dim=128)
    path = write(tmp_path, "wide.pt", {"model": sd})
    result = convert_file(path, str(tmp_path / "out.pt"), SETTINGS)
    assert result["status"] == "failed" and "hdim 256 != model_dim 128" in result["reason"]
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("fixture", ["small_v1_path", "small_v2_path"])
def test_convert_file_parity_and_output(request, tmp_path, fixture):
    src = request.getfixturevalue(fixture)
    before = os.stat(src)
    dst = tmp_path / "converted" / "best_state_100.pt"
    result = convert_file(src, str(dst), SETTINGS)
    assert result["status"] == "converted", result.get("reason")
    assert result["check_passed"] and result["max_abs_logit_diff"] < 1e-4  # fp32 noise
    assert result["top1_agreement"] == 1.0 and result["kl"] < 1e-6
    assert abs(result["loss_ref"] - result["loss_converted"]) < 1e-5
    out = torch.load(dst, weights_only=True)
    assert out["format"] == "gptbatched" and out["step"] == 100
    assert out["source"]["path"] == os.path.abspath(src) and out["source"]["variant"] == fixture[6:8]
    assert out["config"]["family"] == "small" and out["config"]["long_window_blocks"] == 2
    assert "optimizers" not in out and out["optimizer_state"].startswith("not carried")
    assert result["sha256"] and not [p for p in os.listdir(dst.parent) if ".tmp-" in p]
    after = os.stat(src)
    assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)


def test_negative_control_wrong_mapping_fails_the_check(small_v2_path):
    record, small, cfg, out = _converted(small_v2_path)
    swapped = dict(out)
    for i in cfg.attn_layers:  # stack c_proj transposed: shape-correct (hdim == D), semantically wrong
        w = out[f"blocks.{i}.attn.qkvo_w"].clone()
        w[3] = w[3].T.clone()
        swapped[f"blocks.{i}.attn.qkvo_w"] = w
    result = logit_check(reference_model(record, small), build_model(GPTBatched, cfg, swapped), cfg.vocab_size, SETTINGS)
    assert not result["check_passed"] and result["max_abs_logit_diff"] > 1e-2
    from ckpt_migrate.metrics import CHECK_FIELDS

    # What the report shows; no separator counts where the file's separator is outside its vocabulary.
    assert all(isinstance(result[key], (int, float, str)) for key in CHECK_FIELDS if key not in DOCUMENT_FIELDS)
    assert all(result[key] is None for key in DOCUMENT_FIELDS) and cfg.eot_token >= VOCAB


def test_nan_weights_fail_the_conversion_and_publish_nothing(tmp_path):
    sd = synthetic.small_state_dict("v2", vocab=VOCAB)
    sd["blocks.3.mlp.c_fc.weight"][0, 0] = float("nan")
    src = write(tmp_path, "nan.pt", synthetic.upstream_checkpoint(sd, "small"))
    result = convert_file(src, str(tmp_path / "out.pt"), SETTINGS)
    assert result["status"] == "failed"
    assert result["reason"] == "non-finite values in blocks.3.mlp.c_fc.weight (1 NaN, 0 Inf)"
    assert os.listdir(tmp_path) == ["nan.pt"]


def _rows_the_check_never_reads(vocab_size: int, settings: CheckSettings) -> list[int]:
    from ckpt_migrate.check import random_tokens

    used = set(random_tokens(vocab_size, settings.batch, settings.length, settings.seed).flatten().tolist())
    return [row for row in range(vocab_size) if row not in used]


@pytest.mark.parametrize("key, value, counts", [
    ("embed.weight", float("nan"), "(1 NaN, 0 Inf)"),  # in a row no token of the check reaches
    ("lm_head.weight", float("inf"), "(0 NaN, 1 Inf)"),  # the soft-cap turns its logits finite
])
def test_non_finite_weights_the_logit_check_cannot_see_fail_the_conversion(tmp_path, monkeypatch, key, value, counts):
    from ckpt_migrate import one_file as conversion
    from ckpt_migrate.key_mapping import NonFiniteWeightsError

    from .builders import poisoned_small_checkpoint

    settings = CheckSettings(length=64, device="cpu")
    rows = -(-VOCAB // 128) * 128  # v2 pads its embeddings to 128: detection's vocab_size, the check's token range
    unread = _rows_the_check_never_reads(rows, settings)
    index = (unread[len(unread) // 2], 5) if key == "embed.weight" else (5, 0)
    src = poisoned_small_checkpoint(tmp_path / "src" / "best_state_100.pt", key, index, value)
    dst = tmp_path / "out" / "converted.pt"

    # The logit check alone certifies both files (what happened before every weight was tested).
    with monkeypatch.context() as m:
        m.setattr(conversion, "check_finite", lambda state_dict, where="": None)
        blind = convert_file(src, str(tmp_path / "blind.pt"), settings)
    assert blind["status"] == "converted" and blind["check_passed"] and blind["all_finite"], blind.get("reason")

    result = convert_file(src, str(dst), settings)
    assert result["status"] == "failed" and result["reason"] == f"non-finite values in {key} {counts}"
    assert "check_passed" not in result and not dst.parent.exists()  # refused before any forward or write
    with pytest.raises(NonFiniteWeightsError, match=re.escape(f"{src}: non-finite values in {key} {counts}")):
        check_file(src, settings)


def test_every_element_of_every_float_tensor_is_tested(monkeypatch):
    """In chunks (here of 7 elements), through strided views, in float8 (no isfinite kernel), 0-d
    tensors too; integer tensors cannot hold a NaN. The first tensor is named with its counts."""
    from ckpt_migrate import key_mapping as convert
    from ckpt_migrate.key_mapping import NonFiniteWeightsError, check_finite

    monkeypatch.setattr(convert, "FINITE_CHUNK_ELEMENTS", 7)
    strided = torch.zeros(40, 30).T
    strided[3, 5], strided[29, 39], strided[0, 0] = float("nan"), float("inf"), float("-inf")
    f8 = torch.zeros(10, dtype=torch.float8_e4m3fn)
    f8[9] = float("nan")
    clean = {"ids": torch.arange(100), "ok": torch.ones(50, dtype=torch.bfloat16), "big": torch.randn(1000),
             "empty": torch.zeros(0, 4), "c": torch.ones(3, dtype=torch.complex64), "f8": torch.ones(10).to(f8.dtype)}
    check_finite(clean)
    bad = {**clean, "w": strided, "f8": f8, "x": torch.tensor(float("nan")), "y": torch.full((3,), float("inf")),
           "c": torch.tensor([complex(1, float("inf"))]), "z": torch.tensor([float("nan")], dtype=torch.float16)}
    with pytest.raises(NonFiniteWeightsError) as exc:
        check_finite(bad, "f.pt: ")
    assert str(exc.value) == "f.pt: non-finite values in c (0 NaN, 1 Inf); also in f8, w, x and 2 more"
    for key, counts in (("w", (1, 2)), ("f8", (1, 0)), ("x", (1, 0)), ("y", (0, 3)), ("z", (1, 0))):
        assert convert.non_finite_counts(bad[key]) == counts, key


def test_failed_write_leaves_nothing_at_the_final_path(small_v2_path, tmp_path, monkeypatch):
    import ckpt_migrate.one_file as conversion

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conversion.torch, "save", broken_save)
    result = convert_file(small_v2_path, str(tmp_path / "out.pt"), SETTINGS)
    assert result["status"] == "failed" and "No space left on device; nothing written" in result["reason"]
    assert os.listdir(tmp_path) == []


def test_medium_reference_and_gptbatched_agree(medium_path):
    result = check_file(medium_path, SETTINGS)
    assert result["check_passed"] and result["max_abs_logit_diff"] < 1e-4


def test_a_conversion_and_check_leave_torch_compile_machinery_unloaded(small_v2_path, medium_path, tmp_path, python):
    """The reference forward writes its attention out instead of running eager flex, which loads
    dynamo and inductor: ~0.45x a full-size file's weights in host memory on a GPU host
    (benchmarks/RESULTS.md). A conversion of a small file and a check of a medium one load neither."""
    code = ("import sys; from ckpt_migrate.one_file import convert_file, check_file; "
            "from ckpt_migrate.check import CheckSettings; s = CheckSettings(length=256); "
            f"print(convert_file({small_v2_path!r}, {str(tmp_path / 'c.pt')!r}, s)['status'], "
            f"check_file({medium_path!r}, s)['check_passed'], "
            "sorted(m for m in ('torch._dynamo', 'torch._inductor', 'triton') if m in sys.modules))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "converted True []", out.stderr


def test_bf16_check_follows_training_dtype_flow(small_v2_path):
    result = check_file(small_v2_path, CheckSettings(batch=1, length=256, dtype="bfloat16"))
    assert result["check_passed"] and result["check_dtype"] == "bfloat16"
    assert 0 < result["max_abs_logit_diff"] < 0.5 and result["top1_agreement"] > 0.9


def test_loader_api_on_small_medium_and_converted(small_v2_path, medium_path, tmp_path):
    dst = str(tmp_path / "conv.pt")
    assert convert_file(small_v2_path, dst, SETTINGS)["status"] == "converted"
    ids = torch.randint(0, VOCAB, (2, 256), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for name, path in (("small", small_v2_path), ("converted", dst), ("medium", medium_path)):
        model, info, checkpoint = load_pretrained_checkpoint(path, device="cpu", dtype=torch.float32)
        assert isinstance(model, GPTBatched) and isinstance(checkpoint, dict)
        assert info["format"] == ("medium" if name == "medium" else "small")
        with torch.no_grad():
            outputs[name] = model(ids)
        assert outputs[name].dtype == torch.float32 and outputs[name].shape == (2, 256, 1024)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(outputs["small"], outputs["converted"])
    model, _, _ = load_pretrained_checkpoint(medium_path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(ids).dtype == torch.float32


def test_loader_refuses_unsafe_files(tmp_path):
    marker = tmp_path / "PWNED"

    path = write(tmp_path, "evil.pt", {"model": {"embed.weight": torch.zeros(1)}, "p": Call(os.system, f"touch {marker}")})
    with pytest.raises(ValueError, match="unsafe.*os.system|unsafe.*posix.system"):
        load_pretrained_checkpoint(path)
    assert not marker.exists()


def test_cli_inspect_convert_check(small_v2_path, medium_path, tmp_path, python):
    def cli(*args):
        return subprocess.run([python, "-m", "ckpt_migrate.cli", *args], capture_output=True, text=True)

    out = cli("inspect", small_v2_path)
    assert out.returncode == 0 and out.stdout.splitlines()[0] == "Format: small (from train_gpt_small.py)"
    out = cli("inspect", medium_path)
    assert out.stdout.splitlines()[0] == "Format: medium (from train_gpt_medium.py)"
    out = cli("inspect", "--json", medium_path)
    assert '"format": "medium"' in out.stdout
    dst = str(tmp_path / "c.pt")
    out = cli("convert", small_v2_path, dst, "--length", "256")
    assert out.returncode == 0 and "converted" in out.stdout and os.path.exists(dst)
    out = cli("check", dst, "--length", "256")
    # A converted file is never checked against a path read from inside it without being asked.
    assert out.returncode == 1 and "pass the source file" in out.stderr and "Traceback" not in out.stderr
    out = cli("check", dst, "--source", small_v2_path, "--length", "256")
    assert out.returncode == 0 and "check passed" in out.stdout
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    out = cli("inspect", str(bad))
    assert out.returncode == 1 and "Format: unreadable" in out.stdout and "empty file" in out.stdout
    out = cli("check", str(bad))
    assert out.returncode == 1 and "Traceback" not in out.stderr and "empty file" in out.stderr


def test_cli_check_defaults_are_the_pipelines(python):
    """One definition of the check settings: the CLI's defaults are CheckSettings', and the schema's match."""
    import yaml

    from ckpt_migrate.check import CheckSettings
    from .pipeline_helpers import REPO

    out = subprocess.run([python, "-m", "ckpt_migrate.cli", "check", "--help"], capture_output=True, text=True)
    assert "(default: 2048)" in " ".join(out.stdout.split()) and CheckSettings().length == 2048
    with open(os.path.join(REPO, "workflow/schemas/config.schema.yaml")) as f:
        schema = yaml.safe_load(f)["properties"]["check"]["properties"]
    assert sorted(schema) == sorted(f.name for f in dataclasses.fields(CheckSettings))
    for field in schema:
        assert schema[field]["default"] == getattr(CheckSettings(), field), field


def test_convert_never_writes_over_its_source(small_v2_path, tmp_path):
    """``ckpt-migrate convert X X`` (or through a link, or onto a hard link of X) would publish
    the converted file over the checkpoint: refused before any work, the source byte-identical."""
    import hashlib

    src = str(tmp_path / "best_state_100.pt")
    with open(small_v2_path, "rb") as f, open(src, "wb") as g:
        g.write(f.read())
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
    os.symlink(src, tmp_path / "link.pt")
    os.link(src, tmp_path / "hard.pt")
    for dst in (src, str(tmp_path / "link.pt"), str(tmp_path / "hard.pt")):
        result = convert_file(src, dst, CheckSettings(length=64, device="cpu"))
        assert result["status"] == "failed" and "is the source file itself" in result["reason"], result
    assert hashlib.sha256(open(src, "rb").read()).hexdigest() == digest
    (tmp_path / "folder").mkdir()
    result = convert_file(src, str(tmp_path / "folder"), CheckSettings(length=64, device="cpu"))
    assert result["status"] == "failed" and "is a folder" in result["reason"]
    assert sorted(os.listdir(tmp_path)) == ["best_state_100.pt", "folder", "hard.pt", "link.pt"]


def test_a_refused_rename_is_a_failed_record_with_nothing_left(small_v2_path, tmp_path, monkeypatch):
    from ckpt_migrate import atomic

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.PendingFile, "commit", refuse)
    result = convert_file(small_v2_path, str(tmp_path / "out.pt"), CheckSettings(length=64, device="cpu"))
    assert result["status"] == "failed" and result["reason"].startswith(f"cannot write {tmp_path / 'out.pt'}: Permission denied")
    assert os.listdir(tmp_path) == []
    # A destination whose folder cannot be written (/proc takes no new files, even from root).
    result = convert_file(small_v2_path, "/proc/out.pt", CheckSettings(length=64, device="cpu"))
    assert result["status"] == "failed" and result["reason"].startswith("cannot write /proc/out.pt: ")


def test_verify_outputs_on_a_folder_that_is_no_run_says_so(python, tmp_path):
    """A mistyped output_root (or the input tree) must not "verify" with nothing to find."""
    for folder in (tmp_path / "nonexistent", tmp_path):
        out = subprocess.run([python, "-m", "ckpt_migrate.cli", "verify-outputs", str(folder)],
                             capture_output=True, text=True)
        assert out.returncode == 2 and "is not the output_root of a run" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "match their records" not in out.stdout
