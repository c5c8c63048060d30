"""What renderers return: pieces of a ruleset the proxier can diff and apply.

A fragment is plain data. The base fragment holds the fixed chains and maps; each service port
renders to its own fragment, so a sync only re-renders and diffs the service ports that changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NftFragment:
    """Part of our nft table."""

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Chain name → its rules, in order (nft syntax, without ``add rule ip pyproxy CHAIN``)."""
    chain_specs: dict[str, str] = field(default_factory=dict)
    """Base chains only: chain name → ``type nat hook prerouting priority -100 ;``."""
    sets: dict[str, str] = field(default_factory=dict)
    """Set or map name → its declaration body, e.g. ``type ipv4_addr ; flags dynamic,timeout ;``."""
    elements: dict[tuple[str, str], str] = field(default_factory=dict)
    """(set or map name, key) → value (``""`` for a plain set)."""


@dataclass(frozen=True)
class IptFragment:
    """Part of our iptables rules (one or both of the filter and nat tables)."""

    chains: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    """(table, chain) → rules in iptables-restore syntax without the ``-A CHAIN`` prefix."""
    top_rules: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    """Rules this service adds to a shared top-level chain such as nat ``PYPROXY-SERVICES``."""
