"""How the daemon connects and paces itself: one dataclass, one home for every default. The
command line's defaults, the sync loop's and the daemon's all come from here."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyproxy.literals import BackendChoice


@dataclass(frozen=True)
class ConntrackSettings:
    """The conntrack sysctls set at start, kube-proxy's ``conntrack`` section. 0 (or False)
    leaves a value as the host has it."""

    max_per_core: int = 32768
    """``nf_conntrack_max`` at least this times the CPUs (capped at 1,048,576), never lowered;
    the hash table is grown to a quarter of it. Both are the host's, writable only from the
    host's network namespace by a privileged process."""
    min: int = 131072
    """The floor of ``nf_conntrack_max`` when ``max_per_core`` × CPUs is below it."""
    tcp_established_timeout: float = 86400.0
    """Seconds an idle established TCP entry lives (the kernel's default is 5 days)."""
    tcp_close_wait_timeout: float = 3600.0
    """Seconds an entry lives in CLOSE_WAIT (the kernel's 60 s cuts off a server that keeps
    sending after the client's FIN)."""
    tcp_be_liberal: bool = False
    """Accept out-of-window TCP packets instead of marking them INVALID."""
    udp_timeout: float = 0.0
    """Seconds an unreplied UDP entry lives (0: the kernel's 30 s)."""
    udp_stream_timeout: float = 0.0
    """Seconds a UDP entry that saw replies lives (0: the kernel's 120 s)."""


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
    conntrack: ConntrackSettings = field(default_factory=ConntrackSettings)
    """The conntrack sysctls set before the first sync (``pyproxy.sysctls``)."""


class SetupError(Exception):
    """A setting this host, container or command line cannot honour; the message says what to do."""


DEFAULTS = Settings()
FILE_MIN_SYNC_PERIOD = 1.0
"""With --source-file, ``min_sync_period`` is also how often the file is checked: once a
second unless told otherwise."""
"""The defaults, for the command line's help and the sync loop's own."""
