"""Issue 23: documents in every logit check, and validation loss on the lab's held-out tokens."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ckpt_migrate import synthetic
from ckpt_migrate.check import CheckSettings, logit_check, random_tokens
from ckpt_migrate.families import GPTConfig
from ckpt_migrate.models import GPTBatched, GPTFlexAttention
from ckpt_migrate.one_file import build_model, convert_file, evaluate_file, load_source, reference_model
from ckpt_migrate.key_mapping import convert_state_dict
from ckpt_migrate.validation import SHARD_MAGIC, ShardError, read_shard, validation_plan

from .builders import VOCAB

EOT = 7  # inside the tests' 1,000-token vocabulary, so documents exist
SETTINGS = CheckSettings(batch=2, length=256, seed=3, device="cpu")


def write_shard(path, tokens, magic: int = SHARD_MAGIC, version: int = 1) -> str:
    """A token shard as modded-nanogpt's data scripts write it: 256 int32 of header, uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())
    return str(path)


def held_out_tokens(count: int, seed: int = 0) -> torch.Tensor:
    """Random text with a separator every 40 to 300 tokens, as a shard of documents holds."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (count,), generator=gen)
    tokens[tokens == EOT] = EOT + 1
    position = 0
    while position < count:
        tokens[position] = EOT
        position += int(torch.randint(40, 300, (1,), generator=gen))
    return tokens


def checkpoint(tmp_path, family: str, variant: str = "v2", seed: int = 0) -> str:
    sd = (synthetic.small_state_dict(variant, vocab=VOCAB, seed=seed) if family == "small"
          else synthetic.medium_state_dict(vocab=VOCAB, seed=seed))
    path = tmp_path / f"eng_spa_owt_run_{seed}" / "best_state_800.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return synthetic.save(synthetic.upstream_checkpoint(sd, family, step=800, eot_token=EOT), str(path))


def upstream_cross_entropy(model: torch.nn.Module, tokens: torch.Tensor, predictions: int, length: int) -> float:
    """Mean next-token cross-entropy as upstream's validation computes it: ``model(inputs)`` over
    the padded head, ``F.cross_entropy`` against the next tokens, sequence after sequence."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, predictions, length):
            seq = tokens[start:min(start + length, predictions) + 1]
            logits = model(seq[None, :-1])[0].float()
            total += float(F.cross_entropy(logits, seq[1:], reduction="sum"))
    return total / predictions


def test_a_check_with_documents_catches_broken_document_masking_that_random_tokens_miss(tmp_path):
    """Negative control: a converted model that lets attention cross documents passes the
    random-token check (no separator in its batch) and fails the check with documents."""
    record, _, small = load_source(checkpoint(tmp_path, "small"))
    cfg = GPTConfig.from_record(record)
    assert cfg.eot_token == EOT
    broken = build_model(GPTBatched, dataclasses.replace(cfg, eot_token=None), convert_state_dict(small, cfg))
    reference = reference_model(record, small, cfg)
    # The random-token check's own batch: this seed draws no separator, as almost every seed
    # does with a 50k vocabulary.
    seed = next(s for s in range(100) if not (random_tokens(VOCAB, 2, 256, s) == EOT).any())
    ids = random_tokens(VOCAB, 2, 256, seed)[:, :-1]
    reference.compute_dtype = broken.compute_dtype = torch.float32  # as the check runs them
    with torch.no_grad():
        assert (reference(ids) - broken(ids)).abs().max() <= SETTINGS.resolved_tolerance()
    result = logit_check(reference, broken, cfg.vocab_size, dataclasses.replace(SETTINGS, seed=seed))
    assert not result["check_passed"] and result["max_abs_logit_diff"] > 1e-2
    assert result["check_separators"] >= 4 and result["check_documents"] == result["check_separators"] + 2
    good = build_model(GPTBatched, cfg, convert_state_dict(small, cfg))
    assert logit_check(reference, good, cfg.vocab_size, dataclasses.replace(SETTINGS, seed=seed))["check_passed"]


def test_without_a_known_separator_the_record_says_so(tmp_path):
    sd = synthetic.small_state_dict("v2", vocab=VOCAB)
    path = synthetic.save(synthetic.upstream_checkpoint(sd, "small", eot_token=50256), str(tmp_path / "s.pt"))
    result = convert_file(path, str(tmp_path / "out.pt"), SETTINGS)
    assert result["status"] == "converted"
    assert result["check_separators"] is None and result["check_documents"] is None


@pytest.mark.parametrize("family, variant", [("small", "v1"), ("small", "v2"), ("medium", "")])
def test_validation_loss_is_upstreams_cross_entropy_on_the_same_tokens(tmp_path, family, variant):
    """The loss the pipeline records equals the upstream forward's cross-entropy (flex attention,
    the file's own layout) on the shard's first N predictions, within 1e-4 in fp32 on the CPU."""
    src = checkpoint(tmp_path, family, variant)
    tokens = held_out_tokens(1500)
    shard = write_shard(tmp_path / "eng_spa_val_000001.bin", tokens)
    write_shard(tmp_path / "eng_spa_val_000002.bin", held_out_tokens(1500, seed=9))  # not the first in order
    plan = validation_plan({"data": str(tmp_path / "{lang}_val_*.bin"), "tokens": 1000, "sequence_length": 384},
                           "eng_spa")
    assert plan["shard"] == shard
    record, _, state_dict = load_source(src)
    cfg = GPTConfig.from_record(record)
    if family == "small":
        result = convert_file(src, str(tmp_path / "out.pt"), SETTINGS, validation=plan)
        assert result["status"] == "converted" and result["check_real_tokens"] == 2 * 256
        upstream = build_model(GPTFlexAttention, cfg, state_dict, variant=variant, attention="flex",
                               scalars_len=state_dict["scalars"].numel() if "scalars" in state_dict else None)
    else:
        result = evaluate_file(src, plan)
        upstream = build_model(GPTBatched, cfg, state_dict, attention="flex")
    upstream.compute_dtype = torch.float32
    expected = upstream_cross_entropy(upstream, tokens, 1000, 384)
    assert result["val_tokens"] == 1000
    assert abs(result["val_loss"] - expected) <= 1e-4, (result["val_loss"], expected)
    # Documents matter to the number: without them the loss is another one.
    upstream.cfg = dataclasses.replace(cfg, eot_token=None)
    assert abs(upstream_cross_entropy(upstream, tokens, 1000, 384) - expected) > 1e-4


def test_sequences_batched_per_forward_give_the_loss_of_one_at_a_time(tmp_path):
    from ckpt_migrate.validation import validation_loss

    record, _, state_dict = load_source(checkpoint(tmp_path, "medium"))
    model = build_model(GPTBatched, GPTConfig.from_record(record), state_dict)
    tokens = held_out_tokens(1000)  # 999 predictions: 7 full sequences of 128 and one of 103
    one = validation_loss(model, tokens, 128, "cpu", sequences_per_forward=1)
    batched = validation_loss(model, tokens, 128, "cpu", sequences_per_forward=3)
    assert one["val_tokens"] == batched["val_tokens"] == 999
    assert abs(one["val_loss"] - batched["val_loss"]) <= 1e-5


def test_a_shard_that_is_not_the_token_format_is_named(tmp_path):
    bad_magic = write_shard(tmp_path / "a.bin", [1, 2, 3], magic=12345)
    with pytest.raises(ShardError, match=r"a\.bin: not a modded-nanogpt token shard"):
        read_shard(bad_magic)
    truncated = tmp_path / "b.bin"
    truncated.write_bytes(open(write_shard(tmp_path / "c.bin", list(range(10))), "rb").read()[:-4])
    with pytest.raises(ShardError, match=r"b\.bin: its header says 10 tokens"):
        read_shard(str(truncated))
    (tmp_path / "d.bin").write_bytes(b"text")
    with pytest.raises(ShardError, match="shorter than a token shard's 1024-byte header"):
        read_shard(str(tmp_path / "d.bin"))
    assert read_shard(str(tmp_path / "c.bin")).tolist() == list(range(10))


def test_a_shard_of_another_tokenizer_is_a_named_error_not_a_crash(tmp_path):
    src = checkpoint(tmp_path, "medium")
    write_shard(tmp_path / "eng_spa.bin", [1, 2, 60000, 3])
    plan = validation_plan({"data": str(tmp_path / "{lang}.bin"), "tokens": 3, "sequence_length": 4}, "eng_spa")
    result = evaluate_file(src, plan)
    assert result["val_loss"] is None and "token id 60000 is outside the model's vocabulary" in result["val_error"]


def test_doctor_names_each_pairs_shard_and_what_is_wrong_with_it(tmp_path):
    from ckpt_migrate.doctor import validation_findings

    root = tmp_path / "tree"
    for lang in ("eng_spa", "hin_urd", "tam_mal"):
        (root / f"{lang}_owt_run_1").mkdir(parents=True)
        (root / f"{lang}_owt_run_1" / "best_state_1.pt").write_bytes(b"x")
    write_shard(tmp_path / "eng_spa.bin", list(range(50)))
    write_shard(tmp_path / "hin_urd.bin", [1, 2], magic=7)
    config = {"input_root": str(root), "glob": "*_owt_run_*/best_state_*.pt",
              "validation": {"data": str(tmp_path / "{lang}.bin"), "tokens": 1000, "sequence_length": 64}}
    lines = [f.line() for f in validation_findings(config)]
    assert len(lines) == 3, lines
    assert lines[0].startswith("warn") and "eng_spa.bin, 50 tokens" in lines[0] and "fewer than the 1,001" in lines[0]
    assert lines[1].startswith("FAIL") and "hin_urd.bin: not a modded-nanogpt token shard" in lines[1]
    assert lines[2].startswith("warn") and "for tam_mal: those files get no val_loss" in lines[2]
    assert validation_findings({**config, "validation": {"data": None}}) == []


def test_a_failing_validation_leaves_the_conversion_standing(tmp_path, monkeypatch):
    """Out of memory on the held-out tokens (here: any error in the loss) is the record's
    val_error; the conversion, its check and its published file stand."""
    from ckpt_migrate import validation

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(validation, "validation_loss", out_of_memory)
    src = checkpoint(tmp_path, "small")
    write_shard(tmp_path / "eng_spa.bin", held_out_tokens(600))
    plan = validation_plan({"data": str(tmp_path / "{lang}.bin"), "tokens": 500, "sequence_length": 128}, "eng_spa")
    result = convert_file(src, str(tmp_path / "out.pt"), SETTINGS, validation=plan)
    assert result["status"] == "converted" and os.path.isfile(tmp_path / "out.pt") and result["check_passed"]
    assert result["val_loss"] is None and result["val_error"].startswith("RuntimeError: CUDA out of memory")


def test_a_medium_file_killed_while_evaluated_goes_last_and_twice_is_given_up(tmp_path):
    """An evaluation killed from outside is counted like a conversion: it goes after the others of
    its batch, and once killed twice its record names why instead of killing the batch again."""
    import yaml

    from ckpt_migrate.pipeline import OutputLayout, checkpoint_sources, detect_and_plan, read_batches, run_batch

    root, layout = tmp_path / "tree", OutputLayout(str(tmp_path / "out"))
    medium, small = checkpoint(root, "medium", seed=1), checkpoint(root, "small", seed=2)
    write_shard(tmp_path / "eng_spa.bin", held_out_tokens(300))
    sources = checkpoint_sources(str(root), "*_owt_run_*/best_state_*.pt")
    detect_and_plan(sources, {k: os.path.relpath(p, root) for k, p in sources.items()}, layout,
                    validation={"data": str(tmp_path / "{lang}.bin"), "tokens": 200, "sequence_length": 64})
    (batch,) = read_batches(layout.plan)
    key = "eng_spa_owt_run_1/best_state_800"
    os.makedirs(os.path.dirname(layout.attempt(key)), exist_ok=True)
    with open(layout.attempt(key), "w") as f:
        yaml.safe_dump({"host": "node7", "pid": 1, "attempts": 2, "log": layout.staged_log(key)}, f)
    summary = run_batch(layout, batch, {"length": 64, "device": "cpu"}, {}, str(tmp_path / "summary.yaml"))
    assert [f["key"] for f in summary["files"]] == ["eng_spa_owt_run_2/best_state_800", key]
    record = yaml.safe_load(open(layout.staged(key)))
    assert record["status"] == "evaluated" and record["val_loss"] is None
    assert record["val_error"].startswith("killed 2 times while being evaluated") and "on node7" in record["val_error"]
    assert yaml.safe_load(open(layout.staged("eng_spa_owt_run_2/best_state_800")))["val_loss"] > 0
    assert os.path.exists(medium) and os.path.exists(small)


def test_check_cli_reports_validation_loss(tmp_path):
    src = checkpoint(tmp_path, "small")
    shard = write_shard(tmp_path / "val.bin", held_out_tokens(600))
    cli = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ckpt-migrate"), "check", src, "--val-data", shard, "--val-tokens", "500",
                          "--length", "128", "--device", "cpu"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert re.search(r"val_loss\s+\d+\.\d+", cli.stdout) and re.search(r"val_tokens\s+500\n", cli.stdout), cli.stdout
    assert re.search(r"check_separators\s+[1-9]", cli.stdout) and re.search(r"check_real_tokens\s+256", cli.stdout)
    bad = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ckpt-migrate"), "check", src, "--val-data",
                          str(tmp_path / "missing.bin")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [f"error: {tmp_path}/missing.bin: no such token shard"]
    for argv, message in (([str(tmp_path)], "not a regular file, so not a token shard"),
                          ([shard, "--val-tokens", "0"], "must be positive")):
        bad = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ckpt-migrate"), "check", src,
                              "--val-data", *argv], capture_output=True, text=True)
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr
    alone = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ckpt-migrate"), "check", src,
                            "--val-tokens", "5"], capture_output=True, text=True)
    assert alone.returncode == 1 and alone.stderr.strip() == "error: --val-tokens and --val-sequence-length need --val-data FILE"


@pytest.mark.e2e
def test_the_pipeline_records_every_files_validation_loss_and_a_changed_setting_only_reevaluates(tmp_path):
    """Small files get val_loss on their conversion, medium files in the same batched jobs without
    being converted; a pair without a shard has none; a changed setting re-evaluates and converts
    nothing; the report, its table and its figure carry the column."""
    from ckpt_migrate.pipeline import read_report

    from .pipeline_helpers import job_counts, snakemake, tree_state

    root, out, data = tmp_path / "clean_bbpe_50k", tmp_path / "out", tmp_path / "data"
    small_path = checkpoint(root, "small", seed=1)
    medium_path = checkpoint(root, "medium", seed=2)
    other = root / "hin_urd_owt_run_3" / "best_state_800.pt"
    other.parent.mkdir(parents=True)
    synthetic.save(synthetic.upstream_checkpoint(synthetic.small_state_dict("v1", vocab=VOCAB, seed=3), "small",
                                                 step=800, eot_token=EOT), str(other))
    data.mkdir()
    tokens = held_out_tokens(900)
    write_shard(data / "eng_spa_val_000001.bin", tokens)
    before = tree_state(str(root))
    validation = f"{{data: '{data}/{{lang}}_val_*.bin', tokens: 600, sequence_length: 256}}"
    proc = snakemake(str(root), str(out), config={"validation": validation, "check": "{length: 128}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    small, medium = rows["eng_spa_owt_run_1/best_state_800.pt"], rows["eng_spa_owt_run_2/best_state_800.pt"]
    assert small["status"] == "converted" and int(small["check_real_tokens"]) == 256
    assert int(small["check_separators"]) > 0 and int(small["check_documents"]) > int(small["check_separators"])
    assert medium["status"] == "not_needed" and medium["converted_path"] == ""
    assert not (out / "converted" / "eng_spa_owt_run_2").exists()
    for row, path in ((small, small_path), (medium, medium_path)):
        record, _, state_dict = load_source(path)
        cfg = GPTConfig.from_record(record)
        if record["format"] == "small":
            upstream = build_model(GPTFlexAttention, cfg, state_dict, variant="v2", attention="flex",
                                   scalars_len=state_dict["scalars"].numel())
        else:
            upstream = build_model(GPTBatched, cfg, state_dict, attention="flex")
        upstream.compute_dtype = torch.float32
        assert int(row["val_tokens"]) == 600
        assert abs(float(row["val_loss"]) - upstream_cross_entropy(upstream, tokens, 600, 256)) <= 1e-4
    no_shard = rows["hin_urd_owt_run_3/best_state_800.pt"]
    assert no_shard["status"] == "converted" and no_shard["val_loss"] == ""
    assert "val_loss" in (out / "figures" / "report_table.html").read_text()
    assert (out / "figures" / "validation_loss.png").stat().st_size > 1000

    converted = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in
                 (out / "converted/eng_spa_owt_run_1/best_state_800.pt",
                  out / "converted/hin_urd_owt_run_3/best_state_800.pt")}
    other_record = (out / "checks/hin_urd_owt_run_3/best_state_800.yaml").read_bytes()
    validation = validation.replace("tokens: 600", "tokens: 500")
    proc = snakemake(str(root), str(out), config={"validation": validation, "check": "{length: 128}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts.get("plan") == 1 and counts.get("convert") == 2, counts  # the two eng_spa files only
    assert "logit check" not in (out / "logs/convert/eng_spa_owt_run_1/best_state_800.log").read_text()
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in converted} == converted
    assert (out / "checks/hin_urd_owt_run_3/best_state_800.yaml").read_bytes() == other_record
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert rows["eng_spa_owt_run_1/best_state_800.pt"]["val_tokens"] == "500"
    assert rows["eng_spa_owt_run_2/best_state_800.pt"]["val_tokens"] == "500"
    assert tree_state(str(root)) == before
    assert "Nothing to be done" in snakemake(str(root), str(out), "-n", config={
        "validation": validation, "check": "{length: 128}"}).stdout

    # A replaced shard (new held-out tokens, same size) is evaluated again, nothing converted.
    loss = float(rows["eng_spa_owt_run_2/best_state_800.pt"]["val_loss"])
    write_shard(data / "eng_spa_val_000001.bin", held_out_tokens(900, seed=5))
    proc = snakemake(str(root), str(out), config={"validation": validation, "check": "{length: 128}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job_counts(proc.stdout + proc.stderr).get("convert") == 2
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in converted} == converted
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert float(rows["eng_spa_owt_run_2/best_state_800.pt"]["val_loss"]) != loss

    # Validation off: no job for any file, and no loss left in the report.
    proc = snakemake(str(root), str(out), config={"check": "{length: 128}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    assert "convert_batch" not in counts and "convert" not in counts, counts
    rows = read_report(str(out / "report.csv"))
    assert all(r["val_loss"] == "" for r in rows) and {r["status"] for r in rows} == {"converted", "not_needed"}
    assert tree_state(str(root)) == before

    # Back on, with a new small file whose weights hold a NaN: the run fails at its gate, and the
    # report written after the failure still holds every file's loss, whole numbers as written.
    sd = synthetic.small_state_dict("v2", vocab=VOCAB, seed=4)
    sd["blocks.2.mlp.c_fc.weight"][0, 0] = float("nan")
    synthetic.save(synthetic.upstream_checkpoint(sd, "small", step=800, eot_token=EOT),
                   str(root / "eng_spa_owt_run_4" / "best_state_800.pt"))
    proc = snakemake(str(root), str(out), config={"validation": validation, "check": "{length: 128}"})
    assert proc.returncode != 0 and "1 checkpoint(s) failed" in proc.stdout + proc.stderr
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert rows["eng_spa_owt_run_4/best_state_800.pt"]["status"] == "failed"
    assert {rows[f"eng_spa_owt_run_{i}/best_state_800.pt"]["val_tokens"] for i in (1, 2)} == {"500"}
    assert float(rows["eng_spa_owt_run_2/best_state_800.pt"]["val_loss"]) > 0
    assert ",500.0," not in (out / "report.csv").read_text()
