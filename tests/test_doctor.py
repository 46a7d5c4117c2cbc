"""`ckpt-migrate doctor` against the one-node SLURM cluster: the real profile, and broken copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

from ckpt_migrate import synthetic

from .conftest import VOCAB
from .pipeline_helpers import REPO

pytestmark = pytest.mark.e2e  # runs Snakemake or SLURM as programs: `pytest -m "not e2e"` leaves it out


@pytest.fixture(scope="module")
def folders():
    """A tree and an output folder on a filesystem that is not node-local: the home folder, since
    the checkout itself may be under /tmp."""
    base = tempfile.mkdtemp(prefix=".ckpt-migrate-doctor-", dir=os.path.expanduser("~"))
    root = os.path.join(base, "clean_bbpe_50k")
    sd = synthetic.small_state_dict("v2", vocab=VOCAB)
    synthetic.save(synthetic.upstream_checkpoint(sd, "small"), os.path.join(root, "eng_spa_owt_run_1/best_state_1.pt"))
    yield root, os.path.join(base, "results")
    shutil.rmtree(base, ignore_errors=True)


def doctor(env, folders, *extra, workflow_profile="tests/slurm_profile"):
    root, out = folders
    cmd = [sys.executable, "-m", "ckpt_migrate.cli", "doctor", "--profile", "profiles/slurm",
           "--workflow-profile", workflow_profile, *extra, "--config", f"input_root={root}", f"output_root={out}"]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def _broken_profile(tmp_path, **convert) -> str:
    """tests/slurm_profile with the conversion job's set-resources changed."""
    with open(os.path.join(REPO, "tests/slurm_profile/config.yaml")) as f:
        profile = yaml.safe_load(f)
    with open(os.path.join(REPO, "profiles/slurm/config.yaml")) as f:
        profile["set-resources"] = yaml.safe_load(f)["set-resources"]
    profile["set-resources"]["convert_batch"].update(convert)
    folder = tmp_path / "profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return str(folder)


def test_real_profile_passes_and_the_probe_reports_the_node(slurm_cluster, folders):
    proc = doctor(slurm_cluster, folders, "--probe")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(l.startswith("ok") and "SLURM reachable" in l and "gpu" in l for l in lines)
    assert any(l.startswith("ok") and "conversion partition 'gpu' is up" in l for l in lines)
    assert any(l.startswith("ok") and "fit a conversion job (4 CPUs, 32000 MB, a GPU)" in l for l in lines)
    assert any(l.startswith("ok") and "job status by squeue" in l for l in lines)
    assert any(l.startswith("ok") and "1 file(s) match" in l for l in lines)
    # The probe ran as a SLURM job on the GPU partition: this node has no real GPU, so it warns.
    probe = next(l for l in lines if "probe on" in l)
    assert probe.startswith("warn") and "torch" in probe and "no CUDA device visible" in probe
    assert lines[-1].endswith("0 FAIL, 1 warn")


@pytest.mark.parametrize("change,expected", [
    ({"slurm_partition": "nope"}, "conversion partition 'nope' does not exist"),
    ({"slurm_partition": "nogpu"}, "conversion partition 'nogpu' has no node with GPUs"),
    ({"mem_mb": 10_000_000}, "no node in 'gpu' fits a conversion job (4 CPUs, 10000000 MB)"),
    ({"runtime": 120, "slurm_partition": "nogpu"}, "conversion runtime 120 min exceeds 'nogpu''s limit"),
])
def test_broken_profiles_fail_with_the_fix(slurm_cluster, folders, tmp_path, change, expected):
    proc = doctor(slurm_cluster, folders, workflow_profile=_broken_profile(tmp_path, **change))
    assert proc.returncode == 1, proc.stdout
    line = next((l for l in proc.stdout.splitlines() if expected in l), None)
    assert line is not None and line.startswith("FAIL") and " -> " in line, proc.stdout


def test_node_local_output_and_a_missing_tree_fail(slurm_cluster, folders, tmp_path):
    proc = doctor(slurm_cluster, (str(tmp_path / "nope"), str(tmp_path / "out")))
    assert proc.returncode == 1
    assert any(l.startswith("FAIL") and "is not a readable folder" in l for l in proc.stdout.splitlines())
    assert any(l.startswith("FAIL") and "node-local filesystem (/tmp)" in l for l in proc.stdout.splitlines())


def test_output_on_scratch_is_a_warning_and_the_default_partition_is_not_checked(slurm_cluster, folders, tmp_path):
    """Issue 22: scratch purges files unused for 60 days; the profile's default partition is used
    by no job (every rule but convert_batch is local), so a missing one is no FAIL."""
    root, _ = folders
    scratch_out = os.path.join(os.path.dirname(root), "scratch", "results")
    profile = _broken_profile(tmp_path)
    with open(os.path.join(profile, "config.yaml")) as f:
        settings = yaml.safe_load(f)
    settings.setdefault("default-resources", {})["slurm_partition"] = "no_such_partition"
    with open(os.path.join(profile, "config.yaml"), "w") as f:
        yaml.safe_dump(settings, f)
    proc = doctor(slurm_cluster, (root, scratch_out), workflow_profile=profile)
    lines = proc.stdout.splitlines()
    assert any(l.startswith("warn") and "is on scratch" in l and "/fs/ess/PAS2836" in l for l in lines), proc.stdout
    assert not any("no_such_partition" in l for l in lines), proc.stdout
