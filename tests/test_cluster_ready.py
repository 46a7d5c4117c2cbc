"""Issue 11: no silent guesses, conversions that follow the converter, readable outputs, report dates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from ckpt_migrate import synthetic
from ckpt_migrate.check import CheckSettings
from ckpt_migrate.detect import detect
from ckpt_migrate.one_file import convert_file, load_pretrained_checkpoint
from ckpt_migrate.pipeline import read_report, read_yaml

from .conftest import VOCAB
from .pipeline_helpers import REPO, SNAKEMAKE, job_counts

pytestmark = pytest.mark.e2e  # runs Snakemake or SLURM as programs: `pytest -m "not e2e"` leaves it out


def _small(path, eot_token=50256, with_code=True) -> str:
    sd = synthetic.small_state_dict("v2", vocab=VOCAB, seed=4)
    obj = synthetic.upstream_checkpoint(sd, "small", step=100, eot_token=eot_token)
    if not with_code:
        del obj["code"]
    return synthetic.save(obj, str(path))


def test_separator_zero_is_kept_not_replaced_by_the_default(tmp_path):
    path = _small(tmp_path / "zero.pt", eot_token=0)
    record = detect(path)
    assert record["eot_token"] == 0 and record["eot_token_source"] == "code"
    result = convert_file(path, str(tmp_path / "out.pt"), CheckSettings(length=128))
    assert result["status"] == "converted"
    _, info, checkpoint = load_pretrained_checkpoint(str(tmp_path / "out.pt"))
    assert info["config"]["eot_token"] == 0 and checkpoint["config"]["eot_source"] == "code"


def test_no_code_and_a_default_outside_the_vocabulary_is_said_not_used(tmp_path):
    record = detect(_small(tmp_path / "nocode.pt", with_code=False))
    assert record["status"] == "to_convert" and record["vocab_size"] < 50256  # v2 pads the 1000 rows to 1024
    assert record["eot_token"] is None and record["eot_token_source"] == "none"
    assert any("outside the vocabulary" in note and "set eot_token" in note for note in record["notes"])
    assert record["num_iterations_source"] == "none" and "family default" in record["window_source"]
    stated = detect(str(tmp_path / "nocode.pt"), overrides={"eot_token": 7, "num_iterations": 1000})
    assert (stated["eot_token"], stated["eot_token_source"]) == (7, "config")
    assert stated["num_iterations_source"] == "config" and "schedule at step 100 of 1000" in stated["window_source"]


def test_overrides_reach_the_report_and_the_converted_file(tmp_path):
    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    _small(root / "eng_spa_owt_run_1/best_state_100.pt", with_code=False)
    cmd = [SNAKEMAKE, "--cores", "2", "--config", f"input_root={root}", f"output_root={out}", "check={length: 128}"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    row = read_report(str(out / "report.csv"))[0]
    assert row["eot_token"] == "" and row["eot_token_source"] == "none" and "set eot_token" in row["notes"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", row["mtime"]), row["mtime"]
    stated = subprocess.run(cmd + ["eot_token=7"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert stated.returncode == 0 and job_counts(stated.stdout + stated.stderr).get("convert") == 1
    row = read_report(str(out / "report.csv"))[0]
    assert (row["eot_token"], row["eot_token_source"]) == ("7", "config")
    _, info, _ = load_pretrained_checkpoint(str(out / "converted/eng_spa_owt_run_1/best_state_100.pt"))
    assert info["config"]["eot_token"] == 7


def _package_copy(tmp_path, edit: str) -> dict:
    """An environment whose ckpt_migrate is a copy of ours with ``edit`` (a module) changed."""
    copy = tmp_path / "pkg"
    shutil.copytree(os.path.join(REPO, "src", "ckpt_migrate"), copy / "ckpt_migrate")
    with open(copy / "ckpt_migrate" / edit, "a") as f:
        f.write("\n# a change\n")
    return {**os.environ, "PYTHONPATH": str(copy)}


def test_a_converter_change_reconverts_and_a_report_change_does_not(tmp_path):
    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    for i in range(2):
        _small(root / f"eng_spa_owt_run_{i}/best_state_100.pt")
    cmd = [SNAKEMAKE, "--cores", "2", "--config", f"input_root={root}", f"output_root={out}", "check={length: 128}"]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600).returncode == 0
    record = read_yaml(str(out / "checks/eng_spa_owt_run_0/best_state_100.yaml"))
    from ckpt_migrate.fingerprint import converter_fingerprint

    assert record["converter_fingerprint"] == converter_fingerprint()
    for module, expected in (("plots.py", 0), ("report.py", 0), ("key_mapping.py", 2), ("check.py", 2)):
        dry = subprocess.run(cmd + ["-n"], cwd=REPO, capture_output=True, text=True, timeout=600,
                             env=_package_copy(tmp_path / module, module))
        assert dry.returncode == 0, dry.stdout[-2000:]
        assert job_counts(dry.stdout).get("convert", 0) == expected, (module, dry.stdout[-1500:])
    # verify-outputs names files made by another converter.
    check = str(out / "checks/eng_spa_owt_run_0/best_state_100.yaml")
    text = open(check).read().replace(record["converter_fingerprint"], "0123456789abcdef")
    open(check, "w").write(text)
    proc = subprocess.run([sys.executable, "-m", "ckpt_migrate.cli", "verify-outputs", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "outdated:" in proc.stdout and "0123456789abcdef" in proc.stdout


def test_periodic_runs_never_overlap(tmp_path):
    """scripts/run_periodic.sh: a run that finds the previous one still going exits 0 at once."""
    import fcntl

    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    _small(root / "eng_spa_owt_run_1/best_state_100.pt")
    lock = tmp_path / "periodic.lock"
    cmd = ["bash", "scripts/run_periodic.sh", "--cores", "2", "--config", f"input_root={root}",
           f"output_root={out}", "check={length: 128}"]
    env = {**os.environ, "CKPT_MIGRATE_LOCK": str(lock)}
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a run in progress
        skipped = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert skipped.returncode == 0 and "still holds" in skipped.stdout and not out.exists()
    ran = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "run ends with status 0" in ran.stdout
    assert [r["status"] for r in read_report(str(out / "report.csv"))] == ["converted"]
