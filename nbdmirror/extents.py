"""A cache of the source's extents, for the copier only.

Block status is fetched in large windows (one request per GiB or so), so a
sparse 64 GiB disk costs a handful of round trips, not one per chunk.

Invariant: an extent in the cache describes the source as it is now, or
else the range it covers is dirty and will be looked at again.  It holds
because
  * the guest path calls invalidate() after its write completes and before
    it marks the range dirty (job.Job.guest_wrote), and
  * a fetch notes the invalidation count before asking the server and keeps
    its answer only if no invalidation happened meanwhile.
So when the copier clears a chunk's dirty bit and then looks here, either
the cache has already dropped what the write changed, or the write's dirty
bit is set after the clear and the chunk will be copied again.

Only the copier thread calls get(); invalidate() comes from guest threads.
"""

import bisect
import threading


class ExtentCache:
    MAX_WINDOWS = 64

    def __init__(self, fetch):
        self._fetch = fetch          # fetch(offset, count) -> [Extent]
        self._lock = threading.Lock()
        self._seq = 0
        self._starts = []            # sorted window starts
        self._windows = {}           # start -> (end, [Extent], [starts])

    def invalidate(self, offset, length):
        end = offset + length
        with self._lock:
            self._seq += 1
            i = bisect.bisect_right(self._starts, offset) - 1
            i = max(i, 0)
            while i < len(self._starts) and self._starts[i] < end:
                s = self._starts[i]
                if self._windows[s][0] > offset:
                    del self._starts[i]
                    del self._windows[s]
                else:
                    i += 1

    def _lookup(self, pos):
        """The cached window holding `pos`, or None (lock held)."""
        i = bisect.bisect_right(self._starts, pos) - 1
        if i >= 0:
            s = self._starts[i]
            window = self._windows[s]
            if pos < window[0]:
                return window
        return None

    def _window(self, pos, count):
        """The window holding `pos`, fetching one if none is cached."""
        with self._lock:
            found = self._lookup(pos)
            seq = self._seq
        if found is None:
            extents = self._fetch(pos, count)
            if not extents or extents[0].start != pos:
                raise IOError(f"no block status at offset {pos}")
            found = (extents[-1].end, extents, [e.start for e in extents])
            with self._lock:
                if seq == self._seq:
                    self._store(found)
        return found

    def at(self, pos, window=1 << 30):
        """The whole extent holding `pos` (not clipped)."""
        _, extents, starts = self._window(pos, window)
        return extents[bisect.bisect_right(starts, pos) - 1]

    def get(self, start, end, window=1 << 30):
        """Extents covering [start, end), clipped to it."""
        out, pos = [], start
        while pos < end:
            _, extents, starts = self._window(pos, max(window, end - pos))
            i = bisect.bisect_right(starts, pos) - 1
            for e in extents[i:]:
                if e.start >= end:
                    break
                out.append(type(e)(max(e.start, pos), min(e.end, end),
                                   e.flags, e.depth))
                pos = min(e.end, end)
        return out

    def _store(self, window):
        s, e = window[1][0].start, window[0]
        if s in self._windows or len(self._starts) >= self.MAX_WINDOWS:
            self._starts.clear()
            self._windows.clear()
        i = bisect.bisect_left(self._starts, s)
        # drop overlapping windows (a refetch after a partial invalidation)
        while i < len(self._starts) and self._starts[i] < e:
            del self._windows[self._starts.pop(i)]
        if i > 0 and self._windows[self._starts[i - 1]][0] > s:
            del self._windows[self._starts.pop(i - 1)]
            i -= 1
        self._starts.insert(i, s)
        self._windows[s] = window
