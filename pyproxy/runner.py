"""The daemon's sync loop: watch the API, batch changes, sync, report health and latency.

Rules: never sync before every cache (Services, EndpointSlices, our Node) has been listed once
(a partial view would delete live services); batch changes for at least ``min_sync_period``
between syncs; sync every ``sync_period`` even without changes (a cheap no-op when the kernel
model matches); rebuild everything every ``full_sync_period`` and after any failure; keep
the rules in place on exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from pyproxy import gcpolicy
from pyproxy.backoff import Backoff
from pyproxy.config import ProxyConfig
from pyproxy.conntrack import ConntrackCleaner
from pyproxy.health import ProxyHealth
from pyproxy.literals import Family
from pyproxy.model.objects import DesiredState
from pyproxy.model.state import StateBuilder
from pyproxy.problems import ProblemLog
from pyproxy.proxier.base import Proxier, SyncFailed, SyncResult, record
from pyproxy.settings import DEFAULTS

log = logging.getLogger("pyproxy.runner")

TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

NETWORK_PROGRAMMING = Histogram(
    "kubeproxy_network_programming_duration_seconds",
    "In Cluster Network Programming Latency in seconds",
    buckets=(0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30)),
)
FINE_PROGRAMMING = Histogram(
    "pyproxy_network_programming_duration_seconds",
    "Like kubeproxy_network_programming_duration_seconds, with buckets fine enough for p99 under 1s",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30),
)
LAST_QUEUED = Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                    "The last time a sync of proxy rules was queued")
ENDPOINT_CHANGES_TOTAL = Counter("kubeproxy_sync_proxy_rules_endpoint_changes_total",
                                 "Cumulative proxy rules Endpoint changes")
SERVICE_CHANGES_TOTAL = Counter("kubeproxy_sync_proxy_rules_service_changes_total",
                                "Cumulative proxy rules Service changes")
ENDPOINT_CHANGES = Gauge("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes")
SYNC_ERRORS = Counter("pyproxy_sync_errors_total",
                      "Syncs that failed, by reason: refused (the kernel said no) or the exception "
                      "that ended the attempt; each is retried with a full sync after a backoff",
                      ["reason"])
MAX_PENDING_TRIGGERS = 100_000
"""Change times kept for the latency histogram while syncs fail (a bound on memory)."""
SERVICE_CHANGES = Gauge("kubeproxy_sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes")


@dataclass
class Periods:
    """Timing of the sync loop (seconds)."""

    min_sync: float = DEFAULTS.min_sync_period
    """At least this long between two syncs; changes arriving meanwhile are batched."""
    sync: float = DEFAULTS.sync_period
    """Sync at least this often, changed or not (kube-proxy's --sync-period)."""
    full_sync: float = DEFAULTS.full_sync_period
    """Rewrite everything this often, healing any drift in the kernel."""


def _deleting(node: dict[str, Any]) -> bool:
    """Our Node is being deleted (kube-proxy's /healthz then fails, so load balancers drain it)."""
    meta = node.get("metadata")
    return isinstance(meta, dict) and bool(meta.get("deletionTimestamp"))


def _parse_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


class SyncRunner:
    """Owns the store and the proxier; reflectors feed it, the loop syncs."""

    def __init__(self, *, proxier: Proxier, config: ProxyConfig, periods: Periods,
                 health: ProxyHealth, interface_ips: tuple[str, ...] = (),
                 read_interface_ips: Callable[[], tuple[str, ...]] | None = None,
                 clean_conntrack: bool = False,
                 on_synced: Callable[[DesiredState], Awaitable[None]] | None = None,
                 problems: ProblemLog | None = None) -> None:
        self.proxier = proxier
        self.config = config
        self.periods = periods
        self.health = health
        self.builder = StateBuilder(node_name=config.hostname, family=config.family)
        self.interface_ips = interface_ips
        self.read_interface_ips = read_interface_ips
        """Re-reads the node's addresses before each sync that uses them (NodePorts follow an
        address added after start-up within one sync period); None keeps ``interface_ips`` fixed."""
        self.cleaner: ConntrackCleaner | None = ConntrackCleaner(
            family=config.family, localhost_nodeports=config.localhost_nodeports_active) if clean_conntrack else None
        self._wake = asyncio.Event()
        self._pending_triggers: list[float] = []
        self._pending = {"Service": 0, "EndpointSlice": 0}
        self.syncs = 0
        self.on_synced = on_synced
        """Called after each successful sync (the health check node ports follow it)."""
        self.problems = problems if problems is not None else ProblemLog()
        """Shared by the families' runners: each invalid object is logged and counted once."""

    # -- fed by reflectors --------------------------------------------------------------
    def on_replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        with gcpolicy.paused(settle=True):  # a relist or a file: thousands of objects parsed at once
            changed = self.builder.replace(kind, objects)
        if kind == "Node":
            ours = [o for o in objects if self.builder.is_ours(o)]
            self.health.node_deleting = bool(ours) and _deleting(ours[0])
        self._changed(kind, count=changed)

    def on_event(self, event: str, kind: str, obj: dict[str, Any]) -> None:
        if event == "DELETED":
            self.builder.delete_object(obj)
        else:
            self.builder.upsert(obj)
            if kind == "Node" and self.builder.is_ours(obj):
                self.health.node_deleting = _deleting(obj)
        if kind == "EndpointSlice":
            trig = ((obj.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_ANNOTATION)
            ts = _parse_time(trig) if isinstance(trig, str) else None
            if ts is not None and len(self._pending_triggers) < MAX_PENDING_TRIGGERS:
                self._pending_triggers.append(ts)
        self._changed(kind)

    def _changed(self, kind: str, *, count: int = 1) -> None:
        """``count`` changes of ``kind`` arrived (a watch event is one; a relist or a changed
        file counts the objects it added, changed or deleted, as upstream counts each)."""
        if kind in self._pending:
            self._pending[kind] += count
            (ENDPOINT_CHANGES_TOTAL if kind == "EndpointSlice" else SERVICE_CHANGES_TOTAL).inc(count)
            (ENDPOINT_CHANGES if kind == "EndpointSlice" else SERVICE_CHANGES).set(self._pending[kind])
        self.health.queued()
        LAST_QUEUED.set(time.time())
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------
    def _state(self) -> DesiredState:
        with gcpolicy.paused():
            return self.builder.build_for_node(cidrs=self.config.nodeport_addresses,
                                               interfaces=lambda: self.interface_ips)

    def _sync_and_clean(self, state: DesiredState) -> SyncResult:
        """In a worker thread: sync, then drop UDP conntrack entries the new rules orphaned."""
        with gcpolicy.paused():
            result = self.proxier.sync(state)
            if result.full:  # before the collector is back, so it never walks the new state
                gcpolicy.settle()
        if self.cleaner is not None:
            self.cleaner.after_sync(state)
        return result

    async def _pass(self) -> tuple[DesiredState, SyncResult]:
        """One pass of the loop: the node's addresses (when NodePorts depend on them), the
        desired state, its problems reported, the sync and the conntrack cleanup."""
        if self.read_interface_ips is not None and \
                self.builder.needs_interfaces(self.config.nodeport_addresses):
            # In a thread: pyroute2's synchronous API runs an event loop of its own.
            # Only when the Node object does not settle the NodePort addresses.
            self.interface_ips = await asyncio.to_thread(self.read_interface_ips)
        state = self._state()
        self.problems.report(self.config.family, state.problems)
        return state, await asyncio.to_thread(self._sync_and_clean, state)

    async def sync_once(self, *, attempts: int) -> bool:
        """``run --once``: one pass of the loop; when the kernel refuses the ruleset, wait with
        the loop's backoff and try again (a full sync), ``attempts`` times at most."""
        backoff = Backoff(initial=1.0, maximum=30.0)
        for attempt in range(1, attempts + 1):
            try:
                _, result = await self._pass()
            except SyncFailed as err:
                log.error("sync failed (attempt %d of %d): %s", attempt, attempts, err)
                if attempt < attempts:  # the proxier makes its next sync a full one
                    await asyncio.sleep(backoff.next())
                continue
            record(result)
            return True
        return False

    async def run(self, caches_synced: asyncio.Future[Any] | asyncio.Task[Any]) -> None:
        """Sync forever, starting once ``caches_synced`` is done."""
        await caches_synced
        log.info("caches synced; first sync")
        last_sync = 0.0
        last_full = time.monotonic()
        backoff = Backoff(initial=1.0, maximum=30.0)
        while True:
            now = time.monotonic()
            wait = max(0.0, last_sync + self.periods.min_sync - now)
            if wait:
                await asyncio.sleep(wait)
            self._wake.clear()
            if time.monotonic() - last_full >= self.periods.full_sync:
                self.proxier.needs_full = True
                last_full = time.monotonic()
            triggers, self._pending_triggers = self._pending_triggers, []
            pending, self._pending = self._pending, {"Service": 0, "EndpointSlice": 0}
            ENDPOINT_CHANGES.set(0)
            SERVICE_CHANGES.set(0)
            last_sync = time.monotonic()
            # Changes that arrive while the sync runs queue themselves anew.
            queued_at, self.health.last_queued = self.health.last_queued, 0.0
            try:
                state, result = await self._pass()
            except Exception as err:  # noqa: BLE001 - nothing may end the loop: see below
                # SyncFailed is the kernel refusing the ruleset. Anything else (a command that
                # could not start, a netlink error, a bug) must not end the daemon either: the
                # rules in the kernel keep working, and /healthz reports the change that is not
                # applied. Either way the next attempt rebuilds everything.
                SYNC_ERRORS.labels(reason="refused" if isinstance(err, SyncFailed) else type(err).__name__).inc()
                if not isinstance(err, SyncFailed):
                    log.error("sync raised %s", type(err).__name__, exc_info=err)
                    self.proxier.needs_full = True
                # Still not applied: pending since the oldest change (or now, for a full resync).
                earlier = [t for t in (queued_at, self.health.last_queued) if t]
                self.health.last_queued = min(earlier) if earlier else time.time()
                # Bounded: while syncs keep failing, events keep coming.
                self._pending_triggers = (triggers + self._pending_triggers)[:MAX_PENDING_TRIGGERS]
                for k, v in pending.items():
                    self._pending[k] += v
                delay = backoff.next()
                log.error("sync failed; full resync in %.1fs: %s", delay, err)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
                continue
            backoff.reset()
            self.syncs += 1
            if result.operations or result.full or queued_at:
                record(result)  # a sync with something to do (a quiet periodic one is not logged)
            done = time.time()
            self.health.last_updated = done
            # Only now is the change in the kernel: that is what the latency metric measures.
            for ts in triggers:
                if ts <= done:
                    NETWORK_PROGRAMMING.observe(done - ts)
                    FINE_PROGRAMMING.observe(done - ts)
            if result.full:
                last_full = time.monotonic()
            if self.on_synced is not None:
                try:
                    await self.on_synced(state)
                except Exception:  # noqa: BLE001 - a listener problem must not stop syncing
                    log.exception("after-sync hook failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.periods.sync)
            except asyncio.TimeoutError:
                pass



def families_of(kind: str, obj: dict[str, Any], families: Sequence[Family]) -> list[Family]:
    """The IP families whose runner gets ``obj``. An EndpointSlice holds one family's addresses
    (its immutable ``addressType``): it goes to that family's runner alone, as upstream's
    metaproxier routes it. The other runner would only skip it, and counting it there too made
    one IPv4 slice change add 2 to kubeproxy_sync_proxy_rules_endpoint_changes_total on a
    dual-stack node. Everything else, and slices without a valid addressType (each runner
    reports those as invalid, once, through the shared problem log), goes to every family."""
    if kind == "EndpointSlice":
        address_type = obj.get("addressType")
        fam: Family | None = 4 if address_type == "IPv4" else 6 if address_type == "IPv6" else None
        if fam is not None and fam in families:
            return [fam]
    return list(families)


class FamilyRunners:
    """The sync loops of a node's IP families, fed by one source (reflectors or a file): each
    object goes to the families that take it."""

    def __init__(self, runners: list[SyncRunner]) -> None:
        self.runners = runners
        self.families = [r.config.family for r in runners]

    def on_replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        for fam, r in zip(self.families, self.runners):
            r.on_replace(kind, [o for o in objects if fam in families_of(kind, o, self.families)])

    def on_event(self, event: str, kind: str, obj: dict[str, Any]) -> None:
        for fam, r in zip(self.families, self.runners):
            if fam in families_of(kind, obj, self.families):
                r.on_event(event, kind, obj)
