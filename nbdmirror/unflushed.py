"""What the target acknowledged but may not keep: writes since its last flush.

An NBD server may answer a write before the data is durable; only a flush
that completes makes every write *completed before the flush was sent*
durable (the NBD protocol, "Ordering of messages and writes").  A target
that dies and comes back (a crashed qemu-nbd on qcow2, whose metadata it
caches; a rebooted host) may have lost any write since its last flush.  So
after the target connection is lost, the job marks dirty again every region
written since the last flush that completed, and copies it again.

Regions are coarse (at least REGION bytes, whole chunks of the dirty
bitmap), to keep this map small on huge disks: re-copying a whole region
after a loss costs little, and only then.

Invariants (`_lock` guards every field):
  * A target write (a copy, a zero, a write-through) is recorded once it
    completed, before its chunks are released: in the copier's reap, or
    when the write-through's request returns.  So a generation is dropped
    only by a flush sent after each of its writes completed.  A write that
    completed before a flush was sent but is recorded after it stays for a
    later flush: the lag errs on the safe side only.
  * flush_started() moves `_current` into the generation it returns, and a
    fresh `_current` takes later writes.  flush_done(gen, ok) drops that
    generation and every older one when ok (a flush covers every write
    completed before it was sent); when not ok, the generation stays and a
    later flush covers it.
  * lost() hands every region of `_current` and of the pending generations
    to the caller (to mark dirty) and forgets them.
"""

import itertools
import threading
import time

from bitarray import bitarray

REGION = 1 << 20        # bytes per bit, at least (a whole number of chunks)


class UnflushedMap:
    def __init__(self, bitmap):
        self._chunk_shift = bitmap.shift
        self._shift = max(bitmap.shift, REGION.bit_length() - 1)
        self._chunks = bitmap.chunks
        self._regions = (bitmap.size + (1 << self._shift) - 1) >> self._shift
        self._lock = threading.Lock()
        self._current = self._empty()
        self.oldest = None              # monotonic time of _current's first
        self._pending = {}              # generation -> bitarray, oldest first
        self._generations = itertools.count(1)

    def _empty(self):
        bits = bitarray(self._regions)
        bits.setall(0)
        return bits

    def wrote(self, offset, length):
        """A target write of [offset, offset+length) completed."""
        if length <= 0:
            return
        r0 = offset >> self._shift
        r1 = (offset + length - 1 >> self._shift) + 1
        with self._lock:
            self._current[r0:r1] = 1
            if self.oldest is None:
                self.oldest = time.monotonic()

    def flush_started(self):
        """A flush is about to be sent: returns its generation."""
        with self._lock:
            gen = next(self._generations)
            self._pending[gen] = self._current
            self._current = self._empty()
            self.oldest = None
            return gen

    def flush_done(self, gen, ok):
        with self._lock:
            if ok:
                for g in [g for g in self._pending if g <= gen]:
                    del self._pending[g]

    def lost(self):
        """The target may have lost what it did not flush: [(c0, c1)] chunk
        runs of the dirty bitmap to mark again, now forgotten here."""
        with self._lock:
            bits = self._current
            for pending in self._pending.values():
                bits |= pending
            self._current, self._pending = self._empty(), {}
            self.oldest = None
        ratio = self._shift - self._chunk_shift
        runs, pos = [], 0
        while True:
            r0 = bits.find(1, pos)
            if r0 < 0:
                return runs
            r1 = bits.find(0, r0)
            r1 = len(bits) if r1 < 0 else r1
            runs.append((r0 << ratio, min(r1 << ratio, self._chunks)))
            pos = r1
