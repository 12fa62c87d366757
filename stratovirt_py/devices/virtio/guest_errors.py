"""Errors a guest causes on one device: all counted, logged at a bounded rate.

A guest can repeat an error as fast as it writes registers; one log line each
would let it flood the monitor's log (QEMU keeps these behind `-d guest_errors`,
Firecracker counts them in rate-limited metrics).  The first BURST are logged;
after that at most one line per INTERVAL seconds, carrying how many were left
out since the previous line.  `count` keeps the total for tests and monitoring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

BURST = 10
INTERVAL = 60.0


class GuestErrorLog:
    """The guest errors of one device (called with the device lock held)."""

    def __init__(self, device_name: str, burst: int = BURST, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device_name = device_name
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self.count = 0
        self.suppressed = 0  # left out since the last line
        self._last_line = 0.0

    def report(self, what: str) -> None:
        self.count += 1
        now = self._clock()
        if self.count <= self.burst:
            log.warning("%s: guest error: %s", self.device_name, what)
            if self.count == self.burst:
                log.warning("%s: further guest errors are counted and logged at most once "
                            "every %g s", self.device_name, self.interval)
            self._last_line = now
        elif now - self._last_line >= self.interval:
            log.warning("%s: guest error: %s (%d more since the last report)",
                        self.device_name, what, self.suppressed)
            self.suppressed = 0
            self._last_line = now
        else:
            self.suppressed += 1
