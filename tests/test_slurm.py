"""The pipeline through a real SLURM cluster with the lab's profile (profiles/slurm).

Only what this one-node test cluster needs is overridden (tests/slurm_profile: no account,
squeue for job status, fast polling); partitions `cpu`/`gpu`, the GPU request, CPUs, memory
and the grouping of conversions are the profile's own.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import zipfile

import pytest
import yaml

from ckpt_migrate.metrics import CHECK_FIELDS
from ckpt_migrate.pipeline import read_report

from .builders import build_tree
from .pipeline_helpers import REPO, SNAKEMAKE, job_counts, snakemake

pytestmark = pytest.mark.e2e  # runs Snakemake or SLURM as programs: `pytest -m "not e2e"` leaves it out

PROFILE_ARGS = ["--profile", "profiles/slurm", "--workflow-profile", "tests/slurm_profile"]
COMPARED = ("relative_path", "status", "format", "variant", "reason", "step", "params", *CHECK_FIELDS,
            "converted_sha256")


def slurm_snakemake(env: dict, input_root, output_root, *extra, check_length=512, background=False):
    cmd = [SNAKEMAKE, *PROFILE_ARGS, "--config", f"input_root={input_root}", f"output_root={output_root}",
           f"check={{length: {check_length}}}", *extra]
    kwargs = dict(cwd=REPO, env={**os.environ, **env}, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if background:
        return subprocess.Popen(cmd, **kwargs)
    return subprocess.run(cmd, timeout=600, **kwargs)


def _tree(root, n_small=4, n_medium=2):
    """Small files (v1 and v2 in turn, two language pairs) and medium files."""
    files = {f"{('eng_spa', 'rus_pol')[i % 2]}_owt_run_{i}/best_state_100.pt": ("small v1", "small v2")[i % 2]
             for i in range(n_small)}
    files.update({f"hin_urd_owt_run_{i}/best_state_100.pt": "medium" for i in range(n_medium)})
    return build_tree(root, files)


def _records(folder):
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".yaml"):
                with open(os.path.join(d, f)) as fh:
                    out[os.path.relpath(os.path.join(d, f), folder)] = yaml.safe_load(fh)
    return out


def test_pipeline_through_slurm_matches_local_run(slurm_cluster, tmp_path):
    root = tmp_path / "clean_bbpe_50k"
    _tree(root)
    local = snakemake(str(root), str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-2000:]

    proc = slurm_snakemake(slurm_cluster, root, tmp_path / "slurm")
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]

    checks = _records(tmp_path / "slurm/checks")
    assert len(checks) == 4
    for record in checks.values():
        where = record["converted_on"]
        # A SLURM job on the GPU partition, with a GPU allocated (SLURM sets CUDA_VISIBLE_DEVICES).
        assert where.get("slurm_job_id") and where["slurm_partition"] == "gpu", where
        assert where["cuda_visible_devices"] == "0"
    job_ids = {r["converted_on"]["slurm_job_id"] for r in checks.values()}
    submissions = out.count("has been submitted with SLURM jobid")
    # Grouped: the 4 conversions went to SLURM in fewer jobs than conversions (one, here).
    assert len(job_ids) == submissions < len(checks)
    # Detection, plan, report and gate ran in this process, not through SLURM.
    counts = job_counts(out)
    assert counts["plan"] == 1 and counts["convert"] == 4
    assert "localcheckpoint plan:" in out and all(f"localrule {rule}:" in out for rule in ("report", "gate"))
    assert not any(m.get("detected_on", {}).get("slurm_job_id") for m in _records(tmp_path / "slurm/manifests").values())

    local_rows = [{k: r[k] for k in COMPARED} for r in read_report(str(tmp_path / "local/report.csv"))]
    slurm_rows = [{k: r[k] for k in COMPARED} for r in read_report(str(tmp_path / "slurm/report.csv"))]
    assert slurm_rows == local_rows


def _final_files_are_whole(out_root, problems: list, stop: threading.Event):
    """Watch the final paths while a run is cancelled: every visible file must be complete."""
    while not stop.is_set():
        for d, _, files in os.walk(out_root):
            for f in files:
                path = os.path.join(d, f)
                if f.startswith("."):
                    continue  # temporary files of atomic writes
                try:
                    if f.endswith(".pt"):
                        with zipfile.ZipFile(path) as z:
                            z.namelist()
                    elif f.endswith(".yaml") and "/checks/" in path:
                        with open(path) as fh:
                            if "status" not in (yaml.safe_load(fh) or {}):
                                problems.append(f"incomplete record {path}")
                except FileNotFoundError:
                    pass
                except Exception as exc:  # a partial file at a final path
                    problems.append(f"{path}: {exc!r}")
        time.sleep(0.05)


def test_cancelled_conversion_job_is_reported_and_completed_by_a_rerun(slurm_cluster, tmp_path):
    root, out_root = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    _tree(root, n_small=2, n_medium=1)
    env = {**os.environ, **slurm_cluster}
    problems: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_final_files_are_whole, args=(str(out_root), problems, stop), daemon=True)
    watcher.start()
    run = slurm_snakemake(slurm_cluster, root, out_root, check_length=4096, background=True)
    job_id, deadline = "", time.time() + 240
    while time.time() < deadline and not job_id:
        running = subprocess.run(["squeue", "-h", "-p", "gpu", "-t", "R", "-o", "%i"], env=env,
                                 capture_output=True, text=True).stdout.split()
        logs = list((out_root / "staged").rglob("*.log")) if (out_root / "staged").exists() else []
        if running and any("conversion" in p.read_text() or p.stat().st_size for p in logs):
            job_id = running[0]
        time.sleep(0.2)
    assert job_id, "no conversion job started running"
    time.sleep(2)  # part way through the first conversion's check
    subprocess.run(["scancel", job_id], env=env, check=True)
    output, _ = run.communicate(timeout=300)
    assert run.returncode != 0, output[-3000:]
    assert "Error" in output and "convert" in output
    # The run still ends with a report: the killed conversion is a failed row naming its job.
    rows = {r["relative_path"]: r for r in read_report(str(out_root / "report.csv"))}
    assert len(rows) == 3 and rows["hin_urd_owt_run_0/best_state_100.pt"]["status"] == "not_needed"
    unfinished = [r for r in rows.values() if r["status"] == "failed"]
    assert unfinished and any(f"SLURM job {job_id} (CANCELLED" in r["reason"] for r in unfinished), unfinished

    rerun = slurm_snakemake(slurm_cluster, root, out_root, check_length=4096)
    stop.set()
    watcher.join()
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    # Only what did not finish is converted again; a file its batch finished before the kill is reused.
    redone = [f for summary in _records(out_root / "batches").values() for f in summary["files"] if not f["reused"]]
    assert len(redone) == len(unfinished), redone
    statuses = sorted(r["status"] for r in read_report(str(out_root / "report.csv")))
    assert statuses == ["converted", "converted", "not_needed"]
    assert problems == []


def test_conversion_killed_for_memory_is_reported_and_redone(slurm_cluster, tmp_path):
    """SLURM kills the conversion at its memory limit: the run writes its report anyway, the row
    names the job and what SLURM said, and the next run converts only that file."""
    root, out_root = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    _tree(root, n_small=1, n_medium=1)
    # 450 MB: less than the job step holds from torch's import on (the step's Snakemake process, and
    # the conversion at ~520 MB during a 4096-token check), for the several seconds the check runs:
    # SLURM polls RSS once a second here, and a peak shorter than that (600 MB) was sometimes missed.
    # The attempt record is written before torch is imported, so the row names the job either way.
    killed = slurm_snakemake(slurm_cluster, root, out_root, "--set-resources", "convert_batch:mem_mb=450",
                             check_length=4096)
    assert killed.returncode != 0, killed.stdout[-3000:]
    rows = {r["relative_path"]: r for r in read_report(str(out_root / "report.csv"))}
    row = rows["eng_spa_owt_run_0/best_state_100.pt"]
    assert row["status"] == "failed" and "SLURM job" in row["reason"], row
    assert "exceeded its memory limit" in row["reason"] and "staged/eng_spa_owt_run_0/best_state_100.log" in row["reason"], row["reason"]
    assert rows["hin_urd_owt_run_0/best_state_100.pt"]["status"] == "not_needed"
    assert (out_root / "figures" / "report_table.html").exists()
    assert not (out_root / "converted" / "eng_spa_owt_run_0" / "best_state_100.pt").exists()

    rerun = slurm_snakemake(slurm_cluster, root, out_root, check_length=4096)
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    assert job_counts(rerun.stdout).get("convert") == 1 and "plan" not in job_counts(rerun.stdout)
    assert sorted(r["status"] for r in read_report(str(out_root / "report.csv"))) == ["converted", "not_needed"]
