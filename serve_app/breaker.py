"""A circuit breaker for an optional dependency (the Redis cache): after it fails, stop asking it
for a while instead of making every request wait for its timeout.

    closed --(a call fails)--> open --(cooldown passes)--> one probe call
      ^                                                      |  answers: closed
      +------------------------------------------------------+  fails:   open again

While open, `allow()` is False and the caller takes its fallback at once (for the cache: no
cache). After `cooldown` seconds exactly one caller is let through as a probe; the others keep
falling back until it answers. One warning per outage: when the breaker opens from closed, and
an info line when it closes again; probes that fail again are logged at debug level only.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("quill.breaker")


class CircuitBreaker:
    def __init__(self, name: str, cooldown: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.name, self.cooldown, self.clock = name, cooldown, clock
        self.open_until: float | None = None  # None while closed
        self.probing = False  # a probe call is in flight

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def allow(self) -> bool:
        """Whether to make the call now; True at most once per cooldown while open (the probe)."""
        if self.open_until is None:
            return True
        if self.probing or self.clock() < self.open_until:
            return False
        self.probing = True
        return True

    def succeeded(self) -> None:
        if self.open_until is not None:
            log.info("%s answers again: using it again", self.name)
        self.open_until, self.probing = None, False

    def failed(self, exc: BaseException) -> None:
        if self.open_until is None:
            log.warning("%s failed (%s: %s): bypassing it for %g s, then trying again",
                        self.name, type(exc).__name__, exc, self.cooldown)
        else:
            log.debug("%s still failing (%s: %s)", self.name, type(exc).__name__, exc)
        # Calls that started before the breaker opened fail later: each pushes the probe back.
        self.open_until, self.probing = self.clock() + self.cooldown, False

    def abandoned(self) -> None:
        """The call was cancelled before it answered (its client left): neither outcome is known,
        so a later caller may probe instead."""
        self.probing = False
