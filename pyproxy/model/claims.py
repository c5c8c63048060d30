"""Each ClusterIP:port, external address:port and NodePort goes to one Service only.

The API server forbids two Services sharing them, but a hand-written file or a race can still
hold such a pair, and the kernel would refuse the whole ruleset ("File exists"). The Service
that claimed first keeps it (on a fresh start, the first in name order); the other is skipped
as invalid until the conflict goes away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from pyproxy.model.keys import ObjectKey
from pyproxy.model.objects import Problem, ServicePortState


class Claim(NamedTuple):
    """Something only one Service may use."""

    address: str | None
    """A ClusterIP or an external address; None for a NodePort (it is taken on every NodePort
    address at once)."""
    protocol: str
    port: int

    def __str__(self) -> str:
        if self.address is None:
            return f"NodePort {self.port}/{self.protocol.upper()}"
        return f"{self.address} port {self.port}/{self.protocol.upper()}"


def claims_of(states: Iterable[ServicePortState]) -> list[Claim]:
    """What a Service's merged ports use."""
    out = []
    for st in states:
        sp = st.service
        out.append(Claim(sp.cluster_ip, sp.name.protocol, sp.port))
        # External and LB IPs share the map keyed on address . protocol . port.
        out.extend(Claim(ip, sp.name.protocol, sp.port) for ip in sp.external_vips if ip != sp.cluster_ip)
        if sp.node_port:
            out.append(Claim(None, sp.name.protocol, sp.node_port))
    return out


class Claims:
    """Who holds each claim, and the Services left out because of a clash."""

    def __init__(self) -> None:
        self._owner: dict[Claim, ObjectKey] = {}
        self._held: dict[ObjectKey, list[Claim]] = {}
        self.conflicts: dict[ObjectKey, Problem] = {}
        """The Services left out, each with the clash that left it out."""

    def __bool__(self) -> bool:
        return bool(self._owner or self._held or self.conflicts)

    def settle(self, changed: set[ObjectKey], wanted: Callable[[ObjectKey], list[Claim]]) -> None:
        """Services ``changed`` now want ``wanted(key)``: give out what is free, record clashes.

        Owners go first (a changed owner keeps what it still wants), then the rest in name
        order; Services that were in conflict go last, so they never take over a claim."""
        # Each Service's claims are made once here (a cold start settles every Service).
        wants: dict[ObjectKey, list[Claim]] = {}
        for key in changed:
            want = wants[key] = wanted(key)
            if key in self._held:
                self._release(key, keep=want)
        for key in sorted(changed - set(self.conflicts)) + sorted(self.conflicts):
            self.conflicts.pop(key, None)
            want = wants[key] if key in wants else wanted(key)
            clash = next(((c, self._owner[c]) for c in want if self._owner.get(c, key) != key), None)
            if clash is not None:
                claim, owner = clash
                self.conflicts[key] = Problem("Service", key.namespace, key.name,
                                              f"{claim} is already used by Service {owner}")
                self._release(key, keep=[])  # excluded entirely: it holds nothing
                continue
            for claim in want:
                self._owner[claim] = key
            if want:
                self._held[key] = want

    def _release(self, key: ObjectKey, *, keep: list[Claim]) -> None:
        held = self._held.pop(key, [])
        for claim in held:
            if claim not in keep and self._owner.get(claim) == key:
                del self._owner[claim]
        kept = [c for c in held if c in keep]
        if kept:
            self._held[key] = kept
