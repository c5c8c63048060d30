"""How the daemon connects and paces itself: one dataclass, one home for every default. The
command line's defaults, the sync loop's and the daemon's all come from here."""

from __future__ import annotations

from dataclasses import dataclass

from pyproxy.literals import BackendChoice


@dataclass(frozen=True)
class Settings:
    """How the daemon connects and paces itself."""

    kubeconfig: str | None = None
    """Kubeconfig file; None means the in-cluster service account."""
    source_file: str | None = None
    """Follow this file of Services, EndpointSlices and Nodes instead of the API (checked
    every ``min_sync_period``); everything else works as with the API."""
    iptables_backend: BackendChoice = "auto"
    """iptables mode only: nft, legacy or auto."""
    min_sync_period: float = 0.1
    """Least seconds between two syncs (changes meanwhile are batched)."""
    sync_period: float = 30.0
    """Sync at least this often (seconds), even without changes."""
    full_sync_period: float = 3600.0
    """Rewrite the whole ruleset this often (seconds)."""
    healthz_bind_address: str = "0.0.0.0:10256"
    """/healthz and /livez; empty disables."""
    metrics_bind_address: str = "127.0.0.1:10249"
    """/metrics; empty disables."""
    clean_other_modes: bool = True
    """Remove what another proxy mode left in this network namespace, once this mode's first
    sync is in."""
    watch_idle_timeout: float = 90.0
    """Restart a watch silent this long (seconds): a dead connection or a stuck proxy."""


class SetupError(Exception):
    """A setting this host, container or command line cannot honour; the message says what to do."""


DEFAULTS = Settings()
FILE_MIN_SYNC_PERIOD = 1.0
"""With --source-file, ``min_sync_period`` is also how often the file is checked: once a
second unless told otherwise."""
"""The defaults, for the command line's help and the sync loop's own."""
