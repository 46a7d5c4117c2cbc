"""Snakemake's HTML report (--report) and the summary: table, figures and every reason are in the page."""

from __future__ import annotations

import base64
import html as html_lib
import os
import re
import subprocess

import pytest

from ckpt_migrate.pipeline import read_report, summarize

from .builders import build_tree
from .pipeline_helpers import REPO, SNAKEMAKE, snakemake

DATA_URI = re.compile(r"data:([\w/+.-]+)(?:;[\w=.-]+)*;base64,([A-Za-z0-9+/=]+)")


TREE = {
    "eng_spa_owt_run_0/best_state_100.pt": "small v1",
    "eng_spa_owt_run_1/best_state_100.pt": "small v2",
    "hin_urd_owt_run_1/best_state_100.pt": "medium",
    "rus_pol_owt_run_1/best_state_100.pt": "small v2 with NaN",
    "rus_pol_owt_run_2/best_state_100.pt": "no known layout",
    "tam_mal_owt_run_1/best_state_100.pt": "hostile",
    "tam_mal_owt_run_2/best_state_100.pt": "truncated zip",
}


@pytest.mark.e2e
def test_html_report_holds_table_figures_and_every_reason(tmp_path):
    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    build_tree(root, TREE)
    run = snakemake(str(root), str(out), config={"allow_check_failures": "True"})
    assert run.returncode == 0, run.stderr[-3000:]
    page = tmp_path / "report.html"
    proc = subprocess.run([SNAKEMAKE, "--config", f"input_root={root}", f"output_root={out}", "check={length: 512}",
                           "allow_check_failures=True", "--report", str(page)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and page.exists(), proc.stderr[-3000:]
    html = page.read_text()
    embedded = [(mime, base64.b64decode(data)) for mime, data in DATA_URI.findall(html)]
    pngs = [blob for mime, blob in embedded if mime == "image/png" and blob.startswith(b"\x89PNG")]
    pages = [blob.decode() for mime, blob in embedded if mime == "text/html"]
    assert len(pngs) >= 2  # logit check and status/format figures
    table = next(p for p in pages if "<h3>All checkpoints" in p)
    attention = next(p for p in pages if "<h3>Files that need a person" in p)
    assert "table.sortable th" in table and "addEventListener" in table  # sortable by column
    rows = read_report(str(out / "report.csv"))
    statuses = {r["status"] for r in rows}
    assert statuses == {"converted", "not_needed", "failed", "unknown", "unsafe", "unreadable"}
    for row in rows:
        assert html_lib.escape(row["relative_path"]) in table
        if row["status"] in ("failed", "unknown", "unsafe", "unreadable"):
            assert row["reason"] and html_lib.escape(row["reason"]) in attention, row
    for caption in ("Logit check of every converted checkpoint", "The files that need a person"):
        assert caption in html


def test_summary_names_what_needs_a_person_and_files_still_being_written():
    import time

    rows = [
        {"status": "converted", "lang_pair": "eng_spa", "relative_path": "a", "reason": "", "mtime": "0"},
        {"status": "failed", "lang_pair": "eng_spa", "relative_path": "b", "reason": "logit check failed", "mtime": "0"},
        {"status": "unreadable", "lang_pair": "rus_pol", "relative_path": "c", "reason": "damaged",
         "mtime": str(time.time() - 30)},
        {"status": "unsafe", "lang_pair": "", "relative_path": "d", "reason": "os.system", "mtime": "0"},
    ]
    text = summarize(rows)
    assert text.splitlines()[0] == "4 checkpoints: 1 converted, 1 failed, 1 unreadable, 1 unsafe"
    assert "  eng_spa: 1 converted, 1 failed" in text and "  (other): 1 unsafe" in text
    assert "failed: b: logit check failed" in text and "unsafe: d: os.system" in text
    assert "unreadable: c: damaged (modified 30 s ago: probably still being written" in text


def test_report_command_prints_the_summary(tmp_path, python):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.csv").write_text("path,relative_path,lang_pair,status,reason,mtime\n/x,eng_spa_owt_run_1/a.pt,eng_spa,converted,,0\n")
    proc = subprocess.run([python, "-m", "ckpt_migrate.cli", "report", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and "1 checkpoints: 1 converted" in proc.stdout
    missing = subprocess.run([python, "-m", "ckpt_migrate.cli", "report", str(tmp_path / "none")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_report_rereads_only_the_records_that_changed(tmp_path, monkeypatch):
    """The report keeps each row with what it was read from: a rerun reads no YAML for
    unchanged files, and a changed check record or manifest changes its row."""
    from ckpt_migrate import pipeline

    root, layout = tmp_path / "clean_bbpe_50k", pipeline.OutputLayout(str(tmp_path / "out"))
    build_tree(root, {"eng_spa_owt_run_1/best_state_100.pt": "small v2", "hin_urd_owt_run_1/best_state_100.pt": "medium"})
    sources = pipeline.checkpoint_sources(str(root), "*_owt_run_*/best_state_*.pt")
    pipeline.detect_and_plan(sources, {k: os.path.relpath(p, root) for k, p in sources.items()}, layout)
    rows = {r["relative_path"]: r["status"] for r in pipeline.write_report(layout)}
    assert rows == {"eng_spa_owt_run_1/best_state_100.pt": "failed", "hin_urd_owt_run_1/best_state_100.pt": "not_needed"}

    reads = []
    real_read_yaml = pipeline.read_yaml
    from ckpt_migrate import report as report_code

    monkeypatch.setattr(report_code, "read_yaml", lambda path: reads.append(path) or real_read_yaml(path))
    again = pipeline.write_report(layout)
    assert reads == [] and [r["status"] for r in again] == ["failed", "not_needed"]

    pipeline.write_yaml(layout.check("eng_spa_owt_run_1/best_state_100"),
                        {"status": "converted", "reason": "", "max_abs_logit_diff": 2e-6, "sha256": "ab" * 32,
                         "converted_path": layout.converted("eng_spa_owt_run_1/best_state_100")})
    rows = {r["relative_path"]: r for r in pipeline.write_report(layout)}
    assert reads == [layout.manifest("eng_spa_owt_run_1/best_state_100"), layout.check("eng_spa_owt_run_1/best_state_100")]
    row = rows["eng_spa_owt_run_1/best_state_100.pt"]
    assert (row["status"], row["max_abs_logit_diff"], row["converted_sha256"]) == ("converted", 2e-6, "ab" * 32)
    assert read_report(layout.report)[0]["status"] == "converted"

    # Other row code (report.py, records.py or the metric list in metrics.py changed) makes every row again.
    from ckpt_migrate import fingerprint

    reads.clear()
    monkeypatch.setattr(fingerprint, "report_fingerprint", lambda: "0123456789abcdef")
    pipeline.write_report(layout)
    assert len(reads) == 3  # both manifests and the one check record

    # A record that is not one the pipeline wrote (damaged, or a file linked there by hand) is a
    # failed row saying so, quoting none of it; the other rows stand, in the report and after a failure.
    check_path = layout.check("eng_spa_owt_run_1/best_state_100")
    os.unlink(check_path)
    with open(check_path, "w") as f:
        f.write("SECRET: [unclosed\n")
    relative = {k: os.path.relpath(p, root) for k, p in sources.items()}
    for rows in (pipeline.write_report(layout), report_code.report_after_failure(layout, relative)):
        rows = {r["relative_path"]: r for r in rows}
        row = rows["eng_spa_owt_run_1/best_state_100.pt"]
        assert row["status"] == "failed" and "is not one this pipeline wrote" in row["reason"]
        assert "SECRET" not in row["reason"] and rows["hin_urd_owt_run_1/best_state_100.pt"]["status"] == "not_needed"
