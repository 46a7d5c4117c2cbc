"""Attack files by technique (tests/builders.py, issue 19) and the false alarms to avoid.

Every attack is a file that would run ``touch <marker>`` (or import a module whose top level
does) under ``torch.load(weights_only=False)``; CPython's own unpickler, run with recording
stubs, shows it reaching the call. ``inspect_archive`` must call each one ``unsafe`` naming the
call, run nothing, and change nothing. Files that torch's weights-only loader reads must never
be ``unsafe``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from ckpt_migrate.safe_pickle import ALLOWED_GLOBALS, inspect_archive

from . import builders
from . import stub_unpickler as stub
from .old_reader import old_safe_pickle


def printable(text: str) -> str:
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _snapshot(directory) -> dict[str, str]:
    out = {}
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _names(expected) -> tuple:
    return (expected,) if isinstance(expected, str) else tuple(expected)


def _build(tmp_path, name):
    build, expected = builders.ATTACKS[name]
    folder = tmp_path / "run"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    path = build(str(folder / "best_state_100.pt"), str(marker))
    return path, marker, expected


@pytest.mark.parametrize("name", sorted(builders.ATTACKS))
def test_attack_is_unsafe_naming_the_call(tmp_path, name):
    path, marker, expected = _build(tmp_path, name)
    before = _snapshot(tmp_path)
    found = inspect_archive(path)
    assert found.status == "unsafe", (found.status, found.reason)
    assert any(printable(n) in found.reason for n in _names(expected)), found.reason
    assert "\n" not in found.reason
    assert not marker.exists()
    assert _snapshot(tmp_path) == before  # the file (and the planted module beside it) unchanged, nothing added


@pytest.mark.parametrize("name", sorted(builders.ATTACKS))
def test_attack_reaches_the_call_in_cpythons_unpickler(tmp_path, name):
    """The ground truth: what torch.load would unpickle, run with recording stubs, reaches the
    named call (so each attack above is real, and its expected name the first offence)."""
    path, marker, expected = _build(tmp_path, name)
    records = stub.records_of_file(path)
    offences = [stub.analyse(r, frozenset(ALLOWED_GLOBALS)) for r in records]
    first = next(v for v in offences if v.offender)
    assert _names(expected)[0] in (first.offender,) + tuple(first.also), (first, [r.resolved for r in records])
    assert not marker.exists()


def test_negative_control_the_old_reader_misses_attacks(tmp_path):
    old = old_safe_pickle()
    missed = []
    for i, name in enumerate(sorted(builders.ATTACKS)):
        (tmp_path / str(i)).mkdir()
        path, _marker, expected = _build(tmp_path / str(i), name)
        found = old.inspect_archive(path)
        if not (found.status == "unsafe" and any(n in found.reason for n in _names(expected))):
            missed.append(name)
    assert any(n.startswith("frame:") for n in missed), missed
    assert "Counter(foreign instance)" in missed and "legacy file, call in the storage keys (5th pickle)" in missed
    assert "zip with data.pkl DEFLATED" in missed and "tar format, call in pickle" in missed


# --- honest files in the same containers: the verdicts above come from the payload, not the format

def test_honest_legacy_file_is_read_by_torch_and_not_unsafe(tmp_path):
    path = builders.legacy_file(tmp_path / "legacy.pt", None, payload_in=None)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert inspect_archive(path).status != "unsafe"


def test_honest_compressed_pickle_is_read_by_torch_and_not_unsafe(tmp_path):
    path = builders.compressed_pickle_checkpoint(tmp_path / "deflated.pt")
    assert torch.load(path, weights_only=True)["step"] == 100
    assert inspect_archive(path).status != "unsafe"


def test_honest_tar_file_is_read_by_torch_and_not_unsafe(tmp_path):
    path = builders.tar_file(tmp_path / "old.tar.pt")
    with pytest.raises(Exception, match="legacy .tar format"):
        torch.load(path, weights_only=True)
    assert torch.load(path, weights_only=False) == {"step": 100, "lr": 0.1}  # our own honest bytes
    assert inspect_archive(path).status != "unsafe"


@pytest.mark.parametrize("protocol", [0, 1, 2, 4])
def test_honest_raw_pickle_is_not_unsafe(tmp_path, protocol):
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"step": 100, "lr": 0.1, "names": ["a", "b"]}, protocol=protocol))
    assert inspect_archive(str(path)).status != "unsafe"


# --- false alarms: what torch's weights-only loader reads is never unsafe -----------------------

def _values():
    i = torch.tensor([[0, 1], [1, 0]])
    return {
        "sparse COO tensor": lambda: torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0]), (2, 2)),
        "sparse CSR tensor": lambda: torch.tensor([[1.0, 0.0], [0.0, 2.0]]).to_sparse_csr(),
        "strided nested tensor": lambda: torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)],
                                                                   layout=torch.strided),
        "meta tensor": lambda: torch.empty(3, 4, device="meta"),
        "quantized tensor": lambda: torch.quantize_per_tensor(torch.tensor([1.0, 2.0]), 0.1, 10, torch.quint8),
        "np.float64(1.5)": lambda: np.float64(1.5),
        "np.int64(3)": lambda: np.int64(3),
        "np.dtype('float32')": lambda: np.dtype("float32"),
        "np.arange(3)": lambda: np.arange(3),
        "np.random.get_state()": lambda: np.random.get_state(),
        "default_rng(0).bit_generator.state": lambda: np.random.default_rng(0).bit_generator.state,
        "np.random.default_rng(0)": lambda: np.random.default_rng(0),
        "np.random.RandomState(0)": lambda: np.random.RandomState(0),
        "argparse.Namespace(lr=0.1)": lambda: argparse.Namespace(lr=0.1),
    }


# What torch 2.13's weights-only loader does with each (checked, not assumed: the test asserts it).
# The numpy values and Namespace pickle numpy._core.multiarray.scalar/_reconstruct, numpy.dtype,
# numpy.random._pickle.* and argparse.Namespace (see pickletools.dis), none on torch's list; the
# bit generator's state is a plain dict of ints and strings.
TORCH_WEIGHTS_ONLY_READS = {
    "sparse COO tensor": True, "sparse CSR tensor": True, "strided nested tensor": True, "meta tensor": True,
    "quantized tensor": True, "default_rng(0).bit_generator.state": True,
    "np.float64(1.5)": False, "np.int64(3)": False, "np.dtype('float32')": False, "np.arange(3)": False,
    "np.random.get_state()": False, "np.random.default_rng(0)": False, "np.random.RandomState(0)": False,
    "argparse.Namespace(lr=0.1)": False,
}
TENSOR_KINDS = ("sparse COO tensor", "sparse CSR tensor", "strided nested tensor", "meta tensor", "quantized tensor")


def _saved(tmp_path, name) -> str:
    path = str(tmp_path / "value.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"model": {"embed.weight": torch.zeros(2, 2)}, "value": _values()[name]()}, path)
    return path


def _torch_reads(path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.load(path, weights_only=True)
        except pickle.UnpicklingError:
            return False
    return True


@pytest.mark.parametrize("name", sorted(TORCH_WEIGHTS_ONLY_READS))
def test_no_false_alarm_where_torch_weights_only_reads(tmp_path, name):
    path = _saved(tmp_path, name)
    before = _snapshot(tmp_path)
    reads = _torch_reads(path)
    assert reads == TORCH_WEIGHTS_ONLY_READS[name]
    found = inspect_archive(path)
    if reads:
        assert found.status != "unsafe", found.reason
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("name", TENSOR_KINDS)
def test_tensor_kinds_torch_reads_are_ok(tmp_path, name):
    """Issue 19: everything torch's weights-only loader accepts is data here too (sparse, nested,
    meta, quantized): ok, not only 'not unsafe'."""
    found = inspect_archive(_saved(tmp_path, name))
    assert found.status == "ok", found.reason


# --- containers Python's readers see one way and torch another: torch.load is the ground truth

_TORCH_LOAD_ALL = """
import os, sys, warnings, torch
warnings.simplefilter("ignore")
for path in sys.argv[1:]:
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pass
"""


def test_container_attacks_are_unsafe_and_torch_load_runs_them(tmp_path):
    """The reader names the call in each; torch.load(weights_only=False), run on the same files
    in a child process, creates every marker (so each attack is real, and the reader's view is
    torch's, not zipfile's or tarfile's)."""
    built = {}
    for i, (name, (build, expected)) in enumerate(sorted(builders.TORCH_LOAD_ATTACKS.items())):
        folder = tmp_path / f"run_{i}"
        folder.mkdir()
        built[name] = (build(str(folder / "best_state_100.pt"), str(tmp_path / f"PWNED_{i}")),
                       tmp_path / f"PWNED_{i}", expected)
    before = _snapshot(tmp_path)
    for name, (path, marker, expected) in built.items():
        found = inspect_archive(path)
        assert found.status == "unsafe" and expected in found.reason, (name, found.status, found.reason)
        assert not marker.exists()
    assert _snapshot(tmp_path) == before
    subprocess.run([sys.executable, "-c", _TORCH_LOAD_ALL, *(p for p, _, _ in built.values())], cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    assert {name for name, (_, marker, _) in built.items() if marker.exists()} == set(built)


def test_storage_names_differing_in_case_are_ambiguous(tmp_path):
    """zipfile reads data/a; torch's reader may read data/A (it does in one of the two orders)."""
    values = []
    for lower_first in (True, False):
        path = builders.storage_twins_differing_in_case(str(tmp_path / f"{lower_first}.pt"), lower_first)
        found = inspect_archive(path)
        assert found.status == "unreadable" and "differ only in case" in found.reason, found.reason
        values.append(torch.load(path, weights_only=True)["w"].tolist())
    assert [666.0] * 4 in values and values != [[0.0, 1.0, 2.0, 3.0]] * 2


_TORCH_LOAD_FROM_A_SCRIPT = """
import sys, warnings, torch
warnings.simplefilter("ignore")
def main():  # the training script's entry point, as every modded-nanogpt script has one
    open(sys.argv[1] + "." + str(len(sys.argv)), "w").close()
for path in sys.argv[2:]:
    torch.load(path, weights_only=False)
    sys.argv.pop()
"""


def test_inst_or_obj_on_a_function_of_the_training_script_is_unsafe(tmp_path):
    """INST/OBJ with no arguments on a name of __main__: a class would only be created, but the
    script's main() is called by torch.load run from the script. The reader cannot tell a class
    from a function by its name, so it names the call; Python 3 writes a class's instances with
    NEWOBJ or copyreg._reconstructor, which refuse a function."""
    paths = [builders.main_function_called(str(tmp_path / f"{op}/best_state_100.pt"), op) for op in ("INST", "OBJ")]
    for path in paths:
        found = inspect_archive(path)
        assert found.status == "unsafe" and "__main__.main" in found.reason, (found.status, found.reason)
    marker = tmp_path / "PWNED"
    subprocess.run([sys.executable, "-c", _TORCH_LOAD_FROM_A_SCRIPT, str(marker), *paths], cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    assert sorted(p.name for p in tmp_path.glob("PWNED.*")) == ["PWNED.3", "PWNED.4"]  # main() ran for each file
