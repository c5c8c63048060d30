"""What every proxier shares: the sync result and the sync entry point."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from pyproxy import metrics
from pyproxy.literals import IptablesBackend, Mode
from pyproxy.model.objects import DesiredState

log = logging.getLogger("pyproxy.proxier")


@dataclass(frozen=True)
class SyncResult:
    """What one sync did, for logs, metrics, the benchmark and tests."""

    full: bool
    """True for a full sync (startup, after a failure): the whole ruleset was rewritten."""
    operations: int
    """nft commands or iptables-restore lines sent; 0 when nothing changed."""
    changed_services: int
    """Service ports whose rules were rewritten."""
    render_seconds: float
    apply_seconds: float


class SyncFailed(RuntimeError):
    """The kernel refused the ruleset; the previous one is still in place."""


class Proxier(Protocol):
    mode: Mode
    needs_full: bool
    """The next sync rewrites everything (set by the proxier after a failure, and by the sync
    loop for its periodic full sync)."""

    @property
    def iptables_backend(self) -> IptablesBackend | None:
        """The iptables backend this proxier programs (nft or legacy); None in other modes.
        Cleaning another mode's leftovers must spare it."""

    def sync(self, state: DesiredState) -> SyncResult:
        """Make the kernel match ``state``; raise SyncFailed and force a full next sync on error."""

    def render_text(self, state: DesiredState) -> str:
        """The full ruleset as the executor would receive it, changing nothing."""


def record(result: SyncResult) -> None:
    total = result.render_seconds + result.apply_seconds
    metrics.SYNC_DURATION.observe(total)
    (metrics.SYNC_FULL_DURATION if result.full else metrics.SYNC_PARTIAL_DURATION).observe(total)
    metrics.LAST_SYNC.set(time.time())
    metrics.SYNC_OPERATIONS.observe(result.operations)
    log.info(
        "synced %s: %d operations, %d service ports changed, render %.3fs, apply %.3fs",
        "full" if result.full else "partial",
        result.operations,
        result.changed_services,
        result.render_seconds,
        result.apply_seconds,
    )
