"""End to end: Snakemake itself (local executor, 2 cores) on generated trees."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import yaml
import torch

from ckpt_migrate import load_pretrained_checkpoint, synthetic
from ckpt_migrate.pipeline import read_report

from .builders import altered_small_checkpoint, build_tree, medium_checkpoint, small_checkpoint
from .conftest import VOCAB
from .pipeline_helpers import REPO, SNAKEMAKE, job_counts, make_read_only, make_writable, snakemake, tree_state

pytestmark = pytest.mark.e2e  # runs Snakemake or SLURM as programs: `pytest -m "not e2e"` leaves it out



@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A clean_bbpe_50k-like tree: 3 small (v1 and v2), 1 medium, and one of each bad kind."""
    return build_tree(tmp_path_factory.mktemp("scratch") / "clean_bbpe_50k", {
        "eng_spa_owt_run_1/best_state_100.pt": "small v2",
        "eng_spa_owt_run_2/best_state_200.pt": "small v1",
        "rus_pol_owt_run_1/best_state_100.pt": "small v2",
        "hin_urd_owt_run_1/best_state_100.pt": "medium",
        "tam_mal_owt_run_1/best_state_50.pt": "empty",
        "tam_mal_owt_run_2/best_state_60.pt": "hostile",
        "tam_mal_owt_run_3/best_state_70.pt": "no known layout",
    })


EXPECTED = {
    "eng_spa_owt_run_1/best_state_100.pt": "converted",
    "eng_spa_owt_run_2/best_state_200.pt": "converted",
    "hin_urd_owt_run_1/best_state_100.pt": "not_needed",
    "rus_pol_owt_run_1/best_state_100.pt": "converted",
    "tam_mal_owt_run_1/best_state_50.pt": "unreadable",
    "tam_mal_owt_run_2/best_state_60.pt": "unsafe",
    "tam_mal_owt_run_3/best_state_70.pt": "unknown",
}


@pytest.fixture(scope="module")
def first_run(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    before = tree_state(str(tree))
    make_read_only(str(tree))
    proc = snakemake(str(tree), str(out))  # check={length: 512}: a string to Snakemake, typed by common.smk
    return tree, out, proc, before


def test_report_has_one_row_per_checkpoint(first_run):
    tree, out, proc, _ = first_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert {k: r["status"] for k, r in rows.items()} == EXPECTED
    assert rows["eng_spa_owt_run_1/best_state_100.pt"]["lang_pair"] == "eng_spa"
    assert rows["eng_spa_owt_run_2/best_state_200.pt"]["run"] == "2"
    assert rows["eng_spa_owt_run_2/best_state_200.pt"]["variant"] == "v1"
    assert rows["hin_urd_owt_run_1/best_state_100.pt"]["direct_load_ok"] == "True"
    assert "GLOBAL names posix.system" in rows["tam_mal_owt_run_2/best_state_60.pt"]["reason"]
    assert rows["tam_mal_owt_run_1/best_state_50.pt"]["reason"] == "empty file"
    for rel, row in rows.items():
        if row["status"] == "converted":
            assert row["check_passed"] == "True" and float(row["max_abs_logit_diff"]) < 1e-4
            assert row["check_dtype"] == "float32" and row["check_device"] == "cpu"
            record = yaml.safe_load((out / "checks" / rel).with_suffix(".yaml").read_text())
            assert (record["check_length"], record["check_seed"], record["check_batch"]) == (512, 1234, 2)
            assert float(row["top1_agreement"]) == 1.0 and row["converted_sha256"]
    assert not os.path.exists("/tmp/ckpt_migrate_PWNED")
    # The summary is printed at the end.
    assert "7 checkpoints: 3 converted, 1 not_needed, 1 unknown, 1 unreadable, 1 unsafe" in proc.stdout + proc.stderr


def test_only_small_files_got_conversion_jobs(first_run):
    tree, out, proc, _ = first_run
    assert job_counts(proc.stdout + proc.stderr)["convert"] == 3
    assert job_counts(proc.stdout + proc.stderr)["plan"] == 1  # one job detects all seven
    assert "detected 7 file(s), reused 0 manifest(s)" in (out / "logs/plan.log").read_text()
    checks = sorted(os.path.relpath(os.path.join(d, f), out / "checks")
                    for d, _, fs in os.walk(out / "checks") for f in fs)
    assert checks == ["eng_spa_owt_run_1/best_state_100.yaml", "eng_spa_owt_run_2/best_state_200.yaml",
                      "rus_pol_owt_run_1/best_state_100.yaml"]


def test_converted_files_load_with_parity(first_run):
    tree, out, _, _ = first_run
    ids = torch.randint(0, VOCAB, (2, 512), generator=torch.Generator().manual_seed(3))
    for rel in ("eng_spa_owt_run_1/best_state_100", "eng_spa_owt_run_2/best_state_200"):
        converted, info, _ = load_pretrained_checkpoint(str(out / "converted" / f"{rel}.pt"))
        source, _, _ = load_pretrained_checkpoint(str(tree / f"{rel}.pt"))
        assert info["format"] == "small"
        with torch.no_grad():
            assert torch.equal(converted(ids), source(ids))


def test_input_tree_is_untouched(first_run):
    tree, _, _, before = first_run
    make_writable(str(tree))
    try:
        after = tree_state(str(tree))
    finally:
        make_read_only(str(tree))
    # Only the write bits we removed ourselves differ.
    strip = lambda s: {k: v[:3] + (v[4],) for k, v in s.items()}  # noqa: E731
    assert strip(after) == strip(before)


def test_rerun_with_nothing_new_schedules_nothing(first_run):
    tree, out, _, _ = first_run
    # The tree's write bits were toggled (a chmod moves every file's ctime): the plan runs once,
    # finds the same bytes (the tail hash, then every zip entry against its CRC-32) and converts
    # nothing; then nothing is left to do.
    make_writable(str(tree))
    make_read_only(str(tree))
    proc = snakemake(str(tree), str(out))
    counts = job_counts(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and counts.get("plan") == 1 and "convert" not in counts and "convert_batch" not in counts
    assert _last_plan_line(out).startswith("detected 0 file(s)")
    proc = snakemake(str(tree), str(out), "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


def test_lint_is_clean(first_run):
    tree, out, _, _ = first_run
    proc = snakemake(str(tree), str(out), "--lint")
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_missing_input_root_is_one_clear_line(tmp_path):
    proc = snakemake(str(tmp_path / "nope"), str(tmp_path / "out"), "-n")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert f"input_root {tmp_path / 'nope'} does not exist" in text and "Traceback" not in text


def test_incremental_new_run_replaced_file_and_file_completed_later(tmp_path):
    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    small_checkpoint(root / "eng_spa_owt_run_1/best_state_100.pt", seed=1)
    medium_checkpoint(root / "hin_urd_owt_run_1/best_state_100.pt", seed=2)
    # A checkpoint still being written: a prefix of the real file.
    partial = root / "rus_pol_owt_run_1/best_state_100.pt"
    whole = tmp_path / "whole.pt"
    small_checkpoint(whole, seed=3)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(whole.read_bytes()[:100000])
    proc = snakemake(str(root), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = {r["relative_path"]: r["status"] for r in read_report(str(out / "report.csv"))}
    assert statuses["rus_pol_owt_run_1/best_state_100.pt"] == "unreadable"

    # A new run directory lands: only its detection and conversion, plus plan/report/gate.
    small_checkpoint(root / "eng_spa_owt_run_2/best_state_100.pt", seed=4)
    proc = snakemake(str(root), str(out))
    assert proc.returncode == 0
    assert job_counts(proc.stdout + proc.stderr) == {"all": 1, "convert": 1, "convert_batch": 1, "gate": 1,
                                                     "plan": 1, "report": 1, "figures": 1}
    assert _last_plan_line(out).startswith("detected 1 file(s)")
    assert "eng_spa_owt_run_2/best_state_100" in proc.stdout + proc.stderr

    # The partial file completes (new mtime): it is detected again and converted.
    shutil.copyfile(whole, partial)
    proc = snakemake(str(root), str(out))
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["plan"] == 1 and counts["convert"] == 1 and _last_plan_line(out).startswith("detected 1 file(s)")
    statuses = {r["relative_path"]: r["status"] for r in read_report(str(out / "report.csv"))}
    assert statuses["rus_pol_owt_run_1/best_state_100.pt"] == "converted"

    # A replaced checkpoint (new mtime, new weights) is redone, and the output follows it.
    first = root / "eng_spa_owt_run_1/best_state_100.pt"
    old_sha = {r["relative_path"]: r["converted_sha256"] for r in read_report(str(out / "report.csv"))}
    small_checkpoint(first, seed=99)
    proc = snakemake(str(root), str(out))
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts.get("plan") == 1 and counts.get("convert") == 1 and counts.get("convert_batch") == 1, \
        proc.stdout + proc.stderr
    assert _last_plan_line(out).startswith("detected 1 file(s)")
    new_sha = {r["relative_path"]: r["converted_sha256"] for r in read_report(str(out / "report.csv"))}
    assert new_sha["eng_spa_owt_run_1/best_state_100.pt"] != old_sha["eng_spa_owt_run_1/best_state_100.pt"]
    assert "Nothing to be done" in snakemake(str(root), str(out), "-n").stdout


def _last_plan_line(out) -> str:
    """What the last plan job said it detected (its log is appended to by every run)."""
    line = [l for l in (out / "logs/plan.log").read_text().splitlines() if "detected" in l][-1]
    return line.split("ckpt_migrate.plan: ", 1)[1]


def test_failed_check_writes_report_then_exits_nonzero(tmp_path):
    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    small_checkpoint(root / "eng_spa_owt_run_1/best_state_100.pt", seed=1)
    sd = synthetic.small_state_dict("v2", vocab=VOCAB, seed=2)
    sd["blocks.2.mlp.c_fc.weight"][3, 3] = float("inf")
    synthetic.save(synthetic.upstream_checkpoint(sd, "small", step=100), str(root / "eng_spa_owt_run_2/best_state_100.pt"))
    proc = snakemake(str(root), str(out))
    assert proc.returncode != 0
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert rows["eng_spa_owt_run_1/best_state_100.pt"]["status"] == "converted"
    bad = rows["eng_spa_owt_run_2/best_state_100.pt"]
    # Refused before the check runs: the reason names the weight, and there are no check numbers.
    assert bad["status"] == "failed" and bad["check_passed"] == ""
    assert bad["reason"] == "non-finite values in blocks.2.mlp.c_fc.weight (0 NaN, 1 Inf)"
    assert not (out / "converted/eng_spa_owt_run_2/best_state_100.pt").exists()
    assert "1 checkpoint(s) failed" in proc.stdout + proc.stderr
    ok = snakemake(str(root), str(out), config={"allow_check_failures": "True"})
    assert ok.returncode == 0, ok.stderr[-2000:]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_honour_the_umask(tmp_path, umask):
    """Shared scratch: every file and folder written has the mode open()/mkdir give under the umask."""
    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    sd = synthetic.small_state_dict("v2", vocab=VOCAB, seed=1)
    synthetic.save(synthetic.upstream_checkpoint(sd, "small", step=100), str(root / "eng_spa_owt_run_1/best_state_100.pt"))
    cmd = [SNAKEMAKE, "--cores", "2", "--config", f"input_root={root}", f"output_root={out}", "check={length: 128}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    modes = {}
    for folder, dirs, files in os.walk(out):
        for name in dirs + files:
            path = os.path.join(folder, name)
            modes[os.path.relpath(path, out)] = stat.S_IMODE(os.stat(path).st_mode)
    expected_file, expected_dir = 0o666 & ~umask, 0o777 & ~umask
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (expected_dir if os.path.isdir(os.path.join(out, p)) else expected_file)}
    assert "converted/eng_spa_owt_run_1/best_state_100.pt" in modes and "report.csv" in modes
    assert wrong == {}, wrong


def test_output_inside_the_input_tree_is_refused(tmp_path):
    root = tmp_path / "clean_bbpe_50k"
    small_checkpoint(root / "eng_spa_owt_run_1/best_state_100.pt", seed=1)
    before = tree_state(str(root))
    proc = snakemake(str(root), str(root / "results"))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "is inside input_root" in text and "Traceback" not in text
    assert tree_state(str(root)) == before  # nothing written into the tree


@pytest.mark.parametrize("case, words", [
    # The tree sits where converted files go: a converted file's path would be its source's.
    ("tree in converted/", "is inside {out}/converted, where the pipeline writes"),
    ("output_root a link into the tree", "is inside input_root"),
    ("converted/ a link into the tree", "converted is a link into input_root"),
    # Planted deeper, after a first run made the folders: converted/<run> leading to the run itself.
    ("converted/<run> a link into the tree", "converted/eng_spa_owt_run_1 is a link into input_root"),
    ("checks/<run> a link to a folder elsewhere", "checks/eng_spa_owt_run_1 is a link to the folder"),
    ("absolute glob", "must be relative to input_root"),
    ("glob with ..", "climbs out of input_root"),
])
def test_placements_that_could_write_into_the_tree_are_refused(tmp_path, case, words):
    """Each way a tired config could send outputs onto checkpoints, or read outside the tree, stops
    the run at start with one line and writes nothing."""
    out = tmp_path / "results"
    root = out / "converted" if case == "tree in converted/" else tmp_path / "clean_bbpe_50k"
    small_checkpoint(root / "eng_spa_owt_run_1/best_state_100.pt", seed=1)
    config = {"glob": {"absolute glob": f"{root}/*/best_state_*.pt",
                       "glob with ..": "../clean_bbpe_50k/*/best_state_*.pt"}.get(case, "*/best_state_*.pt")}
    if case == "output_root a link into the tree":
        (tmp_path / "link").symlink_to(root, target_is_directory=True)
        out = tmp_path / "link" / "results"
    if case == "converted/ a link into the tree":  # e.g. made to put converted files on a bigger disk
        out.mkdir()
        (out / "converted").symlink_to(root / "eng_spa_owt_run_1", target_is_directory=True)
    if case == "checks/<run> a link to a folder elsewhere":  # its files would be replaced by the run's records
        (out / "checks").mkdir(parents=True)
        (tmp_path / "elsewhere").mkdir()
        (out / "checks" / "eng_spa_owt_run_1").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    if case == "converted/<run> a link into the tree":
        (out / "converted").mkdir(parents=True)
        (out / "converted" / "eng_spa_owt_run_1").symlink_to(root / "eng_spa_owt_run_1", target_is_directory=True)
    before = tree_state(str(root))
    proc = snakemake(str(root), str(out), "-n", config=config)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and words.format(out=os.path.realpath(out)) in text, text[-2000:]
    assert "Traceback" not in text and tree_state(str(root)) == before


def test_doctor_fails_the_same_placements_and_never_runs_a_glob_that_climbs_out(tmp_path):
    """doctor names what the run would refuse, and counts matches only for a glob that stays in the tree."""
    from ckpt_migrate.doctor import storage_findings

    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "results"
    small_checkpoint(root / "eng_spa_owt_run_1/best_state_100.pt", seed=1)

    def findings(glob):
        return [(f.level, f.what) for f in storage_findings({"input_root": str(root), "output_root": str(out),
                                                                "glob": glob})]

    assert ("ok", f"input_root {root}: 1 file(s) match '*/best_state_*.pt'") in findings("*/best_state_*.pt")
    climbing = findings("../clean_bbpe_50k/*/best_state_*.pt")
    assert [level for level, what in climbing if "climbs out of input_root" in what] == ["FAIL"]
    assert not any("file(s) match" in what for _, what in climbing)
    folders = findings("*_owt_run_*/")  # it would match folders, never a checkpoint file
    assert [level for level, what in folders if "ends with '/'" in what] == ["FAIL"]
    (out / "converted" / "odd\nname").mkdir(parents=True)  # a name with a newline: still one line
    (out / "converted" / "odd\nname" / "run").symlink_to(root / "eng_spa_owt_run_1", target_is_directory=True)
    planted = [what for level, what in findings("*/best_state_*.pt") if level == "FAIL" and "input_root" in what]
    assert planted == [f"{out}/converted/odd\\nname/run is a link into input_root {root}: the pipeline "
                       f"writes there, and the checkpoint tree is only ever read"]


def test_every_match_keeps_its_row_when_names_collide(tmp_path):
    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    small_checkpoint(root / "eng_spa_owt_run_1/best_state_100.pt", seed=1)
    shutil.copyfile(root / "eng_spa_owt_run_1/best_state_100.pt", root / "eng_spa_owt_run_1/best_state_100")
    proc = snakemake(str(root), str(out), config={"glob": "*/best_state_*", "check": "{length: 128}"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["relative_path"]: r["status"] for r in read_report(str(out / "report.csv"))}
    assert rows == {"eng_spa_owt_run_1/best_state_100.pt": "converted", "eng_spa_owt_run_1/best_state_100": "converted"}


def test_plan_batches_new_files_and_keeps_unchanged_ones_where_they_were(tmp_path):
    """Batches of conversions_per_job new or changed small files; an unchanged file keeps its
    batch (so its finished conversion stands); a replaced one moves to a new batch alone."""
    from ckpt_migrate.pipeline import OutputLayout, checkpoint_sources, detect_and_plan, read_batches

    root, layout = tmp_path / "clean_bbpe_50k", OutputLayout(str(tmp_path / "out"))
    for i in range(5):
        small_checkpoint(root / f"eng_spa_owt_run_{i}/best_state_100.pt", seed=i)
    medium_checkpoint(root / "hin_urd_owt_run_0/best_state_100.pt")

    def plan():
        sources = checkpoint_sources(str(root), "*_owt_run_*/best_state_*.pt")
        detect_and_plan(sources, {k: os.path.relpath(p, root) for k, p in sources.items()}, layout,
                        conversions_per_job=2)
        return read_batches(layout.plan)

    first = plan()
    assert sorted(len(members) for members in first.values()) == [1, 2, 2]
    assert sorted(k for members in first.values() for k in members) == [f"eng_spa_owt_run_{i}/best_state_100"
                                                                          for i in range(5)]
    src = next(iter(next(iter(first.values())).values()))
    assert os.path.isabs(src) and os.path.isfile(src)  # the source path, from the plan alone
    batch_of = {k: b for b, members in first.items() for k in members}

    assert plan() == first  # nothing changed: the same batches
    from ckpt_migrate.pipeline import write_yaml

    for key in batch_of:  # their conversions finished
        write_yaml(layout.check(key), {"status": "converted"})
    small_checkpoint(root / "eng_spa_owt_run_5/best_state_100.pt", seed=5)
    time.sleep(0.01)
    small_checkpoint(root / "eng_spa_owt_run_0/best_state_100.pt", seed=50)  # replaced: new mtime and bytes
    second = plan()
    moved = {k: b for b, members in second.items() for k in members}
    assert {k: moved[k] for k in batch_of if k != "eng_spa_owt_run_0/best_state_100"} == \
        {k: b for k, b in batch_of.items() if k != "eng_spa_owt_run_0/best_state_100"}
    new_batches = set(second) - set(first)
    assert len(new_batches) == 1 and moved["eng_spa_owt_run_0/best_state_100"] in new_batches
    assert set(second[moved["eng_spa_owt_run_0/best_state_100"]]) == {"eng_spa_owt_run_0/best_state_100",
                                                                     "eng_spa_owt_run_5/best_state_100"}
    # A deleted record (how a failed conversion is retried) puts its file in a new batch too.
    for key in moved:
        write_yaml(layout.check(key), {"status": "converted"})
    os.unlink(layout.check("eng_spa_owt_run_3/best_state_100"))
    third = plan()
    retried = [b for b in set(third) - set(second)]
    assert len(retried) == 1 and list(third[retried[0]]) == ["eng_spa_owt_run_3/best_state_100"]


def test_check_settings_on_the_command_line(tmp_path):
    """check: keys typed as a lab member types them are merged into the section and read as numbers
    (Snakemake passes nested values on as strings; YAML 1.1 reads 5e-4 as a string); a config
    written for an earlier version fails at start, saying where the key went."""
    (tmp_path / "tree").mkdir()
    ok = snakemake(str(tmp_path / "tree"), str(tmp_path / "out"), "-n",
                   config={"check": "{length: 64, tolerance: 5e-4, dtype: bfloat16, device: cuda:1}"})
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    bad = snakemake(str(tmp_path / "tree"), str(tmp_path / "out"), "-n", config={"check": "{tolerance: small}"})
    assert bad.returncode != 0 and "'small' is not of type" in bad.stdout + bad.stderr
    gpu = snakemake(str(tmp_path / "tree"), str(tmp_path / "out"), "-n", config={"check": "{device: gpu}"})
    assert gpu.returncode != 0 and "'gpu' does not match" in gpu.stdout + gpu.stderr
    flat = snakemake(str(tmp_path / "tree"), str(tmp_path / "out"), "-n", config={"check_length": 1024})
    assert flat.returncode != 0
    assert "config keys check_length are now under check:" in flat.stdout + flat.stderr


def _replace_keeping_times(path, new, how: str) -> None:
    """Put the bytes of ``new`` at ``path`` with its size and mtime kept, as each tool does it."""
    st = os.stat(path)
    staged = path.parent / f".{how}.tmp"
    shutil.copyfile(new, staged)
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))
    if how == "mv":  # mv of a file prepared elsewhere: a new inode, the old mtime
        os.rename(staged, path)
    elif how == "cp -p":  # cp -p onto the file: the same inode rewritten, then its times set
        shutil.copyfile(staged, path)
        shutil.copystat(staged, path)
        staged.unlink()
    elif how == "rsync -a":  # rsync -a: a temporary beside it with the times, renamed over it
        shutil.copy2(staged, path.parent / ".rsync.tmp")
        os.replace(path.parent / ".rsync.tmp", path)
        staged.unlink()
    elif how == "touch -r":  # rewritten in place, then touch -r restores the times
        with open(path, "r+b") as f:
            f.write(new.read_bytes())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        staged.unlink()
    else:  # patched in place (a NaN fixed by hand): 4 bytes of one tensor's data, then touch -r
        staged.unlink()
        with zipfile.ZipFile(path) as archive:
            entry = max(archive.infolist(), key=lambda e: e.file_size)
        with open(path, "r+b") as f:
            f.seek(entry.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", f.read(4))
            f.seek(entry.header_offset + 30 + name_length + extra_length + 64)
            f.write(struct.pack("<f", 12.5))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_files_replaced_with_their_mtime_kept_are_reconverted_and_a_future_file_holds_nothing_back(tmp_path):
    """Issue 21: what mv, cp -p, rsync -a and touch -r keep (size, mtime) does not hide a new
    model; a file modified in the future is its own unreadable row, and the rest converts."""
    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    ways = ("mv", "cp -p", "rsync -a", "touch -r", "patch")
    paths = [altered_small_checkpoint(root / f"eng_spa_owt_run_{i}/best_state_100.pt", seed=i, optimizers=False)
             for i in range(len(ways))]
    future = small_checkpoint(root / "hin_urd_owt_run_9/best_state_100.pt", seed=9)
    os.utime(future, (time.time() + 86400, time.time() + 86400))
    proc = snakemake(str(root), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert rows["hin_urd_owt_run_9/best_state_100.pt"]["status"] == "unreadable"
    assert "modified in the future" in rows["hin_urd_owt_run_9/best_state_100.pt"]["reason"]
    assert all(rows[os.path.relpath(p, root)]["status"] == "converted" for p in paths)

    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 0  # the patch lands in the first row of the largest tensor (the embedding or the head)
    with torch.no_grad():
        before_patch = load_pretrained_checkpoint(str(paths[-1]))[0](ids)
    for i, how in enumerate(ways):
        # The same pickle, so the same size, with other weights.
        new = altered_small_checkpoint(tmp_path / f"new_{i}/best_state_100.pt", seed=i, optimizers=False,
                                       mutate=lambda sd: next(iter(sd.values())).mul_(-1))
        _replace_keeping_times(root / os.path.relpath(paths[i], root), Path(new), how)
    cli = os.path.join(os.path.dirname(SNAKEMAKE), "ckpt-migrate")
    check = subprocess.run([cli, "verify-outputs", str(out)], capture_output=True, text=True)
    assert check.returncode != 0 and check.stdout.count("source changed") + check.stderr.count("source changed") == 5
    # output_root through a link: Snakemake's records (of this checkout, by path) hold no params
    # for it, as for a second checkout; the plan's own index still sees every replaced file.
    (tmp_path / "out_link").symlink_to(out)
    proc = snakemake(str(root), str(tmp_path / "out_link"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts.get("plan") == 1 and counts.get("convert") == 5, counts
    for i, how in enumerate(ways):
        rel = os.path.relpath(paths[i], root)
        converted, _, _ = load_pretrained_checkpoint(str(out / "converted" / rel))
        new = paths[i] if how == "patch" else tmp_path / f"new_{i}/best_state_100.pt"
        replacement, _, _ = load_pretrained_checkpoint(str(new))
        with torch.no_grad():
            assert torch.equal(converted(ids), replacement(ids)), how
            assert how != "patch" or not torch.equal(converted(ids), before_patch)
    assert "Nothing to be done" in snakemake(str(root), str(tmp_path / "out_link"), "-n").stdout


@pytest.mark.e2e
def test_links_out_of_the_tree_are_not_read_and_no_cell_is_a_formula(tmp_path):
    """Issue 21: a match that resolves outside input_root is a row, never opened (follow_links
    false); with follow_links it is read like any file, and no output quotes its bytes. A run
    folder named like a formula gives cells a spreadsheet shows as text."""
    root, out, elsewhere = tmp_path / "clean_bbpe_50k", tmp_path / "out", tmp_path / "elsewhere"
    formula = "=SUM(1+2)_owt_run_1"
    altered_small_checkpoint(root / formula / "best_state_100.pt", seed=1, optimizers=False)
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("SECRET-LINE of a private file\n")
    outside_ckpt = altered_small_checkpoint(elsewhere / "run/best_state_100.pt", seed=2, optimizers=False)
    for run, target in (("eng_spa_owt_run_2", elsewhere / "notes.txt"), ("eng_spa_owt_run_3", outside_ckpt)):
        (root / run).mkdir()
        (root / run / "best_state_100.pt").symlink_to(target)

    def outputs_hold(text: bytes) -> list:
        return [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
                if text in open(os.path.join(d, f), "rb").read()]

    proc = snakemake(str(root), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    for run in ("eng_spa_owt_run_2", "eng_spa_owt_run_3"):
        row = rows[f"{run}/best_state_100.pt"]
        assert row["status"] == "unreadable" and "outside input_root: not read" in row["reason"], row
    assert outputs_hold(b"SECRET") == []
    cells = (out / "report.csv").read_text()
    assert f"'{formula}/best_state_100.pt" in cells and f",{formula}" not in cells
    assert rows[f"'{formula}/best_state_100.pt"]["status"] == "converted"

    proc = snakemake(str(root), str(out), config={"follow_links": "true"})  # as typed: YAML's true, not True
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert rows["eng_spa_owt_run_3/best_state_100.pt"]["status"] == "converted"
    assert rows["eng_spa_owt_run_2/best_state_100.pt"]["status"] == "unreadable"
    assert outputs_hold(b"SECRET") == [] and outputs_hold(b"ECRET-LINE") == []


def _write_below(root: Path, names: list[str], data: bytes) -> bytes:
    """Write ``data`` at root/names[0]/.../names[-1], making the folders, each opened from its
    parent's descriptor (the whole path may be over PATH_MAX); returns the path as bytes."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for name in names[:-1]:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    out = os.open(names[-1], os.O_CREAT | os.O_WRONLY | os.O_EXCL, dir_fd=fd)
    os.write(out, data)
    os.close(out)
    os.close(fd)
    return os.fsencode(str(root)) + b"/" + "/".join(names).encode()


def _read_below(path: bytes) -> bytes:
    parts = path.split(b"/")
    fd = os.open(b"/", os.O_RDONLY | os.O_DIRECTORY)
    for name in [p for p in parts[:-1] if p]:
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    f = os.open(parts[-1], os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    with os.fdopen(f, "rb") as stream:
        return stream.read()


@pytest.mark.e2e
def test_a_match_over_path_max_is_its_own_row_and_the_rest_converts(tmp_path):
    """Issue 21: a matched path longer than PATH_MAX (which glob skips without a word) is an
    unreadable row saying so, kept out of the rule inputs; the rest of the tree converts."""
    levels, rest = divmod(3830 - len(str(tmp_path)), 201)
    deep = tmp_path.joinpath(*["d" * 200] * levels, "e" * max(1, rest - 1))
    root, out = deep / "clean_bbpe_50k", tmp_path / "out"
    normal = small_checkpoint(root / "eng_spa_owt_run_1/best_state_100.pt", seed=1)
    data = Path(normal).read_bytes()
    long_run = "hin_urd_owt_run_2_" + "x" * 230
    long_path = _write_below(root, [long_run, "best_state_100.pt"], data)
    assert len(long_path) >= os.pathconf("/", "PC_PATH_MAX") > len(os.fsencode(str(normal)))
    proc = snakemake(str(root), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert rows["eng_spa_owt_run_1/best_state_100.pt"]["status"] == "converted"
    row = rows[f"{long_run}/best_state_100.pt"]
    assert row["status"] == "unreadable" and "(PATH_MAX): not read" in row["reason"], row
    assert _read_below(long_path) == data and Path(normal).read_bytes() == data
    assert "Nothing to be done" in snakemake(str(root), str(out), "-n").stdout
