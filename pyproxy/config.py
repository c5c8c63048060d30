"""Proxy configuration shared by every layer (pure data, no I/O)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from pyproxy.literals import MODES, Family, Mode

PROXY_MODES = MODES


@dataclass(frozen=True)
class ProxyConfig:
    """What the renderers need to know besides the Services and endpoints."""

    mode: Mode = "nftables"
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

    family: Family = 4
    """The IP family this proxier programs (4 or 6). Dual-stack runs one proxier per family,
    each with its own table or binaries, so one family's failure cannot break the other."""

    ip_families: tuple[Family, ...] = (4, 6)
    """Which families to program (``--ip-families``): both by default; an empty family (no
    Services of it) costs one empty table."""

    masquerade_bit: int = 14
    """Which packet-mark bit flags a packet for masquerading (``--iptables-masquerade-bit``)."""

    def for_family(self, family: Family) -> ProxyConfig:
        """This configuration for one family: CIDRs of the other family left out."""
        def mine(cidrs: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(c for c in cidrs if c == "primary" or (":" in c) == (family == 6))

        return replace(self, family=family, cluster_cidrs=mine(self.cluster_cidrs),
                       nodeport_addresses=mine(self.nodeport_addresses))

    def family_configs(self) -> list[ProxyConfig]:
        """One configuration per family to program (userspace mode relays IPv4 only)."""
        families = [f for f in self.ip_families if not (self.mode == "userspace" and f == 6)]
        return [self.for_family(f) for f in families]

    @property
    def localhost_nodeports_active(self) -> bool:
        """Asked for, in iptables mode, and loopback among the NodePort addresses (an empty
        ``--nodeport-addresses`` means all addresses), as upstream decides."""
        if self.mode != "iptables" or not self.localhost_nodeports or self.family != 4:
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
