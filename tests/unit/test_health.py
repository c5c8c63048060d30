"""ProxyHealth (kube-proxy's healthz semantics) and the /healthz, /livez, /metrics servers."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from pyproxy import health as health_mod
from pyproxy import metrics
from pyproxy.health import ProxyHealth, health_app, metrics_app, start_site

T0 = 1_700_000_000.0


# -- ProxyHealth ----------------------------------------------------------------------------------

def test_before_the_first_sync_healthy_only_within_timeout_of_start() -> None:
    assert abs(ProxyHealth(timeout=60.0).started - time.time()) < 5  # started: now by default
    h = ProxyHealth(timeout=60.0, started=T0)
    assert h.healthy(now=T0)
    assert h.healthy(now=T0 + 59.999)
    assert not h.healthy(now=T0 + 60.0)  # the boundary is unhealthy (strictly less than)
    assert not h.healthy(now=T0 + 3600)
    h.last_queued = T0 + 1  # a pending change does not matter before the first sync...
    assert h.healthy(now=T0 + 59.0)
    assert not h.healthy(now=T0 + 61.0)  # ...nor does it save a start that took too long


def test_after_a_sync_healthy_when_nothing_pending_or_pending_less_than_timeout() -> None:
    h = ProxyHealth(timeout=60.0, started=T0, last_updated=T0 + 10)
    assert h.healthy(now=T0 + 10_000)  # nothing pending: healthy however long ago the sync was
    h.last_queued = T0 + 100
    assert h.healthy(now=T0 + 100)
    assert h.healthy(now=T0 + 159.999)
    assert not h.healthy(now=T0 + 160.0)
    assert not h.healthy(now=T0 + 1000)
    h.last_queued = 0.0
    assert h.healthy(now=T0 + 1000)


def test_queued_keeps_the_oldest_change_and_updated_clears_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [T0 + 5]
    monkeypatch.setattr(health_mod, "time", SimpleNamespace(time=lambda: clock[0]))
    h = ProxyHealth(timeout=60.0, started=T0)
    h.queued()
    clock[0] = T0 + 50
    h.queued()  # a later change: the oldest pending one counts
    assert h.last_queued == T0 + 5
    h.last_updated = T0 + 1
    assert not h.healthy(now=T0 + 65)  # 60 s since the oldest change, not 15 s since the newest
    clock[0] = T0 + 66
    h.updated()
    assert h.last_updated == T0 + 66
    assert h.last_queued == 0.0
    assert h.healthy(now=T0 + 10_000)
    clock[0] = T0 + 70
    h.queued()
    assert h.last_queued == T0 + 70


def test_body_fields() -> None:
    h = ProxyHealth(timeout=60.0, started=T0)
    body = h.body(T0 + 1)
    assert set(body) == {"lastUpdated", "currentTime", "nodeEligible"}
    assert body["lastUpdated"] == ""  # never synced
    assert datetime.fromisoformat(str(body["currentTime"])).timestamp() == T0 + 1
    assert body["nodeEligible"] is True
    h.last_updated = T0 - 30
    h.node_deleting = True
    body = h.body(T0 + 1)
    assert datetime.fromisoformat(str(body["lastUpdated"])).timestamp() == T0 - 30
    assert datetime.fromisoformat(str(body["currentTime"])).utcoffset().total_seconds() == 0  # UTC
    assert body["nodeEligible"] is False


# -- the HTTP servers -----------------------------------------------------------------------------

def _count(name: str, code: int) -> float:
    return REGISTRY.get_sample_value(name, {"code": str(code)}) or 0.0


async def _get(server: TestServer, path: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.port}{path}") as resp:
            return resp.status, dict(resp.headers), await resp.read()


def run(main: Any) -> None:
    asyncio.run(asyncio.wait_for(main(), 5))


def test_healthz_and_livez_when_healthy() -> None:
    async def main() -> None:
        now = time.time()
        h = ProxyHealth(timeout=60.0, started=now - 100, last_updated=now - 5)
        async with TestServer(health_app(h), host="127.0.0.1") as server:
            before = _count("kubeproxy_proxy_healthz_total", 200)
            live_before = _count("kubeproxy_proxy_livez_total", 200)
            for path in ("/healthz", "/livez"):
                status, headers, body = await _get(server, path)
                assert status == 200, path
                assert headers["Content-Type"].startswith("application/json")
                assert headers["X-Content-Type-Options"] == "nosniff"
                doc = json.loads(body)
                assert set(doc) == {"lastUpdated", "currentTime", "nodeEligible"}
                assert doc["nodeEligible"] is True
                assert abs(datetime.fromisoformat(doc["lastUpdated"]).timestamp() - (now - 5)) < 1e-3
                assert abs(datetime.fromisoformat(doc["currentTime"]).timestamp() - time.time()) < 5
            assert _count("kubeproxy_proxy_healthz_total", 200) == before + 1
            assert _count("kubeproxy_proxy_livez_total", 200) == live_before + 1

    run(main)


def test_pending_change_older_than_timeout_fails_both() -> None:
    async def main() -> None:
        now = time.time()
        h = ProxyHealth(timeout=60.0, started=now - 1000, last_updated=now - 500, last_queued=now - 61)
        async with TestServer(health_app(h), host="127.0.0.1") as server:
            before = _count("kubeproxy_proxy_healthz_total", 503)
            live_before = _count("kubeproxy_proxy_livez_total", 503)
            for path in ("/healthz", "/livez"):
                status, headers, body = await _get(server, path)
                assert status == 503, path
                assert headers["X-Content-Type-Options"] == "nosniff"
                assert json.loads(body)["nodeEligible"] is True
            assert _count("kubeproxy_proxy_healthz_total", 503) == before + 1
            assert _count("kubeproxy_proxy_livez_total", 503) == live_before + 1

            h.last_queued = time.time() - 30  # pending, but not late yet
            assert (await _get(server, "/healthz"))[0] == 200

    run(main)


def test_node_being_deleted_fails_healthz_but_not_livez() -> None:
    async def main() -> None:
        now = time.time()
        h = ProxyHealth(timeout=60.0, started=now - 100, last_updated=now - 1, node_deleting=True)
        async with TestServer(health_app(h), host="127.0.0.1") as server:
            before = _count("kubeproxy_proxy_healthz_total", 503)
            status, _, body = await _get(server, "/healthz")
            assert status == 503
            assert json.loads(body)["nodeEligible"] is False
            assert _count("kubeproxy_proxy_healthz_total", 503) == before + 1
            status, _, body = await _get(server, "/livez")
            assert status == 200
            assert json.loads(body)["nodeEligible"] is False

            h.node_deleting = False
            assert (await _get(server, "/healthz"))[0] == 200

    run(main)


def test_healthz_before_the_first_sync() -> None:
    async def main() -> None:
        now = time.time()
        starting = ProxyHealth(timeout=60.0, started=now - 10)
        stuck = ProxyHealth(timeout=60.0, started=now - 120)
        async with TestServer(health_app(starting), host="127.0.0.1") as s1, \
                TestServer(health_app(stuck), host="127.0.0.1") as s2:
            status, _, body = await _get(s1, "/healthz")
            assert status == 200
            assert json.loads(body)["lastUpdated"] == ""
            assert (await _get(s2, "/healthz"))[0] == 503
            assert (await _get(s2, "/livez"))[0] == 503

    run(main)


def test_metrics_and_proxy_mode() -> None:
    async def main() -> None:
        metrics.SYNC_DURATION.observe(0.001)
        async with TestServer(metrics_app("nftables"), host="127.0.0.1") as server:
            status, headers, body = await _get(server, "/metrics")
            assert status == 200
            assert headers["Content-Type"].startswith("text/plain")
            text = body.decode()
            assert "kubeproxy_sync_proxy_rules_duration_seconds_bucket" in text
            assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in text
            assert "kubeproxy_proxy_healthz_total" in text
            status, _, body = await _get(server, "/proxyMode")
            assert (status, body) == (200, b"nftables")
            assert (await _get(server, "/nope"))[0] == 404
        async with TestServer(metrics_app("iptables"), host="127.0.0.1") as server:
            assert (await _get(server, "/proxyMode"))[2] == b"iptables"

    run(main)


def test_start_site_serves_on_the_given_address() -> None:
    async def main() -> None:
        h = ProxyHealth(timeout=60.0)
        site = await start_site(health_app(h), "127.0.0.1:0")
        try:
            addresses = site.addresses
            assert addresses and addresses[0][0] == "127.0.0.1"
            port = addresses[0][1]
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/livez") as resp:
                    assert resp.status == 200
        finally:
            await site.cleanup()

    run(main)


def test_all_healthy_needs_every_family():
    from pyproxy.health import AllHealthy, ProxyHealth

    v4, v6 = ProxyHealth(timeout=10), ProxyHealth(timeout=10)
    both = AllHealthy([v4, v6])
    v4.updated()
    v6.updated()
    assert both.healthy()
    v6.queued()
    v6.last_queued -= 60  # an IPv6 change has waited a minute: that family is stale
    assert v4.healthy() and not both.healthy()
    v4.node_deleting = True
    assert both.node_deleting and both.body(0)["nodeEligible"] is False


def test_a_health_check_port_held_by_another_process_is_retried_until_it_binds() -> None:
    """Hardening issue, defect 9: one failed bind used to leave the node looking unhealthy to
    the load balancer until pyproxy restarted."""
    import socket
    import urllib.request

    from pyproxy.service_health import HealthCheck, HealthCheckServer

    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    check = {port: HealthCheck("e2e", "lb", port, 1)}

    def get() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:  # noqa: S310
            return resp.status

    async def main() -> None:
        server = HealthCheckServer(proxy_healthy=lambda: True)
        await server.update(check, ("127.0.0.1",))
        assert server.retry_pending and server.ports == ()
        blocker.close()
        await server.update(check, ("127.0.0.1",))  # the next sync's update
        assert not server.retry_pending and server.ports == (port,)
        assert await asyncio.to_thread(get) == 200
        await server.close()

    asyncio.run(main())
