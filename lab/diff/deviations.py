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

def _service(m: "Mismatch", cluster: gen.Cluster) -> gen.Svc | None:
    return next((s for s in cluster.services if s.name == m.target.service), None)


def _ranges_of_other_family_only(m: "Mismatch", cluster: gen.Cluster) -> bool:
    """A LoadBalancer IP whose Service has source ranges, none of this IP's family: upstream
    drops the ranges of the other family and, with none left, lets every client in; pyproxy
    lets none in (the ranges say who may connect, and nobody of this family is among them)."""
    svc = _service(m, cluster)
    if svc is None or not svc.source_ranges or not m.target.what.endswith("loadBalancer IP"):
        return False
    v6 = ":" in m.target.ip
    if any((":" in r) == v6 for r in svc.source_ranges):
        return False
    # Dropped: a timeout, or EPERM for the node's own packets (dropped in its output hook).
    return not m.pyproxy.pods and bool(m.pyproxy.errors) and m.pyproxy.errors <= {"timeout", "eperm"}


KNOWN: list[tuple[str, Callable[["Mismatch", gen.Cluster], bool]]] = [
    ("source ranges of the other family only: pyproxy denies (upstream allows all)",
     _ranges_of_other_family_only),
]
"""(reason, applies)."""


def explain(m: "Mismatch", cluster: gen.Cluster) -> str:
    """The reason of the first documented deviation that applies, or ""."""
    for reason, applies in KNOWN:
        if applies(m, cluster):
            return reason
    return ""
