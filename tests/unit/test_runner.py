"""SyncRunner: waits for the caches, batches changes, syncs periodically, retries failures and
measures network programming latency; against NftProxier + FakeNft (no kernel, no root).

Each test runs its own event loop with ``asyncio.run`` and cancels the loop task at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY

import pyproxy.backoff as backoff_mod
from pyproxy import runner as runner_mod
from pyproxy.config import ProxyConfig
from pyproxy.health import ProxyHealth
from pyproxy.nft.executor import FakeNft
from pyproxy.proxier.base import SyncResult
from pyproxy.proxier.nftables import NftProxier
from pyproxy.runner import TRIGGER_ANNOTATION, Periods, SyncRunner
from pyproxy.sources.kube import ENDPOINT_SLICES, SERVICES, Reflector, node_resource, wait_synced
from tests import scenario as sc
from tests.unit.helpers import fake_dnat_targets
from tests.unit.test_reflector import (
    GONE_EVENT,
    NODE_PATH,
    SLICE_PATH,
    SVC_PATH,
    FakeApi,
    Reply,
    ev,
    page,
    until,
)

CFG = ProxyConfig(hostname="node-1")
TCP = [sc.port(8080, name="http")]
FAST = Periods(min_sync=0.01, sync=0.2)


def web_service(name: str = "web", ip: str = "10.96.0.10") -> dict[str, Any]:
    return sc.service(name, ip, [sc.port(80, name="http")])


def web_slice(ips: list[str], name: str = "web", trigger: str | None = None) -> dict[str, Any]:
    obj = sc.endpoint_slice(name, ips, TCP)
    if trigger is not None:
        obj["metadata"]["annotations"] = {TRIGGER_ANNOTATION: trigger}
    return obj


NODE = sc.node("node-1", ["192.168.1.1"])


class Rig:
    """A SyncRunner over NftProxier + FakeNft, with every proxier sync recorded."""

    def __init__(self, periods: Periods = FAST, *, timeout: float = 60.0) -> None:
        self.fake = FakeNft()
        self.proxier = NftProxier(config=CFG, executor=self.fake)
        self.health = ProxyHealth(timeout=timeout)
        self.runner = SyncRunner(proxier=self.proxier, config=CFG, periods=periods, health=self.health)
        self.calls: list[float] = []
        """monotonic time of every proxier.sync call, failed ones included."""
        self.results: list[SyncResult] = []
        self.failures = 0
        inner = self.proxier.sync

        def sync(state: Any) -> SyncResult:
            self.calls.append(time.monotonic())
            try:
                result = inner(state)
            except Exception:
                self.failures += 1
                raise
            self.results.append(result)
            return result

        self.proxier.sync = sync  # type: ignore[method-assign]

    def feed_all(self, ips: list[str] | None = None) -> None:
        self.runner.on_replace("Service", [web_service()])
        self.runner.on_replace("EndpointSlice", [web_slice(ips or ["10.244.1.5"])])
        self.runner.on_replace("Node", [NODE])

    async def start(self, synced: bool = True) -> tuple[asyncio.Task[None], asyncio.Future[None]]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if synced:
            fut.set_result(None)
        return asyncio.create_task(self.runner.run(fut)), fut

    # what the fake kernel holds
    def table(self) -> Any:
        return self.fake.tables.get(("ip", "pyproxy"))

    def service_ips(self) -> set[str]:
        """ClusterIP ports programmed: with endpoints (service-ips) or without (rejected)."""
        t = self.table()
        if t is None:
            return set()
        return set(t.elements.get("service-ips", {})) | set(t.elements.get("no-endpoint-services", {}))

    def dnat_targets(self) -> set[str]:
        t = self.table()
        if t is None:
            return set()
        return fake_dnat_targets(t)


async def stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run(main: Any, timeout: float = 5.0) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout))


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def rfc3339(ts: datetime) -> str:
    """As the EndpointSlice controller writes it: seconds, UTC, ``Z``."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- first sync -----------------------------------------------------------------------------------

def test_no_sync_before_caches_synced_then_exactly_one_full_sync() -> None:
    async def main() -> None:
        rig = Rig()
        task, synced = await rig.start(synced=False)
        rig.feed_all()
        await asyncio.sleep(0.3)  # longer than min_sync and sync: still nothing
        assert rig.runner.syncs == 0
        assert rig.calls == []
        assert rig.fake.transactions == []
        assert rig.health.last_queued > 0 and rig.health.last_updated == 0

        synced.set_result(None)
        await until(lambda: rig.runner.syncs == 1, "the first sync")
        await asyncio.sleep(0.05)
        assert rig.runner.syncs == 1 and len(rig.calls) == 1
        assert rig.results[0].full
        assert rig.service_ips() == {"10.96.0.10 . tcp . 80"}
        assert rig.dnat_targets() == {"10.244.1.5:8080"}
        assert rig.table().elements["nodeport-ips"] == {"192.168.1.1": ""}  # from our Node object
        assert rig.health.last_updated > 0
        assert rig.health.last_queued == 0
        assert rig.health.healthy()
        await stop(task)

    run(main)


def test_pending_change_gauges_count_until_the_sync() -> None:
    async def main() -> None:
        rig = Rig()
        total_before = sample("kubeproxy_sync_proxy_rules_endpoint_changes_total")
        task, synced = await rig.start(synced=False)
        rig.runner.on_replace("Service", [web_service()])
        for i in range(3):
            rig.runner.on_event("MODIFIED", "EndpointSlice", web_slice([f"10.244.1.{i + 1}"]))
        rig.runner.on_replace("Node", [NODE])
        assert sample("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 3
        assert sample("kubeproxy_sync_proxy_rules_service_changes_pending") == 1
        assert sample("kubeproxy_sync_proxy_rules_endpoint_changes_total") == total_before + 3
        queued = sample("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds")
        assert abs(queued - time.time()) < 5
        synced.set_result(None)
        await until(lambda: rig.runner.syncs == 1, "the first sync")
        assert sample("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
        assert sample("kubeproxy_sync_proxy_rules_service_changes_pending") == 0
        await stop(task)

    run(main)


# -- batching and periods -------------------------------------------------------------------------

def test_a_burst_of_events_within_min_sync_makes_few_syncs() -> None:
    async def main() -> None:
        rig = Rig(Periods(min_sync=0.25, sync=10.0))
        rig.feed_all()
        task, _ = await rig.start()
        await until(lambda: rig.runner.syncs == 1, "the first sync")
        for i in range(20):  # ~20-40 ms in all: well within one min_sync
            rig.runner.on_event("MODIFIED", "EndpointSlice", web_slice([f"10.244.2.{i + 1}"]))
            await asyncio.sleep(0.001)
        await until(lambda: rig.dnat_targets() == {"10.244.2.20:8080"}, "the last endpoint")
        await asyncio.sleep(0.3)  # room for any straggler sync
        syncs = rig.runner.syncs - 1
        assert 1 <= syncs <= 2, syncs
        assert len(rig.calls) == rig.runner.syncs
        gaps = [b - a for a, b in zip(rig.calls, rig.calls[1:])]
        assert all(g >= 0.25 * 0.95 for g in gaps), gaps  # never closer than min_sync
        assert rig.health.last_queued == 0
        await stop(task)

    run(main)


def test_periodic_sync_without_changes_is_a_cheap_no_op() -> None:
    async def main() -> None:
        rig = Rig(FAST)
        rig.feed_all()
        task, _ = await rig.start()
        await until(lambda: rig.runner.syncs == 1, "the first sync")
        first_update = rig.health.last_updated
        transactions = len(rig.fake.transactions)
        await asyncio.sleep(0.75)  # sync=0.2: about three periodic syncs
        assert 2 <= rig.runner.syncs - 1 <= 5, rig.runner.syncs
        assert len(rig.fake.transactions) == transactions  # nothing sent to the kernel
        assert all(r.operations == 0 and not r.full for r in rig.results[1:])
        assert rig.health.last_updated > first_update
        await stop(task)

    run(main)


def test_full_sync_period_forces_a_full_rewrite() -> None:
    async def main() -> None:
        rig = Rig(Periods(min_sync=0.01, sync=0.05, full_sync=0.3))
        rig.feed_all()
        task, _ = await rig.start()
        await until(lambda: sum(r.full for r in rig.results) >= 2, "a second full sync", timeout=2)
        await stop(task)
        assert rig.results[0].full
        assert not all(r.full for r in rig.results)  # partial syncs in between
        later_full = next(i for i, r in enumerate(rig.results) if i and r.full)
        assert rig.calls[later_full] - rig.calls[0] >= 0.3 * 0.95
        assert rig.service_ips() == {"10.96.0.10 . tcp . 80"}

    run(main)


def test_a_full_sync_moves_the_state_out_of_the_collectors_sight_a_small_one_does_not() -> None:
    """gcpolicy: the model a full sync leaves is frozen (later full collections skip it); an
    incremental sync freezes nothing."""
    import gc

    async def main() -> None:
        gc.unfreeze()
        rig = Rig(Periods(min_sync=0.01, sync=60, full_sync=3600))
        rig.feed_all()
        task, _ = await rig.start()
        await until(lambda: len(rig.results) >= 1, "the first sync", timeout=2)
        frozen = gc.get_freeze_count()
        assert rig.results[0].full and frozen > 0
        # the state the sync built is frozen: no generation the collector walks holds it
        applied = rig.proxier._applied
        assert gc.is_tracked(applied) and not any(o is applied for o in gc.get_objects())
        gc.unfreeze()
        rig.runner.on_event("MODIFIED", "EndpointSlice", web_slice(["10.244.1.6"]))
        await until(lambda: len(rig.results) >= 2, "the second sync", timeout=2)
        await stop(task)
        assert not rig.results[1].full and rig.dnat_targets() == {"10.244.1.6:8080"}
        assert gc.get_freeze_count() == 0

    try:
        run(main)
    finally:
        gc.unfreeze()


def test_relists_and_syncs_run_with_the_collector_paused_and_it_is_back_after() -> None:
    """gcpolicy.paused: the bulk steps (a relist parsed, a sync) run without the cyclic
    collector; between them, and once the runner stops, it is on again."""
    import gc

    seen: list[bool] = []

    async def main() -> None:
        rig = Rig(Periods(min_sync=0.01, sync=60, full_sync=3600))
        inner_sync, inner_replace = rig.proxier.sync, rig.runner.builder.replace

        def sync(state: Any) -> SyncResult:
            seen.append(gc.isenabled())
            return inner_sync(state)

        def replace(kind: str, objects: list[dict[str, Any]]) -> int:
            seen.append(gc.isenabled())
            return inner_replace(kind, objects)

        rig.proxier.sync = sync  # type: ignore[method-assign]
        rig.runner.builder.replace = replace  # type: ignore[method-assign]
        rig.feed_all()
        assert gc.isenabled()
        task, _ = await rig.start()
        await until(lambda: len(rig.results) >= 1, "the first sync", timeout=2)
        await stop(task)
        assert rig.service_ips() == {"10.96.0.10 . tcp . 80"}

    assert gc.isenabled()
    run(main)
    assert seen and not any(seen), seen  # three relists and a sync, each with the collector off
    assert gc.isenabled()


# -- store updates reach the kernel ---------------------------------------------------------------

def test_events_and_relists_reach_the_kernel() -> None:
    async def main() -> None:
        rig = Rig()
        rig.feed_all()
        task, _ = await rig.start()
        await until(lambda: rig.runner.syncs == 1, "the first sync")

        rig.runner.on_event("ADDED", "Service", web_service("db", "10.96.0.20"))
        await until(lambda: "10.96.0.20 . tcp . 80" in rig.service_ips(), "the added service")

        # A relist without "web": the store deletes it (a delete missed while not watching).
        rig.runner.on_replace("Service", [web_service("db", "10.96.0.20")])
        await until(lambda: rig.service_ips() == {"10.96.0.20 . tcp . 80"}, "web removed by the relist")

        rig.runner.on_event("DELETED", "Service", web_service("db", "10.96.0.20"))
        await until(lambda: rig.service_ips() == set(), "db removed by the watch")
        assert rig.table() is not None  # the table stays; only the service rules go
        await stop(task)

    run(main)


def test_invalid_objects_are_counted_in_api_mode() -> None:
    async def main() -> None:
        rig = Rig()
        bad = web_service("bad", "10.96.0.99")
        bad["spec"]["ports"][0]["port"] = 0
        rig.runner.on_replace("Service", [web_service(), bad])
        rig.runner.on_replace("EndpointSlice", [web_slice(["10.244.1.5"])])
        rig.runner.on_replace("Node", [NODE])
        task, _ = await rig.start()
        await until(lambda: rig.runner.syncs == 1, "the first sync")
        assert sample("pyproxy_invalid_objects", {"kind": "Service"}) == 1
        assert rig.service_ips() == {"10.96.0.10 . tcp . 80"}  # the good one is programmed
        rig.runner.on_replace("Service", [web_service()])
        await until(lambda: sample("pyproxy_invalid_objects", {"kind": "Service"}) == 0, "the gauge back to 0")
        await stop(task)

    run(main)


def test_node_events_set_node_deleting() -> None:
    rig = Rig()
    deleting = json.loads(json.dumps(NODE))
    deleting["metadata"]["deletionTimestamp"] = "2024-05-01T12:00:00Z"
    rig.runner.on_event("MODIFIED", "Node", deleting)
    assert rig.health.node_deleting
    assert rig.health.body(time.time())["nodeEligible"] is False
    rig.runner.on_event("MODIFIED", "Node", NODE)
    assert not rig.health.node_deleting
    # Another kind's deletionTimestamp is not ours.
    svc = web_service()
    svc["metadata"]["deletionTimestamp"] = "2024-05-01T12:00:00Z"
    rig.runner.on_event("MODIFIED", "Service", svc)
    assert not rig.health.node_deleting


def test_node_listed_with_deletion_timestamp_sets_node_deleting() -> None:
    rig = Rig()
    deleting = json.loads(json.dumps(NODE))
    deleting["metadata"]["deletionTimestamp"] = "2024-05-01T12:00:00Z"
    rig.runner.on_replace("Node", [deleting])
    assert rig.health.node_deleting


# -- latency --------------------------------------------------------------------------------------

FINE = "pyproxy_network_programming_duration_seconds"
KUBE = "kubeproxy_network_programming_duration_seconds"


def test_trigger_time_annotation_is_observed_once_after_the_sync() -> None:
    async def main() -> None:
        rig = Rig()
        # Listed slices carry old trigger times: not a change we programmed, not observed.
        rig.runner.on_replace("Service", [web_service()])
        rig.runner.on_replace("EndpointSlice", [web_slice(["10.244.1.5"], trigger="2020-01-01T00:00:00Z")])
        rig.runner.on_replace("Node", [NODE])
        count0, sum0, kube0 = sample(FINE + "_count"), sample(FINE + "_sum"), sample(KUBE + "_count")
        task, _ = await rig.start()
        await until(lambda: rig.runner.syncs == 1, "the first sync")
        assert sample(FINE + "_count") == count0

        trigger = datetime.now(timezone.utc) - timedelta(seconds=2)
        rig.runner.on_event("MODIFIED", "EndpointSlice", web_slice(["10.244.1.6"], trigger=rfc3339(trigger)))
        await until(lambda: rig.runner.syncs == 2, "the second sync")
        assert rig.dnat_targets() == {"10.244.1.6:8080"}
        assert sample(FINE + "_count") == count0 + 1
        assert sample(KUBE + "_count") == kube0 + 1
        observed = sample(FINE + "_sum") - sum0
        assert 2.0 <= observed < 4.0, observed  # now - trigger (seconds precision)

        # Unparseable or future (clock skew) trigger times are not observed.
        rig.runner.on_event("MODIFIED", "EndpointSlice", web_slice(["10.244.1.7"], trigger="yesterday"))
        rig.runner.on_event("MODIFIED", "EndpointSlice", web_slice(
            ["10.244.1.8"], trigger=rfc3339(datetime.now(timezone.utc) + timedelta(hours=1))))
        await until(lambda: rig.dnat_targets() == {"10.244.1.8:8080"}, "the last change")
        await asyncio.sleep(0.02)
        assert sample(FINE + "_count") == count0 + 1
        await stop(task)

    run(main)


# -- failures -------------------------------------------------------------------------------------

def test_failed_sync_is_retried_as_a_full_sync_and_stays_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff_mod, "random", SimpleNamespace(uniform=lambda a, b: 0.25))  # 0.25 s retry

    async def main() -> None:
        rig = Rig(timeout=10.0)
        rig.feed_all()
        task, _ = await rig.start()
        await until(lambda: rig.runner.syncs == 1, "the first sync")
        failures0 = sample("kubeproxy_sync_proxy_rules_nftables_sync_failures_total")
        count0 = sample(FINE + "_count")

        rig.fake.fail_next = "boom"
        trigger = rfc3339(datetime.now(timezone.utc) - timedelta(seconds=1))
        rig.runner.on_event("MODIFIED", "EndpointSlice", web_slice(["10.244.3.1"], trigger=trigger))
        queued_at = rig.health.last_queued
        assert queued_at > 0
        await until(lambda: rig.failures == 1, "the failed sync")
        await asyncio.sleep(0.05)  # inside the 0.25 s retry delay
        assert rig.runner.syncs == 1  # failures do not count
        assert rig.dnat_targets() == {"10.244.1.5:8080"}  # the kernel kept the old rules
        assert rig.health.last_queued == queued_at  # still pending since the change
        assert not rig.health.healthy(now=queued_at + 10.0)
        assert sample("kubeproxy_sync_proxy_rules_nftables_sync_failures_total") == failures0 + 1
        assert sample(FINE + "_count") == count0  # not programmed yet: no latency

        await until(lambda: rig.runner.syncs == 2, "the retry")
        assert rig.failures == 1
        assert rig.results[-1].full  # after a failure, everything is rewritten
        assert rig.calls[-1] - rig.calls[-2] >= 0.2
        assert rig.dnat_targets() == {"10.244.3.1:8080"}
        assert rig.health.last_queued == 0
        assert rig.health.healthy(now=queued_at + 10.0)
        assert sample(FINE + "_count") == count0 + 1  # observed once, after the successful retry
        await stop(task)

    run(main)


# -- wired to reflectors and a fake API server ----------------------------------------------------

def test_reflectors_feed_the_runner_end_to_end() -> None:
    async def main() -> None:
        async with FakeApi() as api:
            node_gate = asyncio.Event()
            svc_gone = asyncio.Event()
            api.add_list(SVC_PATH, page([web_service("web"), web_service("old", "10.96.0.30")], rv="10"),
                         page([web_service("web")], rv="20"))
            api.add_watch(SVC_PATH, Reply(status=GONE_EVENT.status, events=GONE_EVENT.events, gate=svc_gone))
            api.add_list(SLICE_PATH, page([web_slice(["10.244.1.5"])], rv="10"))
            trigger = rfc3339(datetime.now(timezone.utc) - timedelta(seconds=1))
            api.add_watch(SLICE_PATH, Reply(events=[0.2, ev("MODIFIED", web_slice(["10.244.1.9"], trigger=trigger))],
                                            hold=True))
            api.add_list(NODE_PATH, Reply(body=page([NODE], rv="10"), gate=node_gate))

            rig = Rig()
            client = api.client()
            refl = [Reflector(client, res, on_replace=rig.runner.on_replace, on_event=rig.runner.on_event)
                    for res in (SERVICES, ENDPOINT_SLICES, node_resource("node-1"))]
            tasks = [asyncio.create_task(r.run()) for r in refl]
            task = asyncio.create_task(rig.runner.run(asyncio.ensure_future(wait_synced(refl))))
            try:
                await until(lambda: refl[0].synced.is_set() and refl[1].synced.is_set(), "two caches")
                await asyncio.sleep(0.05)
                assert rig.calls == []  # the Node cache is not synced yet
                count0 = sample(FINE + "_count")
                node_gate.set()
                await until(lambda: rig.runner.syncs >= 1, "the first sync")
                assert rig.service_ips() == {"10.96.0.10 . tcp . 80", "10.96.0.30 . tcp . 80"}
                await until(lambda: rig.dnat_targets() == {"10.244.1.9:8080"}, "the watched slice")
                assert sample(FINE + "_count") == count0 + 1
                svc_gone.set()
                await until(lambda: rig.service_ips() == {"10.96.0.10 . tcp . 80"}, "old removed by the relist")
                assert refl[0].relists == 2
            finally:
                for t in [*tasks, task]:
                    await stop(t)
                await client.close()
            assert {q.method for q in api.requests} == {"GET"}

    run(main)


def _serve_one_service(api: Any, tmp_path: Any) -> Any:
    """A kubeconfig for the fake API, which lists the web Service with one endpoint."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "c", "cluster": {"server": api.host}}],
        "users": [{"name": "u", "user": {"token": "tok"}}],
        "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}]}))
    api.add_list(SVC_PATH, page([web_service()], rv="1"))
    api.add_list(SLICE_PATH, page([web_slice(["10.244.1.5"])], rv="1"))
    return kubeconfig


def test_daemon_serve_syncs_from_the_api_and_stops_on_sigterm(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyproxy import daemon, hostnet

    monkeypatch.setattr(hostnet, "interface_ips", lambda family=4: ("127.0.0.1", "192.168.9.9") if family == 4 else ())
    fake = FakeNft()

    def make_proxier(config: ProxyConfig, **_: Any) -> NftProxier:
        return NftProxier(config=config, executor=fake)

    async def main() -> None:
        async with FakeApi() as api:
            kubeconfig = _serve_one_service(api, tmp_path)
            api.add_list(NODE_PATH, page([], rv="1"))  # no Node object: interface addresses
            settings = daemon.Settings(kubeconfig=str(kubeconfig), min_sync_period=0.01, sync_period=0.2,
                                       healthz_bind_address="127.0.0.1:0", metrics_bind_address="",
                                       clean_other_modes=False)  # a unit test touches no kernel
            serve = asyncio.create_task(daemon.serve(ProxyConfig(hostname="node-1"), settings,
                                                     make_proxier=make_proxier))
            await until(lambda: fake.transactions or serve.done(), "the first sync", timeout=3)
            assert not serve.done(), serve.exception()
            os.kill(os.getpid(), signal.SIGTERM)  # serve installed its handler before syncing
            await asyncio.wait_for(serve, 2)

            t = fake.tables[("ip", "pyproxy")]  # rules stay in place on exit
            assert set(t.elements["service-ips"]) == {"10.96.0.10 . tcp . 80"}
            assert t.elements["nodeport-ips"] == {"192.168.9.9": ""}  # loopback left out
            assert {q.method for q in api.requests} == {"GET"}
            assert all(q.headers["Authorization"] == "Bearer tok" for q in api.requests)
            assert {q.path for q in api.requests} == {SVC_PATH, SLICE_PATH, NODE_PATH}
            node_list = next(q for q in api.requests if q.path == NODE_PATH)
            assert node_list.query["fieldSelector"] == "metadata.name=node-1"

    run(main)


def test_daemon_families_sync_independently(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dual-stack: the IPv6 proxier failing every sync does not hold back IPv4."""
    from pyproxy import daemon, hostnet
    from pyproxy.nft.executor import NftError

    monkeypatch.setattr(hostnet, "interface_ips", lambda family=4: ("192.168.9.9",) if family == 4 else ())
    v4 = FakeNft()

    class Refusing(FakeNft):
        def run(self, tx: Any) -> None:
            raise NftError("IPv6 refused for the test")

    def make_proxier(config: ProxyConfig, **_: Any) -> NftProxier:
        return NftProxier(config=config, executor=v4 if config.family == 4 else Refusing())

    async def main() -> None:
        async with FakeApi() as api:
            kubeconfig = _serve_one_service(api, tmp_path)
            api.add_list(NODE_PATH, page([], rv="1"))
            settings = daemon.Settings(kubeconfig=str(kubeconfig), min_sync_period=0.01, sync_period=0.2,
                                       healthz_bind_address="", metrics_bind_address="",
                                       clean_other_modes=False)
            serve = asyncio.create_task(daemon.serve(ProxyConfig(hostname="node-1"), settings,
                                                     make_proxier=make_proxier))
            await until(lambda: v4.transactions or serve.done(), "the IPv4 sync", timeout=3)
            assert not serve.done(), serve.exception()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(serve, 2)
            assert set(v4.tables[("ip", "pyproxy")].elements["service-ips"]) == {"10.96.0.10 . tcp . 80"}

    run(main)


def test_nodeports_follow_an_address_added_after_start_up() -> None:
    """The node's addresses are read again before each sync (they were read once at start-up,
    so a NodePort address added later was never served); the periodic sync picks it up."""
    async def main() -> None:
        rig = Rig()
        addresses = ["192.168.9.9"]
        rig.runner.read_interface_ips = lambda: tuple(addresses)
        rig.runner.on_replace("Service", [web_service()])
        rig.runner.on_replace("EndpointSlice", [web_slice(["10.244.1.5"])])
        rig.runner.on_replace("Node", [])  # no Node object: the interfaces' addresses
        task, _ = await rig.start()
        await until(lambda: rig.table() is not None and rig.table().elements.get("nodeport-ips"), "first sync")
        assert rig.table().elements["nodeport-ips"] == {"192.168.9.9": ""}
        addresses.append("192.168.7.7")  # no event: only the address changed
        await until(lambda: "192.168.7.7" in rig.table().elements["nodeport-ips"], "the next periodic sync")
        await stop(task)

    run(main)


def test_the_addresses_are_not_read_when_the_node_object_settles_them() -> None:
    """With our Node object's addresses (and no --nodeport-addresses CIDRs) the interfaces do
    not matter: no netlink dump on each sync."""
    async def main() -> None:
        rig = Rig()
        reads: list[int] = []
        rig.runner.read_interface_ips = lambda: reads.append(1) or ("192.168.9.9",)  # type: ignore[func-returns-value]
        rig.feed_all()
        task, _ = await rig.start()
        await until(lambda: rig.runner.syncs >= 2, "two syncs")
        assert rig.table().elements["nodeport-ips"] == {"192.168.1.1": ""}  # from our Node object
        assert reads == []
        await stop(task)

    run(main)


@pytest.mark.parametrize(("kind", "obj", "families", "want"), [
    ("EndpointSlice", {"addressType": "IPv4"}, [4, 6], [4]),
    ("EndpointSlice", {"addressType": "IPv6"}, [4, 6], [6]),
    ("EndpointSlice", {"addressType": "IPv6"}, [4], [4]),  # the only runner skips it, as before
    ("EndpointSlice", {"addressType": "FQDN"}, [4, 6], [4, 6]),
    ("EndpointSlice", {}, [4, 6], [4, 6]),  # invalid: reported once through the shared log
    ("Service", {"spec": {"ipFamilies": ["IPv4"]}}, [4, 6], [4, 6]),
])
def test_a_slice_goes_to_the_family_of_its_address_type(kind: str, obj: dict[str, Any], families: list[int],
                                                         want: list[int]) -> None:
    from pyproxy.runner import families_of

    assert families_of(kind, obj, families) == want


def test_a_slice_change_counts_once_on_a_dual_stack_node(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to reach both families' runners and add 2 to the endpoint changes counter."""
    from pyproxy import daemon, hostnet

    monkeypatch.setattr(hostnet, "interface_ips", lambda family=4: ())
    fakes = {4: FakeNft(), 6: FakeNft()}

    def make_proxier(config: ProxyConfig, **_: Any) -> NftProxier:
        return NftProxier(config=config, executor=fakes[config.family])

    async def main() -> None:
        async with FakeApi() as api:
            kubeconfig = _serve_one_service(api, tmp_path)
            api.add_list(NODE_PATH, page([], rv="1"))
            changed = web_slice(["10.244.1.6"])
            changed["metadata"]["resourceVersion"] = "2"
            gate = asyncio.Event()
            api.add_watch(SLICE_PATH, Reply(events=[ev("MODIFIED", changed)], gate=gate, hold=True))
            settings = daemon.Settings(kubeconfig=str(kubeconfig), min_sync_period=0.01, sync_period=0.2,
                                       healthz_bind_address="", metrics_bind_address="", clean_other_modes=False)
            serve = asyncio.create_task(daemon.serve(ProxyConfig(hostname="node-1", ip_families=(4, 6)), settings,
                                                     make_proxier=make_proxier))
            await until(lambda: fakes[4].transactions and fakes[6].transactions or serve.done(), "first syncs",
                        timeout=3)
            assert not serve.done(), serve.exception()
            mark = sample("kubeproxy_sync_proxy_rules_endpoint_changes_total")
            gate.set()
            # Both runners would get the event in the same call: a double count shows at once.
            await until(lambda: sample("kubeproxy_sync_proxy_rules_endpoint_changes_total") > mark, "the event")
            assert sample("kubeproxy_sync_proxy_rules_endpoint_changes_total") == mark + 1
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(serve, 2)

    run(main)


# -- faults that must not end the loop (hardening issue, defect 2) -------------------------------

@pytest.mark.parametrize("error", [
    OSError(12, "Cannot allocate memory"),  # fork of nft failed
    RuntimeError("a bug"),
], ids=["oserror", "bug"])
def test_an_unexpected_exception_from_a_sync_is_retried_not_fatal(monkeypatch: pytest.MonkeyPatch,
                                                                   error: Exception) -> None:
    monkeypatch.setattr(backoff_mod, "random", SimpleNamespace(uniform=lambda a, b: 0.05))

    async def main() -> None:
        rig = Rig(timeout=10.0)
        rig.feed_all()
        real_run = rig.fake.run
        raised = []

        def run_once_broken(tx: Any) -> None:
            if not raised:
                raised.append(error)
                raise error
            real_run(tx)

        rig.fake.run = run_once_broken  # type: ignore[method-assign]
        errors0 = sample("pyproxy_sync_errors_total", {"reason": type(error).__name__})
        task, _ = await rig.start()
        await until(lambda: rig.runner.syncs == 1, "the sync after the error")
        assert not task.done()
        assert rig.failures == 1 and rig.results[-1].full
        assert rig.dnat_targets() == {"10.244.1.5:8080"}
        assert sample("pyproxy_sync_errors_total", {"reason": type(error).__name__}) == errors0 + 1
        await stop(task)

    run(main)


def test_a_netlink_error_in_conntrack_cleanup_does_not_fail_the_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyroute2 raises NetlinkError (not OSError), e.g. for an entry that expired between the
    dump and the delete; it used to escape the runner and end the daemon with exit code 0."""
    from pyroute2.netlink.exceptions import NetlinkError

    from pyproxy import conntrack

    def failing_clean(*a: Any, **k: Any) -> int:
        raise NetlinkError(2, "No such file or directory")

    monkeypatch.setattr(conntrack, "clean", failing_clean)

    async def main() -> None:
        rig = Rig()
        rig.runner.cleaner = conntrack.ConntrackCleaner()
        rig.runner.on_replace("Service", [sc.service("dns", "10.96.0.53", [sc.port(53, name="dns", protocol="UDP")])])
        rig.runner.on_replace("EndpointSlice", [sc.endpoint_slice("dns", ["10.244.1.5"], [sc.port(53, name="dns", protocol="UDP")])])
        rig.runner.on_replace("Node", [NODE])
        failures0 = sample("pyproxy_conntrack_cleanup_failures_total")
        task, _ = await rig.start()
        await until(lambda: rig.runner.syncs == 1, "the sync")
        assert sample("pyproxy_conntrack_cleanup_failures_total") == failures0 + 1
        assert rig.runner.health.last_queued == 0  # the rules are in: healthy
        assert not task.done()
        await stop(task)

    run(main)


def test_daemon_exits_non_zero_when_a_task_ends(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync loop or reflector that ends is a bug; the daemon must say so with its exit code
    (it used to return 0, so a restart policy of OnFailure would not restart it)."""
    from pyproxy import daemon, hostnet

    monkeypatch.setattr(hostnet, "interface_ips", lambda family=4: ())

    async def broken_run(self: Any, caches_synced: Any) -> None:
        raise RuntimeError("a bug in the sync loop")

    monkeypatch.setattr(runner_mod.SyncRunner, "run", broken_run)

    async def main() -> None:
        async with FakeApi() as api:
            kubeconfig = _serve_one_service(api, tmp_path)
            api.add_list(NODE_PATH, page([], rv="1"))
            settings = daemon.Settings(kubeconfig=str(kubeconfig), healthz_bind_address="",
                                       metrics_bind_address="", clean_other_modes=False)
            code = await asyncio.wait_for(daemon.serve(
                ProxyConfig(hostname="node-1", ip_families=(4,)), settings,
                make_proxier=lambda config, **_: NftProxier(config=config, executor=FakeNft())), 3)
            assert code == 1

    run(main)


def test_a_relist_counts_the_objects_it_changed_not_one_per_relist() -> None:
    """As upstream counts each changed object: a relist (or a changed file) that brings back
    the same objects counts nothing; one changed and one gone count two."""
    async def main() -> None:
        rig = Rig()
        total = "kubeproxy_sync_proxy_rules_endpoint_changes_total"
        before = sample(total)
        slices = [web_slice(["10.244.1.5"]), web_slice(["10.244.1.6"], name="api"), web_slice(["10.244.1.7"], name="db")]
        rig.runner.on_replace("EndpointSlice", slices)
        assert sample(total) - before == 3
        rig.runner.on_replace("EndpointSlice", slices)
        assert sample(total) - before == 3
        rig.runner.on_replace("EndpointSlice", [web_slice(["10.244.1.9"]), slices[1]])  # web changed, db gone
        assert sample(total) - before == 5

    run(main)
