"""The nftables proxier: one atomic ``nft -f -`` transaction per sync, diffs after the first."""

from __future__ import annotations

import logging
import time

from pyproxy import metrics
from pyproxy.config import ProxyConfig
from pyproxy.literals import IptablesBackend, Mode
from pyproxy.model.objects import DesiredState, ServicePortName, ServicePortState
from pyproxy.nft.executor import NftError, NftExecutor
from pyproxy.nft.transaction import Transaction
from pyproxy.proxier.base import SyncFailed, SyncResult
from pyproxy.proxier.nft_diff import NeedsFullSync, Phases, full_transaction
from pyproxy.render import nftables as render
from pyproxy.render.fragments import NftFragment

log = logging.getLogger("pyproxy.nftables")

TABLE_COMMENT = "rules for pyproxy"
ELEMENT = "element"
"""Garbage kind of a shared set's element (``"set { key }"``) no service port holds any more."""


class NftProxier:
    """Programs table ``ip pyproxy``; keeps what it applied so later syncs send only diffs."""

    mode: Mode = "nftables"
    table = render.TABLE_NAME

    iptables_backend: IptablesBackend | None = None

    def __init__(self, *, config: ProxyConfig, executor: NftExecutor, gc_period: float = 60.0) -> None:
        self.config = config
        self.family = render.table_family(config.family)
        """``ip`` or ``ip6``: each family has a table of its own (dual-stack runs two proxiers)."""
        self.set_specs = render.sets_for(config.family)
        self.executor = executor
        self.gc_period = gc_period
        """Flushed chains and unused sets are deleted in the next sync that deletes anything
        anyway, or once the oldest has waited this long (seconds; 0: at once)."""
        self._garbage: dict[str, tuple[str, float]] = {}
        """Name → ("chain" or a set spec, when it became garbage): in the kernel, unused."""
        self._base: NftFragment | None = None
        self._refs: dict[tuple[str, str], int] = {}
        """How many service ports hold each element of a shared set (render.SHARED_SETS)."""
        self._applied: dict[ServicePortName, ServicePortState] = {}
        """What the kernel holds, as the inputs that rendered it. Fragments are not kept: the
        old fragment of a changed service is rendered again (cheap) to diff against, which keeps
        ~65 MB less in memory at 10k services."""
        self.needs_full = True

    def render_text(self, state: DesiredState) -> str:
        tx = self._full_transaction(self._render_base(state), state, self._phases(full=True))
        if tx.error:
            # The script would stop where the bad operation was left out: never print half.
            raise SyncFailed(f"cannot render the ruleset: {tx.error}")
        return tx.render()

    def _phases(self, *, full: bool) -> Phases:
        """A diff that counts shared elements from nothing (a full sync) or from the kernel's."""
        return Phases(shared_sets=render.SHARED_SETS, refs={} if full else self._refs)

    def _full_transaction(self, base: NftFragment, state: DesiredState, phases: Phases) -> Transaction:
        """The whole table: the base fragment, then every service port in name order."""
        return full_transaction(
            [base, *(self._render_service(state.services[k]) for k in sorted(state.services))],
            family=self.family, table=self.table, comment=TABLE_COMMENT, set_specs=self.set_specs,
            phases=phases,
        )

    def sync(self, state: DesiredState) -> SyncResult:
        t0 = time.perf_counter()
        full = self.needs_full
        base = self._render_base(state)
        new_applied: dict[ServicePortName, ServicePortState] = {}
        changed = 0
        phases = self._phases(full=False)
        if not full:
            try:
                phases.diff(self._base, base)
                for name, sps in state.services.items():
                    old = self._applied.get(name)
                    new_applied[name] = sps
                    if old is not None and (old is sps or old == sps):
                        continue
                    old_frag = self._render_service(old) if old is not None else None
                    if phases.diff(old_frag, self._render_service(sps)):
                        changed += 1
                for name, old in self._applied.items():
                    if name not in state.services:
                        phases.diff(self._render_service(old), None)
                        changed += 1
                for set_name, spec in phases.declare_sets.items():
                    waiting = self._garbage.get(set_name)
                    if waiting is not None and waiting[0] != spec:
                        # "add set" keeps an existing set as it is: a set waiting for deletion
                        # cannot come back with another timeout in place.
                        raise NeedsFullSync(f"set {set_name} returns with another type or timeout")
            except NeedsFullSync as why:
                log.info("full sync needed: %s", why)
                full = True
        if full:
            new_applied = dict(state.services)
            changed = len(new_applied)
            phases = self._phases(full=True)
            tx = self._full_transaction(base, state, phases)
            garbage: dict[str, tuple[str, float]] = {}
        else:
            tx = Transaction(family=self.family, table=self.table, set_specs=self.set_specs)
            phases.write(tx)
            garbage = self._collect(phases, tx)
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
        self._refs = phases.counted()
        self._applied = new_applied
        self._garbage = garbage
        self.needs_full = False
        return SyncResult(
            full=full, operations=len(tx.ops), changed_services=changed,
            render_seconds=t1 - t0, apply_seconds=t2 - t1,
        )

    def _render_base(self, state: DesiredState) -> NftFragment:
        """The fixed chains and maps (the userspace mode adds its relay guard)."""
        return render.render_base(self.config, state)

    def _render_service(self, sps: ServicePortState) -> NftFragment:
        """One service port's fragment (the userspace mode renders redirects instead)."""
        return render.render_service(self.config, sps)

    def _collect(self, phases: Phases, tx: Transaction) -> dict[str, tuple[str, float]]:
        """Update the garbage list and, when due, append its deletion to ``tx``; return the
        garbage that remains in the kernel once ``tx`` is applied."""
        now = time.monotonic()
        garbage = dict(self._garbage)
        for name in phases.gone_chains:
            garbage.setdefault(name, ("chain", now))
        for name, spec in phases.gone_sets.items():
            garbage.setdefault(name, (spec, now))
        for set_name, key in phases.gone_shared:
            garbage.setdefault(f"{set_name} {{ {key} }}", (ELEMENT, now))
        # Wanted again (an endpoint came back): it is live, not garbage.
        for name, _ in phases.declare_chains:
            garbage.pop(name, None)
        for name in phases.declare_sets:
            garbage.pop(name, None)
        for set_name, key, _ in phases.add_elements:
            if set_name in phases.shared_sets:
                garbage.pop(f"{set_name} {{ {key} }}", None)
        if not garbage:
            return garbage
        oldest = min(t for _, t in garbage.values())
        if tx.has_deletes or now - oldest >= self.gc_period:
            for name, (kind, _) in garbage.items():
                if kind == ELEMENT:
                    set_name, _, key = name.partition(" { ")
                    tx.delete_element(set_name, key.removesuffix(" }"))
            chains = [n for n, (kind, _) in garbage.items() if kind == "chain"]
            for name in chains:
                tx.delete_chain(name)
            for name, (spec, _) in garbage.items():
                if spec not in ("chain", ELEMENT):
                    tx.delete_set(name, spec)
            return {}
        return garbage

    @property
    def garbage(self) -> list[str]:
        """Flushed chains, unused sets and unheld shared elements still in the kernel, awaiting
        deletion."""
        return sorted(self._garbage)

    def cleanup(self) -> bool:
        """Delete our table; True if it existed."""
        self.needs_full = True
        return self.executor.delete_table(self.family, self.table)
