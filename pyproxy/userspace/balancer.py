"""Backend choice for the userspace mode: round-robin, ClientIP affinity with a timeout (pure)."""

from __future__ import annotations

import time
from collections.abc import Callable


class Balancer:
    """Round-robin over the endpoints of one service port, with optional ClientIP affinity.

    ``candidates(client_ip)`` returns every endpoint in the order to try: the pinned one first
    (if affinity holds and it still exists), then the rest from the round-robin position. The
    caller tries them in turn, which is how a refused connection is retried on the next backend
    — the one thing this mode can do that the kernel modes cannot.
    """

    def __init__(self, *, affinity_timeout: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints: tuple[tuple[str, int], ...] = ()
        self.affinity_timeout = affinity_timeout
        self._next = 0
        self._pins: dict[str, tuple[tuple[str, int], float]] = {}
        self._clock = clock
        self._prune_at = 1024
        """Expired pins are dropped when there are this many (then twice what remains): the
        cost stays amortised O(1) per connection and memory follows the live clients."""

    def update(self, endpoints: tuple[tuple[str, int], ...], affinity_timeout: int) -> None:
        if endpoints != self.endpoints:
            self.endpoints = endpoints
            self._next = self._next % len(endpoints) if endpoints else 0
            live = set(endpoints)
            self._pins = {c: p for c, p in self._pins.items() if p[0] in live}
        self.affinity_timeout = affinity_timeout

    def candidates(self, client_ip: str) -> list[tuple[str, int]]:
        eps = self.endpoints
        if not eps:
            return []
        start = self._next
        order = [eps[(start + i) % len(eps)] for i in range(len(eps))]
        if self.affinity_timeout:
            pin = self._pins.get(client_ip)
            if pin is not None and self._clock() - pin[1] < self.affinity_timeout and pin[0] in eps:
                # A pinned client does not take a turn: round-robin stays fair to the others.
                order.remove(pin[0])
                order.insert(0, pin[0])
                return order
        self._next = (self._next + 1) % len(eps)
        return order

    def used(self, client_ip: str, endpoint: tuple[str, int]) -> None:
        """Record a successful connection (refreshes the client's affinity)."""
        if self.affinity_timeout:
            now = self._clock()
            self._pins[client_ip] = (endpoint, now)
            if len(self._pins) >= self._prune_at:
                self._pins = {c: p for c, p in self._pins.items() if now - p[1] < self.affinity_timeout}
                self._prune_at = max(1024, 2 * len(self._pins))
