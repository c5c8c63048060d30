"""Userspace-mode renderer: send each service port's traffic to pyproxy's local listener (pure).

It reuses the nftables layout (same table, dispatch maps, no-endpoint rejects); only a service
port's chain differs: instead of choosing and DNATing to an endpoint, ``redirect-…`` rewrites
the destination to this node and the listener's port. The listener then picks a backend.
"""

from __future__ import annotations

from dataclasses import replace

from pyproxy.model.objects import ServicePortState
from pyproxy.render.fragments import NftFragment
from pyproxy.render.naming import nft_comment, nft_service_base

RELAY_PORTS = "relay-ports"


def guard_relays(base: NftFragment, ports: tuple[int, ...]) -> NftFragment:
    """The nftables base plus a guard: relays listen on every address (a redirect from
    prerouting goes to the incoming interface's address), so new connections to their ports
    that were not redirected by us, i.e. from off the node straight to ``node:36000``, are
    dropped. Replies to the node's own ephemeral ports in the same range are not new."""
    chains = dict(base.chains)
    chains["filter-input"] = (
        f"ct state new meta l4proto {{ tcp, udp }} th dport @{RELAY_PORTS} ct status ! dnat drop",
        *chains["filter-input"])
    elements = dict(base.elements)
    elements.update({(RELAY_PORTS, str(p)): "" for p in ports})
    return replace(base, chains=chains, sets={**base.sets, RELAY_PORTS: "type inet_service ;"},
                   elements=elements)


def render_service(sps: ServicePortState, listen_port: int | None) -> NftFragment:
    svc = sps.service
    proto = svc.name.protocol
    cip_key = f"{svc.cluster_ip} . {proto} . {svc.port}"
    # The ClusterIP is in the shared set of active ClusterIPs (see the nftables renderer).
    cip = ("cluster-ips", svc.cluster_ip)
    if listen_port is None or not sps.usable_endpoints:
        elements = {cip: "", ("no-endpoint-services", cip_key): "goto reject-chain"}
        if svc.node_port:
            elements[("no-endpoint-nodeports", f"{proto} . {svc.node_port}")] = "goto reject-chain"
        return NftFragment(elements=elements)
    chain = f"redirect-{nft_service_base(svc.name)}"
    elements = {cip: "", ("service-ips", cip_key): f"goto {chain}"}
    if svc.node_port:
        elements[("service-nodeports", f"{proto} . {svc.node_port}")] = f"goto {chain}"
    return NftFragment(
        chains={chain: (f'meta l4proto {proto} redirect to :{listen_port} {nft_comment(str(svc.name))}',)},
        elements=elements,
    )
