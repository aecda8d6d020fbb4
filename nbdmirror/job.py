"""A mirror job: the state machine, the copier and the events, in one thread.

Threads and locks:
  * The job thread (run) drives the copier and performs every status
    transition.
  * Management (QMP) threads call the verb methods (pause, complete, ...).
    They take `_lock`, ask jobstate whether the verb is allowed, record the
    request, and wake the job thread.  They never touch the copier beyond
    waking it.
  * Guest threads call guest_wrote() after each write (the copier marks the
    bitmap).  In write-blocking mode they call write_through() instead,
    which holds the write's chunks in `locks` (chunklocks.py) while it
    writes the source and then the target.  Around either, before_write()
    and after_write() (guest.py) let the persistent bitmap mark the
    write's regions durably before the source changes.
  * `persist` is the job's persistent bitmap (activitylog.py; NO_LOG
    without --bitmap).  The job calls it at a few hooks, each marked
    "persistent bitmap": attach (a resumed job's marks), scanned,
    checkpoints (_checkpoint: a target and a source flush alongside the
    copy, after which copied regions may be cleared in the file), the
    pivot (pivoting before the switch, pivoted after) and the job's end.
`_lock` guards `state`, `_speed`, `error`, `io_status` and `copy_mode`.

copy-mode auto (the job thread decides): it starts as background and
watches the backlog (dirty + in flight) while it runs; when no smaller
backlog was seen for auto-switch-after seconds (a guest writes faster than
the copier drains), `copy_mode` becomes write-blocking, for good, with a
JOB_COPY_MODE_CHANGED event.  From then on every guest write also lands on
the target, so the backlog only shrinks and the job converges.
Events are emitted with it held, so their order is the order of the
transitions.

Bounds (issue "work with NBD servers as people run them"):
  * Guest I/O is held for a pivot at most PIVOT_HOLD_LIMIT seconds: the
    job converges and flushes with the guest running, then holds it only
    for the last dirty bytes, a final flush and the switch.  Past the
    limit it lets the guest go and tries again; a final flush that does
    not answer in time is an error (ETIMEDOUT) under on-target-error.
  * An abort (force cancel, or an error under `report`) ends the job within
    ABORT_GRACE + copier.ABANDON_GRACE seconds: requests still in flight to
    the target are then ended by killing the connection, which also frees
    guest write-throughs waiting on it (their data is on the source, their
    chunks are marked dirty, and the guest gets its answer).
  * A job whose cancel was accepted never pivots: the switch happens under
    `_lock`, after looking at what was asked last.
"""

import errno
import threading
import time
import traceback

from . import priority
from .activitylog import NO_LOG
from .bitmap import DirtyBitmap
from .chunklocks import ChunkLocks
from .copier import CopyError, Copier
from .endpoints import RECONNECT_MAX, RECONNECT_MIN
from .errors import EndpointError, JobError
from .jobstate import Action, JobState, Status
from .nbdconn import LOST

S = Status
ABORT_GRACE = 1.0       # seconds an abort waits for in-flight requests
IDLE_WAKEUP = 1.0       # the job thread looks around at least this often
# Flush the target this long after its oldest unflushed write: a lost
# connection then costs at most about this much copying again.  (A flush
# per 1 GiB or 256 MiB written made 4 GiB onto a qemu-nbd file target
# 20-45 % slower; one per 10 s is one flush in a 16 s copy of 8 GiB.)
FLUSH_AGE = 10.0
# The job thread runs this much nicer than the process, so that a copy
# competing with the guest for CPU leaves it more: 4 KiB guest reads during
# a 2 GiB copy on 2 cores, 15-16k IOPS at the same priority, 21-22k at +5
# (the copy 13 % longer); an idle guest's copy is as fast (1.36-1.43 s
# either way).  Guest requests never run in this thread.
COPIER_NICE = 5
PIVOT_HOLD_LIMIT = 5.0  # seconds guest I/O may be held for a pivot
HOLD_AIM = 0.5          # hold when the backlog takes about this long to copy
HOLD_MIN_BACKLOG = 1 << 20   # ... or is this small, whatever the rate
HOLD_RETRY_DELAY = 1.0  # after a hold that ran out, let the guest run this long
HOLD_PATIENCE = 1.0     # hold anyway once the backlog stayed big this long
RATE_INTERVAL = 0.5     # seconds between copy rate samples
ERROR_EVENT_INTERVAL = 0.1   # BLOCK_JOB_ERROR at most this often (`ignore`)
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0   # `ignore` retries, doubling


class Job:
    """One mirror job from `source` to `target` (open endpoints; the job
    owns `target` until a pivot hands it to the guest path)."""

    def __init__(self, opts, guest, source, target, emit,
                 connect_timeout=10.0, persist=None):
        self.opts = opts
        self.id = opts.job_id
        self.guest = guest
        self.source = source
        self.target = target
        self.emit = emit                 # emit(event, data)
        self.state = JobState(self.id,
                              getattr(opts, "auto_finalize", True),
                              getattr(opts, "auto_dismiss", True))
        self.bitmap = DirtyBitmap(source.size, opts.granularity)
        self.locks = ChunkLocks(self.bitmap.chunks)
        # persistent bitmap: a resumed job starts from the file's marks
        self.persist = persist or NO_LOG
        self.persist.attach(self.bitmap, self.locks)
        self._checkpoint_flush = None    # (token, [errno]) in flight
        self._starter = None             # priority.Starter, in run()
        self._periodic_flush = False     # _flush_now_and_then in flight
        self.copier = Copier(
            self.bitmap, source, target, sync=opts.sync,
            buf_size=opts.buf_size, speed=opts.speed,
            # persistent bitmap: a resumed job's target holds data already
            target_is_zero=opts.target_is_zero and not self.persist.resumed,
            on_error=self._on_error,
            locks=self.locks, give_up=self._aborting)
        self.copy_mode = opts.copy_mode  # "auto" until it switches
        self._least_backlog = None       # copy-mode auto: smallest seen...
        self._least_at = 0.0             # ... and when
        self._target_learnt = False      # write-throughs may start
        self._through_bytes = 0          # written through to the target
        self.error = None                # why the job failed, if it did
        self.io_status = "ok"
        self.pivoted = False
        self.speed = opts.speed
        self._applied_speed = opts.speed
        self._backoff = BACKOFF_MIN
        self._backoff_until = 0.0
        self._last_error_event = 0.0
        self._hold_retry_at = 0.0
        # Target connection loss (job thread; read by queries).
        self.reconnect_delay = opts.reconnect_delay
        self._connect_timeout = connect_timeout
        self._lost_at = None             # when the loss was noticed
        self._next_attempt = 0.0
        self._attempt_wait = RECONNECT_MIN
        self._finish_asked = None        # when complete/soft cancel came
        self._rate = 0.0                 # bytes/s copied, smoothed
        self._rate_at = (time.monotonic(), 0)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.run, daemon=True,
                                        name=f"nbdmirror-job-{self.id}")
        self._done = threading.Event()
        self._emit_status()              # created

    # -- management verbs (any thread) -----------------------------------
    def _verb(self, fn, *args):
        with self._lock:
            fn(*args)
        self.copier.wake()

    def pause(self):
        self._verb(self.state.pause)

    def resume(self):
        def resume():
            self.state.resume()
            self.io_status = "ok"
        self._verb(resume)

    def complete(self):
        self._verb(self.state.complete)

    def cancel(self, force=False):
        self._verb(self.state.cancel, force)

    def finalize(self):
        self._verb(self.state.finalize)

    def dismiss(self):
        with self._lock:
            self.state.dismiss()
            self._emit_status()

    def set_speed(self, speed):
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")

        def set_speed():
            self.state.check("set-speed")
            self.speed = speed
        self._verb(set_speed)

    def change(self, copy_mode):
        """block-job-change: background or auto -> write-blocking (as QEMU,
        the only switch there is)."""
        if copy_mode not in ("background", "write-blocking"):
            raise JobError(f"copy-mode {copy_mode!r} is not one of "
                           "background, write-blocking")
        with self._lock:
            self.state.check("change")
            if copy_mode == self.copy_mode:
                return
            if copy_mode == "background":
                raise JobError(f"Job '{self.id}': cannot change copy-mode "
                               f"from '{self.copy_mode}' to 'background'")
            self.copy_mode = copy_mode
        self.copier.wake()

    # -- queries (any thread) ------------------------------------------------
    @property
    def status(self):
        return self.state.status

    @property
    def write_blocking(self):
        """Guest writes go through write_through() (once the job knows
        where the target reads as zero: targetzero.py), unless the target
        connection is lost: then they are tracked as in background mode."""
        return self.copy_mode == "write-blocking" and self._target_learnt \
            and self.target.dead is None

    def disconnected_for(self):
        """Seconds since the target connection was lost, or None."""
        lost = self._lost_at
        return None if lost is None else time.monotonic() - lost

    @property
    def actively_synced(self):
        """As QEMU 8.2+: write-blocking keeps the target in step now."""
        return self.write_blocking and not self.bitmap.dirty_chunks and \
            self.status in (S.READY, S.STANDBY) and self.target.dead is None

    @property
    def busy(self):
        return self.status in (S.RUNNING, S.READY) and \
            not self.state.paused and not self.copier.throttled

    def progress(self):
        """(offset, len) as INTERFACE.md §5 defines them."""
        done, in_flight = self.copier.progress()
        offset = done + self._through_bytes
        return offset, offset + self.bitmap.dirty_bytes() + in_flight

    def _event_data(self, **extra):
        offset, length = self.progress()
        data = {"type": "mirror", "device": self.id, "len": length,
                "offset": offset, "speed": self.speed}
        data.update(extra)
        return data

    # -- the guest path's hooks (guest threads) ------------------------------
    def before_write(self, offset, length):
        """persistent bitmap: before a data-changing guest request reaches
        the source, its regions are durably marked (raises OSError, and the
        request fails, if they cannot be)."""
        self.persist.before_write(offset, length)

    def after_write(self, offset, length):
        """persistent bitmap: the request ended, its dirty bits are set."""
        self.persist.after_write(offset, length)

    def guest_wrote(self, offset, length):
        """After a guest write to the source completed (or failed)."""
        self.copier.guest_wrote(offset, length)

    def write_through(self, offset, length, on_source, on_target):
        """A write-blocking guest write: source and target, then answer.

        on_target(target, meanwhile) sends the target half and runs
        meanwhile(), the source half, while it is in flight.  4 KiB random
        writes to a freshly written file (each dirties a clean page) through
        to `nbdkit memory`: 5.6-6.1k a second one half after the other,
        7.9-8.7k side by side; where the source half is a page-cache hit of
        microseconds, the same either way.  QEMU's active mirror writes the
        target once the source write succeeded; here a failed source write
        may leave the target holding the new bytes, which is harmless: the
        range becomes dirty and the copier copies the source's bytes over
        them (what the copier knew of the target there is forgotten before
        the target half is sent).

        It holds its chunks, so no copy of them is in flight meanwhile (it
        waits for those to end) and none starts: a copy cannot read the
        source before this write and land on the target after it.  It lets
        them go only once both halves ended.  The chunks' dirty bits are
        left as they are: this write changes source and target alike.  If
        the target write fails (or the job ends and drops the target
        meanwhile), the range becomes dirty and the copier copies it (and
        applies the error policy)."""
        c0, c1 = self.bitmap.chunk_range(offset, length)
        if not self.locks.take(c0, c1):
            return on_source()       # the job ended while this write waited
        try:
            source = []              # (True, result) or (False, exception)

            def write_source():
                try:
                    source.append((True, on_source()))
                except BaseException as e:   # noqa: BLE001 - raised below
                    source.append((False, e))

            self.copier.writing_through(offset, length)
            try:
                on_target(self.target, write_source)
                target_ok = True
            except Exception:       # noqa: BLE001 - the guest's write is done
                target_ok = False
            if not source:           # the target half failed before it ran
                write_source()
            if target_ok:
                self.copier.unflushed.wrote(offset, length)
            ok, result = source[0]
            if not ok:
                self.guest_wrote(offset, length)
                raise result
            self.copier.written_through(offset, length)
            if not target_ok:
                self.bitmap.mark(offset, length)
                self.copier.wake()
            else:
                with self._lock:
                    self._through_bytes += length
            return result
        finally:
            # Wake the copier only if it passed over held chunks (these
            # may be among them): a wake per guest write costs the job
            # thread a loop, and a guest write the GIL, for nothing.
            if self.locks.release_write(c0, c1):
                self.copier.wake()

    # -- the job thread ----------------------------------------------------
    def start(self):
        if self.persist.resumed:
            # persistent bitmap: a resumed job has no scan to see writes
            # made before it tracks them, so it tracks them from now on.
            self.guest.set_mirror(self)
        self._thread.start()

    def wait(self, timeout=None):
        return self._done.wait(timeout)

    def _advance(self, *steps):
        """Under `_lock`, in order: move to each Status given (with its
        JOB_STATUS_CHANGE) or emit each (event, data) given."""
        with self._lock:
            for step in steps:
                if isinstance(step, Status):
                    self.state.to(step)
                    self._emit_status()
                else:
                    self.emit(*step)

    def _emit_status(self):
        self.emit("JOB_STATUS_CHANGE", {"id": self.id,
                                        "status": str(self.state.status)})

    def _action(self):
        with self._lock:
            return self.state.next_action()

    def _aborting(self):
        return self._action() is Action.ABORT

    def run(self):
        old_source = None
        try:
            # A thread inherits its creator's priority: the connections'
            # I/O threads, which serve guest requests too, start before
            # this one lowers its own, and a reconnected target's through
            # a Starter made before then (priority.py).
            self.source.start_io()
            self.target.start_io()
            self._starter = priority.Starter("nbdmirror-starter")
            priority.nicer(COPIER_NICE)
            self._open()                 # `running`: tracking on
            self._advance(S.RUNNING)
            if not self.persist.resumed:     # persistent bitmap: no scan
                self._scan()
            self.persist.scanned()
            old_source = self._loop()
        except Exception as e:          # noqa: BLE001 - the job must end
            if not isinstance(e, (CopyError, OSError)):
                traceback.print_exc()
            with self._lock:
                self.error = self.error or str(e) or type(e).__name__
                self.state.fail()
            self._abort()
        finally:
            # persistent bitmap: after a clean shutdown's suspension the
            # job stays the guest path's tracker, so that the file goes on
            # marking what guests write until the proxy closes.
            if not self.pivoted and not self.persist.suspended:
                self.guest.set_mirror(None)
            self.bitmap.on_dirty = None
            # persistent bitmap: the file records how the job ended (or,
            # at a clean shutdown, the exact bitmap), target still open.
            self.persist.job_ended(self._outcome(), self.target,
                                   self.source)
            self.locks.abandon()
            if self._starter is not None:
                self._starter.close()
            if not self.pivoted:
                self.target.close()
            elif old_source is not None:
                old_source.close()
            self._done.set()

    def _outcome(self):
        if self.pivoted:
            return "pivoted"
        with self._lock:
            return "failed" if self.error is not None else "cancelled"

    def _open(self):
        try:
            self.copier.learn_target()   # before any write-through
        except OSError:
            pass            # what was learnt holds; the rest is not skipped
        self._target_learnt = True
        self.bitmap.on_dirty = self.copier.wake
        # Tracking starts before the scan (QEMU issue 3273).
        self.guest.set_mirror(self)
        self._drain_untracked()

    def _drain_untracked(self):
        """Wait until the guest requests that were inside the gate when
        tracking started have left: one may have looked at the guest
        path's `mirror` just before it was set, so its write is not marked
        dirty, and it may land after the scan looked at its range (QEMU
        drains to start a dirty bitmap for the same reason).  New requests
        wait meanwhile: microseconds for a file source, for an NBD source
        at most its io-timeout."""
        gate = self.guest.gate
        gate.close()
        try:
            while not gate.wait_empty(IDLE_WAKEUP):
                if self._aborting():
                    return
        finally:
            gate.open()

    def _scan(self):
        """The initial scan.  A block-status error goes through
        on-source-error like any later one; if the job goes on, everything
        is marked dirty and each op looks at its own extents."""
        try:
            self.copier.scan()
        except OSError as e:
            if e.errno == errno.ECANCELED:
                return                  # an abort; the loop sees it
            self._on_error(CopyError("read", e.errno or errno.EIO, 0,
                                     "block status scan"))
            self.bitmap.mark_all()

    def _loop(self):
        """Until the job ends.  Returns the endpoint the guest left in a
        pivot (for run() to close), or None."""
        c = self.copier
        done_before = 0
        while True:
            action = self._action()
            if self.speed != self._applied_speed:
                self._applied_speed = self.speed
                c.set_speed(self._applied_speed)
            if c.done_bytes != done_before:     # progress: errors are over
                done_before, self._backoff = c.done_bytes, BACKOFF_MIN
            self._measure_rate()
            if action is Action.ABORT:
                self._abort()
                return None
            if action is not Action.PAUSE and self.target.dead is not None:
                self._reconnect_step()
                continue
            self._watch_backlog(action)
            if action is Action.PAUSE:
                self._pause_step()
                continue
            if self.status in (S.PAUSED, S.STANDBY):
                self._advance(self.state.resumed_status())
            c.start()
            # After an ignored error or a hold that ran out, wait a little
            # before flushing (or holding the guest) again.
            now = time.monotonic()
            may_retry = now >= max(self._hold_retry_at, self._backoff_until)
            if action in (Action.COMPLETE, Action.SOFT_CANCEL):
                if self._finish_asked is None:
                    self._finish_asked = now
                if may_retry and self._may_hold(now):
                    ended, old_source = self._finish(action)
                    if ended:
                        return old_source
                    continue
            if self.status is S.RUNNING and may_retry and c.converged():
                # The flush must cover every copy: none may complete while
                # it is in flight (the copier runs meanwhile).  Write-
                # throughs that complete meanwhile are guest writes after
                # the point of ready (the flush's start), mirrored as every
                # later one is; counting them would keep a write-blocking
                # job under a busy guest from ever being ready.
                copied = self._copied()
                if self._flush() and c.converged() and \
                        self._copied() == copied:
                    self._advance(S.READY,
                                  ("BLOCK_JOB_READY", self._event_data()))
                continue
            self._checkpoint()
            self._flush_now_and_then()
            c.pump(IDLE_WAKEUP if may_retry else
                   min(IDLE_WAKEUP, max(0.0, max(self._hold_retry_at,
                                                 self._backoff_until) - now)))

    def _watch_backlog(self, action):
        """copy-mode auto: switch to write-blocking once the backlog has
        not shrunk for auto-switch-after seconds of copying."""
        if self.copy_mode != "auto":
            return
        now, backlog = time.monotonic(), self._backlog()
        if action is not Action.RUN or self._least_backlog is None or \
                backlog < self._least_backlog or not backlog:
            # A new low, or not copying (paused, completing): start over.
            self._least_backlog, self._least_at = backlog, now
        elif now - self._least_at >= self.opts.auto_switch_after:
            with self._lock:
                self.copy_mode = "write-blocking"
                self.emit("JOB_COPY_MODE_CHANGED", {
                    "id": self.id, "copy-mode": "write-blocking",
                    "reason": f"the backlog did not shrink for "
                              f"{self.opts.auto_switch_after:g} s"})

    def _measure_rate(self):
        now, done = time.monotonic(), self.copier.done_bytes
        then, done_then = self._rate_at
        if now - then >= RATE_INTERVAL:
            self._rate = (self._rate + (done - done_then) / (now - then)) / 2
            self._rate_at = (now, done)

    def _may_hold(self, now):
        """Hold guest I/O for the end once what is left copies in about
        HOLD_AIM seconds, or, if a guest writes faster than the (speed
        limited) copy drains, after HOLD_PATIENCE: held, it runs at full
        speed, and the hold is bounded anyway."""
        return self._backlog() <= max(HOLD_MIN_BACKLOG,
                                      self._rate * HOLD_AIM) or \
            now - self._finish_asked >= HOLD_PATIENCE

    def _copied(self):
        """Bytes the copier wrote to the target so far (it changes whenever
        a copy completes)."""
        c = self.copier
        return c.copied_bytes + c.zeroed_bytes

    def _backlog(self):
        """Bytes still to copy: dirty or in flight."""
        return self.bitmap.dirty_bytes() + self.copier.progress()[1]

    def _checkpoint(self):
        """persistent bitmap: now and then flush the target and the source
        while copying, so that copied, cold regions can be cleared in the
        file (a crash then re-copies little).  The flushes run alongside
        the copy; a failed one clears nothing (and is no job error: the
        copy's own errors are reported)."""
        pending = self._checkpoint_flush
        if pending is not None:
            token, results = pending
            if len(results) == 2:           # source and target flushed
                self._checkpoint_flush = None
                if not any(results):
                    self.persist.flushed(token)
            return
        done = self.copier.done_bytes
        if self.persist.checkpoint_due(done):
            results = []
            self._checkpoint_flush = (self.persist.flush_started(done),
                                      results)
            self._flush_source(results.append)
            self.copier.start_flush(results.append)

    def _flush_now_and_then(self):
        """Bound what a lost target connection costs (unflushed.py): flush
        the target FLUSH_AGE s after the oldest write it has not flushed.
        One such flush at a time, alongside the copy; a failed one is no
        job error (the copy's errors, and ready's and the pivot's flushes,
        report)."""
        if self._periodic_flush or self.target.dead is not None:
            return
        oldest = self.copier.unflushed.oldest
        if oldest is not None and time.monotonic() - oldest >= FLUSH_AGE:
            self._periodic_flush = True
            self.copier.start_flush(self._periodic_flushed)

    def _periodic_flushed(self, err):
        self._periodic_flush = False

    def _flush_source(self, done):
        """persistent bitmap: a region is cleared only once what was
        copied is durable on both sides: a power loss of the source's host
        must not take back data the target keeps."""
        def flushed(err):
            done(err)
            self.copier.wake()
        self.source.aio_flush(flushed)

    def _reconnect_step(self):
        """The target connection is lost: the guest stays on the source,
        what was in flight is dirty again (failed requests re-mark their
        ops), nothing new is sent, and the job reconnects with back-off.
        Back, it goes on from the bitmap.  After reconnect-delay without
        success, on-target-error applies (and a resume starts over)."""
        c = self.copier
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at = now
            self._next_attempt, self._attempt_wait = now, RECONNECT_MIN
            c.stop()
            self._advance(("TARGET_DISCONNECTED", {
                "device": self.id, "reason": str(self.target.dead)}))
        c.drain(now)                     # queued pieces back to the bitmap
        if now >= self._next_attempt:
            left = self.reconnect_delay - (now - self._lost_at)
            try:
                self.target.reconnect(
                    max(0.1, min(self._connect_timeout, left)),
                    give_up=self._aborting, start_io=self._starter.call)
            except EndpointError:
                self._next_attempt = time.monotonic() + self._attempt_wait
                self._attempt_wait = min(self._attempt_wait * 2,
                                         RECONNECT_MAX)
            else:
                downtime = time.monotonic() - self._lost_at
                self._lost_at = None
                # The server may have lost what it had not flushed.
                c.target_lost()
                self._advance(("TARGET_RECONNECTED", {
                    "device": self.id, "downtime": round(downtime, 3)}))
                c.start()
                return
            if time.monotonic() - self._lost_at >= self.reconnect_delay:
                self._lost_at = None
                self._on_error(CopyError("write", errno.ENOTCONN, 0,
                                         "target connection"), lost=True)
                return
        c.pump(min(IDLE_WAKEUP,
                   max(0.0, self._next_attempt - time.monotonic())))

    def _pause_step(self):
        """Let in-flight copies finish, then sit still until woken."""
        c = self.copier
        c.stop()
        c.drain(time.monotonic())        # hand queued pieces back as dirty
        if c.busy:
            c.pump(IDLE_WAKEUP)
            return
        target = self.state.paused_status()
        if target is not None:
            self._advance(target)
        c.pump(IDLE_WAKEUP)

    def _flush(self, deadline=None):
        """Flush the target while the copier goes on.  True if it worked;
        False on an abort, or on an error or a timeout (both through the
        error policy)."""
        result = []
        self.copier.start_flush(result.append)
        while not result:
            if self._aborting():
                return False
            wait = IDLE_WAKEUP
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    self._on_error(CopyError("write", errno.ETIMEDOUT, 0,
                                             "target flush"))
                    return False
            self.copier.pump(min(wait, IDLE_WAKEUP))
        if result[0]:
            self._on_error(CopyError("write", result[0], 0, "target flush"))
            return False
        return True

    def _finish(self, action):
        """Complete (pivot) or soft-cancel, with a small backlog left:
        flush with the guest running, then hold guest I/O for the last
        dirty bytes (copied at full speed), a final flush and the switch.
        Returns (ended, old source): ended False means go on looping (an
        error, a cancel, or a hold that ran out)."""
        c = self.copier
        if not self._flush():
            return False, None
        gate = self.guest.gate
        gate.close()
        c.hurry(True)            # the guest waits: no speed limit now
        deadline = time.monotonic() + PIVOT_HOLD_LIMIT
        try:
            if not self._held_converge(deadline) or \
                    not self._flush(deadline) or not c.converged():
                return False, None
            with self._lock:
                if self.state.next_action() is not action:
                    return False, None      # a cancel or an error came
                self.state.to(S.PENDING)
                self._emit_status()
                if action is Action.SOFT_CANCEL or self.state.auto_finalize:
                    old = self._switch(action)
                    self._conclude(("BLOCK_JOB_COMPLETED",
                                    self._event_data()))
                    return True, old
            return self._await_finalize()
        finally:
            c.hurry(False)
            gate.open()

    def _held_converge(self, deadline):
        """With the gate closed: wait for the guest requests inside (they
        may be write-throughs waiting for our ops: keep pumping), then copy
        what they dirtied.  False on abort, error pause or deadline."""
        c = self.copier
        gate = self.guest.gate
        while not gate.wait_empty(0) or not c.converged():
            if self._action() not in (Action.COMPLETE, Action.SOFT_CANCEL):
                return False
            if time.monotonic() >= deadline:
                self._hold_retry_at = time.monotonic() + HOLD_RETRY_DELAY
                return False
            c.pump(0.01 if gate.active else 0.1)
        return True

    def _await_finalize(self):
        """auto-finalize false: the job waits in `pending`, guest I/O still
        held (QEMU keeps the source drained), for job-finalize or a cancel.
        Returns as _finish does."""
        while True:
            with self._lock:
                if self.state.next_action() is Action.ABORT:
                    break
                if self.state.finalized:
                    old = self._switch(Action.COMPLETE)
                    self._conclude(("BLOCK_JOB_COMPLETED",
                                    self._event_data()))
                    return True, old
            self.copier.pump(IDLE_WAKEUP)
        self._abort()
        return True, None

    def _switch(self, action):
        """With the gate closed and empty, `_lock` held: the pivot, or (soft
        cancel) stop tracking.  Returns the endpoint the guest left."""
        if action is Action.COMPLETE:
            # persistent bitmap: durably "pivoting" before the guest moves
            # (a restart then serves the target), "pivoted" after.
            self.persist.pivoting()
            old = self.guest.switch_backend(self.target)
            self.pivoted = True
            # The guest's disk now: a lost connection is made again.
            self.target.heal(self.reconnect_delay)
            self.persist.pivoted()
            return old
        self.guest.set_mirror(None)
        return None

    def _conclude(self, event):
        """With `_lock` held: the final event, `concluded`, and `null`
        unless the job waits to be dismissed."""
        self.emit(*event)
        self.state.to(S.CONCLUDED)
        self._emit_status()
        if self.state.auto_dismiss:
            self.state.to(S.NULL)
            self._emit_status()

    def _abort(self):
        """Stop at once: cancel, or an error with policy `report`."""
        if self.status not in (S.ABORTING, S.CONCLUDED, S.NULL):
            self._advance(S.ABORTING)
        c = self.copier
        if not c.drain(time.monotonic() + ABORT_GRACE):
            c.abandon()
        with self._lock:
            if self.error is None and self.state.cancelled:
                event = ("BLOCK_JOB_CANCELLED", self._event_data())
            else:
                event = ("BLOCK_JOB_COMPLETED",
                         self._event_data(error=self.error or "job failed"))
            self._conclude(event)

    # -- errors ------------------------------------------------------------
    def _on_error(self, e, lost=False):
        """Apply on-source-error / on-target-error to a failed request.
        A target write that failed because its connection was lost is
        left to _reconnect_step (which calls this with lost=True once the
        reconnect delay is over)."""
        if not lost and e.operation == "write" and self.reconnect_delay and \
                (self.target.dead is not None or e.errno in LOST):
            # Also once reconnected: a request of the old connection may
            # fail after the new one is up (its op is dirty again anyway).
            return
        policy = self.opts.on_source_error if e.operation == "read" \
            else self.opts.on_target_error
        if policy == "enospc":
            policy = "stop" if e.errno == errno.ENOSPC else "report"
        now = time.monotonic()
        with self._lock:
            if self.state.next_action() is Action.ABORT:
                return              # already ending; no more noise
            if policy == "ignore":
                # Retry later, later each time; and not an event per request.
                if now >= self._backoff_until:
                    self.copier.back_off(self._backoff)
                    self._backoff_until = now + self._backoff
                    self._backoff = min(self._backoff * 2, BACKOFF_MAX)
                if now - self._last_error_event < ERROR_EVENT_INTERVAL:
                    return
            self._last_error_event = now
            self.emit("BLOCK_JOB_ERROR", {"device": self.id,
                                          "operation": e.operation,
                                          "action": policy})
            if policy == "report":
                self.error = str(e)
                self.state.fail()
            elif policy == "stop":
                self.io_status = "nospace" if e.errno == errno.ENOSPC \
                    else "failed"
                self.state.pause_on_error()
        self.copier.wake()           # the loop looks at the new action now
