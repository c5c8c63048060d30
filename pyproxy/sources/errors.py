"""The API source's error, apart from its client: the command line catches it on every path,
and ``run --once`` with a file must not load aiohttp to do so."""

from __future__ import annotations


class KubeError(RuntimeError):
    """The API server could not be reached or refused us; the message says what to check."""
