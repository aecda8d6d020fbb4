"""The token bucket behind `speed`, on a fake clock: no sleeping."""

import pytest

from nbdmirror.ratelimit import RateLimit

MiB = 1 << 20


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def greedy_copy(limit, clock, piece, seconds):
    """A copier that issues `piece` bytes whenever the limit allows, for
    `seconds` of fake time; returns [(time, bytes)] of the requests."""
    issued = []
    end = clock.now + seconds
    while clock.now < end:
        wait = limit.delay()
        if wait > 0:
            clock.now += wait
            continue
        limit.consume(piece)
        issued.append((clock.now, piece))
    return issued


@pytest.mark.parametrize("speed,piece", [(8 * MiB, 8 * MiB // 20),
                                         (1 * MiB, 64 << 10),
                                         (100 * MiB, 1 * MiB)])
def test_every_5_second_window_stays_within_10_percent(speed, piece):
    clock = Clock()
    limit = RateLimit(speed, clock=clock)
    start = clock.now
    issued = greedy_copy(limit, clock, piece, 20)
    for w0 in range(0, 15):
        lo, hi = start + w0, start + w0 + 5
        n = sum(b for t, b in issued if lo <= t < hi)
        assert abs(n - 5 * speed) <= 0.1 * 5 * speed, (w0, n / 5 / speed)


def test_waits_are_short_and_even():
    clock = Clock()
    speed, piece = 8 * MiB, 8 * MiB // 20
    limit = RateLimit(speed, clock=clock)
    issued = greedy_copy(limit, clock, piece, 10)
    gaps = [b[0] - a[0] for a, b in zip(issued, issued[1:])]
    assert max(gaps) <= 1.01 * piece / speed


def test_zero_means_unlimited():
    clock = Clock()
    limit = RateLimit(0, clock=clock)
    for _ in range(1000):
        assert limit.delay() == 0
        limit.consume(1 * MiB)


def test_negative_speed_is_refused():
    with pytest.raises(ValueError):
        RateLimit(-1)
    with pytest.raises(ValueError):
        RateLimit(5).set_speed(-5)


def test_set_speed_takes_effect_at_once():
    clock = Clock()
    limit = RateLimit(1 * MiB, clock=clock)
    limit.consume(4 * MiB)                    # deep in debt at 1 MiB/s
    assert limit.delay() == pytest.approx(4.0)
    limit.set_speed(0)
    assert limit.delay() == 0
    limit.set_speed(2 * MiB)
    start = clock.now
    issued = greedy_copy(limit, clock, 64 << 10, 10)
    rate = sum(b for _, b in issued) / (clock.now - start)
    assert rate == pytest.approx(2 * MiB, rel=0.05)
