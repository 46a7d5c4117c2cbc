"""The bad-input and fault catalogue (docs/reliability.md): every case a named row, nothing run,
nothing lost, nothing partial at a final path, the input tree never written."""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import pytest
import torch

from ckpt_migrate import synthetic
from ckpt_migrate.check import CheckSettings
from ckpt_migrate.one_file import convert_file
from ckpt_migrate.pipeline import read_report, verify_outputs

from .builders import Call, ImportedConfig, OverridingDict, TrainConfig, altered_small_checkpoint
from .conftest import VOCAB
from .pipeline_helpers import REPO, SNAKEMAKE, job_counts, make_read_only, make_writable, snakemake, tree_state

MARKER = "/tmp/ckpt_migrate_reliability_PWNED"


def _hostile(payload):
    def build(path):
        torch.save({"model": {"embed.weight": torch.zeros(2, 2)}, "payload": payload}, path)
    return build


def _raw_pickle(pkl: bytes):
    def build(path):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pkl)
            z.writestr("archive/version", "3\n")
    return build


def _small_ckpt(mutate=None, variant="v2", code_extra="", optimizers=True, protocol=2, extra=None,
                code_prefix="", wrap_model=None, **kw):
    def build(path):
        sd = synthetic.small_state_dict(variant, vocab=VOCAB, seed=len(path) % 97, **kw)
        if mutate:
            mutate(sd)
        obj = synthetic.upstream_checkpoint(sd, "small", step=100, optimizers=optimizers)
        obj["code"] = code_prefix + obj["code"] + code_extra
        obj.update(extra or {})
        if wrap_model:
            obj["model"] = wrap_model(obj["model"])
        torch.save(obj, path, pickle_protocol=protocol)
    return build


def _real_world_objects() -> dict:
    import numpy as np

    return {"step": np.int64(100), "val_loss": np.float32(3.5), "numpy_rng": np.random.get_state(),
            "array": np.arange(4), "args": argparse.Namespace(lr=0.02), "config": TrainConfig(),
            "blob": b"\x00\xff", "tags": {"a"}, "z": 1 + 2j, "counts": collections.Counter("aab"),
            "device": torch.device("cuda", 0), "size": torch.Size([2]),
            "extra": {"u16": torch.zeros(3, dtype=torch.uint16), "f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}}


def _rewritten(extra_entries=None, compression=zipfile.ZIP_STORED, flag_encrypted=False):
    """A real small checkpoint, its archive rewritten: entries added, compressed, or flagged encrypted."""
    def build(path):
        _small_ckpt()(path + ".src")
        with zipfile.ZipFile(path + ".src") as z, zipfile.ZipFile(path, "w", compression=compression) as out:
            for info in z.infolist():
                out.writestr(info.filename, z.read(info.filename))
            for name, data in (extra_entries or {}).items():
                out.writestr(name, data)
        os.unlink(path + ".src")
        if flag_encrypted:
            data = bytearray(open(path, "rb").read())
            data[data.rfind(b"PK\x01\x02") + 8] |= 0x1
            open(path, "wb").write(bytes(data))
    return build


def _symlink_to_fifo(path):
    os.mkfifo(path + ".pipe")  # beside it, not matched by the glob
    os.symlink(os.path.basename(path) + ".pipe", path)


def _legacy_with_payload(path):
    torch.save({"model": {"w": torch.zeros(2)}, "x": Call(os.system, marker_cmd)}, path,
               _use_new_zipfile_serialization=False)


def _converted_file(path):
    src = path + ".src"
    _small_ckpt()(src)
    assert convert_file(src, path, CheckSettings(length=64))["status"] == "converted"
    os.unlink(src)


def _forged_converted(path):
    torch.save({"format": "gptbatched", "model": synthetic.small_state_dict("v2", vocab=VOCAB),
                "config": {"path": "/elsewhere/best_state_1.pt", "status": "converted", "sha256": "0" * 64}}, path)


def _huge_block_index(path):
    torch.save({"model": {"blocks.999999.attn.qkv_w": torch.zeros(1), "lm_head.weight": torch.zeros(2, 2),
                          "embed.weight": torch.zeros(2, 2)}}, path)


def _storage_pickle(kind: bytes, n: int, key: bytes = b"0") -> bytes:
    key_op = b"X" + len(key).to_bytes(4, "little") + key
    return (b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n" + kind + b"\n" + key_op +
            b"X\x03\x00\x00\x00cpuK" + bytes([n]) + b"tQK\x00K" + bytes([n]) +
            b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR")


def _raw_archive(pkl: bytes, storages: dict[str, bytes]):
    def build(path):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pkl)
            for key, data in storages.items():
                z.writestr(f"archive/data/{key}", data)
            z.writestr("archive/version", "3\n")  # without it torch refuses the archive
    return build


_DAG_KEY = (b"\x80\x02})q\x000" + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
                                         for i in range(60)) + b"h<K\x01s.")


def _truncated(fraction):
    def build(path):
        tmp = path + ".whole"
        _small_ckpt()(tmp)
        data = open(tmp, "rb").read()
        os.unlink(tmp)
        open(path, "wb").write(data[: int(len(data) * fraction)])
    return build


def _cut_pickle(path):
    tmp = path + ".whole"
    _small_ckpt()(tmp)
    with zipfile.ZipFile(tmp) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    os.unlink(tmp)
    _raw_pickle(pkl[: len(pkl) // 2])(path)


def _legacy(path):
    torch.save({"model": {"w": torch.zeros(2)}}, path, _use_new_zipfile_serialization=False)


def _zip_without_pickle(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")


def _later_layout(path):
    sd = {}
    for k, v in synthetic.medium_state_dict(vocab=VOCAB).items():
        sd[k.replace("mlp.fc_w", "mlp.c_fc")] = v.T.contiguous() if k.endswith("fc_w") else v
    torch.save({"model": sd}, path)


def _set(key, value):
    def mutate(sd):
        sd[key] = value
    return mutate


def _delete(key):
    def mutate(sd):
        del sd[key]
    return mutate


def _poison(value):
    def mutate(sd):
        sd["blocks.4.mlp.c_fc.weight"][1, 1] = value
    return mutate


marker_cmd = f"touch {MARKER}"
# (folder under the tree, builder, expected status, words the reason must contain)
CATALOGUE = [
    # --- files
    ("empty", lambda p: open(p, "wb").close(), "unreadable", "empty file"),
    ("truncated_10pct", _truncated(0.10), "unreadable", "truncated"),
    ("truncated_50pct", _truncated(0.50), "unreadable", "truncated"),
    ("truncated_last_byte", _truncated(0.99999), "unreadable", "truncated"),
    ("cut_inside_pickle", _cut_pickle, "unreadable", "damaged pickle"),
    # Not random at test time: random bytes start a pickle (a "c" GLOBAL) once in a few hundred runs.
    ("random_bytes", lambda p: open(p, "wb").write(b"\xff" + bytes(range(256)) * 39), "unreadable", "not a zip"),
    ("zip_without_pickle", _zip_without_pickle, "unreadable", "without data.pkl"),
    ("legacy_serialization", _legacy, "unreadable", "legacy"),
    ("directory", lambda p: os.mkdir(p), "unreadable", "is a directory"),
    ("broken_symlink", lambda p: os.symlink("/nonexistent/best_state_1.pt", p), "unreadable", "broken symlink"),
    # --- hostile pickles: refused, the global named, never run
    ("os_system", _hostile(Call(os.system, marker_cmd)), "unsafe", "system"),
    ("subprocess_popen", _hostile(Call(subprocess.Popen, ["touch", MARKER])), "unsafe", "subprocess.Popen"),
    ("builtins_eval", _hostile(Call(eval, f"open({MARKER!r}, 'w')")), "unsafe", "builtins.eval"),
    ("builtins_exec", _hostile(Call(exec, f"open({MARKER!r}, 'w')")), "unsafe", "builtins.exec"),
    ("builtins_getattr", _hostile(Call(getattr, Call(__import__, "os"), "system")), "unsafe", "builtins.getattr"),
    ("builtins_import", _hostile(Call(__import__, "os")), "unsafe", "builtins.__import__"),
    ("posix_system", _raw_pickle(b"cposix\nsystem\n(V" + marker_cmd.encode() + b"\ntR."), "unsafe", "posix.system"),
    ("python2_builtin_eval", _raw_pickle(b"c__builtin__\neval\n(V1\ntR."), "unsafe", "builtins.eval"),
    ("torch_non_rebuild", _hostile(Call(torch.load, MARKER)), "unsafe", "torch.serialization.load"),
    ("functools_partial", _hostile(Call(functools.partial(os.system, marker_cmd))), "unsafe", "functools.partial"),
    ("operator_attrgetter", _raw_pickle(b"\x80\x02c_operator\nattrgetter\nX\x06\x00\x00\x00system\x85R."),
     "unsafe", "_operator.attrgetter"),
    ("reduce_chain_via_allowed_name",
     _raw_pickle(b"\x80\x02ccollections\nOrderedDict\n)R" + b"cos\nsystem\nX\x04\x00\x00\x00true\x85R."),
     "unsafe", "os.system"),
    ("stack_global_from_memo",
     _raw_pickle(b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93\x8c\x04true\x85R."), "unsafe", "os.system"),
    ("inst_opcode", _raw_pickle(b"(S'true'\nios\nsystem\n."), "unsafe", "os.system"),
    ("obj_opcode", _raw_pickle(b"(cos\nsystem\nS'true'\no."), "unsafe", "os.system"),
    ("ext_opcode", _raw_pickle(b"\x80\x02\x82\x01."), "unreadable", "extension code 1 is not registered"),
    ("rebuild_without_storage", _raw_pickle(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00)ttR."),
     "unreadable", "could not find MARK"),
    # --- contents
    ("nan_weight", _small_ckpt(_poison(float("nan"))), "failed",
     "non-finite values in blocks.4.mlp.c_fc.weight (1 NaN, 0 Inf)"),
    ("inf_weight", _small_ckpt(_poison(float("inf"))), "failed",
     "non-finite values in blocks.4.mlp.c_fc.weight (0 NaN, 1 Inf)"),
    ("hdim_not_model_dim", _small_ckpt(num_heads=2, model_dim=128), "failed", "hdim 256 != model_dim 128"),
    ("missing_block", _small_ckpt(_delete("blocks.3.mlp.c_fc.weight")), "unknown", "blocks.3.mlp.c_fc.weight"),
    ("extra_key", _small_ckpt(_set("blocks.2.attn.gate", torch.zeros(4))), "unknown", "blocks.2.attn.gate"),
    ("wrong_shape", _small_ckpt(_set("blocks.5.mlp.c_proj.weight", torch.zeros(128, 256))), "unknown",
     "blocks.5.mlp.c_proj.weight"),
    ("unexpected_wrapper", lambda p: torch.save({"weights": synthetic.small_state_dict("v2", vocab=VOCAB)}, p),
     "unknown", "no model state dict"),
    ("later_upstream_layout", _later_layout, "unknown", "blocks.0.mlp.c_fc"),
    ("huge_code_string", _small_ckpt(code_extra="#" * 30_000_000), "converted", ""),
    # --- issue 10: files the world writes
    ("fifo", os.mkfifo, "unreadable", "FIFO"),
    ("symlink_to_fifo", _symlink_to_fifo, "unreadable", "FIFO"),
    ("encrypted_member", _rewritten(flag_encrypted=True), "unreadable", "encrypted"),
    ("deflated_archive", _rewritten(compression=zipfile.ZIP_DEFLATED), "unreadable", "compressed"),
    ("second_data_pkl", _rewritten({"decoy/data.pkl": b"\x80\x02}."}), "unreadable", "ambiguous archive"),
    ("stray_root_entry", _rewritten({"stray.txt": b"x"}), "unreadable", "ambiguous archive"),
    ("legacy_with_payload", _legacy_with_payload, "unsafe", "system"),
    ("converted_file_in_tree", _converted_file, "not_needed", "already in the GPTBatched layout"),
    ("forged_converted_claim", _forged_converted, "unknown", "claims the GPTBatched format"),
    ("newobj_partial_then_call", _raw_pickle(b"\x80\x02cfunctools\npartial\ncos\nsystem\n\x85\x81X\x04\x00\x00\x00"
                                             b"true\x85R."), "unsafe", "functools.partial"),
    ("build_on_a_class", _raw_pickle(b"\x80\x02ctorch.nn\nModule\n}X\x0b\x00\x00\x00__getattr__K\x01sb."),
     "unsafe", "torch.nn.Module"),
    ("huge_integer", _raw_pickle(b"L" + b"9" * 20000 + b"L\n."), "unreadable", "integer"),
    ("absurd_tensor_size", _raw_archive(b"\x80\x02" + _storage_pickle(b"FloatStorage", 4).replace(
        b"K\x00K\x04\x85", b"K\x00\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x3f\x85") + b".", {"0": b"\0" * 16}),
     "unreadable", "2**48"),
    ("tuple_dag_key", _raw_pickle(_DAG_KEY), "unreadable", "dict key"),
    ("deep_tuple_key", _raw_pickle(b"\x80\x02})" + b"\x85" * 900_000 + b"K\x01s."), "unreadable", "dict key"),
    ("memo_index_2e31", _raw_pickle(b"\x80\x02Nr\xff\xff\xff\x7f."), "unknown", "no model state dict"),
    ("empty_set_flood", _raw_pickle(b"\x80\x04(" + b"\x8f" * 2_000_000 + b"l."), "unreadable", "objects"),
    ("huge_block_index", _huge_block_index, "unknown", "block index"),
    ("storage_two_types", _raw_archive(b"\x80\x02(" + _storage_pickle(b"FloatStorage", 4) +
                                       _storage_pickle(b"HalfStorage", 4) + b"l.", {"0": b"\0" * 16}),
     "unreadable", "two different types"),
    ("huge_storage_key", _raw_archive(b"\x80\x02" + _storage_pickle(b"FloatStorage", 4, b"k" * 5_000_000) + b".", {}),
     "unreadable", "malformed storage reference"),
    ("newline_in_key", _small_ckpt(_set("blocks.0.x\nneeds a person:\n  converted: forged", torch.zeros(1))),
     "unknown", "unexpected"),
    ("blank_lines_before_code", _small_ckpt(code_prefix="\n" * 1_000_000 + " " * 1_000_000), "converted", ""),
    ("build_replaces_dict_methods", _small_ckpt(wrap_model=OverridingDict), "converted", ""),
    ("protocol_0", _small_ckpt(protocol=0), "unreadable", "torch.load cannot read it"),  # text persistent ids
    ("protocol_1", _small_ckpt(protocol=1), "converted", ""),
    ("protocol_4", _small_ckpt(protocol=4), "converted", ""),
    ("protocol_5", _small_ckpt(protocol=5), "converted", ""),
    ("real_world_objects", _small_ckpt(extra=_real_world_objects()), "converted", ""),
    ("class_from_an_importable_module", _small_ckpt(extra={"config": ImportedConfig()}), "unsafe",
     "tests.builders.ImportedConfig"),
    ("dtype_keys_and_values", _small_ckpt(extra={"cfg": {torch.float32: torch.bfloat16}, "dtype": torch.float16}),
     "converted", ""),
    ("no_optimizer_state", _small_ckpt(optimizers=False), "converted", ""),
    ("name with spaces ü", _small_ckpt(), "converted", ""),
]


# File names Snakemake cannot carry as they are (braces are its pattern syntax, a newline, bytes
# that are not UTF-8, %, a name too long for a .yaml suffix): each must still be converted.
ODD_NAMES = [b"best_state_{1}.pt", b"best_state_{step,\\d+}.pt", b"best_state_a\nb.pt", b"best_state_\xff\xfe.pt",
             b"best_state_100%.pt", b"best_state_" + b"x" * 240 + b".pt"]
ODD_FOLDER = "case_owt_run_98_odd_names"


def _display(name: bytes) -> str:
    """How the report shows a file name: undecodable bytes and control characters escaped."""
    return name.decode("utf-8", "backslashreplace").replace("\n", "\\n")


@pytest.fixture(scope="module")
def catalogue_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue") / "clean_bbpe_50k"
    for i, (name, build, _, _) in enumerate(CATALOGUE):
        folder = root / f"case_owt_run_{i:02d}_{name}"
        folder.mkdir(parents=True)
        build(str(folder / "best_state_100.pt"))
    (root / ODD_FOLDER).mkdir()
    for name in ODD_NAMES:
        _small_ckpt()(os.fsdecode(os.fsencode(str(root / ODD_FOLDER)) + b"/" + name))
    # The same checkpoint reached through a symlinked run directory.
    (root / "case_owt_run_99_symlink").symlink_to(root / f"case_owt_run_{len(CATALOGUE) - 1:02d}_{CATALOGUE[-1][0]}")
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    before = tree_state(str(root))
    make_read_only(str(root))
    out = tmp_path_factory.mktemp("catalogue_out")
    proc = snakemake(str(root), str(out))
    make_writable(str(root))
    after = tree_state(str(root))
    make_read_only(str(root))
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    return proc, rows, before, after, out


@pytest.mark.e2e
def test_the_run_ends_with_a_full_report_and_a_non_zero_exit(catalogue_run):
    proc, rows, _, _, out = catalogue_run
    failed = [c[0] for c in CATALOGUE if c[2] == "failed"]
    assert proc.returncode != 0 and f"{len(failed)} checkpoint(s) failed conversion" in proc.stdout + proc.stderr
    assert (out / "figures" / "report_table.html").exists() and (out / "figures" / "logit_check.png").exists()
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("index", range(len(CATALOGUE)), ids=[c[0] for c in CATALOGUE])
def test_every_case_is_a_named_row(catalogue_run, index):
    proc, rows, _, _, _ = catalogue_run
    name, _, status, words = CATALOGUE[index]
    row = rows[f"case_owt_run_{index:02d}_{name}/best_state_100.pt"]
    assert row["status"] == status, row
    if status == "converted":  # nothing to explain: a passed check, and no reason
        assert row["reason"] == "" and row["check_passed"] == "True", row
    else:
        assert words and words in row["reason"], (words, row["reason"])
        assert "\n" not in row["reason"] and len(row["reason"]) <= 300, row["reason"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ODD_NAMES, ids=range(len(ODD_NAMES)))
def test_odd_file_names_are_converted(catalogue_run, name):
    rows = catalogue_run[1]
    row = rows[f"{ODD_FOLDER}/{_display(name)}"]
    assert row["status"] == "converted" and row["check_passed"] == "True", row
    assert os.path.exists(row["converted_path"])  # under its %-escaped key


@pytest.mark.e2e
def test_catalogue_totals(catalogue_run):
    proc, rows, before, after, out = catalogue_run
    tried = len(CATALOGUE) + len(ODD_NAMES) + 1  # + the symlinked run directory
    assert len(rows) == tried  # every case classified, none lost
    assert not os.path.exists(MARKER)  # payloads executed: 0
    strip = lambda s: {k: v[:3] + (v[4],) for k, v in s.items()}  # noqa: E731  (mode bits we changed)
    assert strip(after) == strip(before)  # input bytes changed: 0
    verified, problems = verify_outputs(str(out))
    converted = sum(1 for c in CATALOGUE if c[2] == "converted") + len(ODD_NAMES) + 1
    assert problems == [] and verified == converted  # partial or unrecorded outputs: 0
    leftovers = [f for d, _, fs in os.walk(out) for f in fs if ".tmp-" in f]
    assert leftovers == []
    last = f"case_owt_run_{len(CATALOGUE) - 1:02d}_{CATALOGUE[-1][0]}/best_state_100.pt"
    symlinked, target = rows["case_owt_run_99_symlink/best_state_100.pt"], rows[last]
    assert symlinked["status"] == "converted" and symlinked["realpath"] == target["realpath"]


def test_permission_denied_is_unreadable(tmp_path):
    folder = tempfile.mkdtemp(prefix="ckpt_perm_", dir="/tmp")
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "best_state_1.pt")
    _small_ckpt()(path)
    os.chmod(path, 0)
    code = ("import sys; from ckpt_migrate.safe_pickle import inspect_archive as i; r = i(sys.argv[1]); "
            "print(r.status, r.reason)")
    cmd = [sys.executable, "-c", code, path]
    if os.geteuid() == 0:
        # Root reads anything: ask as an unprivileged user, with the system Python and a copy of
        # the (standard-library only) inspector where that user can read it.
        package = os.path.join(folder, "ckpt_migrate")
        os.mkdir(package)
        open(os.path.join(package, "__init__.py"), "w").close()
        from ckpt_migrate.fingerprint import READER_MODULES

        for module in READER_MODULES:  # the reader's own modules: standard library only
            shutil.copy(os.path.join(REPO, "src", "ckpt_migrate", module), package)
        cmd = ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", code, path]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=folder, env={**os.environ, "PYTHONPATH": folder})
    shutil.rmtree(folder, ignore_errors=True)
    assert out.stdout.strip() == "unreadable permission denied", out.stderr


SLOW_WRITER = """
import sys, time
import ckpt_migrate.atomic as atomic
write = atomic.HashingWriter.write
def slow(self, data):
    time.sleep(0.002)
    return write(self, data)
atomic.HashingWriter.write = slow
from ckpt_migrate.cli import main
sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--length", "128"]))
"""


def test_sigkill_mid_write_leaves_nothing_and_a_rerun_completes(tmp_path):
    src, dst = str(tmp_path / "src.pt"), tmp_path / "out" / "best_state_100.pt"
    _small_ckpt()(src)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, src, str(dst)])
    deadline = time.time() + 120
    while time.time() < deadline:
        temps = [f for f in os.listdir(dst.parent)] if dst.parent.exists() else []
        if temps and os.path.getsize(dst.parent / temps[0]) > 100_000:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    assert any(".tmp-" in f for f in os.listdir(dst.parent))  # the killed writer's temporary
    result = convert_file(src, str(dst), CheckSettings(length=128))
    assert result["status"] == "converted" and torch.load(dst, weights_only=True)["format"] == "gptbatched"
    assert os.listdir(dst.parent) == ["best_state_100.pt"]  # the stale temporary is gone


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
from ckpt_migrate.cli import main
sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--length", "128"]))
"""


def test_output_filesystem_full(tmp_path):
    src, dst = str(tmp_path / "src.pt"), tmp_path / "out" / "best_state_100.pt"
    _small_ckpt()(src)
    before = tree_state(str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, src, str(dst)], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot write" in proc.stdout and "File too large" in proc.stdout
    assert os.listdir(dst.parent) == []  # no partial output, no temporary
    after = tree_state(str(tmp_path))
    assert after[os.path.basename(src)] == before[os.path.basename(src)]


def test_source_replaced_while_being_converted(tmp_path, monkeypatch):
    import ckpt_migrate.one_file as conversion

    src, dst = str(tmp_path / "best_state_100.pt"), str(tmp_path / "out.pt")
    _small_ckpt()(src)
    real_check = conversion.logit_check

    def check_then_replace(*args, **kwargs):
        _small_ckpt(variant="v1")(src + ".new")
        os.replace(src + ".new", src)  # a training job saving a new best state meanwhile
        return real_check(*args, **kwargs)

    monkeypatch.setattr(conversion, "logit_check", check_then_replace)
    result = convert_file(src, dst, CheckSettings(length=128))
    assert result["status"] == "failed" and "changed while it was being converted" in result["reason"]
    assert not os.path.exists(dst)


@pytest.mark.e2e
def test_second_snakemake_on_the_same_outputs_is_refused(tmp_path):
    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    for i in range(2):
        folder = root / f"eng_spa_owt_run_{i}"
        folder.mkdir(parents=True)
        _small_ckpt()(str(folder / "best_state_100.pt"))
    cmd = [SNAKEMAKE, "--cores", "2", "--config", f"input_root={root}", f"output_root={out}", "check={length: 4096}"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "logs" / "convert_batch").exists():
        time.sleep(0.1)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and "cannot be locked" in second.stdout + second.stderr
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output[-3000:]
    assert sorted(r["status"] for r in read_report(str(out / "report.csv"))) == ["converted", "converted"]


@pytest.mark.e2e
def test_verify_outputs_names_changed_and_missing_files(catalogue_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(catalogue_run[4], out)
    converted = sorted(p for p in (out / "converted").rglob("*.pt"))
    n = sum(1 for c in CATALOGUE if c[2] == "converted") + len(ODD_NAMES) + 1
    assert len(converted) == n
    with open(converted[0], "ab") as f:
        f.write(b"\0")  # bit rot, or someone editing in place
    converted[1].unlink()
    shutil.copy(converted[2], out / "converted" / "stray.pt")
    proc = subprocess.run([sys.executable, "-m", "ckpt_migrate.cli", "verify-outputs", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert any(l.startswith("changed: ") and str(converted[0]) in l for l in lines)
    assert any(l.startswith("missing: ") and str(converted[1]) in l for l in lines)
    assert any(l.startswith("unrecorded: ") and "stray.pt" in l for l in lines)
    assert lines[-1] == f"{n - 2} converted file(s) match their records; 3 problem(s)"
    recheck = subprocess.run([sys.executable, "-m", "ckpt_migrate.cli", "verify-outputs", str(catalogue_run[4]),
                              "--recheck", "--length", "128"], capture_output=True, text=True)
    assert recheck.returncode == 0 and f"{n} converted file(s) match" in recheck.stdout, recheck.stdout + recheck.stderr


@pytest.mark.e2e
def test_killed_conversion_still_gets_a_report_and_a_rerun_finishes_it(tmp_path):
    """A conversion job killed from outside (the OOM killer, a node going down) part way through
    its batch ends the run with a full report: the file it had finished keeps its record, the
    file it was on is named as killed, the one it never reached says so; the next run converts
    only the two that did not finish."""
    import yaml

    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    for i in range(3):
        (root / f"eng_spa_owt_run_{i}").mkdir(parents=True)
        _small_ckpt()(str(root / f"eng_spa_owt_run_{i}" / "best_state_100.pt"))
    cmd = [SNAKEMAKE, "--cores", "1", "--config", f"input_root={root}", f"output_root={out}", "check={length: 4096}"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    staged, deadline = out / "staged" / "eng_spa_owt_run_0" / "best_state_100.yaml", time.time() + 180
    while time.time() < deadline and not staged.exists():
        time.sleep(0.05)
    assert staged.exists(), "the first conversion did not finish"
    attempt = out / "attempts" / "eng_spa_owt_run_1" / "best_state_100.yaml"
    while time.time() < deadline and not attempt.exists():
        time.sleep(0.02)
    pid = yaml.safe_load(attempt.read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # on the second file of the batch
    output, _ = first.communicate(timeout=300)
    assert first.returncode != 0, output[-3000:]
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert len(rows) == 3, rows
    done, killed, never = (rows[f"eng_spa_owt_run_{i}/best_state_100.pt"] for i in range(3))
    assert done["status"] == "converted" and float(done["max_abs_logit_diff"]) < 1e-4, done
    assert (out / "converted" / "eng_spa_owt_run_0" / "best_state_100.pt").exists()
    assert killed["status"] == "failed" and "started on" in killed["reason"] and "did not finish" in killed["reason"]
    assert "staged/eng_spa_owt_run_1/best_state_100.log" in killed["reason"], killed["reason"]
    assert never["status"] == "failed" and "did not run" in never["reason"], never["reason"]
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    counts = job_counts(rerun.stdout + rerun.stderr)
    assert counts.get("convert_batch") == 1 and counts.get("convert") == 3 and "plan" not in counts
    (summary,) = (out / "batches").glob("*.yaml")
    reused = {f["key"]: f["reused"] for f in yaml.safe_load(summary.read_text())["files"]}
    assert reused == {"eng_spa_owt_run_0/best_state_100": True, "eng_spa_owt_run_1/best_state_100": False,
                      "eng_spa_owt_run_2/best_state_100": False}
    assert sorted(r["status"] for r in read_report(str(out / "report.csv"))) == ["converted"] * 3


@pytest.mark.e2e
def test_a_failing_file_in_a_batch_leaves_the_others_converted(tmp_path):
    """One conversion job, three files, the middle one with a NaN weight: its check fails and
    is a row; the files before and after it are converted by the same process."""
    import yaml

    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    for i in range(3):
        (root / f"eng_spa_owt_run_{i}").mkdir(parents=True)
        make = _small_ckpt(_poison(float("nan"))) if i == 1 else _small_ckpt()
        make(str(root / f"eng_spa_owt_run_{i}" / "best_state_100.pt"))
    proc = snakemake(str(root), str(out))
    assert proc.returncode != 0 and "1 checkpoint(s) failed" in proc.stdout + proc.stderr  # the gate, after the report
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts.get("convert_batch") == 1 and counts.get("convert") == 3, counts
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert [rows[f"eng_spa_owt_run_{i}/best_state_100.pt"]["status"] for i in range(3)] == \
        ["converted", "failed", "converted"]
    assert "non-finite" in rows["eng_spa_owt_run_1/best_state_100.pt"]["reason"]
    (summary,) = (out / "batches").glob("*.yaml")
    summary = yaml.safe_load(summary.read_text())
    assert [f["status"] for f in summary["files"]] == ["converted", "failed", "converted"]
    # Each file has its own log with its own stages, published beside its record (the NaN file
    # is refused before its check, naming the weight).
    for i in range(3):
        text = (out / "logs" / "convert" / f"eng_spa_owt_run_{i}" / "best_state_100.log").read_text()
        assert f"file {i + 1} of 3" in text
        assert ("non-finite values in blocks.4.mlp.c_fc.weight (1 NaN, 0 Inf)" if i == 1 else "check") in text
    assert not (out / "converted" / "eng_spa_owt_run_1" / "best_state_100.pt").exists()
    # Retrying the failed one (delete its record, rerun the plan) converts that file alone.
    (out / "checks" / "eng_spa_owt_run_1" / "best_state_100.yaml").unlink()
    retry = snakemake(str(root), str(out), "--forcerun", "plan")
    counts = job_counts(retry.stdout + retry.stderr)
    assert counts.get("convert_batch") == 1 and counts.get("convert") == 1, counts
    (newest,) = [p for p in (out / "batches").glob("*.yaml") if yaml.safe_load(p.read_text())["batch"] != summary["batch"]]
    assert [(f["key"], f["reused"]) for f in yaml.safe_load(newest.read_text())["files"]] == \
        [("eng_spa_owt_run_1/best_state_100", False)]


def test_a_file_killed_before_goes_last_and_twice_is_given_up(tmp_path):
    """A file whose conversion was killed from outside (an attempt marker and no record) would
    kill its batch again on every rerun: it goes after the others, and once killed twice it is a
    failed record naming why, so its batch finishes and the run reports."""
    import yaml

    from ckpt_migrate.pipeline import OutputLayout, checkpoint_sources, detect_and_plan, read_batches, run_batch

    root, layout = tmp_path / "clean_bbpe_50k", OutputLayout(str(tmp_path / "out"))
    for i in range(3):
        (root / f"eng_spa_owt_run_{i}").mkdir(parents=True)
        _small_ckpt()(str(root / f"eng_spa_owt_run_{i}" / "best_state_100.pt"))
    sources = checkpoint_sources(str(root), "*_owt_run_*/best_state_*.pt")
    detect_and_plan(sources, {k: os.path.relpath(p, root) for k, p in sources.items()}, layout)
    (batch,) = read_batches(layout.plan)
    keys = [f"eng_spa_owt_run_{i}/best_state_100" for i in range(3)]
    for key, attempts in ((keys[0], 1), (keys[2], 2)):  # killed once, killed twice
        os.makedirs(os.path.dirname(layout.attempt(key)), exist_ok=True)
        with open(layout.attempt(key), "w") as f:
            yaml.safe_dump({"host": "node7", "pid": 1, "attempts": attempts, "log": layout.staged_log(key)}, f)
    summary = run_batch(layout, batch, {"length": 64, "device": "cpu"}, {}, str(tmp_path / "summary.yaml"))
    assert [(f["key"], f["status"]) for f in summary["files"]] == \
        [(keys[1], "converted"), (keys[0], "converted"), (keys[2], "failed")]
    given_up = yaml.safe_load(open(layout.staged(keys[2])))
    assert given_up["status"] == "failed" and given_up["reason"].startswith("killed 2 times"), given_up
    assert "on node7" in given_up["reason"] and "--forcerun plan" in given_up["reason"]
    assert yaml.safe_load(open(layout.attempt(keys[0])))["attempts"] == 2  # its second try, recorded
    assert not os.path.exists(layout.converted(keys[2]))


@pytest.mark.e2e
def test_a_failed_file_alone_in_its_batch_is_retried(tmp_path):
    """One small file, its check fails; deleting its record and planning again converts it again
    (a new batch, not the finished one it was in)."""
    import yaml

    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    (root / "eng_spa_owt_run_0").mkdir(parents=True)
    _small_ckpt(_poison(float("nan")))(str(root / "eng_spa_owt_run_0" / "best_state_100.pt"))
    first = snakemake(str(root), str(out), config={"allow_check_failures": True})
    assert first.returncode == 0 and job_counts(first.stdout + first.stderr).get("convert_batch") == 1
    (out / "checks" / "eng_spa_owt_run_0" / "best_state_100.yaml").unlink()
    retry = snakemake(str(root), str(out), "--forcerun", "plan", config={"allow_check_failures": True})
    counts = job_counts(retry.stdout + retry.stderr)
    assert retry.returncode == 0 and counts.get("convert_batch") == 1 and counts.get("convert") == 1, counts
    summaries = [yaml.safe_load(p.read_text()) for p in (out / "batches").glob("*.yaml")]
    assert len(summaries) == 2 and all(s["files"][0]["reused"] is False for s in summaries)
    assert read_report(str(out / "report.csv"))[0]["status"] == "failed"


def test_a_file_replaced_after_the_plan_is_not_converted_under_its_old_manifest(tmp_path):
    """The plan detected one file; before its batch ran the lab replaced it. The batch converts
    nothing under the stale manifest (its row would describe other bytes): a failed record saying
    so, and the next plan detects the new file and converts it in a new batch."""
    from ckpt_migrate import pipeline

    from .builders import small_checkpoint

    root, layout = tmp_path / "clean_bbpe_50k", pipeline.OutputLayout(str(tmp_path / "out"))
    path = small_checkpoint(root / "eng_spa_owt_run_0/best_state_100.pt", "v1", seed=1)
    settings = {"length": 64, "device": "cpu"}

    def plan_and_run():
        sources = pipeline.checkpoint_sources(str(root), "*_owt_run_*/best_state_*.pt")
        pipeline.detect_and_plan(sources, {k: os.path.relpath(p, root) for k, p in sources.items()}, layout)
        (batch,) = pipeline.read_batches(layout.plan)
        pipeline.run_batch(layout, batch, settings, None, layout.batch(batch))
        return batch, pipeline.read_yaml(layout.staged("eng_spa_owt_run_0/best_state_100"))

    sources = pipeline.checkpoint_sources(str(root), "*_owt_run_*/best_state_*.pt")
    pipeline.detect_and_plan(sources, {k: os.path.relpath(p, root) for k, p in sources.items()}, layout)
    (first_batch,) = pipeline.read_batches(layout.plan)
    small_checkpoint(path, "v2", seed=2)  # replaced: other bytes, other size, an older mtime
    os.utime(path, (time.time() - 60, time.time() - 60))
    pipeline.run_batch(layout, first_batch, settings, None, layout.batch(first_batch))
    record = pipeline.read_yaml(layout.staged("eng_spa_owt_run_0/best_state_100"))
    assert record["status"] == "failed" and "changed after the plan detected it" in record["reason"]
    assert "bytes" in record["reason"] and not os.path.exists(layout.converted("eng_spa_owt_run_0/best_state_100"))

    second_batch, record = plan_and_run()
    assert second_batch != first_batch and record["status"] == "converted" and record["reason"] == ""
    manifest = pipeline.read_yaml(layout.manifest("eng_spa_owt_run_0/best_state_100"))
    assert manifest["variant"] == "v2" and os.path.isfile(layout.converted("eng_spa_owt_run_0/best_state_100"))


def test_a_lost_converted_file_is_named_and_converted_again_as_verify_outputs_says(tmp_path):
    """A converted file deleted (or changed) afterwards: verify-outputs names it and says how to
    redo it; doing that (delete its record, plan again) converts it again in a new batch."""
    from ckpt_migrate import pipeline

    from .builders import small_checkpoint

    root, layout = tmp_path / "clean_bbpe_50k", pipeline.OutputLayout(str(tmp_path / "out"))
    small_checkpoint(root / "eng_spa_owt_run_0/best_state_100.pt", seed=1)
    key = "eng_spa_owt_run_0/best_state_100"

    def plan_run_publish():
        sources = pipeline.checkpoint_sources(str(root), "*_owt_run_*/best_state_*.pt")
        pipeline.detect_and_plan(sources, {k: os.path.relpath(p, root) for k, p in sources.items()}, layout)
        (batch,) = pipeline.read_batches(layout.plan)
        pipeline.run_batch(layout, batch, {"length": 64, "device": "cpu"}, None, layout.batch(batch))
        os.makedirs(os.path.dirname(layout.check(key)), exist_ok=True)  # what the convert rule does
        shutil.copy(layout.staged(key), layout.check(key))
        return batch

    first = plan_run_publish()
    os.unlink(layout.converted(key))
    verified, problems = verify_outputs(layout.root)
    assert verified == 0 and len(problems) == 1 and problems[0].startswith(f"missing: {layout.converted(key)}")
    assert "delete that record and rerun with --forcerun plan" in problems[0]
    os.unlink(layout.check(key))
    assert plan_run_publish() != first and os.path.isfile(layout.converted(key))
    assert verify_outputs(layout.root) == (1, [])


def _written_paths(out, key: str) -> list:
    """Every path a run writes for checkpoint ``key``, and the run's own files."""
    return [out / p for p in ("plan.tsv", "report.csv", "logs/plan.log", f"manifests/{key}.yaml",
                              f"checks/{key}.yaml", f"logs/convert/{key}.log", f"attempts/{key}.yaml",
                              f"converted/{key}.pt")]


@pytest.mark.e2e
def test_links_planted_where_the_pipeline_writes_are_replaced_never_written_through(tmp_path):
    """Issue 21: a symlink or a hard link to a file elsewhere, at every path a run writes, is
    replaced by the run's own file (the file it names is unchanged); a hard link to a checkpoint
    of the tree, any link where Snakemake writes a benchmark or among the staged files (copied
    out), or a FIFO anywhere, stops the run at once, naming it."""
    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    for i in range(2):
        altered_small_checkpoint(root / f"eng_spa_owt_run_{i}/best_state_100.pt", seed=i, optimizers=False)
    assert snakemake(str(root), str(out)).returncode == 0
    decoys = tmp_path / "elsewhere"
    decoys.mkdir()
    planted = {}
    for i, kind in enumerate(("symlink", "hard link")):
        for n, path in enumerate(_written_paths(out, f"eng_spa_owt_run_{i}/best_state_100")):
            if path in planted:
                continue  # the run's own files: planted once
            decoy = decoys / f"{kind}_{n}"
            decoy.write_text("not yours\n")
            path.unlink(missing_ok=True)
            (path.symlink_to if kind == "symlink" else path.hardlink_to)(decoy)
            planted[path] = decoy
    for staged in out.glob("staged/*/*"):  # the batch job converts again (else its record stands)
        staged.unlink()
    proc = snakemake(str(root), str(out), "--forceall")  # every job again: every path written
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(decoy.read_text() == "not yours\n" for decoy in planted.values())
    assert [p for p in planted if p.is_symlink() or p.stat().st_nlink != 1] == []
    rows = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}
    assert [r["status"] for r in rows.values()] == ["converted", "converted"]

    # Links at a new file's record path, before the run that converts it: Snakemake would take
    # either for a finished conversion; the plan removes them and the file is converted.
    new = altered_small_checkpoint(root / "eng_spa_owt_run_2/best_state_100.pt", seed=2, optimizers=False)
    for kind, rel in (("hard link", "checks/eng_spa_owt_run_2/best_state_100.yaml"),
                      ("symlink", "logs/convert/eng_spa_owt_run_2/best_state_100.log")):
        decoy = decoys / f"new {kind}"
        decoy.write_text("not yours\n")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        ((out / rel).symlink_to if kind == "symlink" else (out / rel).hardlink_to)(decoy)
        planted[out / rel] = decoy
    proc = snakemake(str(root), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job_counts(proc.stdout + proc.stderr).get("convert") == 1
    assert all(decoy.read_text() == "not yours\n" for decoy in planted.values())
    row = {r["relative_path"]: r for r in read_report(str(out / "report.csv"))}["eng_spa_owt_run_2/best_state_100.pt"]
    assert row["status"] == "converted" and row["check_passed"] == "True"
    assert os.path.exists(new) and (out / "converted/eng_spa_owt_run_2/best_state_100.pt").exists()

    # A hard link to a checkpoint of the tree, where a run writes: the run stops before any job.
    source = root / "eng_spa_owt_run_0/best_state_100.pt"
    before = source.read_bytes()
    log = out / "logs/convert/eng_spa_owt_run_0/best_state_100.log"
    log.unlink()
    log.hardlink_to(source)
    proc = snakemake(str(root), str(out), "--forcerun", "plan")
    assert proc.returncode != 0 and f"{log} is a hard link to {source}" in proc.stdout + proc.stderr
    assert source.read_bytes() == before
    log.unlink()
    benchmark = out / "benchmarks/plan.tsv"
    benchmark.unlink()
    benchmark.symlink_to(decoys / "symlink_0")
    proc = snakemake(str(root), str(out), "--forcerun", "plan")
    assert proc.returncode != 0 and f"{benchmark} is a link" in proc.stdout + proc.stderr
    assert (decoys / "symlink_0").read_text() == "not yours\n"
    benchmark.unlink()
    staged_log = out / "staged/eng_spa_owt_run_0/best_state_100.log"
    staged_log.unlink()
    staged_log.symlink_to(decoys / "symlink_0")
    proc = snakemake(str(root), str(out))
    assert proc.returncode != 0 and f"{staged_log} is a link" in proc.stdout + proc.stderr
    staged_log.unlink()
    (out / "manifests/.index.json").unlink()
    os.mkfifo(out / "manifests/.index.json")  # read by the plan (and at start): it would wait for ever
    proc = snakemake(str(root), str(out), timeout=120)
    assert proc.returncode != 0 and "manifests/.index.json is a FIFO" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_a_run_on_an_output_folder_in_use_refuses_and_a_stale_lock_is_taken_over(tmp_path):
    """Issue 21: two checkouts on one output_root (Snakemake's own lock lives in each checkout):
    the second refuses with one line naming the holder, writing nothing; a lock whose run is
    gone is taken over, and temporaries that killed jobs left are removed."""
    import json
    import socket

    root, out = tmp_path / "clean_bbpe_50k", tmp_path / "out"
    altered_small_checkpoint(root / "eng_spa_owt_run_1/best_state_100.pt", seed=1, optimizers=False)
    out.mkdir()
    lock = out / ".run.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "a while"}))
    proc = snakemake(str(root), str(out))
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "is in use by another run" in line]
    assert proc.returncode != 0 and len(said) == 1 and f"pid {os.getpid()}" in said[0], proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [".run.lock"]  # nothing written

    gone = subprocess.Popen(["true"])
    gone.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "since": "yesterday"}))
    leftover = out / "converted/eng_spa_owt_run_1/.best_state_100.pt.tmp-k1ll3d"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"\0" * 4096)
    proc = snakemake(str(root), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not lock.exists() and not leftover.exists()
    assert read_report(str(out / "report.csv"))[0]["status"] == "converted"


def test_a_file_whose_ctime_alone_moved_is_judged_by_its_bytes(tmp_path):
    """A chmod changes no byte; a patch of 4 bytes inside a tensor, mtime set back (touch -r),
    keeps size, mtime, inode and the zip's tail, and is still seen (its entry's CRC-32 no longer
    matches). A file that is not a zip has nothing to vouch for it: it counts as changed."""
    from ckpt_migrate.identity import file_identity, identity_change

    path = tmp_path / "best_state_100.pt"
    torch.save({"model": {"w": torch.arange(1 << 16, dtype=torch.float32)}}, path)  # more than the 64 KiB tail
    recorded = file_identity(str(path), with_content=True)
    os.chmod(path, 0o400)
    assert os.stat(path).st_ctime_ns != recorded["ctime_ns"] and identity_change(recorded, str(path)) == ""

    os.chmod(path, 0o600)
    with zipfile.ZipFile(path) as archive:
        entry = next(e for e in archive.infolist() if e.filename.endswith("data/0"))
        start = entry.header_offset
    with open(path, "r+b") as f:
        f.seek(start + 26)
        name_length, extra_length = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(start + 30 + name_length + extra_length + 8)
        f.write(b"\x00\x00\x48\x41")  # 12.5 for the third weight
    os.utime(path, ns=(recorded["mtime_ns"], recorded["mtime_ns"]))
    assert file_identity(str(path), with_content=True)["tail_sha256"] == recorded["tail_sha256"]
    assert torch.load(path, weights_only=True)["model"]["w"][2] == 12.5  # torch reads the patch without a word
    assert "no longer matches its CRC-32" in identity_change(recorded, str(path))

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    before = file_identity(str(legacy), with_content=True)
    os.chmod(legacy, 0o400)
    assert "not a zip" in identity_change(before, str(legacy))


def test_a_folder_made_a_link_during_the_run_is_never_written_through(tmp_path):
    """The start of a run refuses a link below a written folder, but a run lasts hours: a
    conversion job checks again before each file, and stops naming the link (here converted/<run>
    made a link to a run folder of the tree after the plan), writing nothing through it."""
    from dataclasses import asdict

    from ckpt_migrate import pipeline

    root, layout = tmp_path / "clean_bbpe_50k", pipeline.OutputLayout(str(tmp_path / "out"))
    for step in (100, 200):
        altered_small_checkpoint(root / f"eng_spa_owt_run_1/best_state_{step}.pt", seed=step, optimizers=False)
    synthetic.save(synthetic.upstream_checkpoint(synthetic.medium_state_dict(vocab=VOCAB, seed=3), "medium", step=200,
                                                 optimizers=False), str(root / "deu_fra_owt_run_2/best_state_200.pt"))
    sources = pipeline.checkpoint_sources(str(root), "*_owt_run_*/best_state_*.pt")
    pipeline.detect_and_plan(sources, {k: os.path.relpath(p, root) for k, p in sources.items()}, layout)
    (batch_id,) = pipeline.read_batches(layout.plan)
    before = tree_state(str(root))
    os.makedirs(layout.converted_dir)
    os.symlink(root / "deu_fra_owt_run_2", f"{layout.converted_dir}/eng_spa_owt_run_1")  # another run's folder
    with pytest.raises(OSError, match="converted/eng_spa_owt_run_1 became a link to .*deu_fra_owt_run_2 during the run"):
        pipeline.run_batch(layout, batch_id, asdict(CheckSettings(length=64)), None, f"{layout.root}/summary.yaml")
    assert tree_state(str(root)) == before and os.listdir(root / "deu_fra_owt_run_2") == ["best_state_200.pt"]
