"""Read and set facts of the network namespace we run in (netlink via pyroute2, /proc/sys)."""

from __future__ import annotations

import socket

from pyproxy.literals import Family

CAPABILITY_BITS = {"NET_ADMIN": 12, "NET_RAW": 13}
"""Bit numbers in the capability masks of /proc/self/status (linux/capability.h)."""


def interface_ips(family: Family = 4) -> tuple[str, ...]:
    """Every address of one family on the namespace's interfaces, loopback included (callers
    filter); IPv6 link-local addresses are left out (a NodePort there would need a zone)."""
    # Imported here: most starts never need it (the Node names the addresses), and pyroute2
    # takes 0.2 s to import.
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        msgs = ipr.get_addr(family=socket.AF_INET6 if family == 6 else socket.AF_INET)
        addrs = [msg.get_attr("IFA_ADDRESS") for msg in msgs]
    return tuple(a for a in addrs if a and not a.lower().startswith("fe80:"))



def missing_capabilities(names: tuple[str, ...], *, status: str = "/proc/self/status") -> list[str]:
    """Which of ``names`` this process does not hold in its effective set. Empty when it cannot
    tell (no /proc): then the executors' own errors speak."""
    try:
        with open(status, encoding="ascii") as fh:
            line = next((ln for ln in fh if ln.startswith("CapEff:")), "")
        effective = int(line.split()[1], 16)
    except (OSError, IndexError, ValueError):
        return []
    return [n for n in names if not effective >> CAPABILITY_BITS[n] & 1]
