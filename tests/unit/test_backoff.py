"""The one backoff policy: doubling up to a cap, jitter within its bounds, reset on success."""

from __future__ import annotations

import random

from pyproxy.backoff import Backoff


def test_doubles_up_to_the_maximum_within_the_jitter_and_resets():
    random.seed(7)
    b = Backoff(initial=0.5, maximum=4.0, jitter=0.5)
    bases = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    waits = [b.next() for _ in bases]
    assert all(base * 0.5 <= w <= base * 1.5 for w, base in zip(waits, bases)), waits
    b.reset()
    assert 0.25 <= b.next() <= 0.75


def test_jitter_spreads_nodes_that_failed_together():
    waits = {round(Backoff(initial=1.0, jitter=0.2).next(), 6) for _ in range(50)}
    assert len(waits) > 40 and min(waits) >= 0.8 and max(waits) <= 1.2
