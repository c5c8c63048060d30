"""What the benchmarks share: one row measured in a child process, the rows saved as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


class RowFailed(RuntimeError):
    """A row's child process failed; the message is its stderr."""


def child_row(args: list[str], *, timeout: float = 3600) -> dict[str, Any]:
    """Run ``python -m <args>`` (a benchmark's ``--one`` mode) and return the row it prints as
    its last line of JSON. A child per row: its memory, peak RSS and lab are its own."""
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RowFailed(proc.stderr)
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return row


def save(path: str | None, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` to ``path`` as JSON (nothing without a path)."""
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
