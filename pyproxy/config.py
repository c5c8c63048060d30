"""Proxy configuration shared by every layer (pure data, no I/O)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

PROXY_MODES = ("nftables", "iptables", "userspace")


@dataclass(frozen=True)
class ProxyConfig:
    """What the renderers need to know besides the Services and endpoints."""

    mode: str = "nftables"
    """``nftables`` (default) or ``iptables``; ``userspace`` redirects to pyproxy's own relays."""

    hostname: str = ""
    """This node's name (``--hostname-override``); picks the Node object and local endpoints."""

    cluster_cidrs: tuple[str, ...] = ()
    """Pod network CIDRs (``--cluster-cidr``). Traffic to a ClusterIP from outside them is
    masqueraded; traffic from inside keeps its pod source IP. Empty means: never masquerade
    ClusterIP traffic (only hairpin and NodePort traffic), as upstream does without a detector."""

    nodeport_addresses: tuple[str, ...] = ()
    """CIDRs whose node addresses accept NodePort traffic (``--nodeport-addresses``). Empty means
    every address of the node except loopback."""

    masquerade_all: bool = False
    """Masquerade every packet sent to a ClusterIP (``--masquerade-all``)."""

    localhost_nodeports: bool = False
    """iptables mode: NodePorts also answer on 127.0.0.1 (``--iptables-localhost-nodeports``),
    which needs ``route_localnet=1`` and the martian-packet drop rule of CVE-2020-8558. Off by
    default, unlike upstream; nftables mode has no localhost NodePorts (as upstream)."""

    masquerade_bit: int = 14
    """Which packet-mark bit flags a packet for masquerading (``--iptables-masquerade-bit``)."""

    @property
    def localhost_nodeports_active(self) -> bool:
        """Asked for, in iptables mode, and loopback among the NodePort addresses (an empty
        ``--nodeport-addresses`` means all addresses), as upstream decides."""
        if self.mode != "iptables" or not self.localhost_nodeports:
            return False
        cidrs = tuple(c for c in self.nodeport_addresses if c != "primary")
        if not self.nodeport_addresses:
            return True
        return any(ipaddress.ip_address("127.0.0.1") in ipaddress.ip_network(c) for c in cidrs
                   if ":" not in c)

    @property
    def masquerade_mark(self) -> str:
        """The mark value as both nft and iptables print it, e.g. ``0x4000``."""
        return hex(1 << self.masquerade_bit)
