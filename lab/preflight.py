"""What the labs need of the machine, checked once with a message that says what to do."""

from __future__ import annotations

import os
import platform
import shutil

NETNS_TOOLS = ("ip", "nft", "iptables", "iptables-nft-restore", "iptables-legacy-restore", "curl")
CLUSTER_TOOLS = (*NETNS_TOOLS, "go", "openssl", "nsenter", "unshare")


def missing(tools: tuple[str, ...] = NETNS_TOOLS) -> str | None:
    """None when everything is there, else why not (and how to fix it)."""
    if platform.system() != "Linux":
        return "needs Linux (network namespaces, nftables, iptables)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces: run it with sudo"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is missing: run 'bash scripts/setup.sh' first"
    return None
