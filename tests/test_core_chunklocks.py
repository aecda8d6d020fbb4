"""ChunkLocks: the copier takes the free prefix and never waits; guest
write-throughs wait for every chunk they cover; abandon frees the waiters
for good."""

import random
import threading

import pytest

from fakes import poll
from nbdmirror.chunklocks import ChunkLocks

pytestmark = pytest.mark.timeout(30)


def waiters(locks):
    """Threads waiting in take() (CPython's Condition keeps a deque)."""
    return len(locks._cond._waiters)


def held(locks, n):
    return [c for c in range(n) if locks.is_held(c)]


def taker(locks, c0, c1):
    """take(c0, c1) in a thread; returns (thread, results list)."""
    out = []
    t = threading.Thread(target=lambda: out.append(locks.take(c0, c1)),
                         daemon=True)
    t.start()
    return t, out


def test_try_take_takes_the_free_prefix():
    locks = ChunkLocks(10)
    assert locks.try_take(3, 5) == 5
    assert locks.try_take(0, 8) == 3             # stops at held chunk 3
    assert held(locks, 10) == [0, 1, 2, 3, 4]
    assert locks.try_take(3, 8) == 3             # nothing: 3 is held
    assert locks.try_take(5, 8) == 8
    assert locks.next_free(0) == 8
    locks.release(3, 5)
    assert locks.next_free(0) == 3
    assert locks.try_take(9, 10) == 10 and locks.next_free(8) == 8


def test_take_waits_until_every_chunk_it_covers_is_free():
    locks = ChunkLocks(8)
    locks.try_take(3, 4)
    locks.try_take(5, 6)
    t, out = taker(locks, 2, 6)
    poll(lambda: waiters(locks) == 1, what="take() to wait")
    locks.release(3, 4)
    # Woken, it looked, and waits again for chunk 5; nothing taken.
    poll(lambda: waiters(locks) == 1, what="take() to wait again")
    assert out == [] and held(locks, 8) == [5]
    locks.release(5, 6)
    t.join(5)
    assert out == [True] and held(locks, 8) == [2, 3, 4, 5]


def test_abandon_frees_waiters_without_taking_anything():
    locks = ChunkLocks(8)
    locks.try_take(0, 4)
    threads = [taker(locks, 1, 3), taker(locks, 3, 6)]
    poll(lambda: waiters(locks) == 2, what="both takers to wait")
    locks.abandon()
    for t, out in threads:
        t.join(5)
        assert out == [False]
    assert held(locks, 8) == [0, 1, 2, 3]
    assert locks.take(6, 8) is False             # and for good
    assert held(locks, 8) == [0, 1, 2, 3]


def test_a_chunk_has_one_owner_under_threads():
    locks = ChunkLocks(32)
    owner = [None] * 32
    clashes = []

    def work(n, use_try):
        rnd = random.Random(n)
        for _ in range(300):
            c0 = rnd.randrange(32)
            c1 = min(32, c0 + rnd.randint(1, 6))
            if use_try:
                c1 = locks.try_take(c0, c1)
                if c1 == c0:
                    continue
            else:
                assert locks.take(c0, c1)
            for c in range(c0, c1):
                if owner[c] is not None:
                    clashes.append((c, owner[c], n))
                owner[c] = n
            for c in range(c0, c1):
                owner[c] = None
            locks.release(c0, c1)

    threads = [threading.Thread(target=work, args=(n, n % 2 == 0),
                                daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    assert clashes == []
    assert held(locks, 32) == []


def test_a_write_through_learns_whether_the_copier_passed_over_held_chunks():
    locks = ChunkLocks(16)
    assert locks.take(4, 6)                      # a write-through holds 4-5
    assert locks.release_write(4, 6) is False    # nobody looked: no wake
    assert locks.take(4, 6)
    assert locks.try_take(2, 8) == 4             # the copier stops at 4...
    locks.release(2, 4)                          # ...its own release keeps it
    assert locks.release_write(4, 6) is True     # so this one wakes it
    assert locks.release_write(6, 6) is False    # once
    assert locks.take(9, 10)
    assert locks.is_held(9)                      # looked at, held
    assert locks.release_write(9, 10) is True
