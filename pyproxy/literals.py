"""The closed sets of values that flags, families and decisions take, as types.

mypy (strict, in scripts/test.sh) then refuses a typo such as ``mode == "nftable"`` or a
family of 5 wherever these are used; the command line checks its input against the same sets.
"""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["nftables", "iptables", "userspace"]
"""How a node's Services are programmed (``--proxy-mode``)."""
MODES: tuple[Mode, ...] = get_args(Mode)

Family = Literal[4, 6]
"""An IP family: each has its own proxier, store, table and sync loop."""
FAMILIES: tuple[Family, ...] = get_args(Family)

IptablesBackend = Literal["nft", "legacy"]
"""Which iptables binaries program the kernel (iptables mode)."""
BackendChoice = Literal["auto", "nft", "legacy"]
"""``--iptables-backend``: ``auto`` picks the backend that holds rules already (as the distro's
iptables wrapper does), else nft."""

Verdict = Literal["dnat", "reject", "drop", "pass"]
"""What happens to a new connection (``pyproxy explain``)."""
Path = Literal["clusterip", "nodeport", "externalip", "loadbalancer"]
"""Which of a Service's addresses a packet was sent to."""
