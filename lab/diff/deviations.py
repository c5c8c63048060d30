"""Mismatches that are intended: pyproxy differs from upstream kube-proxy on purpose.

Each entry says when it applies (a predicate over the mismatch and its cluster) and why; the
README's "Where pyproxy differs" section says the same for people. A mismatch no entry
explains is a defect until it is fixed (with a regression test in tests/netns/) or added here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lab.diff import gen

if TYPE_CHECKING:
    from lab.diff.run import Mismatch

KNOWN: list[tuple[str, Callable[["Mismatch", gen.Cluster], bool]]] = []
"""(reason, applies)."""


def explain(m: "Mismatch", cluster: gen.Cluster) -> str:
    """The reason of the first documented deviation that applies, or ""."""
    for reason, applies in KNOWN:
        if applies(m, cluster):
            return reason
    return ""
