"""Who may write a chunk's range on the target right now.

Two kinds of writers share the target: the copier (an op: a run of chunks
being copied) and, in write-blocking mode, guest writes written through to
the target.  Each takes the chunks it covers here first.

Invariants:
  * A chunk is held by at most one owner: one copier op or one write-through.
    So two writes to overlapping target ranges are never in flight together,
    and a write-through never lands between a copy's source read and its
    target write (which would leave old data on the target, chunk clean).
  * The copier never waits here: it takes the free prefix of the run it
    wants (try_take) and leaves held chunks for later, so guest writes
    cannot starve it (QEMU commit d69a879bdf).  Guest writes wait (take)
    until the copier's ops on their chunks end.
  * `_cond`'s lock guards `_held`, `_abandoned` and `_passed_over`;
    release() wakes every waiter.
  * The copier does not wait here, so it must be woken when what it passed
    over is released: `_passed_over` is set, under the lock, whenever
    try_take() or is_held() finds a held chunk, and a write-through's
    release_write() returns it (and clears it).  A write-through wakes the
    copier only then: not on every guest write.  Set, returned and cleared
    under one lock, no wake is lost; the copier's own release() leaves it.
  * When the job ends, abandon() frees the waiters for good: with no job
    there is nothing left to keep in step.
"""

import threading

from bitarray import bitarray


class ChunkLocks:
    def __init__(self, chunks):
        self._held = bitarray(chunks)
        self._held.setall(0)
        self._cond = threading.Condition()
        self._abandoned = False
        self._passed_over = False

    def try_take(self, c0, c1):
        """Take the longest free run [c0, x) of [c0, c1); return x (c0 when
        c0 itself is held)."""
        with self._cond:
            busy = self._held.find(1, c0, c1)
            end = c1 if busy < 0 else busy
            self._held[c0:end] = 1
            if busy >= 0:
                self._passed_over = True
            return end

    def take(self, c0, c1):
        """Wait until all of [c0, c1) is free, then take it and return True;
        False (nothing taken) once the locks are abandoned."""
        with self._cond:
            while not self._abandoned and self._held.find(1, c0, c1) >= 0:
                self._cond.wait()
            if self._abandoned:
                return False
            self._held[c0:c1] = 1
            return True

    def abandon(self):
        with self._cond:
            self._abandoned = True
            self._cond.notify_all()

    def release(self, c0, c1):
        """The copier frees an op's chunks."""
        with self._cond:
            self._held[c0:c1] = 0
            self._cond.notify_all()

    def release_write(self, c0, c1):
        """A write-through frees its chunks: True if the copier passed over
        a held chunk since the last such release (it may wait for these)."""
        with self._cond:
            self._held[c0:c1] = 0
            self._cond.notify_all()
            passed_over, self._passed_over = self._passed_over, False
            return passed_over

    def is_held(self, chunk):
        with self._cond:
            held = bool(self._held[chunk])
            self._passed_over |= held
            return held

    def any_held(self, c0, c1):
        """Is a chunk of [c0, c1) held?  (activitylog.py: a copy in flight)"""
        with self._cond:
            return self._held.find(1, c0, c1) >= 0

    def snapshot(self):
        """A copy of the held bits (activitylog.py: saved as dirty)."""
        with self._cond:
            return self._held.copy()

    def next_free(self, start):
        """First chunk at or after `start` nobody holds, or -1."""
        with self._cond:
            return self._held.find(0, start)
