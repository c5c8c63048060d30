"""Read and set facts of the network namespace we run in (netlink via pyroute2, /proc/sys)."""

from __future__ import annotations

import socket

from pyroute2 import IPRoute


def interface_ipv4s() -> tuple[str, ...]:
    """Every IPv4 address on the namespace's interfaces, loopback included (callers filter)."""
    with IPRoute() as ipr:
        addrs = [msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr(family=socket.AF_INET)]
    return tuple(a for a in addrs if a)


def set_sysctl(name: str, value: str) -> None:
    """Write ``/proc/sys/<name with dots as slashes>``."""
    with open("/proc/sys/" + name.replace(".", "/"), "w", encoding="ascii") as fh:
        fh.write(value)
