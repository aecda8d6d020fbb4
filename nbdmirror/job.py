"""A mirror job: the state machine, the copier and the events, in one thread.

Threads and locks:
  * The job thread (run) owns the copier and its handles, and performs every
    status transition.
  * Management (QMP) threads call the verb methods (pause, complete, ...).
    They take `_lock`, ask jobstate whether the verb is allowed, record the
    request, and wake the job thread.  They never touch the copier.
  * Guest threads call guest_wrote() after each write: it invalidates the
    extent cache and marks the bitmap, in that order (extents.py says why).
    In write-blocking mode they call write_through() instead, which holds
    the write's chunks in `locks` (chunklocks.py) while it writes the source
    and then the target.
`_lock` guards `state`, `_speed`, `error` and `copy_mode`.  Events are
emitted with it held, so their order is the order of the transitions.
"""

import errno
import threading
import time
import traceback

from . import endpoints
from .bitmap import DirtyBitmap
from .chunklocks import ChunkLocks
from .copier import CopyError, Copier, NbdWriter, open_reader
from .jobstate import Action, JobState, Status

ABORT_GRACE = 2.0       # seconds a cancel waits for in-flight requests
IDLE_WAKEUP = 1.0       # the job thread looks around at least this often


class JobError(Exception):
    """A refused request; str() is the one-line reason."""


def check_preconditions(source, opts):
    """Raise JobError unless a job from `source` (an endpoint) to
    opts.target can start.  Writes nothing."""
    try:
        h = endpoints.connect(opts.target, name="nbdmirror-check")
    except endpoints.EndpointError as e:
        raise JobError(f"target: {e}") from None
    try:
        if h.is_read_only():
            raise JobError(f"target {opts.target} is read-only")
        size = h.get_size()
        if size != source.size:
            raise JobError(f"target size {size} differs from source size "
                           f"{source.size}")
    finally:
        del h
    if opts.sync == "top":
        if not endpoints.is_nbd_uri(source.uri):
            raise JobError(
                f"sync=top needs an NBD source that offers "
                f"{endpoints.ALLOCATION_DEPTH} (qemu-nbd -A); "
                f"{source.uri} is a file")
        hs = endpoints.connect(source.uri, (endpoints.ALLOCATION_DEPTH,),
                               name="nbdmirror-check")
        if not hs.can_meta_context(endpoints.ALLOCATION_DEPTH):
            raise JobError(
                f"sync=top: source {source.uri} does not offer "
                f"{endpoints.ALLOCATION_DEPTH} (serve it with qemu-nbd -A)")


class Job:
    def __init__(self, opts, device, guest, source, emit, on_end=None):
        self.opts = opts
        self.id = opts.job_id
        self.device = device
        self.guest = guest
        self.source = source             # endpoint the job copies from
        self.emit = emit                 # emit(event, data)
        self.on_end = on_end or (lambda job: None)
        self.state = JobState(self.id)
        self.bitmap = DirtyBitmap(source.size, opts.granularity)
        self.locks = ChunkLocks(self.bitmap.chunks)
        self.copier = None
        self.copy_mode = opts.copy_mode
        self._active_target = None       # write-through endpoint
        self._active_bytes = 0           # written through to the target
        self.error = None                # why the job failed, if it did
        self.io_status = "ok"
        self.pivoted = False
        self._speed = opts.speed
        self._applied_speed = opts.speed
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.run, daemon=True,
                                        name=f"nbdmirror-job-{self.id}")
        self._done = threading.Event()
        self._emit_status()              # created

    # -- management verbs (any thread) -----------------------------------
    def _verb(self, fn, *args):
        with self._lock:
            fn(*args)
        self._wake()

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

    def set_speed(self, speed):
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")

        def set_speed():
            self.state.check("set-speed")
            self._speed = speed
        self._verb(set_speed)

    def change(self, copy_mode):
        """block-job-change: background -> write-blocking (as QEMU, the only
        switch there is)."""
        if copy_mode not in ("background", "write-blocking"):
            raise JobError(f"copy-mode {copy_mode!r} is not one of "
                           "background, write-blocking")
        with self._lock:
            self.state.check("change")
            if copy_mode == self.copy_mode:
                return
            if copy_mode == "background":
                raise JobError(f"Job '{self.id}': cannot change copy-mode "
                               "from 'write-blocking' to 'background'")
            self.copy_mode = copy_mode
        self._wake()

    @property
    def write_blocking(self):
        """Guest writes go through write_through() (once the job thread has
        the target endpoint for them)."""
        return self.copy_mode == "write-blocking" and \
            self._active_target is not None

    def _wake(self):
        copier = self.copier
        if copier is not None:
            copier.wake()

    # -- queries (any thread) ------------------------------------------------
    @property
    def status(self):
        return self.state.status

    def progress(self):
        """(offset, len) as INTERFACE.md §5 defines them."""
        c = self.copier
        if c is None:
            return 0, self.bitmap.dirty_bytes()
        offset = c.done_bytes + self._active_bytes
        return offset, offset + self.bitmap.dirty_bytes() + c.in_flight_bytes

    def block_job_info(self):
        offset, length = self.progress()
        info = {
            "type": "mirror", "device": self.id, "len": length,
            "offset": offset,
            "busy": self.status in (Status.RUNNING, Status.READY)
                    and not self.state.paused,
            "paused": self.state.paused, "speed": self._speed,
            "io-status": self.io_status, "ready": self.state.ever_ready,
            "status": str(self.status), "auto-finalize": True,
            "auto-dismiss": True,
        }
        if self.error:
            info["error"] = self.error
        return info

    def job_info(self):
        offset, length = self.progress()
        info = {"id": self.id, "type": "mirror", "status": str(self.status),
                "current-progress": offset, "total-progress": length}
        if self.error:
            info["error"] = self.error
        return info

    def _event_data(self, **extra):
        offset, length = self.progress()
        data = {"type": "mirror", "device": self.id, "len": length,
                "offset": offset, "speed": self._speed}
        data.update(extra)
        return data

    # -- the job thread ----------------------------------------------------
    def start(self):
        self._thread.start()

    def wait(self, timeout=None):
        return self._done.wait(timeout)

    def guest_wrote(self, offset, length):
        """The guest path's tracker: after a write to the source completed."""
        copier = self.copier
        if copier is not None:
            copier.cache.invalidate(offset, length)
        self.bitmap.mark(offset, length)

    def write_through(self, offset, length, on_source, on_target):
        """A write-blocking guest write: source, then target, then answer.

        It holds its chunks, so no copy of them is in flight meanwhile (it
        waits for those to end) and none starts: a copy cannot read the
        source before this write and land on the target after it.  The
        chunks' dirty bits are left as they are: this write changes source
        and target alike.  If the target write fails, the range becomes
        dirty and the copier copies it (and applies the error policy)."""
        c0, c1 = self.bitmap.chunk_range(offset, length)
        if not self.locks.take(c0, c1):
            return on_source()       # the job ended while this write waited
        try:
            try:
                result = on_source()
            except BaseException:
                self.guest_wrote(offset, length)
                raise
            copier = self.copier
            copier.cache.invalidate(offset, length)
            copier.forget_target_zero(c0, c1)
            try:
                on_target(self._active_target)
            except Exception:       # noqa: BLE001 - the guest's write is done
                self.bitmap.mark(offset, length)
            else:
                with self._lock:
                    self._active_bytes += length
            return result
        finally:
            self.locks.release(c0, c1)
            self._wake()

    def _to(self, status):
        with self._lock:
            self.state.to(status)
            self._emit_status()

    def _emit_status(self):
        self.emit("JOB_STATUS_CHANGE", {"id": self.id,
                                        "status": str(self.state.status)})

    def _action(self):
        with self._lock:
            return self.state.next_action()

    def run(self):
        try:
            self._open()                 # `running`: handles open, tracking on
            self._to(Status.RUNNING)
            self.copier.scan(should_stop=lambda: self._action() is Action.ABORT)
            self._loop()
        except Exception as e:          # noqa: BLE001 - the job must end
            if not isinstance(e, (CopyError, endpoints.EndpointError, OSError)):
                traceback.print_exc()
            with self._lock:
                self.error = self.error or str(e) or type(e).__name__
                self.state.fail()
            self._abort()
        finally:
            if not self.pivoted:
                self.guest.set_mirror(None)
            self.bitmap.on_dirty = None
            self.locks.abandon()
            if self._active_target is not None and not self.pivoted:
                self._active_target.close()
            if self.copier is not None:
                self.copier.close()
            self._done.set()
            self.on_end(self)

    def _open(self):
        writer = NbdWriter(self.opts.target)
        try:
            reader = open_reader(self.source.uri, self.opts.sync == "top")
        except Exception:
            writer.close()
            raise
        self.copier = Copier(
            self.bitmap, reader, writer, sync=self.opts.sync,
            buf_size=self.opts.buf_size, speed=self._speed,
            target_is_zero=self.opts.target_is_zero, on_error=self._on_error,
            locks=self.locks)
        self.bitmap.on_dirty = self.copier.wake
        self.copier.learn_target()       # before any write-through
        # The endpoint write-blocking mode writes through, ready for a switch.
        self._active_target = endpoints.NbdEndpoint(self.opts.target)
        # Tracking starts before the scan (QEMU issue 3273).
        self.guest.set_mirror(self)

    def _loop(self):
        c = self.copier
        while True:
            action = self._action()
            if self._speed != self._applied_speed:
                self._applied_speed = self._speed
                c.set_speed(self._applied_speed)
            if action is Action.ABORT:
                return self._abort()
            if action is Action.PAUSE:
                self._pause_step()
                continue
            if self.status in (Status.PAUSED, Status.STANDBY):
                self._to(self.state.resumed_status())
            c.issuing = True
            if action in (Action.COMPLETE, Action.SOFT_CANCEL):
                if self._finish(action):
                    return
                continue
            if self.status is Status.RUNNING and c.converged() \
                    and self._flush_then(self._ready):
                continue
            c.pump(IDLE_WAKEUP)

    def _pause_step(self):
        """Let in-flight copies finish, then sit still until woken."""
        c = self.copier
        c.issuing = False
        c.drain(time.monotonic())        # hand queued pieces back as dirty
        if c.busy:
            c.pump(IDLE_WAKEUP)
            return
        target = self.state.paused_status()
        if target is not None:
            self._to(target)
        c.pump(IDLE_WAKEUP)

    def _ready(self):
        with self._lock:
            self.state.to(Status.READY)
            self._emit_status()
            self.emit("BLOCK_JOB_READY", self._event_data())

    def _flush_then(self, then):
        """Flush the target; run `then` if it worked and nothing got dirty
        meanwhile.  A failed flush goes through the error policy."""
        try:
            self.copier.flush()
        except CopyError as e:
            self._on_error(e)
            return False
        if not self.copier.converged():
            return False
        then()
        return True

    def _finish(self, action):
        """Complete (pivot) or soft-cancel: hold guest I/O, copy the rest,
        flush, and for complete switch the guest to the target.  Returns
        True when the job ended, False to go on looping (e.g. an ignored
        error, or a cancel arrived)."""
        c = self.copier
        gate = self.guest.gate
        gate.close()
        try:
            # Guest requests inside may be write-throughs waiting for ops of
            # ours to end: keep pumping while they drain.
            while not gate.wait_empty(0.01):
                if self._action() is Action.ABORT:
                    return False
                c.pump(0)
            while not c.converged():
                if self._action() is Action.ABORT:
                    return False
                c.pump(IDLE_WAKEUP)
                if self.state.error_paused:      # policy "stop" while held
                    return False
            if not self._flush_then(lambda: None):
                return False
            if action is Action.COMPLETE:
                self.guest.switch_backend(self._active_target)
                self.pivoted = True
            else:
                self.guest.set_mirror(None)
        finally:
            gate.open()
        with self._lock:
            self.state.to(Status.PENDING)
            self._emit_status()
            self.emit("BLOCK_JOB_COMPLETED", self._event_data())
            self.state.to(Status.CONCLUDED)
            self._emit_status()
            self.state.to(Status.NULL)
            self._emit_status()
        return True

    def _abort(self):
        """Stop at once: cancel, or an error with policy `report`."""
        if self.status not in (Status.ABORTING, Status.CONCLUDED, Status.NULL):
            self._to(Status.ABORTING)
        c = self.copier
        if c is not None:
            c.drain(time.monotonic() + ABORT_GRACE)
        with self._lock:
            if self.error is None and self.state.force_cancelled:
                self.emit("BLOCK_JOB_CANCELLED", self._event_data())
            else:
                self.emit("BLOCK_JOB_COMPLETED",
                          self._event_data(error=self.error or "job failed"))
            self.state.to(Status.CONCLUDED)
            self._emit_status()
            self.state.to(Status.NULL)
            self._emit_status()

    # -- errors ------------------------------------------------------------
    def _on_error(self, e):
        """Apply on-source-error / on-target-error to a failed request."""
        policy = self.opts.on_source_error if e.operation == "read" \
            else self.opts.on_target_error
        if policy == "enospc":
            policy = "stop" if e.errno == errno.ENOSPC else "report"
        with self._lock:
            if self.state.next_action() is Action.ABORT:
                return              # already ending; no more noise
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
            else:
                self.copier.retry_at = time.monotonic() + 0.1
        self.copier.wake()           # the loop looks at the new action now
