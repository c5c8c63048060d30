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
from pyproxy.ipt.restore import TABLES, RestorePayload
from pyproxy.model.objects import DesiredState, ServicePortName, ServicePortState
from pyproxy.proxier.base import SyncFailed, SyncResult
from pyproxy.render import iptables as render
from pyproxy.render.fragments import IptFragment
from pyproxy.render.naming import IPT_PREFIX

log = logging.getLogger("pyproxy.iptables")

Chains = dict[tuple[str, str], tuple[str, ...]]


class IptProxier:
    """Programs our ``PYPROXY-*`` chains in the filter and nat tables of one backend."""

    mode = "iptables"

    def __init__(self, *, config: ProxyConfig, executor: IptExecutor) -> None:
        self.config = config
        self.executor = executor
        self._applied: dict[ServicePortName, tuple[ServicePortState, IptFragment]] = {}
        self._chains: Chains = {}
        """Every chain of ours as last applied: the in-memory model of the kernel."""
        self.needs_full = True

    def _assemble(
        self, base: IptFragment, frags: dict[ServicePortName, tuple[ServicePortState, IptFragment]]
    ) -> Chains:
        """All chains: top-level ones from every fragment's contributions, in service order."""
        top: dict[tuple[str, str], list[str]] = {key: [] for key in render.TOP_CHAINS}
        chains: Chains = dict(base.chains)
        for name in sorted(frags):
            frag = frags[name][1]
            for key, rules in frag.top_rules.items():
                top[key].extend(rules)
            chains.update(frag.chains)
        for key, rules in base.top_rules.items():
            top[key].extend(rules)  # the nodeports rule must come last
        for key, rules in top.items():
            if key not in chains:
                chains[key] = tuple(rules)
        return chains

    def render_text(self, state: DesiredState) -> str:
        base = render.render_base(self.config, state)
        frags = {n: (s, render.render_service(self.config, s)) for n, s in state.services.items()}
        return RestorePayload(rewrite=self._assemble(base, frags)).render()

    def sync(self, state: DesiredState) -> SyncResult:
        t0 = time.perf_counter()
        full = self.needs_full
        base = render.render_base(self.config, state)
        new_applied: dict[ServicePortName, tuple[ServicePortState, IptFragment]] = {}
        changed_names: set[ServicePortName] = set()
        for name, sps in state.services.items():
            old = self._applied.get(name)
            if not full and old is not None and (old[0] is sps or old[0] == sps):
                new_applied[name] = old
            else:
                new_applied[name] = (sps, render.render_service(self.config, sps))
                changed_names.add(name)
        changed_names.update(n for n in self._applied if n not in state.services)
        chains = self._assemble(base, new_applied)

        payload = RestorePayload()
        if full:
            payload.rewrite = dict(chains)
            try:
                existing = {
                    (table, chain)
                    for table in TABLES
                    for chain in self.executor.our_chains(table, IPT_PREFIX)
                }
            except IptablesError as err:
                raise SyncFailed(str(err)) from err
            payload.delete = existing - set(chains)
        else:
            for key, rules in chains.items():
                if self._chains.get(key) != rules:
                    payload.rewrite[key] = rules
            payload.delete = set(self._chains) - set(chains)
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
            raise SyncFailed(f"iptables-restore refused the rules (previous rules kept): {err}") from err
        t2 = time.perf_counter()
        self._applied = new_applied
        self._chains = chains
        self.needs_full = False
        return SyncResult(
            full=full, operations=payload.lines() if payload else 0,
            changed_services=len(changed_names), render_seconds=t1 - t0, apply_seconds=t2 - t1,
        )

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
        self._chains = {}
        self._applied = {}
        return found
