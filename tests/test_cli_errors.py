"""Issue 21: every command, given damaged, empty, non-UTF-8 or missing inputs, says what is wrong
in one line and exits non-zero; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CLI = os.path.join(os.path.dirname(sys.executable), "ckpt-migrate")


@pytest.fixture
def damaged(tmp_path):
    out = tmp_path / "out"
    (out / "checks/run_1").mkdir(parents=True)
    (out / "report.csv").write_bytes(b"\xff\xfe not a report")
    (out / "plan.tsv").write_text("key\tstatus\n")
    (out / "checks/run_1/best_state_100.yaml").write_text("just text, no record")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "empty_out").mkdir()
    (tmp_path / "empty_out" / "report.csv").write_bytes(b"")
    (tmp_path / "config.yaml").write_bytes(b"input_root: [\xff")
    (tmp_path / "list.yaml").write_text("- input_root\n")
    (tmp_path / "good.yaml").write_text("input_root: clean_bbpe_50k\n")
    (tmp_path / "fifo_out").mkdir()
    os.mkfifo(tmp_path / "fifo_out" / "report.csv")  # opened, it would wait for a writer for ever
    os.mkfifo(tmp_path / "fifo.yaml")
    return tmp_path


COMMANDS = {
    "report on a non-UTF-8 report.csv": (["report", "{t}/out"], "is damaged"),
    "report on a missing folder": (["report", "{t}/missing"], "does not exist"),
    "report on an empty report.csv": (["report", "{t}/empty_out"], "is empty"),
    "verify-outputs with a damaged check record": (["verify-outputs", "{t}/out"], "holds no record"),
    "verify-outputs on a missing folder": (["verify-outputs", "{t}/missing"], "not the output_root"),
    "inspect an empty file": (["inspect", "{t}/empty.pt"], "empty file"),
    "convert a missing file": (["convert", "{t}/missing.pt", "{t}/converted.pt"], "file not found"),
    "check an empty file": (["check", "{t}/empty.pt"], "empty file"),
    "doctor with a non-UTF-8 config": (["doctor", "--configfile", "{t}/config.yaml"], "config.yaml is not UTF-8"),
    "doctor with a config that is a list": (["doctor", "--configfile", "{t}/list.yaml"], "list.yaml holds a list"),
    "doctor with a config that is a FIFO": (["doctor", "--configfile", "{t}/fifo.yaml"], "fifo.yaml is a FIFO"),
    "doctor with a --config that is not YAML": (["doctor", "--configfile", "{t}/good.yaml", "--config",
                                                 "input_root=["], "input_root=...: the value is not valid YAML"),
    "report on a report.csv that is a FIFO": (["report", "{t}/fifo_out"], "report.csv is a FIFO"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_bad_input_is_one_line_and_a_nonzero_exit(damaged, name):
    argv, words = COMMANDS[name]
    proc = subprocess.run([CLI, *(a.format(t=damaged) for a in argv)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    said = [line for line in (proc.stderr + proc.stdout).splitlines() if words in line]
    assert len(said) == 1 and len(said[0]) <= 400, proc.stderr + proc.stdout
    assert not (damaged / "converted.pt").exists()


def test_a_yaml_error_names_the_line_and_quotes_nothing(tmp_path):
    """A parser's message quotes the file (an unknown tag, a snippet): the line says where only."""
    (tmp_path / "config.yaml").write_text("input_root: !SECRET_tag_hunter2 x\n")
    record = tmp_path / "out/checks/run_1/best_state_100.yaml"
    record.parent.mkdir(parents=True)
    record.write_text("status: converted\nsha256: !SECRET_tag_hunter2 [\n")
    (tmp_path / "out/plan.tsv").write_text("key\tstatus\n")
    for argv in (["doctor", "--configfile", str(tmp_path / "config.yaml")], ["verify-outputs", str(tmp_path / "out")]):
        proc = subprocess.run([CLI, *argv], capture_output=True, text=True, timeout=60)
        said = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "not valid YAML (line" in said and "SECRET" not in said, said
