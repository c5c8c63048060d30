"""A fault-injecting HTTP proxy between pyproxy and the lab's API server (test tooling).

pyproxy talks plain HTTP to the proxy, which forwards each request (headers included, so the
ServiceAccount token authenticates as usual) to the API server over TLS and streams the answer
back, unless a fault is engaged. A control endpoint switches faults at run time:

    python -m e2e.faultproxy --listen 192.168.60.1:7443 --control 127.0.0.1:7444 \\
        --upstream https://127.0.0.1:6443 --ca /run/pyproxy-lab/X/ca.crt
    curl -X POST 'http://127.0.0.1:7444/fault?mode=stall'
    curl http://127.0.0.1:7444/stats

Modes (the names the e2e tests use):

``pass``      forward everything.
``stall``     a half-open connection as the client sees it: streams in flight stop forwarding
              and stay open, new requests are read and never answered.
``cut``       every open connection is reset, and so is every new one.
``gone``      watches are answered 410 Gone (a storm when it lasts); lists pass.
``gone-event`` watches start, then get an ERROR event with code 410.
``status-N``  every request is answered HTTP N with a Status body (500, 503, 504...).
``garbage``   lists are answered 200 with a JSON array (not an object); watches 410, so that the
              client does list.
``garbage-watch`` watches are answered 200 with an HTML line.
``slow-B``    answers are forwarded at B bytes per second.

Entering a fault that answers requests (``gone``, ``status-N``, ``garbage``...) ends the watch
streams in flight, as a server restart or a load balancer failover would, so that the client's
next requests meet the fault. Leaving a fault (``pass``) does not mend connections it broke: a
stalled stream stays stalled, as a real half-open connection would; the client has to notice
and reconnect.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "host", "content-length"}


def _status(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "InternalError" if code >= 500 else "Expired", "code": code}


class FaultProxy:
    def __init__(self, *, upstream: str, ca: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.ssl = ssl.create_default_context(cafile=ca)
        self.mode = "pass"
        self.stats: Counter[str] = Counter()
        self._open: set[asyncio.BaseTransport] = set()
        self._upstreams: set[aiohttp.ClientResponse] = set()
        self._session: aiohttp.ClientSession | None = None

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None), auto_decompress=False)
        return self._session

    async def _hold(self) -> None:
        await asyncio.Event().wait()  # until the client gives up and closes

    async def handle(self, request: web.Request) -> web.StreamResponse:
        watch = request.query.get("watch") in ("1", "true")
        kind = "watch" if watch else "list"
        self.stats[f"{kind}:{self.mode}"] += 1
        self.stats[kind] += 1
        transport = request.transport
        if transport is not None:
            self._open.add(transport)
        try:
            return await self._answer(request, watch)
        finally:
            if transport is not None:
                self._open.discard(transport)

    async def _answer(self, request: web.Request, watch: bool) -> web.StreamResponse:
        mode = self.mode
        if mode == "cut":
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        if mode == "stall":
            await self._hold()
        if mode.startswith("status-"):
            code = int(mode.split("-", 1)[1])
            return web.json_response(_status(code, f"injected {code}"), status=code)
        if mode == "garbage":
            if not watch:
                return web.Response(body=b"[1, 2, 3]", content_type="application/json")
            return web.json_response(_status(410, "too old resource version (injected)"), status=410)
        if mode == "garbage-watch" and watch:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b"<html><body>502 Bad Gateway</body></html>\n")
            await resp.write_eof()
            return resp
        if watch and mode == "gone":
            return web.json_response(_status(410, "too old resource version (injected)"), status=410)
        if watch and mode == "gone-event":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(json.dumps({"type": "ERROR", "object": _status(
                410, "too old resource version (injected)")}).encode() + b"\n")
            await resp.write_eof()
            return resp
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        sess = await self.session()
        async with sess.request(request.method, self.upstream + request.path_qs, headers=headers,
                                data=await request.read() or None) as up:
            self._upstreams.add(up)
            try:
                resp = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP})
                await resp.prepare(request)
                try:
                    async for chunk in up.content.iter_any():
                        await self._relay(resp, chunk)
                except aiohttp.ClientError:
                    pass  # the upstream was closed under us (a fault began): end the stream
                await resp.write_eof()
                return resp
            finally:
                self._upstreams.discard(up)

    async def _relay(self, resp: web.StreamResponse, chunk: bytes) -> None:
        mode = self.mode
        if mode == "stall":
            await self._hold()
        if mode == "cut":
            raise asyncio.CancelledError
        if mode.startswith("slow-"):
            rate = float(mode.split("-", 1)[1])
            for i in range(0, len(chunk), 64):
                await resp.write(chunk[i:i + 64])
                await asyncio.sleep(64 / rate)
            return
        await resp.write(chunk)

    async def control(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            mode = request.query.get("mode", "pass")
            self.mode = mode
            if mode == "cut":
                for transport in list(self._open):
                    transport.abort()
            elif mode not in ("pass", "stall") and not mode.startswith("slow-"):
                for up in list(self._upstreams):
                    up.close()  # the client sees its watch end, and comes back to the fault
            return web.json_response({"mode": self.mode})
        return web.json_response({"mode": self.mode, "stats": dict(self.stats)})


async def serve(listen: str, control: str, upstream: str, ca: str) -> None:
    proxy = FaultProxy(upstream=upstream, ca=ca)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    ctl = web.Application()
    ctl.router.add_route("*", "/fault", proxy.control)
    ctl.router.add_route("GET", "/stats", proxy.control)
    runners = []
    for application, where in ((app, listen), (ctl, control)):
        runner = web.AppRunner(application, handle_signals=True)
        await runner.setup()
        host, port = where.rsplit(":", 1)
        await web.TCPSite(runner, host, int(port)).start()
        runners.append(runner)
    print(f"faultproxy: {listen} -> {upstream}, control {control}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--ca", required=True)
    a = p.parse_args()
    asyncio.run(serve(a.listen, a.control, a.upstream, a.ca))


if __name__ == "__main__":
    main()
