"""The unflushed map (nbdmirror/unflushed.py): which regions a target that
lost its connection may have lost, by flush generation."""

from nbdmirror.bitmap import DirtyBitmap
from nbdmirror.unflushed import REGION, UnflushedMap

K = 1 << 10
M = 1 << 20


def fresh(size=16 * M + 5, granularity=64 * K):
    bm = DirtyBitmap(size, granularity)
    return bm, UnflushedMap(bm)


def test_nothing_written_nothing_lost():
    _, m = fresh()
    assert m.lost() == [] and m.oldest is None


def test_a_write_is_lost_as_its_whole_regions_in_chunks():
    bm, m = fresh()
    m.wrote(REGION - 1, 2)                      # straddles regions 0 and 1
    assert m.oldest is not None
    per_region = REGION // bm.granularity
    assert m.lost() == [(0, 2 * per_region)]
    assert m.lost() == []                       # forgotten once handed out


def test_the_short_last_region_ends_at_the_last_chunk():
    bm, m = fresh()
    m.wrote(bm.size - 1, 1)
    (c0, c1), = m.lost()
    assert c1 == bm.chunks and c0 == 16 * M // bm.granularity


def test_a_flush_that_worked_covers_writes_before_it_only():
    _, m = fresh()
    m.wrote(0, 4096)
    gen = m.flush_started()
    assert m.oldest is None
    m.wrote(5 * M, 4096)                        # after the flush was sent
    m.flush_done(gen, True)
    assert [c0 for c0, _ in m.lost()] == [5 * M // (64 * K)]


def test_a_failed_flush_covers_nothing():
    _, m = fresh()
    m.wrote(0, 4096)
    m.flush_done(m.flush_started(), False)
    assert m.lost() == [(0, REGION // (64 * K))]


def test_overlapping_flushes_a_later_one_covers_the_earlier_generation():
    _, m = fresh()
    m.wrote(0, 1)
    first = m.flush_started()
    m.wrote(3 * M, 1)
    second = m.flush_started()
    m.wrote(9 * M, 1)
    m.flush_done(second, True)                  # covers both generations
    m.flush_done(first, False)                  # too late to matter
    assert [c0 * 64 * K for c0, _ in m.lost()] == [9 * M]


def test_a_flush_in_flight_at_the_loss_is_lost_too():
    _, m = fresh()
    m.wrote(2 * M, 1)
    m.flush_started()                           # never answered
    m.wrote(6 * M, 1)
    assert [c0 * 64 * K for c0, _ in m.lost()] == [2 * M, 6 * M]


def test_granularity_coarser_than_a_region_keeps_chunks():
    bm, m = fresh(size=64 * M, granularity=4 * M)
    m.wrote(9 * M, 1)
    assert m.lost() == [(2, 3)]
