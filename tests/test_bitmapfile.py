"""The bitmap file: what it refuses, with which reason, and what it keeps.

No processes: bitmapfile.BitmapFile and activitylog.prepare on files in
tmp_path.  Every refusal is one line that starts with `bitmap: PATH: `,
and a refused file is left exactly as it was.
"""

import fcntl
import os

import pytest

from nbdmirror import activitylog, bitmapfile
from nbdmirror.bitmapfile import (HEADER, SECTOR, SECTOR_BITS, BitmapFile,
                                  BitmapFileError, identity)

K, M = 1 << 10, 1 << 20
SIZE = 600 * M + 12345          # three sectors, a short last chunk
GRAN = 64 * K
CHUNKS = (SIZE + GRAN - 1) // GRAN


def ident(**changes):
    fields = dict(size=SIZE, granularity=GRAN, sync="full",
                  source="/images/src.img",
                  target="nbd+unix:///?socket=/run/t.sock", job_id="m0")
    fields.update(changes)
    return identity(**fields)


def make(path, **changes):
    """A file made for the job ident(**changes); closed.  Returns its uuid."""
    bf = BitmapFile.open(str(path))
    log = activitylog.prepare(bf, ident(**changes))
    uid = bf.header["uuid"]
    log.close()
    return uid


def content(path):
    with open(path, "rb") as f:
        return f.read()


def refused(path, match, **kw):
    """prepare() on `path` is refused with `match`; the file is unchanged."""
    before = content(path) if os.path.isfile(path) else None
    with pytest.raises(BitmapFileError) as e:
        bf = BitmapFile.open(str(path))
        try:
            activitylog.prepare(bf, ident(**kw.pop("ident", {})), **kw)
        finally:
            bf.close()
    msg = str(e.value)
    assert msg.startswith(f"bitmap: {path}: ") and "\n" not in msg, msg
    assert match in msg, msg
    if before is not None:
        assert content(path) == before
    return msg


def test_a_new_file_marks_everything_for_a_full_copy(tmp_path):
    path = tmp_path / "bm"
    make(path)
    assert os.path.getsize(path) == bitmapfile.file_size(CHUNKS)
    assert os.stat(path).st_mode & 0o777 == 0o600
    bf = BitmapFile.open(str(path))
    assert bf.state == "active" and bf.header["size"] == SIZE
    marks = bf.load()
    assert marks.count(1) == CHUNKS and not marks[CHUNKS:].any()
    bf.close()
    assert sorted(os.listdir(tmp_path)) == ["bm"]       # no temp file left


def test_sync_none_starts_with_nothing_marked(tmp_path):
    path = tmp_path / "bm"
    make(path, sync="none")
    bf = BitmapFile.open(str(path))
    assert not bf.load().any()
    bf.close()


def test_resume_loads_the_marks_as_written(tmp_path):
    path = tmp_path / "bm"
    uid = make(path)
    bf = BitmapFile.open(str(path))
    image = bitmapfile.new_image(CHUNKS)
    for c in (0, 7, SECTOR_BITS - 1, SECTOR_BITS, CHUNKS - 1):
        image[c] = 1
    bf.write_chunks(image, 0, CHUNKS)
    bf.sync()
    bf.close()
    bf = BitmapFile.open(str(path))
    log = activitylog.prepare(bf, ident())
    assert log.resumed and bf.header["uuid"] == uid
    assert [i for i in range(CHUNKS) if log.image[i]] == \
        [0, 7, SECTOR_BITS - 1, SECTOR_BITS, CHUNKS - 1]
    log.close()


def test_state_changes_survive_and_a_torn_header_falls_back(tmp_path):
    path = tmp_path / "bm"
    make(path)
    bf = BitmapFile.open(str(path))
    bf.set_state("pivoting")
    newer = bf._slot
    bf.close()
    bf = BitmapFile.open(str(path))
    assert bf.state == "pivoting"
    bf.close()
    # A torn write of the newer slot: the older header is used.
    with open(path, "r+b") as f:
        f.seek(newer * bitmapfile.SLOT + 40)
        f.write(b"\xff" * 16)
    bf = BitmapFile.open(str(path))
    assert bf.state == "active"
    bf.close()


def test_a_file_held_by_another_proxy_is_refused_even_with_discard(tmp_path):
    path = tmp_path / "bm"
    make(path)
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)          # as a running proxy holds it
    try:
        refused(path, "in use: locked by another process", discard=True)
    finally:
        os.close(fd)
    make(path)                              # free again


@pytest.mark.parametrize("what,changes,words", [
    ("size", {"size": SIZE + GRAN}, "made for another disk size"),
    ("granularity", {"granularity": 4 * K}, "made for another granularity"),
    ("sync", {"sync": "top"}, "made for another sync mode"),
    ("source", {"source": "/images/other.img"}, "made for another source"),
    ("target", {"target": "nbd://host/x"}, "made for another target"),
])
def test_a_file_of_another_job_is_refused_then_discarded(tmp_path, what,
                                                         changes, words):
    path = tmp_path / "bm"
    uid = make(path)
    msg = refused(path, words, ident=changes)
    assert "bitmap-discard starts over" in msg
    bf = BitmapFile.open(str(path))
    log = activitylog.prepare(bf, ident(**changes), discard=True)
    assert not log.resumed and bf.header["uuid"] != uid
    assert bf.load().count(1) == log.chunks     # a full copy
    log.close()


def test_a_job_id_of_its_own_does_not_matter(tmp_path):
    path = tmp_path / "bm"
    make(path)
    bf = BitmapFile.open(str(path))
    assert activitylog.prepare(bf, ident(job_id="other")).resumed
    bf.close()


def test_corrupt_marks_are_refused_naming_the_sector(tmp_path):
    path = tmp_path / "bm"
    make(path)
    with open(path, "r+b") as f:
        f.seek(HEADER + 2 * SECTOR + 100)
        f.write(b"\x5a")
    refused(path, "corrupt marks: checksum mismatch in sector 2")
    bf = BitmapFile.open(str(path))
    assert not activitylog.prepare(bf, ident(), discard=True).resumed
    bf.close()


def test_a_corrupt_header_is_refused(tmp_path):
    path = tmp_path / "bm"
    make(path)
    with open(path, "r+b") as f:
        for slot in (0, 1):
            f.seek(slot * bitmapfile.SLOT + 60)
            f.write(b"garbage")
    refused(path, "corrupt header (checksum mismatch)")


@pytest.mark.parametrize("keep", [HEADER + SECTOR, HEADER - 100, 1000])
def test_a_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "bm"
    make(path)
    os.truncate(path, keep)
    refused(path, "truncated: ")


def test_a_longer_file_is_refused(tmp_path):
    path = tmp_path / "bm"
    make(path)
    with open(path, "ab") as f:
        f.write(bytes(SECTOR))
    refused(path, "corrupt: ")


def test_a_file_not_ours_is_never_replaced(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(64 * K))
    refused(path, "not an nbdmirror bitmap file", discard=True)
    # not even one that starts with zeroes
    path.write_bytes(bytes(HEADER) + b"data")
    refused(path, "not an nbdmirror bitmap file", discard=True)


def test_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    refused(tmp_path / "fifo", "not a regular file")
    refused(tmp_path, "not a regular file")


def test_an_empty_file_is_taken_as_new(tmp_path):
    path = tmp_path / "bm"
    path.write_bytes(b"")
    make(path)
    assert os.path.getsize(path) == bitmapfile.file_size(CHUNKS)


@pytest.mark.parametrize("state", ["cancelled", "failed"])
def test_a_file_whose_job_ended_is_refused_then_discarded(tmp_path, state):
    path = tmp_path / "bm"
    make(path)
    bf = BitmapFile.open(str(path))
    bf.set_state(state)
    bf.close()
    refused(path, f"the job in it ended ({state}); the target is out of date")
    bf = BitmapFile.open(str(path))
    assert not activitylog.prepare(bf, ident(), discard=True).resumed
    assert bf.state == "active"
    bf.close()


@pytest.mark.parametrize("state", ["pivoting", "pivoted"])
def test_a_pivoted_file_is_never_discarded(tmp_path, state):
    path = tmp_path / "bm"
    make(path)
    bf = BitmapFile.open(str(path))
    bf.set_state(state)
    bf.close()
    refused(path, "pivoted to the target", discard=True)


def test_resume_can_be_refused_when_writes_went_untracked(tmp_path):
    path = tmp_path / "bm"
    make(path)
    refused(path, "the guest wrote since this proxy started", resume_ok=False)


def test_a_long_source_name_is_kept_as_a_digest(tmp_path):
    path = tmp_path / "bm"
    long = "/" + "x" * 3000
    make(path, source=long)
    bf = BitmapFile.open(str(path))
    assert bf.header["source"].startswith("sha256:")
    assert activitylog.prepare(bf, ident(source=long)).resumed
    bf.close()
    refused(path, "made for another source", ident={"source": long + "y"})
