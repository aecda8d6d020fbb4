"""The job's thread against fake endpoints (fakes.JobRig): a Completer
thread answers the requests, except those the test holds (flushes, mostly)
to decide their outcome and timing.

Pinned here, from job.py's docstring and issue 9: ready only at zero dirty
+ nothing in flight + a successful target flush; a pivot only after the
final flush succeeded, and never after an accepted force cancel; an abort
ends in bounded time even with target requests that never complete; guest
writes (write-through or tracked) racing the copier never put two
overlapping writes in flight on the target.
"""

import errno
import random
import threading
import time

import pytest

from fakes import JobRig, poll
from nbdmirror import copier as copier_mod
from nbdmirror import job as job_mod

K = 1 << 10
M = 1 << 20

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def rigs():
    made = []

    def make(**kw):
        rig = JobRig(**kw)
        made.append(rig)
        return rig
    yield make
    for rig in made:
        rig.close()


SETTLED = {"dirty": 0, "in_flight": 0, "busy": False, "durable": True}


def settled(facts):
    """The facts SETTLED names, from a JobRig fact record."""
    return {k: facts[k] for k in SETTLED}


# -- ready --------------------------------------------------------------------

def test_ready_comes_after_a_successful_flush_of_a_converged_copy(rigs):
    rig = rigs(hold={"flush"}).start()
    flush = rig.flush()
    assert "BLOCK_JOB_READY" not in rig.names()
    assert flush.image == rig.src.data           # sent with all copied
    rig.sched.complete(flush)
    rig.wait_event("BLOCK_JOB_READY")
    assert [settled(f) for f in rig.ready_facts] == [SETTLED]
    assert rig.tgt.flushes == [0]
    assert rig.statuses() == ["created", "running", "ready"]


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
def test_a_failing_flush_never_yields_ready(rigs, policy, monkeypatch):
    # `ignore` retries after its back-off, at the job's next look around.
    monkeypatch.setattr(job_mod, "IDLE_WAKEUP", 0.05)
    rig = rigs(hold={"flush"}, on_target_error=policy).start()
    failures = 3 if policy == "ignore" else 1
    for _ in range(failures):
        rig.sched.complete(rig.flush(), errno.EIO)
    error = rig.wait_event("BLOCK_JOB_ERROR")
    assert (error["operation"], error["action"]) == ("write", policy)
    if policy == "report":
        done = rig.wait_event("BLOCK_JOB_COMPLETED")
        rig.ended()
        assert "Input/output error" in done["error"]
        assert "BLOCK_JOB_READY" not in rig.names()
        assert rig.guest.backend is rig.src and rig.tgt.closed
        return
    if policy == "stop":
        rig.wait_status("paused")
        assert rig.sched.pending("flush") == []
        rig.job.resume()
    flush = rig.flush()
    assert "BLOCK_JOB_READY" not in rig.names()
    rig.sched.complete(flush)
    rig.wait_event("BLOCK_JOB_READY")
    assert rig.tgt.flushes == [errno.EIO] * failures + [0]
    assert [settled(f) for f in rig.ready_facts] == [SETTLED]


def test_a_guest_write_while_the_flush_is_in_flight_delays_ready(rigs):
    """The flush answers while the write's copy is still in flight: not
    ready; the copy ends, a new flush, and then ready."""
    rig = rigs(hold={"flush"}).start()
    flush = rig.flush()
    rig.hold.add("read")
    rig.guest.pwrite(b"\x01" * 4 * K, 300 * K)
    rig.sched.wait_for(("read", lambda r: r.offset <= 300 * K < r.end))
    rig.sched.complete(flush)
    rig.hold.discard("read")
    second = rig.flush()
    assert "BLOCK_JOB_READY" not in rig.names()
    assert second.image == rig.src.data
    rig.sched.complete(second)
    rig.wait_event("BLOCK_JOB_READY")
    assert rig.tgt.flushes == [0, 0]
    assert [settled(f) for f in rig.ready_facts] == [SETTLED]


def test_the_flush_before_ready_covers_copies_made_while_it_was_in_flight(
        rigs):
    """The guest writes while the flush is in flight and the copier copies
    it before the flush answers: everything is clean again when it does,
    but the flush does not cover that copy.  Ready needs a flush after it."""
    rig = rigs(hold={"flush"}).start()
    flush = rig.flush()
    rig.guest.pwrite(b"\x02" * 4 * K, 300 * K)
    poll(lambda: rig.tgt.data == rig.src.data and not rig.job.copier.busy
         and not rig.job.bitmap.dirty_chunks, what="the copy")
    rig.sched.complete(flush)
    rig.hold.discard("flush")
    rig.wait_event("BLOCK_JOB_READY")
    assert [settled(f) for f in rig.ready_facts] == [SETTLED]


# -- pivot --------------------------------------------------------------------

def ready_rig(rigs, **kw):
    """A job in `ready`, its flushes held."""
    rig = rigs(hold={"flush"}, **kw).start()
    rig.sched.complete(rig.flush())
    rig.wait_event("BLOCK_JOB_READY")
    return rig


def completing_flush(rig, which):
    """complete(), and the flush `which` of the two it sends (held): the
    one with the guest running, or the final one, with the guest held."""
    rig.job.complete()
    flush = rig.flush()
    if which == "final":
        rig.sched.complete(flush)
        flush = rig.flush()
    return flush


def test_complete_pivots_only_after_the_final_flush_succeeded(rigs):
    rig = ready_rig(rigs)
    rig.guest.pwrite(b"\x03" * 5000, 123456)     # left to copy at the end
    rig.job.complete()
    first = rig.flush()                          # guest running
    assert rig.guest.backend is rig.src
    rig.sched.complete(first)
    final = rig.flush()                          # guest held
    assert rig.guest.gate.closed and rig.guest.backend is rig.src
    assert final.image == rig.src.data
    rig.sched.complete(final)
    done = rig.wait_event("BLOCK_JOB_COMPLETED")
    rig.ended()
    assert "error" not in done
    assert rig.guest.backend is rig.tgt and rig.job.pivoted
    assert rig.src.closed and not rig.tgt.closed
    # The guest's disk now: a lost connection is made again.
    assert rig.tgt.heal_delay == rig.opts.reconnect_delay > 0
    [facts] = rig.pivot_facts
    assert settled(facts) == SETTLED
    assert facts["gate_closed"] and facts["flushes"] == [0, 0, 0]
    assert not rig.guest.gate.closed             # the guest goes on
    assert rig.statuses()[-3:] == ["pending", "concluded", "null"]


@pytest.mark.parametrize("which", ["first", "final"])
def test_a_failed_flush_while_completing_means_no_pivot(rigs, which):
    rig = ready_rig(rigs)
    flush = completing_flush(rig, which)
    rig.sched.complete(flush, errno.EIO)
    done = rig.wait_event("BLOCK_JOB_COMPLETED")
    rig.ended()
    assert "error" in done
    assert rig.pivot_facts == [] and not rig.job.pivoted
    assert rig.guest.backend is rig.src and rig.guest.mirror is None
    assert not rig.guest.gate.closed and rig.tgt.closed and not rig.src.closed


@pytest.mark.parametrize("which", ["first", "final"])
def test_a_force_cancel_accepted_before_the_switch_means_no_pivot(rigs, which):
    """The cancel is accepted just before a flush answers (with success):
    the job must look at it before it switches."""
    rig = ready_rig(rigs)
    flush = completing_flush(rig, which)
    rig.sched.complete(flush, 0,
                       before_done=lambda: rig.job.cancel(force=True))
    rig.wait_event("BLOCK_JOB_CANCELLED")
    rig.ended()
    assert rig.pivot_facts == [] and not rig.job.pivoted
    assert rig.guest.backend is rig.src and not rig.guest.gate.closed
    assert "BLOCK_JOB_COMPLETED" not in rig.names()


def test_soft_cancel_after_ready_leaves_the_target_in_sync_without_pivot(
        rigs):
    rig = ready_rig(rigs)
    rig.guest.pwrite(b"\x04" * 4 * K, 700 * K)
    rig.hold.clear()
    rig.job.cancel()
    done = rig.wait_event("BLOCK_JOB_COMPLETED")
    rig.ended()
    assert "error" not in done and not rig.job.pivoted
    assert rig.guest.backend is rig.src and rig.guest.mirror is None
    assert rig.tgt.durable == rig.src.data
    assert rig.tgt.heal_delay is None


# -- abort --------------------------------------------------------------------

@pytest.mark.parametrize("hang", ["target-busy", "target-idle", "source"])
def test_abort_with_requests_that_never_complete_ends_in_bounded_time(
        rigs, monkeypatch, hang):
    """An endpoint stops answering: the target (with the copier's writes in
    flight, or only a guest write-through), or the source (the copier's
    reads).  A force cancel ends the job within ABORT_GRACE +
    ABANDON_GRACE, the target's requests end (the source's are left to
    finish on their own), and the guest gets its answer: its data is on
    the source."""
    monkeypatch.setattr(job_mod, "ABORT_GRACE", 0.2)
    monkeypatch.setattr(copier_mod, "ABANDON_GRACE", 0.5)
    rig = rigs(size=4 * M, copy_mode="write-blocking", queue_sync=True)
    if hang == "target-busy":
        rig.hold_target = True
        rig.start()
        rig.sched.wait_for(("write", rig.tgt))   # the copier's, stuck
    elif hang == "target-idle":
        rig.start()
        rig.wait_event("BLOCK_JOB_READY")
        rig.hold_target = True
    else:
        rig.hold.add("read")
        rig.start()
        rig.sched.wait_for(("read", rig.src))
    answered = []
    payload = b"\x05" * 8 * K
    guest = threading.Thread(
        target=lambda: answered.append(rig.guest.pwrite(payload, 3 * M)),
        daemon=True)
    guest.start()
    if hang != "source":
        rig.sched.wait_for(lambda r: r.sync and r.ep is rig.tgt)
    t0 = time.monotonic()
    rig.job.cancel(force=True)
    rig.ended(timeout=5)
    elapsed = time.monotonic() - t0
    guest.join(5)
    assert not guest.is_alive() and answered == [None]
    assert elapsed < job_mod.ABORT_GRACE + copier_mod.ABANDON_GRACE + 0.5
    assert "BLOCK_JOB_CANCELLED" in rig.names()
    assert rig.sched.pending(rig.tgt) == [] and rig.tgt.closed
    assert rig.src.data[3 * M:3 * M + len(payload)] == payload
    assert rig.guest.backend is rig.src and rig.guest.mirror is None


# -- guest writes racing the copier -------------------------------------------

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("copy_mode", ["write-blocking", "background"])
def test_guest_writes_racing_the_copier_never_overlap_on_the_target(
        rigs, copy_mode, seed):
    size = M + 5 * K
    rig = rigs(size=size, seed=seed, copy_mode=copy_mode, queue_sync=True,
               granularity=16 * K, buf_size=96 * K).start()
    # Writes before the job tracks them race nothing (the scan copies
    # them); they could all be over by then.
    poll(lambda: rig.guest.mirror is rig.job)
    stop_at = time.monotonic() + 5           # a bound, not a pace

    def writer(n):
        rnd = random.Random(seed * 100 + n)
        for _ in range(25):
            if time.monotonic() > stop_at:
                return
            off = rnd.randrange(size)
            length = min(size - off, rnd.choice([512, 4 * K, 20 * K, 40 * K]))
            how = rnd.random()
            if how < 0.6:
                rig.guest.pwrite(bytes([rnd.randrange(1, 256)]) * length, off)
            elif how < 0.9:
                rig.guest.zero(length, off)
            else:
                rig.guest.trim(length, off)

    writers = [threading.Thread(target=writer, args=(n,), daemon=True)
               for n in range(3)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(10)
        assert not t.is_alive()
    rig.wait_event("BLOCK_JOB_READY", timeout=10)
    rig.job.complete()
    rig.wait_event("BLOCK_JOB_COMPLETED", timeout=10)
    rig.ended()
    assert rig.job.pivoted and rig.guest.backend is rig.tgt
    [facts] = rig.pivot_facts
    assert settled(facts) == SETTLED
    assert rig.tgt.data == rig.src.data
    assert rig.tgt.overlaps == []
    assert rig.sched.aliased == []
    assert rig.sched.max_data_in_flight <= 96 * K
    if copy_mode == "write-blocking":
        assert any(r.sync and r.kind == "write" for r in rig.tgt.log)


# -- flushes now and then (unflushed.py) ---------------------------------------

def test_copies_after_ready_are_flushed_within_flush_age(rigs, monkeypatch):
    """What the job writes after ready becomes durable on the target by
    itself, FLUSH_AGE after the oldest unflushed write, with no guest flush
    and no pivot: a target lost later costs at most that much again."""
    monkeypatch.setattr(job_mod, "FLUSH_AGE", 0.2)
    rig = rigs().start()
    rig.wait_event("BLOCK_JOB_READY")
    flushes = len(rig.tgt.flushes)
    rig.guest.pwrite(bytes([0xEE]) * 4096, 70000)
    poll(lambda: rig.tgt.durable == rig.guest.backend.data,
         what="the guest's write durable on the target")
    assert len(rig.tgt.flushes) > flushes and not any(rig.tgt.flushes)
    assert rig.job.copier.unflushed.oldest is None


def test_a_lost_target_gets_again_what_it_had_not_flushed(rigs):
    rig = rigs().start()
    rig.wait_event("BLOCK_JOB_READY")
    rig.guest.pwrite(bytes([0xEE]) * 4096, 70000)
    unflushed = rig.job.copier.unflushed
    poll(lambda: rig.tgt.data == rig.guest.backend.data and
         unflushed.oldest is not None, what="the copy, reaped")
    assert rig.job.copier.target_lost() == 1 << 20  # its whole region
    done = rig.job.copier.done_bytes
    poll(lambda: rig.job.copier.done_bytes >= done + (1 << 20),
         what="the region copied again")
    poll(lambda: rig.tgt.data == rig.guest.backend.data, what="the copy")


# -- the start of tracking -----------------------------------------------------

def test_a_guest_write_in_flight_when_tracking_starts_reaches_the_target(
        rigs):
    """A write that entered the guest path before the job tracked writes
    (so it is not marked dirty) and lands on the source after the job set
    its mirror: the scan must not look at its range before it landed, or
    the target never gets it.  Here its range reads as zeroes before it,
    and the write is held inside the source until the job either scanned
    (the bug) or closed the gate to wait for it (the fix)."""
    size = 1 * M
    rig = rigs(size=size, src_data=bytes(size))
    inside, release = threading.Event(), threading.Event()
    write_to_source = rig.src.pwrite

    def held_pwrite(buf, offset, fua=False):
        inside.set()
        assert release.wait(10), "the test did not release the write"
        write_to_source(buf, offset, fua)
    rig.src.pwrite = held_pwrite
    scanned = threading.Event()
    rig.src.during_extents = lambda offset, count: scanned.set()
    data = bytes([0xA7]) * 4096
    writer = threading.Thread(target=rig.guest.pwrite,
                              args=(data, 300 * K), daemon=True)
    writer.start()
    assert inside.wait(5)
    assert rig.guest.mirror is None     # entered untracked
    rig.start()
    poll(lambda: scanned.is_set() or rig.guest.gate.closed, 5,
         "the job scanning, or holding the gate for the write inside")
    release.set()
    writer.join(5)
    rig.wait_event("BLOCK_JOB_READY")
    assert rig.src.data[300 * K:304 * K] == data
    assert rig.tgt.data == rig.src.data, "the target lacks the write"


def _nice(tid):
    with open(f"/proc/self/task/{tid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[16])


def test_the_job_thread_copies_at_a_lower_cpu_priority(rigs):
    """A copy competing with the guest for CPU leaves it more: the job's
    thread is COPIER_NICE nicer than the process, the process unchanged."""
    rig = rigs().start()
    rig.wait_event("BLOCK_JOB_READY")
    base = _nice(threading.get_native_id())
    assert _nice(rig.job._thread.native_id) == \
        min(19, base + job_mod.COPIER_NICE)
    assert _nice(threading.get_native_id()) == base


def test_a_reconnected_target_starts_its_io_at_the_process_priority(rigs):
    """The job thread, nicer, cannot start a thread at the process's
    priority where it may not raise one (unprivileged): a target's new
    connection starts its I/O thread through the job's Starter."""
    rig = rigs()
    started_at = []

    def reconnect(timeout, give_up=None, start_io=None):
        run = start_io or (lambda fn: fn())
        started_at.append(run(lambda: _nice(threading.get_native_id())))
        rig.tgt.dead = None
    rig.tgt.reconnect = reconnect
    rig.start()
    rig.wait_event("BLOCK_JOB_READY")
    base = _nice(threading.get_native_id())
    rig.tgt.abort("lost")
    rig.wait_event("TARGET_RECONNECTED")
    assert started_at == [base]
    assert _nice(rig.job._thread.native_id) == \
        min(19, base + job_mod.COPIER_NICE)
