"""The dirty bitmap: geometry, updates, queries and the dirty count under threads."""

import random
import sys
import threading

import pytest

from nbdmirror.bitmap import DirtyBitmap

K = 1 << 10
M = 1 << 20
G64 = 64 * K


def dirty_set(bm):
    """The dirty chunk numbers, from a snapshot."""
    return {i for i, b in enumerate(bm.snapshot()) if b}


# -- geometry -------------------------------------------------------------------

def test_granularity_must_be_a_power_of_two():
    for bad in (0, -4096, 3 * K, 65 * K):
        with pytest.raises(ValueError):
            DirtyBitmap(M, bad)


def test_chunk_count_rounds_a_short_last_chunk_up():
    bm = DirtyBitmap(1025 * K, G64)
    assert bm.chunks == 17          # 16 full chunks + one of 1 KiB
    assert bm.shift == 16
    assert DirtyBitmap(M, G64).chunks == 16
    assert DirtyBitmap(0, G64).chunks == 0
    assert DirtyBitmap(1, G64).chunks == 1


def test_chunk_range_covers_every_touched_chunk():
    bm = DirtyBitmap(1025 * K, G64)
    assert bm.chunk_range(0, 1) == (0, 1)
    assert bm.chunk_range(0, G64) == (0, 1)
    assert bm.chunk_range(G64 - 1, 2) == (0, 2)
    assert bm.chunk_range(G64, G64) == (1, 2)
    assert bm.chunk_range(0, 1025 * K) == (0, 17)
    assert bm.chunk_range(1024 * K, K) == (16, 17)      # the short chunk
    assert bm.chunk_range(1000 * K, 10 * M) == (15, 17)  # clipped at size
    assert bm.chunk_range(5, 0) == (0, 0)
    assert bm.chunk_range(5, -1) == (0, 0)


def test_chunk_bytes_counts_the_short_last_chunk_at_its_size():
    bm = DirtyBitmap(1025 * K, G64)
    assert bm.chunk_bytes(0, 1) == G64
    assert bm.chunk_bytes(16, 17) == K
    assert bm.chunk_bytes(0, 17) == 1025 * K
    assert bm.chunk_bytes(3, 3) == 0
    assert bm.chunk_bytes(20, 30) == 0


# -- updates and the dirty count ---------------------------------------------------

def test_new_bitmap_is_clean():
    bm = DirtyBitmap(1025 * K, G64)
    assert bm.dirty_chunks == 0
    assert bm.dirty_bytes() == 0
    assert bm.next_dirty(0) == -1
    assert not any(bm.is_dirty(c) for c in range(bm.chunks))


def test_mark_rounds_out_to_whole_chunks():
    bm = DirtyBitmap(1025 * K, G64)
    bm.mark(G64 + 10, 1)
    assert dirty_set(bm) == {1}
    bm.mark(3 * G64 - 1, 2)                 # straddles chunks 2 and 3
    assert dirty_set(bm) == {1, 2, 3}
    assert bm.dirty_chunks == 3
    assert bm.dirty_bytes() == 3 * G64


def test_marking_twice_counts_once():
    bm = DirtyBitmap(M, G64)
    bm.mark(0, 4 * G64)
    bm.mark(2 * G64, 4 * G64)
    assert bm.dirty_chunks == 6
    bm.mark_chunks(0, 6)
    assert bm.dirty_chunks == 6


def test_dirty_bytes_counts_the_short_last_chunk_at_its_size():
    bm = DirtyBitmap(1025 * K, G64)
    bm.mark(1024 * K, K)
    assert bm.dirty_chunks == 1
    assert bm.dirty_bytes() == K
    bm.mark(0, 1)
    assert bm.dirty_bytes() == G64 + K
    bm.mark_all()
    assert bm.dirty_chunks == 17
    assert bm.dirty_bytes() == 1025 * K
    bm.clear_chunks(16, 17)
    assert bm.dirty_bytes() == 16 * G64


def test_mark_all_and_clear_all():
    bm = DirtyBitmap(10 * M + 1, G64)
    bm.mark_all()
    assert bm.dirty_chunks == bm.chunks == 161
    assert bm.dirty_bytes() == 10 * M + 1
    bm.clear_chunks(0, bm.chunks)
    assert bm.dirty_chunks == 0
    assert bm.dirty_bytes() == 0


def test_clear_counts_only_bits_that_were_set():
    bm = DirtyBitmap(M, G64)
    bm.mark_chunks(2, 4)
    bm.mark_chunks(8, 9)
    bm.clear_chunks(0, 10)
    assert bm.dirty_chunks == 0
    bm.clear_chunks(0, 10)
    assert bm.dirty_chunks == 0
    bm.mark_chunks(5, 5)                    # empty ranges change nothing
    bm.clear_chunks(7, 3)
    assert bm.dirty_chunks == 0


def test_on_dirty_is_called_after_marking_outside_the_lock():
    bm = DirtyBitmap(M, G64)
    seen = []
    # Calling back into the bitmap would deadlock if the lock were held.
    bm.on_dirty = lambda: seen.append(bm.dirty_chunks)
    bm.mark(0, 1)
    bm.mark_chunks(3, 3)                    # nothing marked: no call
    bm.clear_chunks(0, 1)                   # clearing: no call
    bm.mark_all()
    assert seen == [1, 16]


def test_on_dirty_is_called_only_when_a_clean_bitmap_becomes_dirty():
    bm = DirtyBitmap(M, G64)
    seen = []
    bm.on_dirty = lambda: seen.append(bm.dirty_chunks)
    bm.mark_chunks(2, 3)
    bm.mark_chunks(5, 7)                    # dirty already: the copier knows
    bm.mark_chunks(2, 3)
    assert seen == [1]
    bm.clear_chunks(0, bm.chunks)
    bm.mark_chunks(9, 10)                   # clean again, then dirty
    assert seen == [1, 1]


# -- queries ------------------------------------------------------------------------

def test_next_dirty_searches_from_start_within_stop():
    bm = DirtyBitmap(1025 * K, G64)
    bm.mark_chunks(3, 5)
    bm.mark_chunks(16, 17)
    assert bm.next_dirty(0) == 3
    assert bm.next_dirty(4) == 4
    assert bm.next_dirty(5) == 16
    assert bm.next_dirty(0, 3) == -1
    assert bm.next_dirty(0, 4) == 3
    assert bm.next_dirty(5, 16) == -1
    assert bm.next_dirty(17) == -1
    assert bm.next_dirty(10, 5) == -1
    assert bm.next_dirty(5, 1000) == 16     # stop clipped to the bitmap


def test_dirty_run_end_stops_at_the_first_clean_chunk_or_stop():
    bm = DirtyBitmap(1025 * K, G64)
    bm.mark_chunks(3, 7)
    bm.mark_chunks(10, 17)
    assert bm.dirty_run_end(3, 17) == 7
    assert bm.dirty_run_end(5, 17) == 7
    assert bm.dirty_run_end(3, 5) == 5      # capped by stop
    assert bm.dirty_run_end(10, 17) == 17   # runs to the end
    assert bm.dirty_run_end(10, 1000) == 17
    assert bm.dirty_run_end(7, 17) == 7     # starts clean: empty run


def test_scan_finds_every_run_against_a_model():
    rng = random.Random(4)
    bm = DirtyBitmap(3 * M + 5 * K, 4 * K)
    model = [False] * bm.chunks
    for _ in range(200):
        c0 = rng.randrange(bm.chunks)
        c1 = min(bm.chunks, c0 + rng.randrange(1, 40))
        dirty = rng.random() < 0.6
        if dirty:
            bm.mark_chunks(c0, c1)
        else:
            bm.clear_chunks(c0, c1)
        model[c0:c1] = [dirty] * (c1 - c0)
    # Walk the runs as the copier does and rebuild the set of dirty chunks.
    found, c = set(), bm.next_dirty(0)
    while c >= 0:
        end = bm.dirty_run_end(c, bm.chunks)
        assert end > c
        found.update(range(c, end))
        c = bm.next_dirty(end)
    assert found == {i for i, d in enumerate(model) if d}
    assert found == dirty_set(bm)
    assert bm.dirty_chunks == len(found)


# -- concurrency ----------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_dirty_count_stays_exact_under_concurrent_mark_and_clear():
    """Threads mark and clear overlapping ranges; the O(1) count must match.

    Each thread owns a disjoint stripe for its model check and also hits a
    shared region that every thread fights over.
    """
    bm = DirtyBitmap(64 * M + 3 * K, 4 * K)     # 16385 chunks, short tail
    nthreads, stripe = 4, 2048
    shared = range(nthreads * stripe, bm.chunks)
    errors = []
    start = threading.Barrier(nthreads)

    def worker(n):
        rng = random.Random(1000 + n)
        lo = n * stripe
        model = [False] * stripe
        start.wait()
        for _ in range(3000):
            # our own stripe: must match the model exactly
            a = rng.randrange(stripe)
            b = min(stripe, a + rng.randrange(1, 64))
            if rng.random() < 0.5:
                bm.mark_chunks(lo + a, lo + b)
                model[a:b] = [True] * (b - a)
            else:
                bm.clear_chunks(lo + a, lo + b)
                model[a:b] = [False] * (b - a)
            # the shared region: only the global count is checked
            a = rng.randrange(shared.start, shared.stop)
            b = min(shared.stop, a + rng.randrange(1, 128))
            if rng.random() < 0.5:
                bm.mark(a << bm.shift, (b - a) << bm.shift)
            else:
                bm.clear_chunks(a, b)
            bm.next_dirty(rng.randrange(bm.chunks))
            bm.dirty_bytes()
        snap = bm.snapshot()
        mine = [bool(x) for x in snap[lo:lo + stripe]]
        if mine != model:
            errors.append(f"thread {n}: stripe differs from its model")

    threads = [threading.Thread(target=worker, args=(n,))
               for n in range(nthreads)]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)             # switch threads as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert not errors
    snap = bm.snapshot()
    assert bm.dirty_chunks == snap.count(1)
    expected = snap.count(1) * bm.granularity
    if snap[bm.chunks - 1]:
        expected -= bm.granularity - 3 * K
    assert bm.dirty_bytes() == expected
