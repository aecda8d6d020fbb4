"""The copier against fake endpoints (fakes.py): the test is the job thread
(it calls pump()) and decides when and how each request completes.

Pinned here, from copier.py's docstring: clear-before-read, re-dirty on
failure, progress counts only ops that ended well, data in flight bounded
by buf-size, one buffer per request; the zero handling (all-zero data,
targetzero.py, `top` depth); the extent cache racing a guest write; the
abandon path of an abort.
"""

import errno
import random

import pytest

from fakes import FakeEndpoint, Layout, Scheduler, noise
from nbdmirror import copier as copier_mod
from nbdmirror.bitmap import DirtyBitmap
from nbdmirror.copier import Copier
from nbdmirror.endpoints import HOLE, ZERO
from nbdmirror.targetzero import TargetZeroMap

K = 1 << 10
M = 1 << 20
G = 64 * K                      # granularity in most tests
ZH = HOLE | ZERO


@pytest.fixture(autouse=True)
def one_mib_requests(monkeypatch):
    """These tests reason in 1 MiB requests (pieces and coalesced ops)."""
    monkeypatch.setattr(copier_mod, "REQUEST_SIZE", M)


pytestmark = pytest.mark.timeout(30)


class Rig:
    """A copier between two fake endpoints, and what it reported."""

    def __init__(self, src_data, tgt_data=None, *, seed=0, granularity=G,
                 buf_size=2 * M, sync="full", target_is_zero=False,
                 layout=None, tgt_layout=None, read_at="issue", tgt_kw=None):
        self.sched = Scheduler(seed)
        self.src = FakeEndpoint(self.sched, data=src_data, name="src",
                                layout=layout, read_at=read_at,
                                has_depth=sync == "top")
        if tgt_data is None:
            tgt_data = bytes([0x55]) * len(src_data)    # not the source
        self.tgt = FakeEndpoint(self.sched, data=tgt_data, name="tgt",
                                layout=tgt_layout, **(tgt_kw or {}))
        self.bitmap = DirtyBitmap(len(src_data), granularity)
        self.errors = []
        self.buf_size = buf_size
        self.copier = Copier(self.bitmap, self.src, self.tgt, sync=sync,
                             buf_size=buf_size,
                             target_is_zero=target_is_zero,
                             on_error=self.errors.append)

    def start(self):
        self.copier.learn_target()
        self.copier.scan()

    def guest_write(self, offset, data):
        """A guest write: the source changes, then the copier hears of it
        (guest.py's order)."""
        self.src.data[offset:offset + len(data)] = data
        self.src.layout.set(offset, offset + len(data), 0, 1)
        self.copier.guest_wrote(offset, len(data))

    def run(self, order="fifo", rounds=10000):
        """Pump and complete (`order`: fifo, reverse, random, some) until
        converged."""
        c = self.copier
        for _ in range(rounds):
            c.pump(0)
            if c.converged():
                return
            if order == "some":
                self.sched.complete_some()
            else:
                self.sched.complete_all(order)
        raise AssertionError(f"not converged after {rounds} rounds")

    def in_flight(self):
        return self.copier.progress()[1]

    def dirty(self):
        return {i for i, b in enumerate(self.bitmap.snapshot()) if b}

    def settle(self, rounds=100):
        """Stop issuing and complete what is in flight, so that what the
        ops left behind shows (a re-dirtied chunk is not taken again)."""
        c = self.copier
        c.stop()
        for _ in range(rounds):
            c.pump(0)
            if not self.sched.complete_all() and not c.busy:
                c.start()
                return
        raise AssertionError("ops did not end")

    def check_clean_run(self):
        """What holds after any run, errors or not."""
        assert self.tgt.overlaps == []
        assert self.sched.aliased == []
        assert self.sched.max_data_in_flight <= max(self.buf_size, 4096)


# -- copying ------------------------------------------------------------------

MIXED = [(3 * G, 0, 1), (2 * G + 4 * K, ZH, 1), (5 * G - 4 * K, 0, 1),
         (6 * G, ZH, 1)]


def mixed_disk(seed):
    """1 MiB: data, a hole (reads as zero), data, a hole."""
    data = bytearray(noise(16 * G, seed))
    layout = Layout(16 * G, MIXED, max_runs=2)   # partial replies
    for s, e in layout.ranges(lambda f, d: f & ZERO):
        data[s:e] = bytes(e - s)
    return bytes(data), layout


@pytest.mark.parametrize("order", ["fifo", "reverse", "random", "some"])
@pytest.mark.parametrize("read_at", ["issue", "complete"])
def test_copy_reaches_the_source_in_any_completion_order(order, read_at):
    data, layout = mixed_disk(1)
    rig = Rig(data, layout=layout, buf_size=256 * K, granularity=16 * K,
              read_at=read_at, seed=7)
    rig.start()
    rig.run(order)
    assert rig.tgt.data == rig.src.data
    assert rig.copier.done_bytes == len(data)
    assert rig.errors == [] and rig.in_flight() == 0
    rig.check_clean_run()


def test_requests_completed_before_they_return_work_too():
    """done() may be called inside aio_*, before it returns."""
    data, layout = mixed_disk(2)
    rig = Rig(data, layout=layout, buf_size=256 * K)
    rig.src.auto = rig.tgt.auto = True
    rig.start()
    rig.run()
    assert rig.tgt.data == rig.src.data
    assert rig.sched.pending() == []


# -- clear-before-read --------------------------------------------------------

@pytest.mark.parametrize("read_at", ["issue", "complete"])
def test_guest_write_during_an_inflight_read_leaves_the_chunk_dirty(read_at):
    rig = Rig(noise(2 * M, 3), buf_size=2 * M, read_at=read_at)
    rig.start()
    c = rig.copier
    c.pump(0)
    read = rig.sched.wait_for(("read", lambda r: r.offset == 0))[0]
    assert read.length == M
    # The op's bits are clear while its read is in flight...
    assert not any(rig.bitmap.is_dirty(i) for i in range(M // G))
    rig.guest_write(100 * K, b"\x01" * 4 * K)       # ...the guest writes...
    rig.sched.complete(read)                         # ...the read answers
    c.pump(0)
    write = rig.sched.wait_for(("write", lambda r: r.offset == 0))[0]
    c.stop()                           # so that the copy does not restart
    rig.sched.complete(write)
    c.pump(0)
    assert 1 in rig.dirty()            # chunk of [100K, 104K): again
    c.start()
    rig.run()
    assert rig.tgt.data == rig.src.data
    rig.check_clean_run()


def test_guest_write_while_the_target_write_is_in_flight_is_copied_again():
    rig = Rig(noise(M, 4), buf_size=M)
    rig.start()
    c = rig.copier
    c.pump(0)
    rig.sched.complete(rig.sched.wait_for("read")[0])
    c.pump(0)
    write = rig.sched.wait_for("write")[0]
    rig.guest_write(500 * K, b"\x02" * 512)
    c.stop()
    rig.sched.complete(write)
    c.pump(0)
    assert rig.dirty() == {500 * K // G}
    c.start()
    rig.run()
    assert rig.tgt.data == rig.src.data


# -- errors -------------------------------------------------------------------

def test_failed_read_redirties_the_op_and_reports_a_read_error():
    rig = Rig(noise(2 * M, 5), buf_size=2 * M)
    rig.start()
    c = rig.copier
    c.pump(0)
    reads = rig.sched.wait_for("read", n=2)
    rig.sched.complete(reads[1], errno.EIO)      # [1M, 2M) fails
    rig.settle()
    assert [(e.operation, e.errno, e.offset) for e in rig.errors] == \
        [("read", errno.EIO, M)]
    assert rig.dirty() == set(range(M // G, 2 * M // G))
    assert c.done_bytes == M                     # only the op that worked
    assert rig.in_flight() == 0 and not c.busy
    rig.run()
    assert rig.tgt.data == rig.src.data and c.done_bytes == 2 * M


@pytest.mark.parametrize("kind,err", [("write", errno.ENOSPC),
                                      ("zero", errno.EIO)])
def test_failed_target_request_redirties_the_op_and_reports_a_write_error(
        kind, err):
    # [0, 512K) data, [512K, 1M) zero: an op of one read (512K pieces),
    # an op of one zero.
    layout = Layout(M, [(M // 2, 0, 1), (M // 2, ZH, 1)])
    data = noise(M // 2, 6) + bytes(M // 2)
    rig = Rig(data, layout=layout, buf_size=M // 2)
    rig.tgt.fail(kind, err)
    rig.start()
    c = rig.copier
    c.pump(0)
    rig.settle()
    assert [(e.operation, e.errno) for e in rig.errors] == [("write", err)]
    bad = rig.errors[0].offset
    lost = set(range(bad // G, bad // G + M // 2 // G))
    assert rig.dirty() == lost
    assert c.done_bytes == M - M // 2
    rig.run()
    assert rig.tgt.data == rig.src.data and c.done_bytes == M


def test_one_failed_piece_redirties_the_whole_op_and_counts_none_of_it():
    # Data and zero extents alternate every 16K: one 64K chunk-op of many
    # pieces (reads and zeroes).
    runs = [(16 * K, 0 if i % 2 == 0 else ZH, 1) for i in range(16)]
    layout = Layout(256 * K, runs)
    data = bytearray(noise(256 * K, 7))
    for s, e in layout.ranges(lambda f, d: f & ZERO):
        data[s:e] = bytes(e - s)
    rig = Rig(bytes(data), layout=layout, buf_size=8 * M,
              granularity=256 * K)
    rig.start()
    c = rig.copier
    c.pump(0)
    reads = rig.sched.wait_for("read", n=8)
    assert len(rig.sched.pending("zero")) == 8
    rig.sched.complete(reads[3], errno.EIO)
    rig.sched.complete_all("reverse")
    rig.settle()
    assert [e.operation for e in rig.errors] == ["read"]
    assert rig.dirty() == {0} and c.done_bytes == 0
    rig.run()
    assert rig.tgt.data == rig.src.data


def test_block_status_error_redirties_and_reports_a_read_error():
    rig = Rig(noise(M, 8), buf_size=M)
    rig.start()
    rig.src.fail_extents(errno.EIO, times=2)     # sizing the op, and its
    c = rig.copier                               # extents
    c.pump(0)               # the op fails before any request: one pump
    assert [(e.operation, e.errno) for e in rig.errors] == \
        [("read", errno.EIO)]
    assert rig.dirty() == set(range(M // G)) and c.done_bytes == 0
    assert not c.busy
    rig.run()
    assert rig.tgt.data == rig.src.data


def test_failed_write_forgets_that_the_target_read_as_zero():
    """target-is-zero, a write there fails (leaving junk): a later copy of
    zeroes must write them, not skip the chunk as already zero."""
    rig = Rig(noise(M, 9), bytes(M), buf_size=M, target_is_zero=True)
    rig.tgt.fail("write", errno.EIO)
    rig.start()
    rig.copier.pump(0)
    rig.settle()
    assert rig.errors and rig.dirty() == set(range(M // G))
    rig.guest_write(0, bytes(M))                 # now all zeroes
    rig.run()
    assert rig.tgt.data == bytes(M)


# -- data in flight -----------------------------------------------------------

@pytest.mark.parametrize("buf_size,disk", [(4096, 256 * K),
                                           (3 * 4096 + 100, 256 * K),
                                           (100 * K, M),
                                           (3 * M + M // 2, 8 * M)])
def test_data_in_flight_never_exceeds_buf_size(buf_size, disk):
    rig = Rig(noise(disk, 10), buf_size=buf_size, granularity=4 * K, seed=3)
    rig.start()
    rig.run("some")
    assert rig.tgt.data == rig.src.data
    rig.check_clean_run()
    # ... and the pool was used, not one request at a time.
    piece = max(4096, min(M, buf_size) & ~4095)
    assert rig.sched.max_data_in_flight == piece * max(1, buf_size // piece)


def test_a_buffer_is_not_reused_before_its_write_completed():
    rig = Rig(noise(4 * M, 11), buf_size=2 * M, granularity=4 * K)
    rig.start()
    c = rig.copier
    c.pump(0)
    rig.sched.complete_all()       # both reads: both buffers now in writes
    c.pump(0)
    assert len(rig.sched.pending("write")) == 2
    assert rig.sched.pending("read") == []       # no buffer left to read
    rig.run("reverse")
    rig.check_clean_run()
    assert rig.tgt.data == rig.src.data


def test_the_copier_leaves_chunks_a_write_through_holds():
    rig = Rig(noise(M, 19), buf_size=M)          # 1M pieces: 16 chunks
    rig.start()
    c = rig.copier
    c.locks.try_take(2, 4)                       # a write-through's

    def touches_held(r):
        return r.offset < 4 * G and r.end > 2 * G
    for _ in range(50):
        c.pump(0)
        assert not any(touches_held(r) for r in rig.sched.pending())
        if not rig.sched.complete_all() and not c.busy:
            break
    assert rig.dirty() == {2, 3}
    assert not any(touches_held(r) for r in rig.tgt.log)
    c.locks.release(2, 4)
    rig.run()
    assert rig.tgt.data == rig.src.data


# -- zeroes -------------------------------------------------------------------

def test_all_zero_data_becomes_a_zero_request():
    layout = Layout(M, [(M, 0, 1)])              # reported as data
    data = bytearray(noise(M, 12))
    data[256 * K:768 * K] = bytes(512 * K)
    rig = Rig(bytes(data), layout=layout, buf_size=256 * K)
    rig.start()
    rig.run()
    assert rig.tgt.data == rig.src.data
    writes = sorted((r.kind, r.offset, r.length) for r in rig.tgt.log)
    assert writes == [("write", 0, 256 * K), ("write", 768 * K, 256 * K),
                      ("zero", 256 * K, 256 * K), ("zero", 512 * K, 256 * K)]
    assert rig.copier.zeroed_bytes == 512 * K


def test_zero_ranges_the_target_already_reads_as_zero_are_skipped():
    # Source: data, zero, zero-bytes-as-data, zero.  Target: junk in its
    # first half, zero in its second (learnt by block status).
    quarter = M // 4
    layout = Layout(M, [(quarter, 0, 1), (quarter, ZH, 1), (quarter, 0, 1),
                        (quarter, ZH, 1)])
    data = noise(quarter, 13) + bytes(3 * quarter)
    tgt = bytes([0x55]) * (M // 2) + bytes(M // 2)
    tgt_layout = Layout(M, [(M // 2, 0, 1), (M // 2, ZH, 1)])
    rig = Rig(data, tgt, layout=layout, tgt_layout=tgt_layout,
              buf_size=quarter)
    rig.start()
    # The scan counts the zero quarter the target has as done already.
    assert rig.copier.done_bytes == quarter
    rig.run()
    assert rig.tgt.data == rig.src.data
    # Written: the data, zeroes over the target's junk; the zero-bytes
    # quarter was read and found zero, but the target reads zero there.
    assert sorted((r.kind, r.offset) for r in rig.tgt.log) == \
        [("write", 0), ("zero", quarter)]
    assert rig.copier.done_bytes == M


def test_target_is_zero_skips_every_zero_range():
    layout = Layout(M, [(M // 2, ZH, 1), (M // 2, 0, 1)])
    data = bytes(M // 2) + noise(M // 2, 14)
    rig = Rig(data, bytes(M), layout=layout, buf_size=M // 2,
              target_is_zero=True)
    rig.start()
    rig.run()
    assert [(r.kind, r.offset) for r in rig.tgt.log] == [("write", M // 2)]
    assert rig.tgt.extents_calls == 0            # nothing to learn


def test_without_native_zero_the_target_gets_zero_writes():
    layout = Layout(M, [(M // 2, ZH, 1), (M // 2, 0, 1)])
    data = bytes(M // 2) + noise(M // 2, 15)
    rig = Rig(data, layout=layout, buf_size=M // 2,
              tgt_kw={"zero_native": False})
    rig.start()
    rig.run("reverse")
    assert rig.tgt.data == rig.src.data
    assert {r.kind for r in rig.tgt.log} == {"write"}


def test_a_refused_fast_zero_is_retried_as_a_plain_zero():
    layout = Layout(M, [(M, ZH, 1)])
    rig = Rig(bytes(M), layout=layout, tgt_kw={"can_fast_zero": True})
    rig.tgt.fail(lambda r: r.kind == "zero" and r.fast, errno.ENOTSUP)
    rig.start()
    rig.run()
    assert rig.errors == [] and rig.tgt.data == bytes(M)
    assert [(r.fast, r.result) for r in rig.tgt.log] == \
        [(True, errno.ENOTSUP), (False, 0)]


def test_top_sync_never_writes_where_depth_is_not_1():
    # depth 1 [0, 96K), backing [96K, 320K), unallocated [320K, 512K)
    layout = Layout(512 * K, [(96 * K, 0, 1), (224 * K, 0, 2),
                              (192 * K, ZH, 0)])
    rig = Rig(noise(512 * K, 16), layout=layout, sync="top",
              buf_size=256 * K)
    rig.start()
    assert rig.dirty() == {0, 1}                 # chunks overlapping depth 1
    rig.run("random")
    # The guest writes into the backing and the unallocated range: only
    # what it wrote becomes the top layer's.
    rig.guest_write(150 * K, b"\x03" * 5 * K)
    rig.guest_write(400 * K, b"\x04" * K)
    rig.run("random")
    top = layout.ranges(lambda f, d: d == 1)
    assert top == [(0, 96 * K), (150 * K, 155 * K), (400 * K, 401 * K)]
    for r in rig.tgt.log:
        assert any(s <= r.offset and r.end <= e for s, e in top), r
    for s, e in top:
        assert rig.tgt.data[s:e] == rig.src.data[s:e]


def test_targetzero_whole_chunks_and_runs():
    bm = DirtyBitmap(4 * G + 100, G)             # a short last chunk
    tz = TargetZeroMap(bm)
    assert tz.whole_chunks(1, 3 * G) == (1, 3)
    assert tz.whole_chunks(G, G + 5) == (1, 1)   # none whole
    assert tz.whole_chunks(3 * G, 4 * G + 100) == (3, 5)
    tz.learn(type("E", (), {"zero": True, "start": 0,
                            "end": 4 * G + 100})())
    tz.forget(1, 2)
    assert list(tz.runs(0, 5)) == [(0, 1, True), (1, 2, False), (2, 5, True)]
    assert tz.reads_zero(2, 5) and not tz.reads_zero(0, 2)


# -- the extent cache against a racing guest write ----------------------------

@pytest.mark.parametrize("writes", [
    {1: 5 * G},             # while the op is sized, before its bits clear
    {1: 12 * G, 2: 5 * G},  # and while its extents are fetched, after
])
def test_block_status_racing_a_guest_write_leaves_nothing_stale(writes):
    """Block status answers 'all zero' and, before the answer arrives, a
    guest writes data (`writes`: the copier's n-th request -> where): the
    stale answer must not be kept, nor lose the write."""
    layout = Layout(M, [(M, ZH, 1)])
    rig = Rig(bytes(M), layout=layout, buf_size=M)
    rig.start()
    calls = rig.src.extents_calls
    fired = []

    def during(offset, count):
        n = rig.src.extents_calls - calls
        if n in writes:
            fired.append(n)
            rig.guest_write(writes[n], b"\x07" * G)
        if len(fired) < len(writes):
            rig.src.during_extents = during
    rig.src.during_extents = during
    rig.run()
    assert fired == sorted(writes)
    assert rig.tgt.data == rig.src.data


def test_a_guest_write_drops_the_cached_extents_it_touches():
    layout = Layout(M, [(M, ZH, 1)])
    rig = Rig(bytes(M), layout=layout, buf_size=M)
    rig.start()
    rig.run()
    calls = rig.src.extents_calls
    rig.guest_write(3 * G, b"\x08" * 100)
    rig.run()
    assert rig.src.extents_calls > calls
    assert rig.tgt.data == rig.src.data


# -- ending -------------------------------------------------------------------

def test_drain_gives_queued_pieces_back_as_dirty():
    rig = Rig(noise(4 * M, 17), buf_size=M, granularity=4 * K)
    rig.start()
    c = rig.copier
    c.pump(0)
    c.stop()
    assert not c.drain(0)              # one read still in flight
    rig.sched.complete_all()
    c.pump(0)
    rig.sched.complete_all()
    assert c.drain(float("inf"))
    assert not c.busy and rig.in_flight() == 0
    assert rig.bitmap.dirty_bytes() == 4 * M - c.done_bytes
    c.start()
    rig.run()
    assert rig.tgt.data == rig.src.data


def test_abandon_ends_target_requests_that_never_complete(monkeypatch):
    monkeypatch.setattr(copier_mod, "ABANDON_GRACE", 2.0)
    rig = Rig(noise(4 * M, 18), buf_size=2 * M)
    rig.start()
    c = rig.copier
    c.pump(0)
    rig.sched.complete_all()
    c.pump(0)
    assert len(rig.tgt.pending("write")) == 2    # and they never complete
    assert not c.drain(0)
    assert c.abandon()
    assert rig.tgt.dead and rig.sched.pending() == []
    assert not c.busy and rig.in_flight() == 0
    assert rig.bitmap.dirty_bytes() == 4 * M
    assert c.done_bytes == 0


# -- a seeded soak ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_soak_guest_writes_errors_and_any_completion_order(seed):
    rnd = random.Random(seed)
    size = 512 * K + rnd.choice([0, 4 * K, 12345])
    data, _ = mixed_disk(seed)
    data = (data * 2)[:size]
    gran = rnd.choice([4 * K, 16 * K, 64 * K])
    zero = rnd.random() < 0.5            # a zero target, maybe said so
    layout = Layout.from_data(data)
    layout.max_runs = rnd.choice([None, 3])
    rig = Rig(data, buf_size=rnd.choice([4096, 32 * K, 2 * M]),
              layout=layout,
              granularity=gran, seed=seed,
              read_at=rnd.choice(["issue", "complete"]),
              target_is_zero=zero and rnd.random() < 0.5,
              tgt_data=bytes(size) if zero else None,
              tgt_kw={"zero_native": rnd.random() < 0.8})
    rig.start()
    c = rig.copier
    for _ in range(300):
        c.pump(0)
        roll = rnd.random()
        if roll < 0.2:
            off = rnd.randrange(size)
            n = min(size - off, rnd.choice([1, 512, 4 * K, 70 * K]))
            payload = bytes(n) if rnd.random() < 0.3 else \
                bytes([rnd.randrange(1, 256)]) * n
            rig.guest_write(off, payload)
        elif roll < 0.25:
            ep = rnd.choice([rig.src, rig.tgt])
            ep.fail(rnd.choice(["read", "write", "zero"]), errno.EIO)
        pending = rig.sched.pending()
        if pending and roll < 0.8:
            rig.sched.complete(rnd.choice(pending))
    rig.src._rules.clear()
    rig.tgt._rules.clear()
    rig.run("some")
    assert rig.tgt.data == rig.src.data
    assert all(e.errno == errno.EIO for e in rig.errors)
    rig.check_clean_run()
