"""The iptables proxier: one ``iptables-restore --noflush`` per sync, partial after the first.

A partial sync rewrites the top-level chains (they hold one rule per service, so any service
change touches them) and only the service and endpoint chains of services that changed; a
sync with no change sends nothing at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pyproxy import metrics
from pyproxy.config import ProxyConfig
from pyproxy.ipt.executor import IptablesError, IptExecutor
from pyproxy.ipt.nfacct import NfacctClient, NfacctError
from pyproxy.ipt.restore import TABLES, PayloadError, RestorePayload
from pyproxy.literals import IptablesBackend, Mode
from pyproxy.model.objects import DesiredState, ServicePortName, ServicePortState
from pyproxy.proxier.base import SyncFailed, SyncResult
from pyproxy.render import iptables as render
from pyproxy.render.fragments import IptFragment
from pyproxy.render.naming import IPT_PREFIX

log = logging.getLogger("pyproxy.iptables")

Chains = dict[tuple[str, str], tuple[str, ...]]

MATCH_PROBE = IPT_PREFIX + "NFACCT-CHECK"
"""A nat chain of ours that nothing jumps to, made for a moment to see whether iptables takes
the nfacct match."""


@dataclass(frozen=True)
class KernelCount:
    """A packet count the rules keep in an nfacct object, exported as upstream's metric."""

    name: str
    """The nfacct object (upstream's name)."""
    metric: metrics.KernelCounter
    what: str
    """What it counts, for people."""


LOCALHOST = KernelCount(render.LOCALHOST_NODEPORTS_COUNTER, metrics.LOCALHOST_NODEPORTS_ACCEPTED,
                        "connections to localhost NodePorts")
INVALID = KernelCount(render.INVALID_DROPPED_COUNTER, metrics.INVALID_DROPPED,
                      "forwarded packets dropped as conntrack-INVALID")
COUNTS = (LOCALHOST, INVALID)


class IptProxier:
    """Programs our ``PYPROXY-*`` chains in the filter and nat tables of one backend."""

    mode: Mode = "iptables"

    def __init__(self, *, config: ProxyConfig, executor: IptExecutor,
                 nfacct: NfacctClient | None = None, drop_invalid: bool = False) -> None:
        self.config = config
        self.executor = executor
        self.nfacct = nfacct
        """Where localhost NodePort connections and INVALID drops are counted (None: not)."""
        self.drop_invalid = drop_invalid
        """Forwarded packets conntrack holds INVALID are dropped (see render_base)."""
        self._counting: set[str] = set()
        """The nfacct objects the rules count in: each set on a full sync that could create it."""
        self._match_works = False
        """iptables took the nfacct match once (a kernel keeps its match modules)."""
        self._told: set[str] = set()
        """What was logged about the counter already (each once)."""
        self._applied: dict[ServicePortName, ServicePortState] = {}
        """Inputs of what the kernel holds. Service chains are not kept: a changed service's old
        chains are rendered again to diff against (cheap, and ~100 MB less at 10k services)."""
        self._top_rules: dict[ServicePortName, dict[tuple[str, str], tuple[str, ...]]] = {}
        """Each service's rules in the shared top-level chains."""
        self._shared: Chains = {}
        """Top-level and base chains as last applied."""
        self.needs_full = True

    @property
    def iptables_backend(self) -> IptablesBackend | None:
        return self.executor.backend

    @staticmethod
    def _shared_chains(base: IptFragment,
                       tops: dict[ServicePortName, dict[tuple[str, str], tuple[str, ...]]]) -> Chains:
        """Top-level chains from every service's contributions (in name order) plus the base."""
        top: dict[tuple[str, str], list[str]] = {key: [] for key in render.TOP_CHAINS}
        for name in sorted(tops):
            for key, rules in tops[name].items():
                top[key].extend(rules)
        for key, rules in base.top_rules.items():
            top[key].extend(rules)  # the nodeports rule must come last
        chains: Chains = {key: tuple(rules) for key, rules in top.items()}
        chains.update(base.chains)
        return chains

    def _counts(self, kc: KernelCount, *, everything: bool) -> bool:
        """Whether rules count ``kc``: as the last full sync could make them, or, with
        ``everything``, whenever it is wanted, as on a kernel with nfacct (what ``render`` shows)."""
        return kc.name in self._counting or (everything and kc in self._wanted_counters())

    def _render_service(self, sps: ServicePortState, *, everything: bool = False) -> IptFragment:
        counted = self._counts(LOCALHOST, everything=everything)
        return render.render_service(self.config, sps, localhost_counter=LOCALHOST.name if counted else None)

    def _render_base(self, state: DesiredState, *, everything: bool = False) -> IptFragment:
        counted = self._counts(INVALID, everything=everything)
        return render.render_base(self.config, state, drop_invalid=self.drop_invalid,
                                  invalid_counter=INVALID.name if counted else None)

    def _wanted_counters(self) -> list[KernelCount]:
        wanted = [LOCALHOST] if self.config.localhost_nodeports_active else []
        return wanted + ([INVALID] if self.drop_invalid else [])

    def _prepare_counters(self) -> None:
        """Before a full sync: the nfacct objects the rules count in, each created if missing
        (its count kept), as upstream ensures its nfacct objects on each full sync. Without
        one, its rules go without the match and its metric is not exported; the sync goes on,
        and the next full sync tries again."""
        wanted = self._wanted_counters() if self.nfacct is not None else []
        for kc in COUNTS:
            if kc not in wanted:
                self._count_in(kc, on=False)
        made: list[KernelCount] = []
        for kc in wanted:
            assert self.nfacct is not None
            try:
                self.nfacct.ensure(kc.name)
            except NfacctError as err:
                self._count_in(kc, on=False)
                self._log_once(
                    f"ensure {kc.name}", logging.WARNING,
                    f"cannot create the nfacct object {kc.name} ({err}): {kc.what} are not counted "
                    f"and {kc.metric.name} is not exported. The kernel needs nfnetlink_acct and "
                    "xt_nfacct (CONFIG_NETFILTER_NETLINK_ACCT, CONFIG_NETFILTER_XT_MATCH_NFACCT; "
                    "modprobe nfnetlink_acct xt_nfacct) and pyproxy NET_ADMIN; tried again on each "
                    "full sync")
                continue
            made.append(kc)
        if made and not self._match_works:
            # A kernel can have nfnetlink_acct without the xt_nfacct match: try the match
            # alone, in a chain of ours nothing jumps to (the full sync deletes it), so that
            # a refusal cannot be taken for the ruleset's.
            probe = RestorePayload()
            probe.rewrite[("nat", MATCH_PROBE)] = (f"-m nfacct --nfacct-name {made[0].name}",)
            try:
                self.executor.restore(probe)
            except IptablesError as err:
                for kc in made:
                    self._count_in(kc, on=False)
                self._log_once(
                    "match", logging.WARNING,
                    f"iptables refused the nfacct match (-m nfacct --nfacct-name {made[0].name}: "
                    f"{err}): {' and '.join(kc.what for kc in made)} are not counted and "
                    f"{', '.join(kc.metric.name for kc in made)} not exported. The kernel needs "
                    "xt_nfacct (CONFIG_NETFILTER_XT_MATCH_NFACCT; modprobe xt_nfacct); tried "
                    "again on each full sync")
                return
            self._match_works = True
        for kc in made:
            self._count_in(kc, on=True)
            self._log_once(f"counting {kc.name}", logging.INFO,
                           f"{kc.what} are counted in the nfacct object {kc.name} ({kc.metric.name})")

    def _count_in(self, kc: KernelCount, *, on: bool) -> None:
        """Count ``kc`` from this sync on (or not at all), and export it (or stop). Only a
        proxier that counts touches the metric: the other family's never does."""
        counted = kc.name in self._counting
        if on:
            self._counting.add(kc.name)
            kc.metric.read_with(lambda: self._read_counter(kc.name))
        elif counted:
            self._counting.discard(kc.name)
            kc.metric.read_with(None)

    def _read_counter(self, name: str) -> int | None:
        """The counter's packets, at scrape time; None (not exported) when it cannot be read."""
        client = self.nfacct
        if name not in self._counting or client is None:
            return None
        try:
            counter = client.get(name)
        except NfacctError as err:
            log.debug("cannot read the nfacct object %s: %s", name, err)
            return None
        return counter.packets if counter is not None else None

    def _log_once(self, key: str, level: int, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            log.log(level, "%s", message)

    def render_text(self, state: DesiredState) -> str:
        """The rules a sync writes, on a kernel that has nfacct (the counting rules included:
        nothing is asked of the kernel here)."""
        base = self._render_base(state, everything=True)
        payload = RestorePayload()
        tops = {}
        for name, sps in state.services.items():
            frag = self._render_service(sps, everything=True)
            payload.rewrite.update(frag.chains)
            tops[name] = frag.top_rules
        payload.rewrite.update(self._shared_chains(base, tops))
        try:
            return payload.render()
        except PayloadError as err:
            raise SyncFailed(f"cannot render the ruleset: {err}") from None

    def sync(self, state: DesiredState) -> SyncResult:
        if self.needs_full:
            self._prepare_counters()
        return self._sync(state)

    def _sync(self, state: DesiredState) -> SyncResult:
        t0 = time.perf_counter()
        full = self.needs_full
        base = self._render_base(state)
        payload = RestorePayload()
        new_applied: dict[ServicePortName, ServicePortState] = {}
        tops = {} if full else dict(self._top_rules)
        changed = 0
        for name, sps in state.services.items():
            old = self._applied.get(name)
            new_applied[name] = sps
            if not full and old is not None and (old is sps or old == sps):
                continue
            frag = self._render_service(sps)
            tops[name] = frag.top_rules
            changed += 1
            if full or old is None:
                payload.rewrite.update(frag.chains)
                continue
            old_frag = self._render_service(old)
            for key, rules in frag.chains.items():
                if old_frag.chains.get(key) != rules:
                    payload.rewrite[key] = rules
            payload.delete.update(k for k in old_frag.chains if k not in frag.chains)
        if not full:
            for name, old in self._applied.items():
                if name not in state.services:
                    payload.delete.update(self._render_service(old).chains)
                    tops.pop(name, None)
                    changed += 1
        shared = self._shared_chains(base, tops)
        for key, rules in shared.items():
            if full or self._shared.get(key) != rules:
                payload.rewrite[key] = rules
        if full:
            try:
                existing = {
                    (table, chain)
                    for table in TABLES
                    for chain in self.executor.our_chains(table, IPT_PREFIX)
                }
            except IptablesError as err:
                raise SyncFailed(str(err)) from err
            payload.delete = existing - set(payload.rewrite)
        t1 = time.perf_counter()
        try:
            if full:
                # Our chains must exist before the built-in chains can jump to them.
                self.executor.restore(payload)
                for table, chain, args in render.HOOK_JUMPS:
                    self.executor.ensure_jump(table, chain, args)
            elif payload:
                self.executor.restore(payload)
        except IptablesError as err:
            metrics.IPT_RESTORE_FAILURES.inc()
            if not full:
                metrics.IPT_PARTIAL_RESTORE_FAILURES.inc()
            self.needs_full = True
            kept = self._put_filter_back(payload, full=full)
            raise SyncFailed(f"iptables-restore refused the rules ({kept}): {err}") from err
        t2 = time.perf_counter()
        self._applied = new_applied
        self._top_rules = tops
        self._shared = shared
        self.needs_full = False
        return SyncResult(
            full=full, operations=payload.lines() if payload else 0,
            changed_services=changed, render_seconds=t1 - t0, apply_seconds=t2 - t1,
        )

    def _put_filter_back(self, payload: RestorePayload, *, full: bool) -> str:
        """iptables-restore commits filter before nat: when nat was refused, filter already holds
        the new rules. Every filter chain of ours is a shared chain, so what it held before is
        in ``self._shared``: send that back. (When filter itself was refused, this rewrites it
        with what it still holds: harmless.) Returns what holds now, for the error message."""
        if "filter" not in payload.tables or len(payload.tables) < 2:
            return "previous rules kept"
        if full and not self._shared:
            # The first sync since start: what the kernel held before is not known.
            return "the filter table may hold the new rules until the next full sync"
        undo = RestorePayload()
        for key in payload.rewrite:
            if key[0] != "filter":
                continue
            if key in self._shared:
                undo.rewrite[key] = self._shared[key]
            else:
                undo.delete.add(key)
        for key in payload.delete:
            if key[0] == "filter" and key in self._shared:
                undo.rewrite[key] = self._shared[key]
        try:
            self.executor.restore(undo)
        except IptablesError as err:
            log.error("could not put the filter table back after a refused nat table: %s", err)
            return "the filter table may hold the new rules until the next full sync"
        return "previous rules kept"

    def cleanup(self) -> bool:
        """Remove our jumps and chains from this backend; True if anything was there."""
        found = False
        self.needs_full = True
        self._shared = {}
        self._top_rules = {}
        self._applied = {}
        if not self.executor.holds_chains(IPT_PREFIX):
            return found  # nothing of ours, and so no jump to it either
        for table, chain, args in render.HOOK_JUMPS:
            found |= self.executor.delete_jump(table, chain, args)
        payload = RestorePayload()
        for table in TABLES:
            for chain in self.executor.our_chains(table, IPT_PREFIX):
                payload.delete.add((table, chain))
        if payload:
            found = True
            self.executor.restore(payload)
        return found
