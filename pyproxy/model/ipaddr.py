"""IP parsing that accepts what the Kubernetes API accepts.

The API server validated old objects with Go's sloppy parser, which reads ``10.0.0.010`` as
``10.0.0.10`` (leading zeros are decimal, not octal). Python's ``ipaddress`` refuses leading
zeros, so IPv4 goes through our own parser and comes out canonical, as upstream's rules do.
"""

from __future__ import annotations

import ipaddress
import re

from pyproxy.literals import Family


class BadAddress(ValueError):
    """An address or CIDR that cannot be parsed."""


CANONICAL_V4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                           r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")
"""A dotted quad already in canonical form (no leading zeros): most addresses, taken at once."""


def _sloppy_v4(text: str) -> str | None:
    parts = text.split(".")
    if len(parts) != 4:
        return None
    octets = []
    for part in parts:
        # Only plain decimal digits; "0x10" or "+1" are refused as the API refuses them.
        if not part or not part.isascii() or not part.isdigit() or len(part) > 3:
            return None
        value = int(part, 10)
        if value > 255:
            return None
        octets.append(str(value))
    return ".".join(octets)


def canonical_ip(text: object) -> tuple[str, Family]:
    """Return ``(canonical text, family)`` for an IP, family 4 or 6; raise BadAddress."""
    if not isinstance(text, str) or not text.strip():
        raise BadAddress(f"not an IP address: {text!r}")
    if CANONICAL_V4.fullmatch(text):
        return text, 4
    raw = text.strip()
    v4 = _sloppy_v4(raw)
    if v4 is not None:
        return v4, 4
    if "%" in raw:  # a zone ("fe80::1%eth0") is valid for sockets, not in the API
        raise BadAddress(f"not an IP address: {text!r}")
    try:
        addr = ipaddress.IPv6Address(raw)
    except ValueError:
        raise BadAddress(f"not an IP address: {text!r}") from None
    return str(addr), 6


def canonical_cidr(text: object) -> tuple[str, int]:
    """Return ``(canonical CIDR, family)``; host bits are cleared (``10.0.0.7/8`` → ``10.0.0.0/8``)."""
    if not isinstance(text, str) or "/" not in text:
        raise BadAddress(f"not a CIDR: {text!r}")
    addr_text, _, len_text = text.strip().partition("/")
    addr, family = canonical_ip(addr_text)
    if not len_text.isascii() or not len_text.isdigit():
        raise BadAddress(f"not a CIDR: {text!r}")
    prefix = int(len_text, 10)
    try:
        net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    except ValueError:
        raise BadAddress(f"not a CIDR: {text!r}") from None
    return str(net), family


def ip_in_cidrs(ip: str, cidrs: tuple[str, ...]) -> bool:
    """True if ``ip`` (canonical) lies in any of ``cidrs`` (canonical)."""
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(c) for c in cidrs)
