"""The guest path (guest.py) and the job's write-through (Job.write_through)
against fake endpoints.

Pinned here: a tracked write is reported after the source has it, also
when it failed; write-blocking sends writes and zeroes through, never
trims; the gate keeps new requests out once closed and counts those
inside; a write-through waits for a copy of its chunks to end, so the copy
cannot land on the target after it.
"""

import errno
import threading

import pytest

from fakes import FakeEndpoint, JobRig, Scheduler, noise, poll
from nbdmirror import copier as copier_mod
from nbdmirror.guest import GuestIO

K = 1 << 10
M = 1 << 20
G = 64 * K

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def one_mib_requests(monkeypatch):
    """These tests reason in 1 MiB requests (pieces and coalesced ops)."""
    monkeypatch.setattr(copier_mod, "REQUEST_SIZE", 1 << 20)


class Mirror:
    """What GuestIO calls on a job, recorded: ("wrote", offset, length,
    the source's bytes there at that moment) or ("through", ...); the
    persistent bitmap's hooks around them in `hooks`: ("before", offset,
    length, the source's bytes then) and ("after", offset, length)."""

    def __init__(self, src, write_blocking=False):
        self.src = src
        self.write_blocking = write_blocking
        self.calls = []
        self.hooks = []

    def before_write(self, offset, length):
        self.hooks.append(("before", offset, length,
                           bytes(self.src.data[offset:offset + length])))

    def after_write(self, offset, length):
        self.hooks.append(("after", offset, length, len(self.calls)))

    def guest_wrote(self, offset, length):
        self.calls.append(("wrote", offset, length,
                           bytes(self.src.data[offset:offset + length])))

    def write_through(self, offset, length, on_source, on_target):
        self.calls.append(("through", offset, length))
        return on_source()


def guest_on(data=None, **kw):
    sched = Scheduler()
    src = FakeEndpoint(sched, data=data or bytes(M), name="src", **kw)
    return sched, src, GuestIO(src)


# -- tracking -----------------------------------------------------------------

def test_a_tracked_write_is_reported_after_the_source_has_it():
    _, src, guest = guest_on()
    guest.set_mirror(Mirror(src))
    guest.pwrite(b"\x01" * 100, 5000)
    guest.zero(200, 6000)
    guest.trim(300, 7000)
    assert guest.mirror.calls == [("wrote", 5000, 100, b"\x01" * 100),
                                  ("wrote", 6000, 200, bytes(200)),
                                  ("wrote", 7000, 300, bytes(300))]


def test_the_persistent_bitmap_hooks_come_before_the_source_and_after_all():
    """before_write sees the source unchanged (the durable mark comes
    first); after_write comes once the write was reported."""
    _, src, guest = guest_on()
    guest.set_mirror(Mirror(src))
    guest.pwrite(b"\x01" * 100, 5000)
    guest.zero(200, 6000)
    assert guest.mirror.hooks == [("before", 5000, 100, bytes(100)),
                                  ("after", 5000, 100, 1),
                                  ("before", 6000, 200, bytes(200)),
                                  ("after", 6000, 200, 2)]


def test_a_failed_source_write_is_reported_too():
    _, src, guest = guest_on()
    guest.set_mirror(Mirror(src))
    src.fail("write", errno.EIO)
    with pytest.raises(OSError) as e:
        guest.pwrite(b"\x02" * 10, 0)
    assert e.value.errno == errno.EIO
    assert [c[:3] for c in guest.mirror.calls] == [("wrote", 0, 10)]


def test_write_blocking_sends_writes_and_zeroes_through_but_not_trims():
    _, src, guest = guest_on()
    guest.set_mirror(Mirror(src, write_blocking=True))
    guest.pwrite(b"\x03" * 10, 0)
    guest.zero(20, 100)
    guest.trim(30, 200)
    assert [c[:3] for c in guest.mirror.calls] == [
        ("through", 0, 10), ("through", 100, 20), ("wrote", 200, 30)]


def test_without_a_mirror_requests_just_go_to_the_backend():
    _, src, guest = guest_on()
    guest.pwrite(b"\x04" * 10, 0)
    buf = bytearray(10)
    guest.pread(buf, 0)
    assert buf == b"\x04" * 10 and guest.mirror is None


# -- the gate -----------------------------------------------------------------

def test_a_closed_gate_keeps_new_requests_out_and_counts_those_inside():
    sched, src, guest = guest_on(queue_sync=True)
    inside = threading.Thread(target=guest.pwrite, args=(b"\x05" * 8, 0),
                              daemon=True)
    inside.start()
    first = sched.wait_for("write")[0]           # inside, on the source
    guest.gate.close()
    assert guest.gate.active == 1 and not guest.gate.wait_empty(0)
    later = threading.Thread(target=guest.pwrite, args=(b"\x06" * 8, 8),
                             daemon=True)
    later.start()
    poll(lambda: len(guest.gate._cond._waiters) == 1,
         what="the later request to wait at the gate")
    sched.complete(first)
    assert guest.gate.wait_empty(5)
    inside.join(5)
    assert sched.pending() == [] and guest.gate.active == 0
    old = guest.switch_backend(src)              # allowed: closed, empty
    assert old is src
    guest.gate.open()
    sched.complete(sched.wait_for("write")[0])
    later.join(5)
    assert not later.is_alive() and src.data[8:16] == b"\x06" * 8


def test_gate_closes_nest_until_each_is_opened():
    """A pivot's hold, a drive-mirror resuming a bitmap and a quit may
    close the gate at once: the first open() must not let guests in while
    another still holds it."""
    sched, src, guest = guest_on(queue_sync=True)
    guest.gate.close()
    guest.gate.close()
    waiter = threading.Thread(target=guest.pwrite, args=(b"\x08" * 8, 0),
                              daemon=True)
    waiter.start()
    poll(lambda: len(guest.gate._cond._waiters) == 1,
         what="the request to wait at the gate")
    guest.gate.open()
    assert guest.gate.closed and sched.pending() == []
    assert len(guest.gate._cond._waiters) == 1, "let in by the first open"
    guest.gate.open()
    sched.complete(sched.wait_for("write")[0])
    waiter.join(5)
    assert not waiter.is_alive() and src.data[:8] == b"\x08" * 8


def test_switch_backend_needs_the_gate_closed_and_empty():
    sched, src, guest = guest_on(queue_sync=True)
    other = FakeEndpoint(sched, size=M, name="other")
    guest.set_mirror(Mirror(src))
    with pytest.raises(AssertionError):
        guest.switch_backend(other)              # open
    t = threading.Thread(target=guest.pwrite, args=(b"\x07", 0), daemon=True)
    t.start()
    sched.wait_for("write")
    guest.gate.close()
    with pytest.raises(AssertionError):
        guest.switch_backend(other)              # a request inside
    sched.complete_all()
    t.join(5)
    assert guest.switch_backend(other) is src
    assert guest.backend is other and guest.mirror is None
    guest.gate.open()


# -- the job's write-through (the test is the job thread) ---------------------

def dirty(rig):
    return [c for c, bit in enumerate(rig.job.bitmap.snapshot()) if bit]


def opened_rig(size=M, **kw):
    """A write-blocking job, opened (tracking on, target learnt), not
    started: the test drives job.copier itself."""
    rig = JobRig(size=size, copy_mode="write-blocking", **kw)
    rig.job._open()
    assert rig.job.write_blocking and rig.guest.mirror is rig.job
    return rig


def test_a_write_through_waits_for_the_copy_of_its_chunks_and_lands_after():
    rig = opened_rig()
    job, sched, c = rig.job, rig.sched, rig.job.copier
    c.scan()
    c.pump(0)
    read = sched.wait_for("read")[0]             # the copy of [0, 1M)
    assert read.offset == 0 and read.length == M
    new = b"\x08" * 4 * K
    guest = threading.Thread(target=rig.guest.pwrite, args=(new, 100 * K),
                             daemon=True)
    guest.start()
    poll(lambda: len(job.locks._cond._waiters) == 1,
         what="the write-through to wait for the copy's chunks")
    sched.complete(read)                         # the old data
    c.pump(0)
    sched.complete(sched.wait_for("write")[0])
    assert rig.src.data[100 * K:104 * K] != new  # still waiting
    c.pump(0)                                    # the op ends: released
    guest.join(5)
    assert not guest.is_alive()
    assert [(r.kind, r.offset, r.sync) for r in rig.tgt.log] == \
        [("write", 0, False), ("write", 100 * K, True)]
    assert rig.tgt.data == rig.src.data
    assert job.bitmap.dirty_chunks == 0 and job._through_bytes == 4 * K


def test_a_failed_target_write_through_marks_dirty_and_answers_the_guest():
    rig = opened_rig()
    rig.tgt.fail(lambda r: r.sync, errno.ENOSPC)
    rig.guest.pwrite(b"\x09" * 100, 3 * G + 10)  # no error for the guest
    assert rig.src.data[3 * G + 10:3 * G + 110] == b"\x09" * 100
    assert dirty(rig) == [3]
    assert rig.job._through_bytes == 0
    assert not rig.job.locks.is_held(3)


def copy_dirty(rig):
    """Drive the opened rig's copier (the test is the job thread) until
    nothing is dirty or in flight, completing every request."""
    c = rig.job.copier
    for _ in range(1000):
        if c.converged():
            return
        c.pump(0)
        rig.sched.complete_all()
    raise AssertionError("the copier did not converge")


def test_a_write_through_writes_the_source_while_the_target_write_is_out():
    """The two halves side by side: the source half starts once the
    target's write is sent, and the guest waits for both; the chunk stays
    held until the target write completed."""
    rig = opened_rig(queue_sync=True)       # the test completes the target
    entered, release = threading.Event(), threading.Event()
    source_pwrite = rig.src.pwrite

    def slow_source(buf, offset, fua=False):
        entered.set()
        assert release.wait(5)
        source_pwrite(buf, offset, fua)
    rig.src.pwrite = slow_source
    new = b"\x0c" * 4 * K
    guest = threading.Thread(target=rig.guest.pwrite, args=(new, 2 * G),
                             daemon=True)
    guest.start()
    target_write = rig.sched.wait_for((rig.tgt, "write"))[0]
    assert entered.wait(5), "the source half did not start beside it"
    release.set()
    poll(lambda: rig.src.data[2 * G:2 * G + 4 * K] == new,
         what="the source half")
    assert guest.is_alive() and rig.job.locks.is_held(2)
    rig.sched.complete(target_write)
    guest.join(5)
    assert not guest.is_alive() and not rig.job.locks.is_held(2)
    assert rig.tgt.data[2 * G:2 * G + 4 * K] == new
    assert dirty(rig) == [] and rig.job._through_bytes == 4 * K


def test_a_failed_source_write_through_marks_dirty_and_fails_the_guest():
    """The target half may land although the source half failed: the
    range is dirty, and the copy puts the source's bytes back over it."""
    rig = opened_rig()
    rig.src.fail("write", errno.EIO)
    with pytest.raises(OSError) as e:
        rig.guest.pwrite(b"\x0a" * 100, 5 * G)
    assert e.value.errno == errno.EIO
    assert dirty(rig) == [5] and not rig.job.locks.is_held(5)
    assert rig.job._through_bytes == 0
    copy_dirty(rig)
    assert rig.tgt.data[5 * G:6 * G] == rig.src.data[5 * G:6 * G]


def test_a_failed_source_write_through_is_undone_where_the_target_read_zero():
    """The copier knew the target to read zero there: the target half
    makes it forget that before it is sent, so the copy of the (zero)
    source zeroes the guest's bytes away instead of skipping the chunk."""
    rig = opened_rig(src_data=bytes(M), target_is_zero=True)
    rig.tgt.data[:] = bytes(M)
    assert rig.job.copier.target_zero.reads_zero(7, 8)

    def refuse(buf, offset, fua=False):      # e.g. ENOSPC: nothing written
        raise OSError(errno.ENOSPC, "no space")
    rig.src.pwrite = refuse
    with pytest.raises(OSError):
        rig.guest.pwrite(b"\x0d" * 4 * K, 7 * G)
    assert rig.tgt.data[7 * G:7 * G + 4 * K] == b"\x0d" * 4 * K
    assert dirty(rig) == [7]
    copy_dirty(rig)
    assert rig.tgt.data == bytes(M)


def test_a_write_through_after_the_job_ended_writes_the_source_only():
    rig = opened_rig(src_data=noise(M, 1))
    rig.job.locks.try_take(0, 2)
    done = []
    guest = threading.Thread(
        target=lambda: done.append(rig.guest.pwrite(b"\x0b" * 10, 0)),
        daemon=True)
    guest.start()
    poll(lambda: len(rig.job.locks._cond._waiters) == 1,
         what="the write-through to wait")
    rig.job.locks.abandon()                      # the job ends
    guest.join(5)
    assert done == [None] and rig.src.data[:10] == b"\x0b" * 10
    assert rig.tgt.log == []
