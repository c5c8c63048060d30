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
                    # The same endpoint can sit in two slices while the controller moves
                    # it; prefer the ready copy, else keep the first.
                    if prev is None or (ep.ready and not prev.ready):
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
