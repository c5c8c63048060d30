"""A Service's ports joined with its EndpointSlices' endpoints: what each port's rules serve."""

from __future__ import annotations

from collections.abc import Iterable

from pyproxy.model.objects import Endpoint, NodeView, ServicePort, ServicePortState
from pyproxy.model.parse import ParsedSlice


def merge_ports(ports: Iterable[ServicePort], slices: list[ParsedSlice],
                view: NodeView) -> tuple[ServicePortState, ...]:
    """One :class:`ServicePortState` per port: the endpoints of every slice port with the same
    name and protocol, each address and port once, sorted (so equal inputs give equal states)."""
    states = []
    for sp in ports:
        found: dict[tuple[str, int], Endpoint] = {}
        for sl in slices:
            for port_name, proto, port in sl.ports:
                if port_name != sp.name.port or proto != sp.name.protocol:
                    continue
                for ep in sl.endpoints:
                    prev = found.get((ep.ip, port))
                    if prev is None or _preferred(ep, prev):
                        found[(ep.ip, port)] = ep if ep.port == port else Endpoint(
                            ip=ep.ip,
                            port=port,
                            ready=ep.ready,
                            serving=ep.serving,
                            terminating=ep.terminating,
                            node_name=ep.node_name,
                            zone=ep.zone,
                            zone_hints=ep.zone_hints,
                            node_hints=ep.node_hints,
                        )
        states.append(ServicePortState(sp, tuple(sorted(found.values())), view))
    return tuple(states)


def _preferred(new: Endpoint, old: Endpoint) -> bool:
    """Whether ``new`` replaces ``old``, the same address and port from another slice.

    The same endpoint sits in two slices while the controller moves it (equal copies); a pod
    IP reused before the old Pod object is gone gives a terminating copy and a live one: the
    live one wins, as upstream decides. Two live copies that differ are undefined upstream
    (whichever slice its map yields last); here the ready one wins, else the first, so the
    result does not depend on order."""
    if new.terminating != old.terminating:
        return not new.terminating
    return new.ready and not old.ready
