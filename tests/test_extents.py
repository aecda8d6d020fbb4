"""The copier's cache of source extents: windows, clipping, invalidation."""

import pytest

from nbdmirror.endpoints import HOLE, ZERO, Extent
from nbdmirror.extents import ExtentCache

K = 1 << 10


class FakeSource:
    """Extents of a disk made of (length, flags) runs; counts fetches, and
    can run a hook in the middle of a fetch (a guest write racing it)."""

    def __init__(self, runs):
        self.runs = runs
        self.fetches = 0
        self.during_fetch = None

    def fetch(self, offset, count):
        self.fetches += 1
        if self.during_fetch:
            hook, self.during_fetch = self.during_fetch, None
            hook()
        out, pos = [], 0
        for length, flags in self.runs:
            s, e = pos, pos + length
            pos = e
            if e <= offset or s >= offset + count:
                continue
            out.append(Extent(max(s, offset), e, flags))
        return out


@pytest.fixture
def disk():
    # 64K data, 64K zero hole, 128K data
    return FakeSource([(64 * K, 0), (64 * K, HOLE | ZERO), (128 * K, 0)])


def test_get_clips_extents_to_the_range(disk):
    cache = ExtentCache(disk.fetch)
    got = cache.get(32 * K, 160 * K)
    assert [(e.start, e.end, e.zero) for e in got] == [
        (32 * K, 64 * K, False), (64 * K, 128 * K, True),
        (128 * K, 160 * K, False)]


def test_at_returns_the_extent_unclipped_at_its_end(disk):
    cache = ExtentCache(disk.fetch)
    e = cache.at(70 * K)                      # a fetch from 70K
    assert (e.start, e.end, e.zero) == (70 * K, 128 * K, True)
    cache.invalidate(0, 256 * K)
    cache.get(0, 4 * K)                       # a window from 0
    e = cache.at(70 * K)
    assert (e.start, e.end, e.zero) == (64 * K, 128 * K, True)


def test_a_window_is_fetched_once(disk):
    cache = ExtentCache(disk.fetch)
    cache.get(0, 256 * K)
    cache.get(10 * K, 20 * K)
    cache.at(200 * K)
    assert disk.fetches == 1


def test_a_guest_write_drops_the_window_it_touches(disk):
    cache = ExtentCache(disk.fetch)
    cache.get(0, 256 * K)
    disk.runs[1] = (64 * K, 0)                # the guest wrote the hole
    cache.invalidate(100 * K, 4 * K)
    assert not cache.at(70 * K).zero
    assert disk.fetches == 2


def test_a_write_racing_a_fetch_keeps_its_answer_out_of_the_cache(disk):
    cache = ExtentCache(disk.fetch)
    disk.during_fetch = lambda: cache.invalidate(70 * K, 1)
    cache.get(0, 256 * K)                     # answered, but not kept
    cache.get(0, 256 * K)
    assert disk.fetches == 2
    cache.get(0, 256 * K)                     # this one was kept
    assert disk.fetches == 2


def test_an_unanswered_offset_is_an_error():
    cache = ExtentCache(lambda offset, count: [])
    with pytest.raises(IOError):
        cache.get(0, 4 * K)
