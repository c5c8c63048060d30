"""Chain and set names derived from service port names.

Names must be stable (the same service gets the same chain on every sync and after a restart),
unique, and within the kernel's limits: 28 characters for an iptables chain, 256 for nft.
Like upstream, nft names keep the readable service name after a short hash, and iptables names
are a prefix plus a hash.
"""

from __future__ import annotations

import base64
import hashlib

from pyproxy.model.objects import Endpoint, ServicePortName

NFT_NAME_MAX = 240  # below the kernel's 256 with room for the longest prefix


def _hash(text: str, length: int) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest).decode()[:length]


def nft_service_base(spn: ServicePortName) -> str:
    """``HASH8-ns/svc/proto/port``: readable in ``nft list``, unique thanks to the hash."""
    base = f"{spn.namespace}/{spn.name}/{spn.protocol}/{spn.port}"
    return _truncate(f"{_hash(base, 8)}-{base}")


def nft_endpoint_base(spn: ServicePortName, ep: Endpoint) -> str:
    """The service base plus ``__IP/port`` (IPv6 colons become dots: nft names cannot hold them)."""
    base = f"{spn.namespace}/{spn.name}/{spn.protocol}/{spn.port}__{ep.ip.replace(':', '.')}/{ep.port}"
    return _truncate(f"{_hash(base, 8)}-{base}")


def _truncate(name: str) -> str:
    return name if len(name) <= NFT_NAME_MAX else name[: NFT_NAME_MAX - 3] + "..."


IPT_PREFIX = "PYPROXY-"


def ipt_service_hash(spn: ServicePortName) -> str:
    """16 characters, so ``PYPROXY-SVC-`` + hash is exactly 28, iptables' limit."""
    return _hash(f"{spn}{spn.protocol}", 16)


def ipt_endpoint_hash(spn: ServicePortName, ep: Endpoint) -> str:
    return _hash(f"{spn}{spn.protocol}{ep.addr}", 16)
