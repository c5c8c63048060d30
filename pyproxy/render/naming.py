"""Chain and set names derived from service port names.

Names must be stable (the same service gets the same chain on every sync and after a restart),
unique, and within the kernel's limits: 28 characters for an iptables chain, 256 for nft.
Like upstream, nft names keep the readable service name after a short hash, and iptables names
are a prefix plus a hash.
"""

from __future__ import annotations

import base64
import hashlib
import re

from pyproxy.literals import Mode
from pyproxy.model.objects import Endpoint, ServicePortName

NFT_NAME_MAX = 238
"""Longest service or endpoint base in a name: with the longest prefix ("local-endpoints-", 16)
a name stays below the kernel's limit of 255 characters."""


def _hash(text: str, length: int) -> str:
    """The first ``length`` base32 characters of the text's SHA-256. Base32 turns each 5 bytes
    into 8 characters, so only the bytes those characters need are encoded: the same name,
    for a seventh of the work (the encoder is pure Python, and a cold start names 20k chains)."""
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest[: -(-length // 8) * 5]).decode()[:length]


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


# Comments carry names into rule text. The model only admits names the API server accepts, so
# they never hold a quote, a space or a line break; these helpers make sure of it anyway (a
# renderer fed by a future source that forgot to validate must not write a broken or injected
# ruleset) and keep within the kernel's limits: nft refuses a comment over 128 characters and
# the whole transaction with it, the iptables comment match one over 255.
NFT_COMMENT_MAX = 128
IPT_COMMENT_MAX = 255
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:/()\[\]>,+=-]")


def _comment_text(text: str, limit: int) -> str:
    safe = _UNSAFE.sub("?", text)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def nft_comment(text: str) -> str:
    """``comment "…"`` for an nft rule: unsafe characters replaced by ``?``, at most 128."""
    return f'comment "{_comment_text(text, NFT_COMMENT_MAX)}"'


def ipt_comment(text: str) -> str:
    """``-m comment --comment "…"`` for an iptables rule, as :func:`nft_comment` but 255."""
    return f'-m comment --comment "{_comment_text(text, IPT_COMMENT_MAX)}"'


IPT_PREFIX = "PYPROXY-"


def ipt_service_hash(spn: ServicePortName) -> str:
    """16 characters, so ``PYPROXY-SVC-`` + hash is exactly 28, iptables' limit."""
    return _hash(f"{spn}{spn.protocol}", 16)


def ipt_endpoint_hash(spn: ServicePortName, ep: Endpoint) -> str:
    return _hash(f"{spn}{spn.protocol}{ep.addr}", 16)


class ServiceChains:
    """The chain names of one service port in one mode: what the renderer writes and what
    ``pyproxy explain`` names, from one place. nftables: ``service-``, ``local-``,
    ``external-``, ``firewall-``, ``endpoint-`` + a readable base; iptables: ``PYPROXY-SVC-``,
    ``SVL-``, ``EXT-``, ``FW-``, ``SEP-`` + a hash (the userspace mode renders nftables)."""

    def __init__(self, spn: ServicePortName, *, mode: Mode) -> None:
        self.spn = spn
        self.iptables = mode == "iptables"
        if self.iptables:
            h = ipt_service_hash(spn)
            self.cluster, self.local = f"{IPT_PREFIX}SVC-{h}", f"{IPT_PREFIX}SVL-{h}"
            self.external, self.firewall = f"{IPT_PREFIX}EXT-{h}", f"{IPT_PREFIX}FW-{h}"
        else:
            base = nft_service_base(spn)
            self.cluster, self.local = f"service-{base}", f"local-{base}"
            self.external, self.firewall = f"external-{base}", f"firewall-{base}"

    def endpoint(self, ep: Endpoint) -> str:
        """The chain that DNATs to one endpoint."""
        if self.iptables:
            return f"{IPT_PREFIX}SEP-{ipt_endpoint_hash(self.spn, ep)}"
        return f"endpoint-{nft_endpoint_base(self.spn, ep)}"

    def affinity_set(self, ep: Endpoint) -> str:
        """nftables: the set of clients that stick to one endpoint (ClientIP affinity)."""
        return f"affinity-{nft_endpoint_base(self.spn, ep)}"
