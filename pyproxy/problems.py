"""Invalid objects, reported once: logged when they appear and counted in a gauge.

Each IP family's store judges the same objects, so the families share one :class:`ProblemLog`:
a malformed Service is logged once, not once per family, and counted once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pyproxy.literals import Family
from pyproxy.metrics import INVALID_OBJECTS
from pyproxy.model.objects import Problem

log = logging.getLogger("pyproxy")

KINDS = ("Service", "EndpointSlice", "Node")


class ProblemLog:
    """What each family's store currently skips as invalid."""

    def __init__(self) -> None:
        self._current: dict[int, dict[str, str]] = {}
        """family → problem text → kind."""

    def report(self, family: Family, problems: Iterable[Problem]) -> None:
        """Log the problems no family had already, then set the gauge from all families."""
        now = {str(p): p.kind for p in problems}
        known = {text for texts in self._current.values() for text in texts}
        for text in now:
            if text not in known:
                log.warning("skipping invalid %s (fix the object; the others are programmed)", text)
        self._current[family] = now
        counts = dict.fromkeys(KINDS, 0)
        for text, kind in {t: k for texts in self._current.values() for t, k in texts.items()}.items():
            counts[kind] = counts.get(kind, 0) + 1
        for kind, n in counts.items():
            INVALID_OBJECTS.labels(kind=kind).set(n)
