"""The fast ustar/pax/GNU header reader gives what Python's tarfile gives: same samples, same problems by reason,
on archives of every format the writers we know produce, cut at every byte and with corrupted bytes."""

import gzip
import io
import tarfile

import numpy as np
import pytest

from prh_stitch.data.stream import _members, _members_tarfile, _members_ustar, _RawSample, _read_tar


def _tar(fmt, compress=False):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
            if kind == tarfile.SYMTYPE:
                info.linkname = "elsewhere"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("__meta__.json", b'{"shard": 1}')
        add("s000.jpg", bytes(range(200)))
        add("s000.txt", b"a red circle")
        add("folder", kind=tarfile.DIRTYPE)
        add("s001.png", b"x" * 512)  # a whole block: no padding
        add("s001.txt", b"")  # an empty member
        add("link.txt", kind=tarfile.SYMTYPE)
        add("noextension", b"skipped")
        if fmt != tarfile.USTAR_FORMAT:  # long and non-ASCII names need pax records or GNU longnames
            add("deep/" + "d" * 120 + "/s002.txt", "café ünïcode".encode())
            add("deep/" + "d" * 120 + "/s002.jpg", b"\xff\xd8" * 300)
            add("crème.txt", b"accents")
        add("s003.txt", b"last")
    data = buffer.getvalue()
    return gzip.compress(data) if compress else data


def _read(data, members):
    out = []
    for item in _read_tar("mem", io.BytesIO(data), members=members):
        if isinstance(item, _RawSample):
            out.append(("sample", item.key, sorted(item.files.items()), item.truncated))
        else:
            out.append(("problem", item.reason))
    return out


FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fast_reader_reads_whole_archives_like_tarfile(fmt):
    data = _tar(FORMATS[fmt])
    expected = _read(data, _members_tarfile)
    assert _read(data, _members) == expected
    keys = [entry[1] for entry in expected if entry[0] == "sample"]
    assert keys[:2] == ["s000", "s001"] and keys[-1] == "s003" and not any(e[0] == "problem" for e in expected)
    if fmt != "ustar":
        assert "deep/" + "d" * 120 + "/s002" in keys and "crème" in keys
    # the fast path really was taken: it reads the first header itself
    assert list(_members_ustar("mem", io.BytesIO(data[512:]), data[:512])) == list(_members_tarfile("mem", io.BytesIO(data)))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fast_reader_matches_tarfile_on_an_archive_cut_at_every_byte(fmt):
    data = _tar(FORMATS[fmt])
    for cut in range(len(data) + 1):
        assert _read(data[:cut], _members) == _read(data[:cut], _members_tarfile), f"cut at byte {cut}"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fast_reader_matches_tarfile_on_corrupted_bytes(fmt):
    data = _tar(FORMATS[fmt])
    rng = np.random.default_rng(0)
    for position in rng.choice(len(data), size=600, replace=False):
        broken = bytearray(data)
        broken[position] ^= 0xFF
        broken = bytes(broken)
        assert _read(broken, _members) == _read(broken, _members_tarfile), f"byte {position} flipped"


def test_compressed_and_non_tar_data_go_to_tarfile():
    data = _tar(tarfile.PAX_FORMAT, compress=True)
    assert _read(data, _members) == _read(_tar(tarfile.PAX_FORMAT), _members_tarfile)
    assert _read(b"not a tar at all" * 100, _members) == [("problem", "unreadable_shard")]
    assert _read(b"", _members) == [("problem", "unreadable_shard")]
