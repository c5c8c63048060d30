"""The iptables proxier: one ``iptables-restore --noflush`` per sync, partial after the first.

A partial sync rewrites the top-level chains (they hold one rule per service, so any service
change touches them) and only the service and endpoint chains of services that changed; a
sync with no change sends nothing at all.
"""

from __future__ import annotations

import logging
import time

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


class IptProxier:
    """Programs our ``PYPROXY-*`` chains in the filter and nat tables of one backend."""

    mode: Mode = "iptables"

    def __init__(self, *, config: ProxyConfig, executor: IptExecutor,
                 nfacct: NfacctClient | None = None) -> None:
        self.config = config
        self.executor = executor
        self.nfacct = nfacct
        """Where localhost NodePort connections are counted (None: not counted)."""
        self._counter: str | None = None
        """The nfacct object the rules count in: set on a full sync that could create it."""
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

    def _render_service(self, sps: ServicePortState, *, counter: str | None = None) -> IptFragment:
        """``counter``: the nfacct object to count localhost NodePort connections in; by
        default the one the last full sync could use (None: no counting rule)."""
        return render.render_service(self.config, sps, localhost_counter=counter or self._counter)

    def _prepare_counter(self) -> None:
        """Before a full sync: the localhost NodePort counter, created if missing (its count
        kept), as upstream ensures its nfacct objects on each full sync. Without it the rules
        go without the match and the metric is not exported; the sync goes on, and the next
        full sync tries again."""
        if self.nfacct is None or not self.config.localhost_nodeports_active:
            self._count_in(None)
            return
        name = render.LOCALHOST_NODEPORTS_COUNTER
        try:
            self.nfacct.ensure(name)
        except NfacctError as err:
            self._count_in(None)
            self._log_once(
                "ensure", logging.WARNING,
                f"cannot create the nfacct object {name} ({err}): connections to localhost "
                "NodePorts are not counted and kubeproxy_iptables_localhost_nodeports_accepted_"
                "packets_total is not exported. The kernel needs nfnetlink_acct and xt_nfacct "
                "(CONFIG_NETFILTER_NETLINK_ACCT, CONFIG_NETFILTER_XT_MATCH_NFACCT; modprobe "
                "nfnetlink_acct xt_nfacct) and pyproxy NET_ADMIN; tried again on each full sync")
            return
        if not self._match_works:
            # A kernel can have nfnetlink_acct without the xt_nfacct match: try the match
            # alone, in a chain of ours nothing jumps to (the full sync deletes it), so that
            # a refusal cannot be taken for the ruleset's.
            probe = RestorePayload()
            probe.rewrite[("nat", MATCH_PROBE)] = (f"-m nfacct --nfacct-name {name}",)
            try:
                self.executor.restore(probe)
            except IptablesError as err:
                self._count_in(None)
                self._log_once(
                    "match", logging.WARNING,
                    f"iptables refused the nfacct match (-m nfacct --nfacct-name {name}: {err}): "
                    "connections to localhost NodePorts are not counted and kubeproxy_iptables_"
                    "localhost_nodeports_accepted_packets_total is not exported. The kernel needs "
                    "xt_nfacct (CONFIG_NETFILTER_XT_MATCH_NFACCT; modprobe xt_nfacct); tried "
                    "again on each full sync")
                return
            self._match_works = True
        self._count_in(name)
        self._log_once("counting", logging.INFO,
                       f"connections to localhost NodePorts are counted in the nfacct object "
                       f"{name} (kubeproxy_iptables_localhost_nodeports_accepted_packets_total)")

    def _count_in(self, name: str | None) -> None:
        """Count in ``name`` from this sync on (None: not at all), and export it. Only the
        proxier that counts touches the metric: the other family's never does."""
        counted, self._counter = self._counter, name
        if name:
            metrics.LOCALHOST_NODEPORTS_ACCEPTED.read_with(self._read_counter)
        elif counted:
            metrics.LOCALHOST_NODEPORTS_ACCEPTED.read_with(None)

    def _read_counter(self) -> int | None:
        """The counter's packets, at scrape time; None (not exported) when it cannot be read."""
        name, client = self._counter, self.nfacct
        if name is None or client is None:
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
        """The rules a sync writes, on a kernel that has nfacct (the counting rule included
        when localhost NodePorts are on: nothing is asked of the kernel here)."""
        counter = render.LOCALHOST_NODEPORTS_COUNTER if self.config.localhost_nodeports_active else None
        base = render.render_base(self.config, state)
        payload = RestorePayload()
        tops = {}
        for name, sps in state.services.items():
            frag = self._render_service(sps, counter=counter)
            payload.rewrite.update(frag.chains)
            tops[name] = frag.top_rules
        payload.rewrite.update(self._shared_chains(base, tops))
        try:
            return payload.render()
        except PayloadError as err:
            raise SyncFailed(f"cannot render the ruleset: {err}") from None

    def sync(self, state: DesiredState) -> SyncResult:
        if self.needs_full:
            self._prepare_counter()
        return self._sync(state)

    def _sync(self, state: DesiredState) -> SyncResult:
        t0 = time.perf_counter()
        full = self.needs_full
        base = render.render_base(self.config, state)
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
        for table, chain, args in render.HOOK_JUMPS:
            found |= self.executor.delete_jump(table, chain, args)
        payload = RestorePayload()
        for table in TABLES:
            for chain in self.executor.our_chains(table, IPT_PREFIX):
                payload.delete.add((table, chain))
        if payload:
            found = True
            self.executor.restore(payload)
        self.needs_full = True
        self._shared = {}
        self._top_rules = {}
        self._applied = {}
        return found
