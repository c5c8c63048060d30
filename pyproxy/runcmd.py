"""How executors start commands: optionally inside a named network namespace."""

from __future__ import annotations


def netns_prefix(netns: str | None) -> list[str]:
    """argv prefix that runs a command in a named network namespace (tests and the lab)."""
    return ["ip", "netns", "exec", netns] if netns else []
