"""How executors start commands: optionally inside a named network namespace, with their
input in a memory file rather than a pipe."""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import IO


def netns_prefix(netns: str | None) -> list[str]:
    """argv prefix that runs a command in a named network namespace (tests and the lab)."""
    return ["ip", "netns", "exec", netns] if netns else []


def run_captured(argv: list[str], *, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` with ``stdin`` as its input and its output captured.

    The input is written to an anonymous memory file the command reads by itself: through a
    pipe, ``subprocess`` feeds it 4 KiB at a time from a Python loop that needs the GIL for
    every chunk, so a 4 MB ``nft -f`` script took 4 s instead of 1 s while another thread
    was busy (a cold start encodes the netlink elements while nft parses the chains).
    Raises OSError when the command cannot be started."""
    if stdin is None:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    with _memory_file() as fh:
        fh.write(stdin)
        fh.flush()
        fh.seek(0)
        return subprocess.run(argv, stdin=fh, capture_output=True, check=False)


def _memory_file() -> IO[bytes]:
    try:
        return os.fdopen(os.memfd_create("pyproxy-input", os.MFD_CLOEXEC), "w+b")
    except (AttributeError, OSError):  # no memfd_create: a temporary file does the same
        return tempfile.TemporaryFile()
