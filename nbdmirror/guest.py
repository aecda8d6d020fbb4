"""The guest I/O path: every NBD request the guest sends, routed to the
source (or, after a pivot, to the target), with dirty tracking on writes.

Invariants (the copier and the job rely on them):
  * While a job mirrors the disk (`mirror` is set), every data-changing
    request (pwrite, trim, zero) either
      - runs on the source, then calls mirror.guest_wrote() *after* the
        source request returned, also when it failed (the bytes may have
        changed either way): the range becomes dirty, and the copier, which
        clears bits before it reads, sees every write that could race it; or
      - in write-blocking mode, goes through mirror.write_through(), which
        writes the source and the target (side by side) before the guest
        is answered, and marks the range dirty if either failed
        (job.Job.write_through says how it stays out of the copier's way).
  * With a persistent bitmap (activitylog.py), mirror.before_write() runs
    before a data-changing request reaches the source (on either path
    above) and returns only once the request's regions are durably marked
    in the bitmap file; if it raises, the request fails without touching
    the source.  mirror.after_write() follows when the request ended, after
    guest_wrote().  So a crash at any moment leaves every chunk that may
    differ between source and target marked in the file, and the guest's
    answer comes after the mark.
  * `changed` becomes true at the first data-changing request: a job
    resumed later (drive-mirror with an existing bitmap file) would not
    know what that request changed.
  * Every request runs inside the gate.  close() stops new requests from
    entering until the matching open() (closes nest: a job's pivot, a
    drive-mirror resuming a bitmap and a quit may overlap); `active` counts
    those still inside.  Once it is 0, no guest request touches any
    backend, so the job can copy the last dirty bytes and switch `backend`
    atomically with respect to the guest.
  * `backend` and `mirror` change only while the gate is closed and empty
    (pivot, end of a soft cancel) or in a way no request can miss: the job
    sets `mirror`, then waits until the requests inside the gate then have
    left (they may have read `mirror` before it was set: untracked), and
    only then scans; so every write is tracked by its dirty bit or seen by
    the scan.  It clears it
    when it ends, after which its bitmap no longer matters.  A resumed job
    (persistent bitmap, no scan) sets it before the guest is served or
    writes; a job suspended by a clean shutdown keeps it, so that its
    bitmap file goes on marking guest writes until the proxy closes.
"""

import threading


class Gate:
    """Counts guest requests in flight; close() keeps new ones out."""

    def __init__(self):
        # A plain Lock (the default RLock costs every request more), taken
        # directly on the request path.  Waiters (wait_empty, requests at a
        # closed gate) exist only while the gate is closed: only then does
        # the last request out need to wake them.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._active = 0
        self._closed = 0        # close() calls not yet opened

    def __enter__(self):
        with self._lock:
            while self._closed:
                self._cond.wait()
            self._active += 1

    def __exit__(self, *exc):
        with self._lock:
            self._active -= 1
            if self._closed and not self._active:
                self._cond.notify_all()

    def close(self):
        """New requests wait at the gate from now on, until as many open()
        calls as close() calls were made."""
        with self._cond:
            self._closed += 1

    def wait_empty(self, timeout):
        """After close(): wait up to `timeout` s for the requests inside;
        True if none is."""
        with self._cond:
            if self._active:
                self._cond.wait(timeout)
            return not self._active

    def open(self):
        with self._cond:
            self._closed -= 1
            if not self._closed:
                self._cond.notify_all()

    @property
    def closed(self):
        return self._closed > 0

    @property
    def active(self):
        return self._active


class GuestIO:
    """What nbdkit's callbacks call.  `backend` is an endpoint (endpoints.py)."""

    def __init__(self, backend):
        self.backend = backend
        self.gate = Gate()
        self.mirror = None      # the job tracking guest writes, or None
        self.changed = False    # a data-changing request was served

    # -- configuration, by the job ----------------------------------------
    def set_mirror(self, mirror):
        self.mirror = mirror

    def switch_backend(self, backend):
        """Pivot: only with the gate closed and empty.  Returns the old
        backend, which the caller now owns (and closes)."""
        assert self.gate.closed and not self.gate.active, \
            "switch_backend needs the gate closed and empty"
        old, self.backend = self.backend, backend
        self.mirror = None
        return old

    # -- requests -----------------------------------------------------------
    def _change(self, offset, length, on_source, on_target):
        """A data-changing request: on_source() does it on the backend,
        on_target(endpoint, meanwhile) on the mirror target, running
        meanwhile() while it is in flight (None: it cannot be written
        through, e.g. trim, whose result is not defined)."""
        with self.gate:
            self.changed = True
            mirror = self.mirror
            if mirror is None:
                return on_source()
            # persistent bitmap: durably marked before the source changes
            mirror.before_write(offset, length)
            try:
                if on_target is not None and mirror.write_blocking:
                    return mirror.write_through(offset, length, on_source,
                                                on_target)
                try:
                    return on_source()
                finally:
                    mirror.guest_wrote(offset, length)
            finally:
                mirror.after_write(offset, length)   # persistent bitmap

    def pread(self, buf, offset):
        with self.gate:
            self.backend.pread(buf, offset)

    def pwrite(self, buf, offset, fua=False):
        if self.mirror is None:
            # No job: straight to the backend, without _change's closures
            # (a 4 KiB write 7 % faster).  `mirror` is looked at again
            # inside the gate, which is where it counts.
            with self.gate:
                if self.mirror is None:
                    self.changed = True
                    return self.backend.pwrite(buf, offset, fua)
        self._change(offset, len(buf),
                     lambda: self.backend.pwrite(buf, offset, fua),
                     # from a private copy, as QEMU's active mirror does
                     lambda t, meanwhile: t.pwrite_during(
                         meanwhile, bytes(buf), offset, fua))

    def trim(self, count, offset, fua=False):
        self._change(offset, count,
                     lambda: self.backend.trim(count, offset, fua), None)

    def zero(self, count, offset, may_trim=False, fua=False, fast=False):
        self._change(offset, count,
                     lambda: self.backend.zero(count, offset, may_trim, fua,
                                               fast),
                     lambda t, meanwhile: t.zero_during(
                         meanwhile, count, offset, may_trim, fua))

    def flush(self):
        with self.gate:
            self.backend.flush()

    def extents(self, offset, count):
        with self.gate:
            return self.backend.extents(offset, count)
