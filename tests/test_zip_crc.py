"""torch.save's archive with the CRCs computed by us, beside the write (ckpt_migrate.zip_crc)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import zipfile
import zlib

import pytest
import torch

from ckpt_migrate import zip_crc
from ckpt_migrate.check import CheckSettings
from ckpt_migrate.conversion import convert_file


class Buffer(io.RawIOBase):
    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.data += bytes(b)
        return len(b)


def test_crc32_combine_is_zlibs():
    rng = random.Random(0)
    for length_b in (0, 1, 2, 3, 255, 4096, 65537, (1 << 20) + 3):
        a, b = rng.randbytes(rng.randrange(0, 3000)), rng.randbytes(length_b)
        assert zip_crc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


PAYLOAD = {
    "format": "test",
    "model": {"big": torch.randn(70_001), "small": torch.arange(10), "empty": torch.empty(0),
              "half": torch.ones(3, 5, dtype=torch.bfloat16), "view": torch.randn(4, 6)[1:3]},
    "config": {"layers": 2, "name": "x"},
}


@pytest.fixture
def small_pieces(monkeypatch):
    """Chunks small enough that the test's largest tensor is CRC'd on the pool, with a remainder."""
    monkeypatch.setattr(zip_crc, "PARALLEL_MIN", 64 << 10)
    monkeypatch.setattr(zip_crc, "CHUNK", 16 << 10)


def test_the_archive_is_torchs_with_the_same_crcs(small_pieces):
    ours = Buffer()
    assert zip_crc.save_with_parallel_crc(PAYLOAD, ours) is True
    reference = io.BytesIO()
    torch.save(PAYLOAD, reference)
    with zipfile.ZipFile(io.BytesIO(bytes(ours.data))) as a, zipfile.ZipFile(reference) as b:
        assert a.testzip() is None  # every record's CRC checks out
        assert [i.filename for i in a.infolist()] == [i.filename for i in b.infolist()]
        assert [i.header_offset for i in a.infolist()] == [i.header_offset for i in b.infolist()]
        differing = [i.filename for i, j in zip(a.infolist(), b.infolist())
                     if i.CRC != j.CRC or a.read(i) != b.read(j)]
    # torch derives the serialization id from the CRCs it computed itself, none here.
    assert [name.split("/", 1)[1] for name in differing] == [".data/serialization_id"]
    assert len(ours.data) == len(reference.getvalue())
    loaded = torch.load(io.BytesIO(bytes(ours.data)), weights_only=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in PAYLOAD["model"].items())
    assert loaded["config"] == PAYLOAD["config"]


def test_a_stream_it_does_not_know_is_refused_by_name():
    writer = zip_crc.CrcFillingWriter(Buffer())
    with pytest.raises(zip_crc.ZipLayoutError, match="local file header"):
        writer.write(b"NOT A ZIP HEADER, THIRTY BYTES LONG AT LEAST")
    cut = zip_crc.CrcFillingWriter(Buffer())
    header = zip_crc.LOCAL_HEADER + bytes(2) + (8).to_bytes(2, "little") + bytes(18) + (1).to_bytes(2, "little") + bytes(2)
    cut.write(header)
    cut.write(b"a")  # the record's name
    cut.write(b"data that never gets its descriptor")
    with pytest.raises(zip_crc.ZipLayoutError, match="ended inside record a"):
        cut.close()


def test_a_layout_error_writes_the_file_again_with_torchs_crcs(small_v2_path, tmp_path, monkeypatch, caplog):
    def refuse(self):
        raise zip_crc.ZipLayoutError("record x laid out otherwise")

    monkeypatch.setattr(zip_crc.CrcFillingWriter, "_read_local_header", refuse)
    dst = tmp_path / "out.pt"
    with caplog.at_level(logging.WARNING):
        result = convert_file(small_v2_path, str(dst), CheckSettings(length=256))
    assert result["status"] == "converted", result
    assert "laid out otherwise; writing" in caplog.text and "again with torch's own CRCs" in caplog.text
    with zipfile.ZipFile(dst) as archive:
        assert archive.testzip() is None
    assert result["sha256"] == hashlib.sha256(dst.read_bytes()).hexdigest()
    assert [p for p in os.listdir(tmp_path) if p != "out.pt"] == []  # no temporary left


def test_a_converted_file_passes_zips_own_crc_test(small_v2_path, tmp_path, small_pieces):
    dst = tmp_path / "out.pt"
    result = convert_file(small_v2_path, str(dst), CheckSettings(length=256))
    assert result["status"] == "converted", result
    with zipfile.ZipFile(dst) as archive:
        assert archive.testzip() is None
    assert result["sha256"] == hashlib.sha256(dst.read_bytes()).hexdigest()
