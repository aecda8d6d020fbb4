"""The guest I/O path: every NBD request the guest sends, routed to the
source (or, after a pivot, to the target), with dirty tracking on writes.

Invariants (the copier and the job rely on them):
  * Every data-changing request (pwrite, trim, zero) calls the tracker *after*
    the backend request returns, and also when it failed: the bytes may have
    changed either way.  The tracker marks the range dirty, so the copier,
    which clears bits before it reads, sees every write that could race it.
  * Every request runs inside the gate.  `hold()` closes the gate to new
    requests and waits for the ones inside to leave; while held, no guest
    request touches any backend, so the job can copy the last dirty bytes and
    switch `backend` atomically with respect to the guest.
  * `backend` and `tracker` change only while the gate is held (pivot,
    end of tracking) or before the first request that could see them
    (set_tracker is called before the copier's initial scan; a write in
    flight at that moment completes and then reads `tracker`, so it is
    tracked either by its bit or by the scan).
"""

import threading


class Gate:
    """Counts guest requests in flight; `hold()` drains and blocks them."""

    def __init__(self):
        self._cond = threading.Condition()
        self._active = 0
        self._held = False

    def __enter__(self):
        with self._cond:
            while self._held:
                self._cond.wait()
            self._active += 1

    def __exit__(self, *exc):
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    def hold(self, should_stop=lambda: False):
        """Block new requests and wait for in-flight ones to finish.

        Returns False (gate released again) if should_stop() became true
        first, so a force cancel is never stuck behind a hung guest request.
        """
        with self._cond:
            self._held = True
            while self._active:
                if should_stop():
                    self._held = False
                    self._cond.notify_all()
                    return False
                self._cond.wait(0.05)
            return True

    def release(self):
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @property
    def held(self):
        return self._held


class GuestIO:
    """What nbdkit's callbacks call.  `backend` is an endpoint (endpoints.py)."""

    def __init__(self, backend):
        self.backend = backend
        self.gate = Gate()
        self.tracker = None     # callable(offset, length) or None

    # -- configuration, by the job ----------------------------------------
    def set_tracker(self, tracker):
        self.tracker = tracker

    def switch_backend(self, backend):
        """Pivot: only with the gate held."""
        assert self.gate.held, "switch_backend needs the gate held"
        self.backend = backend
        self.tracker = None

    # -- requests -----------------------------------------------------------
    def _changed(self, offset, length):
        tracker = self.tracker
        if tracker is not None:
            tracker(offset, length)

    def pread(self, buf, offset):
        with self.gate:
            self.backend.pread(buf, offset)

    def pwrite(self, buf, offset, fua=False):
        with self.gate:
            try:
                self.backend.pwrite(buf, offset, fua)
            finally:
                self._changed(offset, len(buf))

    def trim(self, count, offset, fua=False):
        with self.gate:
            try:
                self.backend.trim(count, offset, fua)
            finally:
                self._changed(offset, count)

    def zero(self, count, offset, may_trim=False, fua=False, fast=False):
        with self.gate:
            try:
                self.backend.zero(count, offset, may_trim, fua, fast)
            finally:
                self._changed(offset, count)

    def flush(self):
        with self.gate:
            self.backend.flush()

    def extents(self, offset, count):
        with self.gate:
            return self.backend.extents(offset, count)
