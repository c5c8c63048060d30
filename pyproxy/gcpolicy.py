"""The cyclic garbage collector's settings for a process that holds a large, long-lived state.

Python's collector runs a full collection each time the tracked objects grow by a quarter and
enough young collections have passed. A cold start at 10k services × 10 endpoints builds a few
million long-lived objects (parsed objects, the model, the rendered operations) from nothing,
so it paid for ~15 full collections, each walking everything built so far: 1.5 s of a 7 s
parse, render and encode (measured in one process with the collector on, off, and as set here).
Nearly none of it is garbage: the model is made of tuples, dataclasses and dicts that reference
counting frees the moment they are dropped; cycles are rare (exceptions, asyncio futures).

So: young collections less often (still often enough for those cycles), and after each full
sync the objects then alive are moved out of the collector's sight (``gc.freeze``), so a
later full collection walks only what came after: at 10k services one walk of the whole state
costs a few hundred ms, a stall a daemon would otherwise take at random moments. Frozen objects
are still freed by reference counting when the state drops them; only a cycle among them would
stay (none is made by the model).

Bulk work (a relist's or a file's objects parsed, a state built, a sync rendered and encoded)
runs with the collector paused (:func:`paused`): everything such a step makes either survives
it (the state) or is freed by reference counting when the step drops it, so a young or middle
collection in between only walks what it cannot free: ~0.4 s of a cold start at 10k services.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 10_000
"""Allocations (minus deallocations) between two young collections (Python's default: 700)."""
MIDDLE_THRESHOLD = 20
"""Young collections between two middle-generation ones (default 10)."""
OLD_THRESHOLD = 100
"""Middle-generation collections between two full ones (default 10), besides the growth rule."""


def configure() -> None:
    """Set the thresholds above (once, at start)."""
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)


def settle() -> None:
    """After a full sync: what is alive now is the long-lived state; keep the collector off it."""
    gc.freeze()


_lock = threading.Lock()
_depth = 0
_was_enabled = True


@contextmanager
def paused(*, settle: bool = False) -> Iterator[None]:
    """The collector off for a bulk step, back as it was once the last such step (of any
    thread: a sync runs in a worker while the event loop parses a relist) has ended.

    ``settle``: what the step leaves alive is long-lived (a relist parsed into the store) or
    about to be freed by reference counting (a decoded LIST): :func:`settle` it as the step
    ends. Otherwise the first young collection after it walks everything the step made (0.15
    s after decoding a 10k-Service file). Only for rare steps (relists, files, full syncs): a
    cyclic garbage object still uncollected when they end stays for good (see the module)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
        if settle:
            gc.freeze()
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
