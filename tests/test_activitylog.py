"""The activity log keeps the bitmap file's durable marks ahead of the guest.

In this process, with no server: the real GuestIO, Job, copier and
ActivityLog over raw files.  bitmapfile.fsync is the fault hook: each test
replaces it with one that records what the file held when it was synced
(the "durable" file, what a power loss would leave) and may slow it down
or fail it.  The source endpoint checks, at every data-changing request,
before the data changes, that the durable file marks every chunk the
request touches: so the guest's answer, which comes later, comes after the
durable mark.
"""

import os
import random
import threading
import time

import pytest
from bitarray import bitarray

from nbdmirror import activitylog, bitmapfile
from nbdmirror.bitmap import DirtyBitmap
from nbdmirror.bitmapfile import HEADER, SECTOR, SECTOR_BITS, BitmapFile
from nbdmirror.chunklocks import ChunkLocks
from nbdmirror.endpoints import FileEndpoint
from nbdmirror.guest import GuestIO
from nbdmirror.job import Job
from nbdmirror.options import make_job_options

pytestmark = pytest.mark.timeout(60)

K, M = 1 << 10, 1 << 20
GRAN = 64 * K


class Disk:
    """The bitmap file as a power loss could leave it.  bitmapfile's fault
    hooks (pwrite, fsync) are replaced: a sync makes what the file holds
    durable; a sector written since may be found old or new, so a chunk is
    surely marked only if the synced sector and every later version of it
    mark it (`floor`)."""

    def __init__(self, monkeypatch, delay=0.0):
        self.durable = b""
        self.floor = bitarray(endian="little")
        self.syncs = 0
        self.delay = delay
        self.fail = None            # an errno: the next syncs fail
        self.lock = threading.Lock()
        monkeypatch.setattr(bitmapfile, "fsync", self.fsync)
        monkeypatch.setattr(bitmapfile, "pwrite", self.pwrite)

    def pwrite(self, fd, data, offset):
        n = os.pwrite(fd, data, offset)
        data = bytes(data[:n])
        with self.lock:
            for pos in range(max(offset, HEADER), offset + n, SECTOR):
                s = (pos - HEADER) // SECTOR
                raw = data[pos - offset:pos - offset + SECTOR - 4]
                if len(raw) < SECTOR - 4 or s * SECTOR_BITS >= len(self.floor):
                    continue
                bits = bitarray(endian="little")
                bits.frombytes(raw)
                self.floor[s * SECTOR_BITS:(s + 1) * SECTOR_BITS] &= bits
        return n

    def fsync(self, fd):
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise OSError(self.fail, os.strerror(self.fail))
        with self.lock:
            self.durable = os.pread(fd, 1 << 30, 0)
            self.floor = self._bits(self.durable)
            self.syncs += 1

    @staticmethod
    def _bits(data):
        body = data[HEADER:]
        bits = bitarray(endian="little")
        for s in range(len(body) // SECTOR):
            bits.frombytes(body[s * SECTOR:s * SECTOR + SECTOR - 4])
        return bits

    def marks(self):
        """The chunks surely marked after a power loss now."""
        with self.lock:
            return self.floor.copy()


class CheckedSource(FileEndpoint):
    """A raw file source that checks rule (R) before every change: the
    durable file marks each chunk of the request."""

    def __init__(self, path, disk, granularity):
        super().__init__(path)
        self.disk, self.shift = disk, granularity.bit_length() - 1
        self.violations = []
        self.changes = 0

    def _check(self, offset, length):
        marks = self.disk.marks()
        c0 = offset >> self.shift
        c1 = (offset + length + (1 << self.shift) - 1) >> self.shift
        if marks.count(1, c0, c1) != c1 - c0:
            self.violations.append((offset, length))
        self.changes += 1

    def pwrite(self, buf, offset, fua=False):
        self._check(offset, len(buf))
        super().pwrite(buf, offset, fua)

    def zero(self, count, offset, may_trim=False, fua=False, fast=False):
        self._check(offset, count)
        super().zero(count, offset, may_trim, fua, fast)

    def trim(self, count, offset, fua=False):
        self._check(offset, count)
        super().trim(count, offset, fua)


def raw(path, size, seed=None):
    with open(path, "wb") as f:
        f.truncate(size)
        if seed is not None:
            f.write(random.Random(seed).randbytes(size))
    return str(path)


def open_log(path, size, sync="full", granularity=GRAN):
    bf = BitmapFile.open(str(path))
    ident = bitmapfile.identity(size, granularity, sync, "/s", "nbd://t/")
    return activitylog.prepare(bf, ident)


def wait_for(check, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


class Rig:
    """A job from a checked raw source to a raw target, with a log."""

    def __init__(self, tmp_path, monkeypatch, size=16 * M, delay=0.0005,
                 **job):
        self.size = size
        self.disk = Disk(monkeypatch, delay)
        self.source = CheckedSource(raw(tmp_path / "src", size, seed=5),
                                    self.disk, GRAN)
        self.target = FileEndpoint(raw(tmp_path / "tgt", size))
        self.log = open_log(tmp_path / "bm", size)
        self.guest = GuestIO(self.source)
        self.events = []
        opts = make_job_options({"target": "nbd://t/", "granularity": GRAN,
                                 "bitmap": str(tmp_path / "bm"),
                                 **{k.replace("_", "-"): v
                                    for k, v in job.items()}})
        self.job = Job(opts, self.guest, self.source, self.target,
                       lambda name, data: self.events.append((name, data)),
                       persist=self.log)

    def writers(self, n, ops, seed):
        """n threads of `ops` random guest writes, zeroes and trims each,
        to the end; returns their errors."""
        errors = []

        def run(i):
            rng = random.Random(seed * 100 + i)
            try:
                for _ in range(ops):
                    off = rng.randrange(self.size)
                    length = rng.randint(1, min(256 * K, self.size - off))
                    kind = rng.random()
                    if kind < 0.7:
                        self.guest.pwrite(rng.randbytes(length), off)
                    elif kind < 0.85:
                        self.guest.zero(length, off)
                    else:
                        self.guest.trim(length, off)
            except Exception as e:     # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=run, args=(i,), daemon=True)
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a writer is stuck"
        return errors


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_every_source_change_comes_after_its_durable_mark(
        tmp_path, monkeypatch, copy_mode):
    """Through the copy, ready and a pivot, four guest threads write while
    the log marks, syncs and (cooling fast) clears regions: at every source
    change the durable file marks its chunks."""
    monkeypatch.setattr(activitylog, "COOL_AFTER", 0.02)
    monkeypatch.setattr(activitylog, "CHECKPOINT_INTERVAL", 0.02)
    r = Rig(tmp_path, monkeypatch, speed="32M", copy_mode=copy_mode)
    r.job.start()
    wait_for(lambda: r.job.copier.done_bytes > 0, what="copying")
    assert not r.writers(4, 100, seed=1)            # while copying
    assert r.job.status == "running", "the copy ended before the writers"
    wait_for(lambda: r.job.status == "ready", what="ready")
    wait_for(lambda: r.log.cleared > 0, what="a region cleared")
    for seed in (2, 3):                             # ready: clears and marks
        assert not r.writers(4, 50, seed=seed)
        cleared = r.log.cleared
        wait_for(lambda: r.log.cleared > cleared, what="a region cleared")
    assert r.source.violations == [], r.source.violations[:5]
    assert r.source.changes == 800
    r.job.complete()
    assert r.job.wait(20) and r.job.pivoted
    assert [d for e, d in r.events if e == "BLOCK_JOB_COMPLETED"
            and "error" not in d]
    with open(tmp_path / "src", "rb") as a, open(tmp_path / "tgt", "rb") as b:
        assert a.read() == b.read()
    assert b'"state": "pivoted"' in r.disk.durable[:HEADER]
    r.log.close()


def test_writers_to_one_new_region_share_one_sync(tmp_path, monkeypatch):
    disk = Disk(monkeypatch, delay=0.05)
    size = 64 * M
    log = open_log(tmp_path / "bm", size, sync="none")
    log.attach(DirtyBitmap(size, GRAN), ChunkLocks(size // GRAN))
    syncs = disk.syncs
    barrier = threading.Barrier(8)

    def write(i):
        barrier.wait()
        log.before_write(8 * M + i * 4 * K, 4 * K)
        log.after_write(8 * M + i * 4 * K, 4 * K)
    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert disk.syncs - syncs == 1
    region = disk.marks()[8 * M // GRAN:12 * M // GRAN]
    assert region.all()
    # A region already marked costs nothing more: no write, no sync.
    before = disk.durable
    log.before_write(9 * M, 1 * M)
    log.after_write(9 * M, 1 * M)
    assert disk.syncs - syncs == 1 and disk.durable == before
    log.close()


def test_a_sequential_writer_pays_one_sync_per_several_regions(
        tmp_path, monkeypatch):
    disk = Disk(monkeypatch)
    size = 256 * M
    log = open_log(tmp_path / "bm", size, sync="none")
    log.attach(DirtyBitmap(size, GRAN), ChunkLocks(size // GRAN))
    syncs = disk.syncs
    for off in range(0, size, M):
        log.before_write(off, M)
        assert disk.marks()[off // GRAN]        # durably, before the write
        log.after_write(off, M)
    regions = size // activitylog.REGION
    assert disk.syncs - syncs <= 2 + regions // (activitylog.MARK_AHEAD + 1)
    # A random writer gets no marks ahead.
    log2 = open_log(tmp_path / "bm2", size, sync="none")
    log2.attach(DirtyBitmap(size, GRAN), ChunkLocks(size // GRAN))
    log2.before_write(40 * M, 4096)
    log2.after_write(40 * M, 4096)
    assert log2.dirty_marks() == activitylog.REGION // GRAN
    log.close()
    log2.close()


def test_a_failed_sync_fails_the_guest_write_and_leaves_the_source(
        tmp_path, monkeypatch):
    disk = Disk(monkeypatch)
    size = 8 * M
    src = CheckedSource(raw(tmp_path / "src", size, seed=1), disk, GRAN)
    tgt = FileEndpoint(raw(tmp_path / "tgt", size))
    log = open_log(tmp_path / "bm", size, sync="none")
    guest = GuestIO(src)
    opts = make_job_options({"target": "nbd://t/", "granularity": GRAN,
                             "sync": "none"})
    job = Job(opts, guest, src, tgt, lambda *a: None, persist=log)
    job.start()
    wait_for(lambda: job.status == "ready", what="ready")
    before = open(tmp_path / "src", "rb").read()
    disk.fail = 5                                       # EIO
    with pytest.raises(OSError) as e:
        guest.pwrite(b"x" * 4096, 3 * M)
    assert e.value.errno == 5 and src.changes == 0
    assert open(tmp_path / "src", "rb").read() == before
    assert not log._active
    disk.fail = None                                    # healed: marked again
    guest.pwrite(b"x" * 4096, 3 * M)
    assert src.changes == 1 and not src.violations
    job.cancel(force=True)
    assert job.wait(10)


class UnflushableSource(FileEndpoint):
    """A source whose flushes fail: what was copied from it is not known
    durable there, so nothing may be cleared."""

    def aio_flush(self, done):
        done(5)


def test_no_clear_unless_the_source_flushed_too(tmp_path, monkeypatch):
    monkeypatch.setattr(activitylog, "COOL_AFTER", 0.0)
    monkeypatch.setattr(activitylog, "CHECKPOINT_INTERVAL", 0.01)
    Disk(monkeypatch)
    size = 16 * M
    for source, cleared in ((UnflushableSource, False), (FileEndpoint, True)):
        src = source(raw(tmp_path / "src", size, seed=2))
        tgt = FileEndpoint(raw(tmp_path / "tgt", size))
        log = open_log(tmp_path / f"bm-{cleared}", size)
        opts = make_job_options({"target": "nbd://t/", "granularity": GRAN})
        job = Job(opts, GuestIO(src), src, tgt, lambda *a: None, persist=log)
        job.start()
        wait_for(lambda: job.status == "ready", what="ready")
        deadline = time.monotonic() + 0.3       # some checkpoints
        while time.monotonic() < deadline and not log.cleared:
            time.sleep(0.01)
        assert bool(log.cleared) is cleared
        assert (log.dirty_marks() == 0) is cleared
        job.cancel(force=True)
        assert job.wait(10)


class Parts:
    """A log over a real file with a bare bitmap and chunk locks."""

    def __init__(self, tmp_path, monkeypatch, size=32 * M, sync="none"):
        monkeypatch.setattr(activitylog, "COOL_AFTER", 0.0)
        self.disk = Disk(monkeypatch)
        self.bitmap = DirtyBitmap(size, GRAN)
        self.locks = ChunkLocks(self.bitmap.chunks)
        self.log = open_log(tmp_path / "bm", size, sync=sync)
        self.log.attach(self.bitmap, self.locks)
        self.log.scanned()
        self.per_region = activitylog.REGION // GRAN

    def write(self, region):
        off = region * activitylog.REGION
        self.log.before_write(off, 4096)
        self.bitmap.mark(off, 4096)
        self.log.after_write(off, 4096)

    def copy(self, region):
        c0 = region * self.per_region
        self.bitmap.clear_chunks(c0, c0 + self.per_region)

    def marked(self, region):
        """In the file (written, synced or not)."""
        with open(self.log.path, "rb") as f:
            data = f.read()
        bits = bitarray(endian="little")
        bits.frombytes(data[HEADER:HEADER + SECTOR - 4])
        c0 = region * self.per_region
        return bits[c0:c0 + self.per_region].any()


def test_a_region_is_cleared_only_after_a_flush(tmp_path, monkeypatch):
    p = Parts(tmp_path, monkeypatch)
    p.write(1)
    p.copy(1)
    assert p.marked(1)
    token = p.log.flush_started()
    assert p.marked(1)                          # not before the flush ends
    p.log.flushed(token)
    assert not p.marked(1)
    assert p.log.cleared == 1


def test_no_clear_for_a_write_begun_after_the_flush_was_sent(tmp_path,
                                                             monkeypatch):
    p = Parts(tmp_path, monkeypatch)
    p.write(1)
    p.copy(1)
    token = p.log.flush_started()
    p.write(1)              # begun after: its copy is not in the flush
    p.copy(1)
    p.log.flushed(token)
    assert p.marked(1)
    p.log.flushed(p.log.flush_started())     # the next flush covers it
    assert not p.marked(1)


def test_no_clear_while_a_write_is_in_progress(tmp_path, monkeypatch):
    p = Parts(tmp_path, monkeypatch)
    off = 2 * activitylog.REGION
    p.log.before_write(off, 4096)               # in progress...
    token = p.log.flush_started()
    p.log.flushed(token)
    assert p.marked(2)
    p.bitmap.mark(off, 4096)
    p.log.after_write(off, 4096)                # ... then dirty, not clean
    p.log.flushed(p.log.flush_started())
    assert p.marked(2)


def test_no_clear_for_a_copy_in_flight_when_the_flush_was_sent(
        tmp_path, monkeypatch):
    p = Parts(tmp_path, monkeypatch)
    p.write(3)
    c0 = 3 * p.per_region
    p.locks.try_take(c0, c0 + 1)                # the copier's op...
    p.copy(3)
    token = p.log.flush_started()
    p.locks.release(c0, c0 + 1)                 # ... ends after the flush
    p.log.flushed(token)
    assert p.marked(3)


def test_a_warm_region_stays_marked_unless_too_many_are(tmp_path,
                                                        monkeypatch):
    p = Parts(tmp_path, monkeypatch)
    monkeypatch.setattr(activitylog, "COOL_AFTER", 3600.0)
    monkeypatch.setattr(activitylog, "MAX_HOT", 2)
    for r in (0, 1, 2, 3):
        p.write(r)
        p.copy(r)
    p.log.flushed(p.log.flush_started())
    # The two written last stay marked: writing them again costs nothing.
    assert [p.marked(r) for r in range(4)] == [False, False, True, True]


def test_nothing_is_cleared_before_the_scan(tmp_path, monkeypatch):
    monkeypatch.setattr(activitylog, "COOL_AFTER", 0.0)
    monkeypatch.setattr(activitylog, "LOOK_INTERVAL", 0.0)
    Disk(monkeypatch)
    size = 16 * M
    log = open_log(tmp_path / "bm", size, sync="full")
    log.attach(DirtyBitmap(size, GRAN), ChunkLocks(size // GRAN))
    assert log.flush_started() is None      # the scan has not marked yet
    assert not log.checkpoint_due(0)
    log.scanned()
    assert log.checkpoint_due(0)            # a first look, once scanned
    log.flushed(log.flush_started())
    assert log.dirty_marks() == 0           # nothing was dirty in memory


def test_a_clean_shutdown_saves_the_exact_bitmap(tmp_path, monkeypatch):
    disk = Disk(monkeypatch)
    size = 16 * M
    src = CheckedSource(raw(tmp_path / "src", size, seed=2), disk, GRAN)
    tgt = FileEndpoint(raw(tmp_path / "tgt", size))
    log = open_log(tmp_path / "bm", size)
    guest = GuestIO(src)
    opts = make_job_options({"target": "nbd://t/", "granularity": GRAN,
                             "speed": "4M"})
    job = Job(opts, guest, src, tgt, lambda *a: None, persist=log)
    job.start()
    wait_for(lambda: job.copier.done_bytes > 0, what="copying")
    log.suspend()
    job.cancel(force=True)
    assert job.wait(10)
    exact = job.bitmap.snapshot()
    marks = disk.marks()[:len(exact)]
    assert marks == bitarray(exact, endian="little")
    assert 0 < marks.count(1) < len(exact) and not marks[0]
    # Guests may write until the proxy closes: still marked first.
    assert guest.mirror is job
    guest.pwrite(b"y" * 4096, 0)
    assert disk.marks()[0] and not src.violations
    log.close()
    bf = BitmapFile.open(str(tmp_path / "bm"))
    assert bf.state == "active"
    bf.close()
