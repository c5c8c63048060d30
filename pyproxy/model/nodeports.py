"""Which of the node's addresses accept NodePorts (``--nodeport-addresses``)."""

from __future__ import annotations

from pyproxy.model.ipaddr import ip_in_cidrs
from pyproxy.model.objects import NodeInfo


def needs_interfaces(*, node: NodeInfo | None, cidrs: tuple[str, ...]) -> bool:
    """Whether the NodePort addresses depend on the interfaces' addresses: no Node object (or
    one without addresses), or ``--nodeport-addresses`` CIDRs - with CIDRs any local address
    inside them takes NodePorts, as upstream, not only the Node object's."""
    return node is None or not node.addresses or any(c != "primary" for c in cidrs)


def nodeport_ips(
    *,
    node: NodeInfo | None,
    interface_ips: tuple[str, ...],
    cidrs: tuple[str, ...],
) -> tuple[str, ...]:
    """Which addresses accept NodePorts.

    With no ``--nodeport-addresses`` CIDRs: the Node object's addresses when we have it, else
    every interface address. With CIDRs: every node or interface address inside them. The
    keyword ``primary`` adds the node's primary address (the Node's first InternalIP or
    ExternalIP; without a Node object, the first non-loopback interface address). Loopback is
    always left out (localhost NodePorts need route_localnet; see the README).
    """
    primary: list[str] = []
    if "primary" in cidrs:
        cidrs = tuple(c for c in cidrs if c != "primary")
        pool = (node.addresses if node and node.addresses else ()) or tuple(
            ip for ip in interface_ips if not ip.startswith("127."))
        primary = list(pool[:1])
        if not cidrs:
            return tuple(primary)
    if cidrs:
        candidates = list((node.addresses if node else ())) + list(interface_ips)
        chosen = [ip for ip in candidates if ip_in_cidrs(ip, cidrs)]
    else:
        chosen = list(node.addresses) if node and node.addresses else list(interface_ips)
    out: list[str] = []
    for ip in [*primary, *chosen]:
        if ip.startswith("127.") or ip == "::1" or ip in out:
            continue
        out.append(ip)
    return tuple(out)
