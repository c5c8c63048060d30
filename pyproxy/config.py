"""Proxy configuration shared by every layer (pure data, no I/O)."""

from __future__ import annotations

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

    masquerade_bit: int = 14
    """Which packet-mark bit flags a packet for masquerading (``--iptables-masquerade-bit``)."""

    @property
    def masquerade_mark(self) -> str:
        """The mark value as both nft and iptables print it, e.g. ``0x4000``."""
        return hex(1 << self.masquerade_bit)
