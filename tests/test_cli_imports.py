"""The login-node commands never import torch: ``inspect``, ``report``, ``verify-outputs`` and
``doctor`` (without ``--probe``) each run in a fresh interpreter on real inputs (a small
checkpoint, its converted file, the output folder of a real conversion), and torch is imported
neither by the command nor by the detection child it forks.

Two witnesses: ``sys.modules`` after the command returns, and an audit hook installed before
the CLI is imported (CPython raises an ``import`` event for every module it loads; a forked
child inherits the hook), which appends every torch import to a marker file. The negative
control runs a command that does import torch and shows both witnesses see it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from .builders import small_checkpoint

# Appends "pid module" to the marker file for every torch module any process loads from here on.
HOOK = r"""
import os, sys
marker = os.environ["CKPT_MIGRATE_TORCH_MARKER"]

def hook(event, args):
    if event == "import" and (args[0] == "torch" or args[0].startswith("torch.")):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()} {args[0]}\n")

sys.addaudithook(hook)
"""

# sys.argv[1:] are the CLI's arguments; prints its exit code and whether torch was loaded, after
# the command's own output.
WRAPPER = HOOK + r"""
from ckpt_migrate.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
print("CKPT_MIGRATE_RESULT", rc, "torch" in sys.modules, flush=True)
"""


def run_cli(*args: str, marker: str, code: str = WRAPPER) -> tuple[int, bool, str, str, float]:
    """(exit code, torch in sys.modules, stdout before the result line, stderr, seconds)."""
    if os.path.exists(marker):
        os.unlink(marker)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CKPT_MIGRATE_TORCH_MARKER": marker})
    seconds = time.perf_counter() - t0
    out, _, last = proc.stdout.rstrip("\n").rpartition("\n")
    assert last.startswith("CKPT_MIGRATE_RESULT "), proc.stdout + proc.stderr
    _, rc, loaded = last.split()
    return int(rc), loaded == "True", out, proc.stderr, seconds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tree with one small checkpoint, converted by the pipeline's own functions into an output
    folder with its check record and report, and a config naming both. Under the home folder:
    doctor fails an output_root on a node-local filesystem such as /tmp."""
    from ckpt_migrate import pipeline

    base = tempfile.mkdtemp(prefix=".ckpt-migrate-cli-imports-", dir=os.path.expanduser("~"))
    root = os.path.join(base, "clean_bbpe_50k")
    layout = pipeline.OutputLayout(os.path.join(base, "results"))
    small_checkpoint(os.path.join(root, "eng_spa_owt_run_1/best_state_100.pt"), seed=1)
    sources = pipeline.checkpoint_sources(root, "*_owt_run_*/best_state_*.pt")
    pipeline.detect_and_plan(sources, {k: os.path.relpath(p, root) for k, p in sources.items()}, layout)
    (batch,) = pipeline.read_batches(layout.plan)
    key = "eng_spa_owt_run_1/best_state_100"
    pipeline.run_batch(layout, batch, {"length": 64, "device": "cpu"}, None, layout.batch(batch))
    os.makedirs(os.path.dirname(layout.check(key)), exist_ok=True)  # what the convert rule does
    shutil.copy(layout.staged(key), layout.check(key))
    pipeline.write_report(layout)
    assert os.path.isfile(layout.converted(key)) and os.path.isfile(layout.report)
    config = os.path.join(base, "config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"input_root": root, "output_root": layout.root, "glob": "*_owt_run_*/best_state_*.pt"}, f)
    yield {"source": sources[next(iter(sources))], "converted": layout.converted(key), "out": layout.root,
           "config": config, "marker": str(tmp_path_factory.mktemp("marker") / "torch_imports"), "base": base}
    shutil.rmtree(base, ignore_errors=True)


def _assert_no_torch(run, loaded: bool):
    assert not loaded, "torch is in sys.modules"
    assert not os.path.exists(run["marker"]), open(run["marker"]).read()


def test_inspect_imports_no_torch(run):
    rc, loaded, out, err, seconds = run_cli("inspect", run["source"], run["converted"], marker=run["marker"])
    assert rc == 0, out + err
    assert out.splitlines()[0] == "Format: small (from train_gpt_small.py)"
    assert "Format: gptbatched (converted from small (from train_gpt_small.py))" in out
    _assert_no_torch(run, loaded)
    rc, loaded, out, err, _ = run_cli("inspect", "--json", run["source"], marker=run["marker"])
    assert rc == 0 and '"format": "small"' in out and '"variant": "v2"' in out, out + err
    _assert_no_torch(run, loaded)
    print(f"inspect: {seconds:.2f} s")


def test_doctor_without_probe_imports_no_torch(run):
    rc, loaded, out, err, seconds = run_cli("doctor", "--configfile", run["config"], marker=run["marker"])
    lines = out.splitlines()
    assert rc == 0, out + err
    assert any(l.startswith("ok") and "1 file(s) match" in l for l in lines), out
    assert any(l.startswith("ok") and "is writable" in l for l in lines), out
    # torch is named from its installed files: version and build, without importing it.
    import torch

    build = "CUDA build" if torch.version.cuda else "CPU-only build"
    assert f"ok    torch {torch.__version__} ({build}) in {sys.executable}" in lines, out
    assert lines[-1].endswith("0 FAIL, 0 warn"), out
    _assert_no_torch(run, loaded)
    print(f"doctor: {seconds:.2f} s")


def test_report_imports_no_torch(run):
    rc, loaded, out, err, seconds = run_cli("report", run["out"], marker=run["marker"])
    assert rc == 0, out + err
    assert out.splitlines()[0] == f"report: {os.path.join(run['out'], 'report.csv')}"
    assert "1 checkpoints: 1 converted" in out
    _assert_no_torch(run, loaded)
    rc, loaded, out, err, _ = run_cli("report", os.path.join(run["base"], "nowhere"), marker=run["marker"])
    assert rc == 2 and "does not exist" in err
    _assert_no_torch(run, loaded)
    print(f"report: {seconds:.2f} s")


def test_verify_outputs_imports_no_torch(run):
    rc, loaded, out, err, seconds = run_cli("verify-outputs", run["out"], marker=run["marker"])
    assert rc == 0, out + err
    assert out.splitlines()[-1] == "1 converted file(s) match their records; 0 problem(s)"
    _assert_no_torch(run, loaded)
    # A changed converted file is named, still without torch.
    with open(run["converted"], "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    try:
        rc, loaded, out, err, _ = run_cli("verify-outputs", run["out"], marker=run["marker"])
        assert rc == 1 and out.startswith(f"changed: {run['converted']}") and "1 problem(s)" in out, out + err
        _assert_no_torch(run, loaded)
    finally:
        with open(run["converted"], "r+b") as f:
            f.seek(-1, 2)
            f.write(last)
    rc, loaded, out, err, _ = run_cli("verify-outputs", os.path.join(run["base"], "nowhere"), marker=run["marker"])
    assert rc == 2 and "is not the output_root of a run" in err
    _assert_no_torch(run, loaded)
    print(f"verify-outputs: {seconds:.2f} s")


def test_negative_control_the_witnesses_see_torch_in_a_child_and_in_the_process(run):
    """A forked child imports torch (as a detection child would if the reader needed it): the
    marker names the child while the parent's sys.modules has no torch; then the process itself
    imports it, and both witnesses see that."""
    code = HOOK + r"""
pid = os.fork()
if pid == 0:
    import torch
    os._exit(0)
os.waitpid(pid, 0)
print("child", pid, "torch" in sys.modules, flush=True)
import torch
print("CKPT_MIGRATE_RESULT", 0, "torch" in sys.modules, flush=True)
"""
    rc, loaded, out, err, _ = run_cli(marker=run["marker"], code=code)
    _, child, parent_had_torch = out.split()
    assert rc == 0 and parent_had_torch == "False" and loaded, out + err
    pids = {line.split()[0] for line in open(run["marker"]).read().splitlines()}
    assert child in pids and len(pids) == 2, pids  # the child's imports, then the process's own
