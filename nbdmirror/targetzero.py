"""Which chunks of the target are known to read as zeroes.

The copier skips zero ranges there instead of writing zeroes again (a fresh
sparse target, `target-is-zero`, or what block status said at the start).

Thread rules (no lock of its own):
  * learn() runs in the job thread before anything but the copier can write
    the target (write-blocking guest writes start after it): a write landing
    after the target's block status was read would be taken for zeroes.
  * After that, a chunk's bit is read or cleared only by whoever holds that
    chunk in ChunkLocks (chunklocks.py): a copier op, or a write-through
    guest write, which calls forget() before writing the target.  One
    holder at a time, so a bit never changes under its reader.  Each bitarray
    call runs whole under the GIL, so holders of neighbouring chunks that
    share a byte do not disturb each other.
"""

from bitarray import bitarray


class TargetZeroMap:
    def __init__(self, bitmap, all_zero=False):
        self._shift = bitmap.shift
        self._granularity = bitmap.granularity
        self._size = bitmap.size
        self._chunks = bitmap.chunks
        self._bits = bitarray(bitmap.chunks)
        self._bits.setall(bool(all_zero))

    def whole_chunks(self, start, end):
        """Chunks [c0, c1) lying wholly inside bytes [start, end); the short
        last chunk counts as whole when `end` reaches the disk's end."""
        c0 = (start + self._granularity - 1) >> self._shift
        c1 = self._chunks if end >= self._size else end >> self._shift
        return c0, max(c0, c1)

    def learn(self, extent):
        """The target reads `extent` as it says (job thread, before any
        write-through)."""
        if extent.zero:
            c0, c1 = self.whole_chunks(extent.start, extent.end)
            self._bits[c0:c1] = 1

    def forget(self, c0, c1):
        """Chunks [c0, c1) may not read as zero any more (their holder is
        about to write them, or a write of them failed)."""
        if c0 < c1:
            self._bits[c0:c1] = 0

    def reads_zero(self, c0, c1):
        """True if every chunk of [c0, c1) reads as zero."""
        return self._bits.count(0, c0, c1) == 0

    def runs(self, c0, c1):
        """Yield (start, end, zero) runs of chunks covering [c0, c1)."""
        c = c0
        while c < c1:
            value = self._bits[c]
            nxt = self._bits.find(not value, c, c1)
            nxt = c1 if nxt < 0 else nxt
            yield c, nxt, bool(value)
            c = nxt
