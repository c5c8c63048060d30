"""Exponential backoff with jitter: the one policy for every retry (a failed sync, a reflector
that lost the API server, a file-mode sync)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Each failure waits twice as long as the one before, up to ``maximum``; a success resets
    it. Jitter spreads the retries of many nodes that failed together (an API server restart)
    so they do not return in lockstep."""

    initial: float = 1.0
    """Seconds before the first retry (before jitter)."""
    maximum: float = 30.0
    """Longest wait (before jitter), reached after a few failures in a row."""
    jitter: float = 0.2
    """Each wait is drawn from ``[base × (1 − jitter), base × (1 + jitter)]``."""
    _base: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._base = self.initial

    def next(self) -> float:
        """The wait before the next retry (with jitter); the one after will be twice as long."""
        delay = self._base * random.uniform(1 - self.jitter, 1 + self.jitter)
        self._base = min(self._base * 2, self.maximum)
        return delay

    def reset(self) -> None:
        """After a success: the next failure waits ``initial`` again."""
        self._base = self.initial
