"""The restricted unpickler: tensors as stubs, no torch import, hostile globals refused unexecuted."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import zipfile

import pytest
import torch

from ckpt_migrate.detect import detect
from ckpt_migrate.safe_pickle import TensorStub, inspect_archive

from .builders import Call, hostile_checkpoint


def test_tensors_come_back_as_stubs_without_reading_bytes(small_v2_path):
    found = inspect_archive(small_v2_path)
    assert found.status == "ok", found.reason
    model = found.obj["model"]
    stub = model["_orig_mod.blocks.0.attn.qkv_w"]
    assert isinstance(stub, TensorStub)
    assert stub.dtype == "float32" and stub.shape == (3, 128, 128)
    assert model["_orig_mod.embed.weight"].dtype == "bfloat16"
    assert found.obj["step"] == 100 and "num_iterations = 1000" in found.obj["code"]
    # The optimizer state is described too, but none of its bytes were needed.
    muon_state = next(iter(found.obj["optimizers"][1]["state"].values()))
    assert isinstance(muon_state["momentum_buffer"], TensorStub)


def test_detection_does_not_import_torch(small_v2_path, python):
    code = ("import sys; from ckpt_migrate.detect import detect; r = detect(sys.argv[1]); "
            "print(r['format'], 'torch' in sys.modules)")
    out = subprocess.run([python, "-c", code, small_v2_path], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["small", "False"]


def _marker_cmd(marker) -> str:
    return f"touch {marker}"


HOSTILE = {
    "os.system": lambda m: Call(os.system, _marker_cmd(m)),
    "subprocess.Popen": lambda m: Call(subprocess.Popen, ["touch", str(m)]),
    "builtins.eval": lambda m: Call(eval, f"open({str(m)!r}, 'w')"),
    "builtins.exec": lambda m: Call(exec, f"open({str(m)!r}, 'w')"),
    "builtins.getattr": lambda m: Call(getattr, Call(__import__, "os"), "system"),
    "torch.load": lambda m: Call(torch.load, str(m)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_global_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "PWNED"
    path = hostile_checkpoint(tmp_path / "evil.pt", HOSTILE[name](marker))
    found = inspect_archive(path)
    record = detect(path)
    assert found.status == "unsafe" and record["status"] == "unsafe"
    # The reason names the first name the unpickler would resolve outside the allow-list.
    expected = {"os.system": "system", "torch.load": "torch.serialization.load"}.get(name, name)
    assert expected in found.reason, found.reason
    assert not marker.exists()


def _zip_with_pickle(path, pkl: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    return str(path)


def test_posix_system_by_hand_written_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    pkl = b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    found = inspect_archive(_zip_with_pickle(tmp_path / "p.pt", pkl))
    assert found.status == "unsafe" and "posix.system" in found.reason
    assert not marker.exists()


def test_reduce_chain_through_allowed_names_cannot_build_a_callable(tmp_path):
    # OrderedDict is allowed; using it as a stepping stone to reach os.system must still fail.
    pkl = (b"\x80\x02ccollections\nOrderedDict\n)R" + b"cos\nsystem\n" + b"X\x04\x00\x00\x00true\x85R.")
    found = inspect_archive(_zip_with_pickle(tmp_path / "chain.pt", pkl))
    assert found.status == "unsafe" and "os.system" in found.reason


def test_stack_global_with_unicode_names_is_refused(tmp_path):
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=4).dump(Call(os.system, "true"))
    found = inspect_archive(_zip_with_pickle(tmp_path / "sg.pt", buf.getvalue()))
    assert found.status == "unsafe"


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_truncated_files_are_unreadable(tmp_path, small_v2_path, cut):
    data = open(small_v2_path, "rb").read()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * cut)])
    found = inspect_archive(str(path))
    assert found.status == "unreadable" and "\n" not in found.reason and found.reason


def test_cut_inside_the_pickle_is_unreadable(tmp_path, small_v2_path):
    with zipfile.ZipFile(small_v2_path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        pkl = z.read(name)
    found = inspect_archive(_zip_with_pickle(tmp_path / "half.pt", pkl[: len(pkl) // 2]))
    assert found.status == "unreadable" and "damaged pickle" in found.reason


def test_missing_storage_is_unreadable(tmp_path, small_v2_path):
    with zipfile.ZipFile(small_v2_path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        pkl = z.read(name)
    found = inspect_archive(_zip_with_pickle(tmp_path / "nostorage.pt", pkl))
    assert found.status == "unreadable" and "missing from the archive" in found.reason


@pytest.mark.parametrize("kind,expect", [
    ("empty", "empty file"),
    ("random", "not a zip archive"),
    ("legacy", "legacy (pre-1.6, non-zip) torch.save format"),
    ("zip_without_pickle", "without data.pkl"),
    ("directory", "is a directory"),
])
def test_bad_files_are_unreadable_with_one_line(tmp_path, kind, expect):
    path = tmp_path / "bad.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "legacy":
        torch.save({"model": {"w": torch.zeros(2)}}, path, _use_new_zipfile_serialization=False)
    elif kind == "zip_without_pickle":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    elif kind == "directory":
        path.mkdir()
    found = inspect_archive(str(path))
    assert found.status == "unreadable"
    assert expect in found.reason and "\n" not in found.reason


def _one_tensor_archive(path, size: int, storage_numel: int) -> str:
    """A hand-written torch.save archive: one float tensor of ``size`` elements over a storage of
    ``storage_numel`` (a consistent file when size <= storage_numel)."""
    pkl = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
           b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
           + b"K" + bytes([storage_numel]) + b"tQ"
           + b"K\x00K" + bytes([size]) + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR.")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", b"\0" * 4 * storage_numel)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    return str(path)


def test_tensor_views_must_stay_inside_their_storage(tmp_path):
    ok = inspect_archive(_one_tensor_archive(tmp_path / "ok.pt", size=4, storage_numel=4))
    assert ok.status == "ok" and ok.obj.shape == (4,)
    assert torch.load(tmp_path / "ok.pt", weights_only=True).shape == (4,)  # a real torch file
    bad = inspect_archive(_one_tensor_archive(tmp_path / "bad.pt", size=100, storage_numel=4))
    assert bad.status == "unreadable" and "reaches past its storage of 4 elements" in bad.reason


_TEXT_NUMBERS = {
    b"I": [b"0", b"1", b"00", b"01", b" 1", b"+0", b"-0", b"-1", b"010", b"0x1f", b"0X1F", b"08", b"0x", b"1_000",
           b"0_10", b"I5L", b"5L", b" 7 ", b"\t9", b"9\x00junk", b"\x00", b"", b" ", b"abc", b"1e3", b"+", b"-",
           b"9223372036854775807", b"9223372036854775808", b"-9223372036854775809", b"0o17", b"0b101", b"1 2",
           b"\xd9\xa3", b"5\x1c"],
    b"L": [b"0L", b"00", b"L00", b"01", b"010L", b"5LL", b"5", b"-5L", b"0x10L", b"1_0L", b" 3 L", b"12345678901234567890L",
           b"", b"L", b"0o7L"],
    b"F": [b"1.5", b"-0.0", b"1e3", b"1E-3", b".5", b"5.", b"inf", b"-Infinity", b"nan", b"NaN", b"1e999", b"-1e999",
           b"1e-999", b"1_0", b" 1.5", b"1.5 ", b"0x1p3", b"1e", b"1.5\x00x", b"", b"+.5e+2", b"in", b"infx"],
}


def test_protocol_0_numbers_are_read_as_the_c_unpickler_reads_them():
    """INT, LONG and FLOAT carry their number as a line of text: the C unpickler parses it with
    strtol (octal, booleans for any two characters that read 0 or 1), PyLong_FromString and
    PyOS_string_to_double. Each line: the same value and type as pickle.loads (CPython's C
    unpickler, what torch.load runs), or refused where it fails."""
    from ckpt_migrate.pickle_machine import PickleMachine
    from ckpt_migrate.pickle_values import DEFAULT_LIMITS, UnreadableError

    disagree = []
    for opcode, lines in _TEXT_NUMBERS.items():
        for line in lines:
            data = opcode + line + b"\n."
            try:
                expected = pickle.loads(data)
            except Exception:
                expected = "refused"
            try:
                ours = PickleMachine(data, DEFAULT_LIMITS, float("inf")).run()
            except UnreadableError:
                ours = "refused"
            same = (type(ours) is type(expected) and (ours == expected or ours != ours and expected != expected))
            if not same:
                disagree.append((opcode + line, expected, ours))
    assert disagree == []
