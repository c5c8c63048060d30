"""The nftables proxier: one atomic ``nft -f -`` transaction per sync, diffs after the first."""

from __future__ import annotations

import logging
import time

from pyproxy import metrics
from pyproxy.config import ProxyConfig
from pyproxy.model.objects import DesiredState, ServicePortName, ServicePortState
from pyproxy.nft.executor import NftError, NftExecutor
from pyproxy.nft.transaction import Transaction
from pyproxy.proxier.base import SyncFailed, SyncResult
from pyproxy.proxier.nft_diff import NeedsFullSync, Phases, full_transaction
from pyproxy.render import nftables as render
from pyproxy.render.fragments import NftFragment

log = logging.getLogger("pyproxy.nftables")

TABLE_COMMENT = "rules for pyproxy"


class NftProxier:
    """Programs table ``ip pyproxy``; keeps what it applied so later syncs send only diffs."""

    mode = "nftables"
    family = render.TABLE_FAMILY
    table = render.TABLE_NAME

    def __init__(self, *, config: ProxyConfig, executor: NftExecutor) -> None:
        self.config = config
        self.executor = executor
        self._base: NftFragment | None = None
        self._applied: dict[ServicePortName, tuple[ServicePortState, NftFragment]] = {}
        self.needs_full = True

    def render_text(self, state: DesiredState) -> str:
        return full_transaction(
            render.render_full(self.config, state), family=self.family, table=self.table,
            comment=TABLE_COMMENT,
        ).render()

    def sync(self, state: DesiredState) -> SyncResult:
        t0 = time.perf_counter()
        full = self.needs_full
        base = render.render_base(self.config, state)
        new_applied: dict[ServicePortName, tuple[ServicePortState, NftFragment]] = {}
        changed = 0
        phases = Phases()
        if not full:
            try:
                phases.diff(self._base, base)
                for name, sps in state.services.items():
                    old = self._applied.get(name)
                    if old is not None and (old[0] is sps or old[0] == sps):
                        new_applied[name] = old
                        continue
                    frag = render.render_service(self.config, sps)
                    new_applied[name] = (sps, frag)
                    if phases.diff(old[1] if old else None, frag):
                        changed += 1
                for name, (_, frag) in self._applied.items():
                    if name not in state.services:
                        phases.diff(frag, None)
                        changed += 1
            except NeedsFullSync as why:
                log.info("full sync needed: %s", why)
                full = True
        if full:
            new_applied = {
                name: (sps, render.render_service(self.config, sps))
                for name, sps in sorted(state.services.items())
            }
            changed = len(new_applied)
            tx = full_transaction(
                [base, *(frag for _, frag in new_applied.values())],
                family=self.family, table=self.table, comment=TABLE_COMMENT,
            )
        else:
            tx = Transaction(family=self.family, table=self.table)
            phases.write(tx)
        t1 = time.perf_counter()
        if tx.ops:
            try:
                self.executor.run(tx)
            except NftError as err:
                metrics.NFT_SYNC_FAILURES.inc()
                # The kernel kept the old ruleset, but our model may now be wrong about it:
                # rebuild everything next time.
                self.needs_full = True
                raise SyncFailed(f"nft refused the ruleset (previous rules kept): {err}") from err
        t2 = time.perf_counter()
        self._base = base
        self._applied = new_applied
        self.needs_full = False
        return SyncResult(
            full=full, operations=len(tx.ops), changed_services=changed,
            render_seconds=t1 - t0, apply_seconds=t2 - t1,
        )

    def cleanup(self) -> bool:
        """Delete our table; True if it existed."""
        self.needs_full = True
        return self.executor.delete_table(self.family, self.table)
