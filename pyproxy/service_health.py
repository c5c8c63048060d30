"""Health check node ports: one HTTP listener per LoadBalancer Service with
externalTrafficPolicy: Local, which the cloud load balancer polls to learn which nodes have
endpoints of that Service.

Same answers as upstream kube-proxy: 200 when the node has ready local endpoints and the proxy
itself is healthy, 503 otherwise; body ``{"service": {"namespace", "name"}, "localEndpoints": N,
"serviceProxyHealthy": bool}``; headers ``Content-Type: application/json``,
``X-Content-Type-Options: nosniff`` and ``X-Load-Balancing-Endpoint-Weight: N``. Any path answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from pyproxy.literals import Family
from pyproxy.model.objects import DesiredState

log = logging.getLogger("pyproxy.healthcheck")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """What one health check node port reports."""

    namespace: str
    name: str
    port: int
    local_endpoints: int
    """Ready, not terminating endpoint IPs on this node, over all the Service's ports."""


def health_checks(state: DesiredState) -> dict[int, HealthCheck]:
    """Port → what it reports, for every Service that has a health check node port."""
    ips: dict[tuple[str, str, int], set[str]] = {}
    for sps in state.services.values():
        port = sps.service.health_check_node_port
        if port:
            spn = sps.service.name
            ips.setdefault((spn.namespace, spn.name, port), set()).update(sps.local_ready_ips)
    out: dict[int, HealthCheck] = {}
    for (namespace, name, port), found in sorted(ips.items()):
        # Two Services on one port is refused by the API server; keep the first if a file does it.
        out.setdefault(port, HealthCheck(namespace, name, port, len(found)))
    return out


def response(check: HealthCheck, *, proxy_healthy: bool) -> tuple[int, dict[str, str], str]:
    """Status, headers and body of one answer (pure)."""
    body = json.dumps({"service": {"namespace": check.namespace, "name": check.name},
                       "localEndpoints": check.local_endpoints, "serviceProxyHealthy": proxy_healthy},
                      separators=(",", ":"))  # compact, as Go's encoder writes it
    status = 200 if check.local_endpoints > 0 and proxy_healthy else 503
    headers = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff",
               "X-Load-Balancing-Endpoint-Weight": str(check.local_endpoints)}
    return status, headers, body


class HealthCheckServer:
    """Keeps one listener per health check node port, on each NodePort address (every address
    when there are none), following :meth:`update`. Runs on the caller's event loop."""

    def __init__(self, *, proxy_healthy: Callable[[], bool], family: Family = 4) -> None:
        self.proxy_healthy = proxy_healthy
        self.family = family
        """One server per family (dual-stack); asyncio binds IPv6 sockets IPv6-only, so the two
        families' wildcard listeners do not collide."""
        self._checks: dict[int, HealthCheck] = {}
        self._servers: dict[int, tuple[tuple[str, ...], dict[str, asyncio.AbstractServer]]] = {}
        """Port → (the addresses it should listen on, the listeners bound so far)."""
        self._failed: set[tuple[int, str]] = set()

    def _handler(self, port: int) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        async def handle(_: web.BaseRequest) -> web.Response:
            check = self._checks.get(port)
            if check is None:
                return web.Response(status=404, text="no such health check\n")
            status, headers, body = response(check, proxy_healthy=self.proxy_healthy())
            return web.Response(status=status, body=body.encode(), headers=headers)
        return handle

    async def update(self, checks: dict[int, HealthCheck], ips: tuple[str, ...]) -> None:
        """Follow ``checks``; also retry every listener that could not be bound before (another
        process held the port for a while): it is called after every sync, so a failed bind is
        retried at least once per sync period instead of never."""
        self._checks = dict(checks)
        hosts = ips or (("::",) if self.family == 6 else ("0.0.0.0",))
        for port in [p for p, (bound, _) in self._servers.items() if p not in checks or bound != hosts]:
            await self._close(port)
        loop = asyncio.get_running_loop()
        for port in checks:
            _, listening = self._servers.setdefault(port, (hosts, {}))
            for host in hosts:
                if host in listening:
                    continue
                try:
                    listening[host] = await loop.create_server(web.Server(self._handler(port)), host, port,
                                                               reuse_address=True)
                    if (port, host) in self._failed:
                        self._failed.discard((port, host))
                        log.info("health check node port %s:%d is listening now", host, port)
                except OSError as err:
                    # Another process holds the port: the other Services keep their checks,
                    # and this one is tried again after the next sync.
                    if (port, host) not in self._failed:
                        self._failed.add((port, host))
                        log.error("health check node port %s:%d of %s/%s: %s (retried after each sync)",
                                  host, port, checks[port].namespace, checks[port].name, err)

    async def _close(self, port: int) -> None:
        _, servers = self._servers.pop(port)
        self._failed = {(p, h) for p, h in self._failed if p != port}
        for server in servers.values():
            server.close()
            await server.wait_closed()

    async def close(self) -> None:
        for port in list(self._servers):
            await self._close(port)

    @property
    def retry_pending(self) -> bool:
        """Some listener could not be bound yet."""
        return bool(self._failed)

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(sorted(p for p, (_, bound) in self._servers.items() if bound))
