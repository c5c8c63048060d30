"""kube-proxy's health semantics and the HTTP servers for /healthz, /livez and /metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from pyproxy.literals import Mode

if TYPE_CHECKING:
    # Imported where the servers are made: ``run --once`` keeps only the health state and
    # never loads aiohttp (a quarter of a second, most of it its TLS contexts).
    from aiohttp import web

HEALTHZ_TOTAL = Counter("kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status", ["code"])
LIVEZ_TOTAL = Counter("kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"])


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat() if ts else ""


@dataclass
class ProxyHealth:
    """Healthy means: every change queued for a sync was applied, or the oldest pending one was
    queued less than ``timeout`` ago (kube-proxy uses twice the sync period)."""

    timeout: float
    last_queued: float = 0.0
    """When the oldest change not yet applied was queued; 0 when none is pending."""
    last_updated: float = 0.0
    node_deleting: bool = False
    started: float = field(default_factory=time.time)

    def queued(self) -> None:
        if not self.last_queued:
            self.last_queued = time.time()

    def updated(self) -> None:
        self.last_updated = time.time()
        self.last_queued = 0.0

    def healthy(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if not self.last_updated:
            # Before the first sync: healthy while within the timeout of starting.
            return now - self.started < self.timeout
        return not self.last_queued or now - self.last_queued < self.timeout

    def body(self, now: float) -> dict[str, object]:
        return {"lastUpdated": _iso(self.last_updated), "currentTime": _iso(now),
                "nodeEligible": not self.node_deleting}


class AllHealthy:
    """Several families' health as one: healthy when every family is (dual-stack)."""

    def __init__(self, parts: list[ProxyHealth]) -> None:
        self.parts = parts

    def healthy(self, now: float | None = None) -> bool:
        return all(p.healthy(now) for p in self.parts)

    @property
    def node_deleting(self) -> bool:
        return any(p.node_deleting for p in self.parts)

    def body(self, now: float) -> dict[str, object]:
        # The oldest family's last update: what a reader of "lastUpdated" must assume.
        oldest = min(self.parts, key=lambda p: p.last_updated)
        return {**oldest.body(now), "nodeEligible": not self.node_deleting}


def health_app(health: ProxyHealth | AllHealthy) -> web.Application:
    from aiohttp import web

    async def healthz(_: web.Request) -> web.Response:
        now = time.time()
        ok = health.healthy(now) and not health.node_deleting  # /healthz fails on node deletion
        code = 200 if ok else 503
        HEALTHZ_TOTAL.labels(code=str(code)).inc()
        return web.Response(status=code, text=json.dumps(health.body(now)), content_type="application/json",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def livez(_: web.Request) -> web.Response:
        now = time.time()
        code = 200 if health.healthy(now) else 503
        LIVEZ_TOTAL.labels(code=str(code)).inc()
        return web.Response(status=code, text=json.dumps(health.body(now)), content_type="application/json",
                            headers={"X-Content-Type-Options": "nosniff"})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/livez", livez)])
    return app


def metrics_app(mode: Mode) -> web.Application:
    from aiohttp import web

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def proxy_mode(_: web.Request) -> web.Response:
        return web.Response(text=mode)

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics), web.get("/proxyMode", proxy_mode)])
    return app


async def start_site(app: web.Application, bind: str) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` (``[v6]:port`` too); returns the runner to clean up."""
    from aiohttp import web

    host, _, port = bind.rpartition(":")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]") or None, int(port)).start()
    return runner
