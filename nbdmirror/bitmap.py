"""The dirty bitmap: which chunks of the disk the target may not yet hold.

One bit per `granularity` bytes (the last chunk may be short).  A set bit
means "the target may differ from the source here".

Invariants (enforced here, relied on by guest.py and copier.py):
  * `_lock` guards `_bits` and `_dirty`; every method takes it, so guest
    threads and the copier may call any method at any time.
  * `_dirty == _bits.count(1)` at every release of the lock: setting and
    clearing count the bits they flip, so dirty_bytes() never scans.
  * The guest path sets bits *after* its source write completes (also when it
    failed); the copier clears bits *before* it reads a range, and sets them
    again if the copy fails.  So a guest write that races a copy always leaves
    its range dirty.  See guest.GuestIO.pwrite and copier.Copier.

A job with a persistent bitmap (activitylog.py) keeps the file's marks a
superset of these bits, durably, and a resumed job starts from them (load).

Finding the next dirty chunk is a C-speed bitarray search from a cursor, so a
whole pass over a 16M-chunk bitmap costs one scan, not one per step.
"""

import threading

from bitarray import bitarray


class DirtyBitmap:
    def __init__(self, size, granularity):
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError("granularity must be a power of two")
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.chunks = (size + granularity - 1) >> self.shift
        self._bits = bitarray(self.chunks)
        self._bits.setall(0)
        self._dirty = 0
        self._lock = threading.Lock()
        # Called (outside the lock) after a mark made a clean bitmap dirty.
        # Only then: a copier that saw dirty chunks is busy with them or
        # will look again (job.IDLE_WAKEUP at most), and a wake for every
        # guest write under a busy guest cost a third of its write rate
        # (a thread wake-up and a copier round of one chunk per write).
        self.on_dirty = None

    # -- geometry ---------------------------------------------------------
    def chunk_range(self, offset, length):
        """Chunks [c0, c1) that overlap bytes [offset, offset+length)."""
        if length <= 0:
            return 0, 0
        end = min(offset + length, self.size)
        return offset >> self.shift, (end + self.granularity - 1) >> self.shift

    def chunk_bytes(self, c0, c1):
        """Bytes of the disk covered by chunks [c0, c1)."""
        return max(0, min(c1 << self.shift, self.size) - (c0 << self.shift))

    # -- updates ----------------------------------------------------------
    def mark(self, offset, length):
        """Mark bytes [offset, offset+length) dirty (whole chunks)."""
        self.mark_chunks(*self.chunk_range(offset, length))

    def mark_chunks(self, c0, c1):
        if c0 >= c1:
            return
        with self._lock:
            was_clean = not self._dirty
            self._dirty += (c1 - c0) - self._bits.count(1, c0, c1)
            self._bits[c0:c1] = 1
        cb = self.on_dirty
        if cb is not None and was_clean:
            cb()

    def mark_all(self):
        self.mark_chunks(0, self.chunks)

    def load(self, bits):
        """Mark every chunk set in `bits` (a resumed job: the persistent
        bitmap's marks, activitylog.py)."""
        bits = bitarray(bits[:self.chunks], endian=self._bits.endian())
        with self._lock:
            self._bits[:len(bits)] |= bits
            self._dirty = self._bits.count(1)
        cb = self.on_dirty
        if cb is not None:
            cb()

    def clear_chunks(self, c0, c1):
        if c0 >= c1:
            return
        with self._lock:
            self._dirty -= self._bits.count(1, c0, c1)
            self._bits[c0:c1] = 0

    # -- queries ----------------------------------------------------------
    def is_dirty(self, chunk):
        with self._lock:
            return bool(self._bits[chunk])

    def next_dirty(self, start, stop=None):
        """First dirty chunk in [start, stop), or -1."""
        stop = self.chunks if stop is None else min(stop, self.chunks)
        if start >= stop:
            return -1
        with self._lock:
            if not self._dirty:
                return -1
            return self._bits.find(1, start, stop)

    def dirty_run_end(self, c0, stop):
        """End of the run of dirty chunks starting at c0, at most `stop`."""
        stop = min(stop, self.chunks)
        with self._lock:
            end = self._bits.find(0, c0, stop)
        return stop if end < 0 else end

    def count_dirty(self, c0, c1):
        """Dirty chunks in [c0, c1)."""
        with self._lock:
            return self._bits.count(1, c0, min(c1, self.chunks))

    @property
    def dirty_chunks(self):
        return self._dirty

    def dirty_bytes(self):
        """Dirty bytes, counting the short last chunk at its real size."""
        with self._lock:
            n = self._dirty << self.shift
            if self._dirty and self.size & (self.granularity - 1) \
                    and self._bits[self.chunks - 1]:
                n -= self.granularity - (self.size & (self.granularity - 1))
            return n

    def snapshot(self):
        """A copy of the bits (for tests and diagnostics)."""
        with self._lock:
            return self._bits.copy()
