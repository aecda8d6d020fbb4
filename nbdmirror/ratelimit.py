"""A token bucket for the background copy speed (bytes per second).

Pure logic with an injectable clock, so it is tested without sleeping.  The
bucket holds at most `burst` seconds worth of bytes, and a request may take
it into debt: the next request then waits until the debt is paid.  With
requests no larger than speed/20 (the copier sizes them so), waits are short
and even, never long lumpy sleeps.
"""

import time


class RateLimit:
    def __init__(self, speed=0, burst=0.1, clock=time.monotonic):
        self._clock = clock
        self.burst = burst
        self.set_speed(speed)

    def set_speed(self, speed):
        """Bytes per second; 0 means unlimited."""
        if speed < 0:
            raise ValueError("speed must not be negative")
        self.speed = speed
        self._tokens = 0.0
        self._stamp = self._clock()

    def _refill(self):
        now = self._clock()
        self._tokens = min(self._tokens + (now - self._stamp) * self.speed,
                           self.speed * self.burst)
        self._stamp = now

    def delay(self):
        """Seconds to wait before the next request may start (0 = now)."""
        if not self.speed:
            return 0.0
        self._refill()
        # Less than a byte of debt is rounding, not debt.
        return 0.0 if self._tokens > -1 else -self._tokens / self.speed

    def consume(self, nbytes):
        if self.speed:
            self._refill()
            self._tokens -= nbytes
