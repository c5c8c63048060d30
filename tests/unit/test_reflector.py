"""KubeClient and Reflector against a scripted fake API server on 127.0.0.1.

The fake server (:class:`FakeApi`) answers LISTs and WATCHes from per-path queues the test
fills, and records every request (method, path, query, headers). No real Kubernetes, no root.
Each test runs its own event loop with ``asyncio.run`` (pytest-asyncio is not used).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import sys
import textwrap
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import pyproxy.backoff as backoff_mod
from pyproxy.model.state import StateBuilder
from pyproxy.sources import kube
from pyproxy.sources.kube import (
    ENDPOINT_SLICES,
    SERVICES,
    KubeClient,
    KubeError,
    Reflector,
    Resource,
    node_resource,
    wait_synced,
)
from tests import scenario as sc

# Spelled out, not taken from the module: a change to the selector must fail a test.
SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
SVC_PATH = "/api/v1/services"
SLICE_PATH = "/apis/discovery.k8s.io/v1/endpointslices"
NODE_PATH = "/api/v1/nodes"


# -- the fake API server ------------------------------------------------------------------------

@dataclass
class Reply:
    """One scripted answer. For a watch, ``events`` are streamed one write each: a dict is
    sent as a JSON line, bytes are written raw, a float pauses that many seconds."""

    status: int = 200
    body: Any = None
    events: list[Any] = field(default_factory=list)
    gate: asyncio.Event | None = None
    """Answer only once this is set (lets a test look at the state in between)."""
    hold: bool = False
    """After the events, keep the watch open until the server stops."""


@dataclass
class Req:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("1", "true")


class FakeApi:
    """Scripted API server. Unscripted watches stay open (quiet); unscripted lists get 500."""

    def __init__(self, *, ssl_context: Any = None) -> None:
        self._ssl = ssl_context
        self.requests: list[Req] = []
        self.lists: dict[str, deque[Reply]] = defaultdict(deque)
        self.watches: dict[str, deque[Reply]] = defaultdict(deque)
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def __aenter__(self) -> FakeApi:
        await self.server.start_server(ssl=self._ssl)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await self.server.close()

    @property
    def host(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.server.port}"

    def client(self) -> KubeClient:
        return KubeClient(host=self.host, ssl_context=False, headers={})

    # scripting
    def add_list(self, path: str, *replies: Reply | dict[str, Any]) -> None:
        for r in replies:
            self.lists[path].append(r if isinstance(r, Reply) else Reply(body=r))

    def add_watch(self, path: str, *replies: Reply) -> None:
        self.watches[path].extend(replies)

    # what happened
    def list_requests(self, path: str) -> list[Req]:
        return [r for r in self.requests if r.path == path and not r.is_watch]

    def watch_requests(self, path: str) -> list[Req]:
        return [r for r in self.requests if r.path == path and r.is_watch]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        req = Req(request.method, request.path, dict(request.query), dict(request.headers))
        self.requests.append(req)
        queue = (self.watches if req.is_watch else self.lists)[req.path]
        if queue:
            reply = queue.popleft()
        elif req.is_watch:
            reply = Reply(hold=True)
        else:
            reply = Reply(status=500, body={"message": f"unscripted list {req.path}"})
        if reply.gate is not None:
            await reply.gate.wait()
        if reply.status != 200 or not req.is_watch:
            return web.json_response(reply.body if reply.body is not None else {}, status=reply.status)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for ev in reply.events:
            if isinstance(ev, float):
                await asyncio.sleep(ev)
            elif isinstance(ev, bytes):
                await resp.write(ev)
            else:
                await resp.write(json.dumps(ev).encode() + b"\n")
        if reply.hold:
            await self._stop.wait()
        await resp.write_eof()
        return resp


# -- helpers ------------------------------------------------------------------------------------

def page(items: list[dict[str, Any]], rv: str = "", cont: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
    return {"kind": "ServiceList", "apiVersion": "v1", "metadata": meta, "items": items}


def svc(name: str, rv: str = "1", ip: str = "") -> dict[str, Any]:
    """A Service as a LIST returns it: without kind."""
    obj = sc.service(name, ip or f"10.96.0.{sum(map(ord, name)) % 250 + 1}", [sc.port(80, name="http")])
    obj["metadata"]["resourceVersion"] = rv
    del obj["kind"]
    return obj


def ev(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": obj}


def bookmark(rv: str) -> dict[str, Any]:
    return {"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1",
                                            "metadata": {"resourceVersion": rv}}}


def name_of(obj: dict[str, Any]) -> str:
    return obj["metadata"]["name"]


async def until(pred: Callable[[], bool], what: str, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task``; re-raise whatever it died of if it had died already."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Recorder:
    def __init__(self) -> None:
        self.replaced: list[tuple[str, list[dict[str, Any]]]] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def on_replace(self, kind: str, items: list[dict[str, Any]]) -> None:
        self.replaced.append((kind, copy.deepcopy(items)))

    def on_event(self, event: str, kind: str, obj: dict[str, Any]) -> None:
        self.events.append((event, kind, copy.deepcopy(obj)))


def run(main: Callable[[], Awaitable[None]], timeout: float = 5.0) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout))


@dataclass
class Backoff:
    """Records the reflector's backoff sleeps (and sleeps ~nothing) and its jitter draws."""

    delays: list[float] = field(default_factory=list)
    synced_when_sleeping: list[bool] = field(default_factory=list)
    uniform_args: list[tuple[float, float]] = field(default_factory=list)
    reflector: Reflector | None = None


@pytest.fixture
def backoff(monkeypatch: pytest.MonkeyPatch) -> Backoff:
    rec = Backoff()
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *a: Any, **kw: Any) -> None:
        rec.delays.append(delay)
        if rec.reflector is not None:
            rec.synced_when_sleeping.append(rec.reflector.synced.is_set())
        await real_sleep(0.001)

    class AsyncioProxy:
        def __getattr__(self, name: str) -> Any:
            return sleep if name == "sleep" else getattr(asyncio, name)

    def uniform(a: float, b: float) -> float:
        rec.uniform_args.append((a, b))
        return (a + b) / 2  # the middle of the jitter range: the plain exponential value

    monkeypatch.setattr(kube, "asyncio", AsyncioProxy())
    monkeypatch.setattr(backoff_mod, "random", SimpleNamespace(uniform=uniform))
    return rec


# -- LIST -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("resource", "path", "kind"), [
    (SERVICES, SVC_PATH, "Service"),
    (ENDPOINT_SLICES, SLICE_PATH, "EndpointSlice"),
])
def test_chunked_list_delivers_every_page_once_with_kind_and_selector(
        resource: Resource, path: str, kind: str) -> None:
    names = ["a", "b", "c", "d", "e"]

    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(path,
                         page([svc("a"), svc("b")], rv="42", cont="c1"),
                         page([svc("c"), svc("d")], rv="42", cont="c2"),
                         page([svc("e")], rv="42"))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, resource, on_replace=rec.on_replace, on_event=rec.on_event, page_size=2)
            task = asyncio.create_task(r.run())
            await asyncio.wait_for(r.synced.wait(), 2)
            await until(lambda: len(api.watch_requests(path)) == 1, "the watch")
            await stop(task)
            await client.close()

            # One replace with everything, not one per page; every item got its kind.
            assert [k for k, _ in rec.replaced] == [kind]
            items = rec.replaced[0][1]
            assert [name_of(o) for o in items] == names
            assert all(o["kind"] == kind for o in items)
            assert rec.events == []
            assert r.resource_version == "42"
            assert r.relists == 1

            lists = api.list_requests(path)
            assert len(lists) == 3
            assert [q.query.get("continue") for q in lists] == [None, "c1", "c2"]
            # Only the first page names a version (the API server refuses one next to a token).
            assert [q.query.get("resourceVersion") for q in lists] == ["0", None, None]
            for q in lists:
                assert q.query["limit"] == "2"
                assert q.query["labelSelector"] == SELECTOR
                assert "fieldSelector" not in q.query
            # The watch keeps the selector too, or it would stream what the list filtered out.
            assert api.watch_requests(path)[0].query["labelSelector"] == SELECTOR

    run(main)


def test_node_reflector_selects_its_node_by_field_selector() -> None:
    async def main() -> None:
        async with FakeApi() as api:
            node = sc.node("node-1", ["192.168.1.1"])
            del node["kind"]
            api.add_list(NODE_PATH, page([node], rv="7"))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, node_resource("node-1"), on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: len(api.watch_requests(NODE_PATH)) == 1, "the node watch")
            await stop(task)
            await client.close()

            assert rec.replaced[0][0] == "Node"
            assert rec.replaced[0][1][0]["kind"] == "Node"
            (lst,) = api.list_requests(NODE_PATH)
            (watch,) = api.watch_requests(NODE_PATH)
            for q in (lst, watch):
                assert q.query["fieldSelector"] == "metadata.name=node-1"
                assert "labelSelector" not in q.query
            assert lst.query["limit"] == "500"
            assert watch.query["resourceVersion"] == "7"

    run(main)


def test_expired_continue_token_restarts_the_list_from_the_first_page() -> None:
    """A 410 on page 2 (the continue token expired): list again from scratch, and replace the
    store with the fresh list only, not with page 1 of the failed one plus the new list."""
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH,
                         page([svc("old-1"), svc("old-2")], rv="5", cont="c1"),
                         Reply(status=410, body={"kind": "Status", "code": 410, "reason": "Expired"}),
                         page([svc("new-1")], rv="9"))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event, page_size=2)
            task = asyncio.create_task(r.run())
            await until(lambda: len(api.watch_requests(SVC_PATH)) == 1, "the watch")
            await stop(task)
            await client.close()

            assert [[name_of(o) for o in items] for _, items in rec.replaced] == [["new-1"]]
            assert [q.query.get("continue") for q in api.list_requests(SVC_PATH)] == [None, "c1", None]
            assert r.relists == 1
            assert api.watch_requests(SVC_PATH)[0].query["resourceVersion"] == "9"

    run(main)


def test_wait_synced_needs_every_reflector() -> None:
    async def main() -> None:
        async with FakeApi() as api:
            gate = asyncio.Event()
            api.add_list(SVC_PATH, page([svc("a")], rv="1"))
            api.add_list(SLICE_PATH, Reply(body=page([], rv="2"), gate=gate))
            rec = Recorder()
            client = api.client()
            refl = [Reflector(client, res, on_replace=rec.on_replace, on_event=rec.on_event)
                    for res in (SERVICES, ENDPOINT_SLICES)]
            tasks = [asyncio.create_task(r.run()) for r in refl]
            synced = asyncio.ensure_future(wait_synced(refl))
            await asyncio.wait_for(refl[0].synced.wait(), 2)
            await asyncio.sleep(0.05)
            assert not synced.done()
            gate.set()
            await asyncio.wait_for(synced, 2)
            assert sorted(k for k, _ in rec.replaced) == ["EndpointSlice", "Service"]
            for t in tasks:
                await stop(t)
            await client.close()

    run(main)


# -- WATCH --------------------------------------------------------------------------------------

def test_watch_starts_at_list_version_with_bookmarks_and_streams_events_in_order() -> None:
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([svc("a", rv="90"), svc("b", rv="91")], rv="100"))
            modified = svc("a", rv="102")
            modified["kind"] = "Service"  # watch events normally carry it; the ADDED here does not
            api.add_watch(SVC_PATH, Reply(events=[
                ev("ADDED", svc("c", rv="101")),
                ev("MODIFIED", modified),
                ev("DELETED", svc("b", rv="103")),
                bookmark("150"),
            ]))  # then the stream ends normally: reconnect from the bookmark, no relist
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event, watch_timeout=7)
            task = asyncio.create_task(r.run())
            await until(lambda: len(api.watch_requests(SVC_PATH)) == 2, "the second watch")
            await stop(task)
            await client.close()

            first, second = api.watch_requests(SVC_PATH)
            assert first.query["resourceVersion"] == "100"
            assert first.query["allowWatchBookmarks"] == "true"
            assert first.query["watch"] in ("1", "true")
            assert first.query["timeoutSeconds"] == "7"
            assert first.query["labelSelector"] == SELECTOR
            assert second.query["resourceVersion"] == "150"  # advanced by the bookmark
            assert r.resource_version == "150"

            assert [(e, k, name_of(o), o["metadata"]["resourceVersion"]) for e, k, o in rec.events] == [
                ("ADDED", "Service", "c", "101"),
                ("MODIFIED", "Service", "a", "102"),
                ("DELETED", "Service", "b", "103"),
            ]
            assert all(o["kind"] == "Service" for _, _, o in rec.events)
            assert r.relists == 1
            assert len(api.list_requests(SVC_PATH)) == 1
            assert len(rec.replaced) == 1

    run(main)


def test_bookmark_only_advances_resource_version() -> None:
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([], rv="10"))
            api.add_watch(SVC_PATH, Reply(events=[bookmark("77")], hold=True))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: r.resource_version == "77", "the bookmark's resourceVersion")
            await asyncio.sleep(0.02)
            assert rec.events == []
            assert r.relists == 1
            await stop(task)
            await client.close()

    run(main)


def test_event_split_across_chunks_is_reassembled_and_a_chunk_may_hold_two() -> None:
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([], rv="1"))
            line = json.dumps(ev("ADDED", svc("split", rv="2"))).encode() + b"\n"
            two = (json.dumps(ev("ADDED", svc("x", rv="3"))) + "\n"
                   + json.dumps(ev("ADDED", svc("y", rv="4"))) + "\n").encode()
            api.add_watch(SVC_PATH, Reply(events=[line[:17], 0.03, line[17:], 0.01, two], hold=True))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: len(rec.events) == 3, "three events")
            await stop(task)
            await client.close()
            assert [name_of(o) for _, _, o in rec.events] == ["split", "x", "y"]
            assert r.resource_version == "4"

    run(main)


# -- 410 Gone -----------------------------------------------------------------------------------

GONE_EVENT = Reply(events=[{"type": "ERROR", "object": {
    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
    "message": "too old resource version: 10 (20)"}}])


@pytest.mark.parametrize("gone", [GONE_EVENT, Reply(status=410, body={"kind": "Status", "code": 410})],
                         ids=["error-event", "http-410"])
def test_gone_relists_and_the_store_drops_what_vanished(gone: Reply, backoff: Backoff) -> None:
    async def main() -> None:
        async with FakeApi() as api:
            gate = asyncio.Event()
            api.add_list(SVC_PATH, page([svc("keep", rv="5"), svc("vanish", rv="6")], rv="10"))
            api.add_list(SVC_PATH, page([svc("keep", rv="5"), svc("fresh", rv="19")], rv="20"))
            api.add_watch(SVC_PATH, Reply(status=gone.status, body=gone.body, events=list(gone.events), gate=gate))

            builder = StateBuilder(node_name="node-1")

            def on_event(event: str, kind: str, obj: dict[str, Any]) -> None:
                builder.delete_object(obj) if event == "DELETED" else builder.upsert(obj)

            def names() -> set[str]:
                return {n.name for n in builder.build().services}

            client = api.client()
            r = Reflector(client, SERVICES, on_replace=builder.replace, on_event=on_event)
            backoff.reflector = r
            task = asyncio.create_task(r.run())
            await asyncio.wait_for(r.synced.wait(), 2)
            await until(lambda: len(api.watch_requests(SVC_PATH)) == 1, "the first watch")
            assert r.relists == 1
            assert names() == {"keep", "vanish"}

            gate.set()  # now the watch answers 410
            await until(lambda: r.relists == 2, "the relist")
            assert names() == {"keep", "fresh"}  # "vanish" was deleted while we were not watching
            await until(lambda: len(api.watch_requests(SVC_PATH)) == 2, "the watch after the relist")
            await stop(task)
            await client.close()

            first_list, relist = api.list_requests(SVC_PATH)
            # Neither is a quorum read of etcd: the first list takes any version (the API
            # server's cache), the relist our version or newer; neither continues an old list.
            assert first_list.query["resourceVersion"] == "0"
            assert relist.query["resourceVersion"] == "10"
            assert relist.query["resourceVersionMatch"] == "NotOlderThan"
            assert "continue" not in relist.query
            assert relist.query["labelSelector"] == SELECTOR
            assert api.watch_requests(SVC_PATH)[1].query["resourceVersion"] == "20"
            assert r.resource_version == "20"
            assert backoff.delays == []  # 410 means relist at once, not back off

    run(main)


# -- errors and backoff -------------------------------------------------------------------------

def test_server_errors_back_off_with_jitter_then_recover(backoff: Backoff) -> None:
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, Reply(status=500, body={"message": "etcd down"}),
                         Reply(status=500, body={"message": "etcd down"}),
                         Reply(status=503, body={"message": "still down"}),
                         page([svc("a")], rv="3"))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            backoff.reflector = r
            task = asyncio.create_task(r.run())
            await asyncio.wait_for(r.synced.wait(), 2)
            await until(lambda: len(api.watch_requests(SVC_PATH)) == 1, "the watch")
            await stop(task)
            await client.close()

            assert backoff.delays == [0.5, 1.0, 2.0]  # exponential (jitter drawn at its middle)
            assert backoff.uniform_args == [(0.5, 1.5)] * 3  # ±50 % jitter on each
            assert backoff.synced_when_sleeping == [False, False, False]
            assert r.synced.is_set()
            assert [[name_of(o) for o in items] for _, items in rec.replaced] == [["a"]]
            assert r.relists == 1
            assert len(api.list_requests(SVC_PATH)) == 4

    run(main)


def test_backoff_is_capped_by_max_backoff(backoff: Backoff) -> None:
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, *[Reply(status=500, body={}) for _ in range(5)], page([], rv="3"))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event, max_backoff=1.5)
            task = asyncio.create_task(r.run())
            await asyncio.wait_for(r.synced.wait(), 2)
            await stop(task)
            await client.close()
            assert backoff.delays == [0.5, 1.0, 1.5, 1.5, 1.5]

    run(main)


def test_watch_errors_relist_with_backoff_429_resumes_and_a_good_watch_resets(backoff: Backoff) -> None:
    """An HTTP error or an ERROR event means the watch cannot resume from our version (e.g.
    "too large resource version" after an etcd restore: retrying it would fail forever), so
    the reflector relists; 429 only asks us to come back later with the same watch."""
    too_large = {"kind": "Status", "code": 504, "reason": "Timeout",
                 "message": "Too large resource version: 99, current: 32"}

    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([svc("a")], rv="30"), page([svc("a")], rv="32"),
                         page([svc("a")], rv="33"))
            api.add_watch(SVC_PATH,
                          Reply(status=500, body={"message": "boom"}),
                          Reply(events=[{"type": "ERROR", "object": too_large}]),
                          Reply(status=429, body={"message": "slow down"}),
                          Reply(events=[ev("ADDED", svc("b", rv="34"))]),  # ends normally
                          Reply(status=429, body={}))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: len(api.watch_requests(SVC_PATH)) == 6, "six watches")
            await stop(task)
            await client.close()

            assert backoff.delays == [0.5, 1.0, 2.0, 0.5]  # reset by the watch that ended normally
            assert r.relists == 3 and len(api.list_requests(SVC_PATH)) == 3
            assert [q.query["resourceVersion"] for q in api.watch_requests(SVC_PATH)] == [
                "30", "32", "33", "33", "34", "34"]
            assert [name_of(o) for _, _, o in rec.events] == ["b"]

    run(main)


def test_unreachable_server_is_a_kube_error() -> None:
    async def main() -> None:
        async with FakeApi() as api:
            host = api.host
        client = KubeClient(host=host, ssl_context=False, headers={})  # nothing listens there now
        with pytest.raises(KubeError, match="GET /api/v1/services"):
            await client.get(SVC_PATH, {})
        with pytest.raises(KubeError, match="WATCH /api/v1/services"):
            await client.watch(SVC_PATH, {}, lambda e: None)
        await client.close()

    run(main)


def test_a_garbled_watch_line_backs_off_instead_of_killing_the_reflector(backoff: Backoff) -> None:
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([], rv="1"))
            api.add_watch(SVC_PATH, Reply(events=[b"<html>proxy error</html>\n"]))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: len(api.watch_requests(SVC_PATH)) >= 2 or task.done(), "a second watch")
            try:
                assert not task.done(), f"reflector died: {task.exception()!r}"
                assert backoff.delays == [0.5]
            finally:
                if not task.done():
                    await stop(task)
                await client.close()

    run(main)


# -- GET only -----------------------------------------------------------------------------------

def test_only_get_requests_are_ever_made(backoff: Backoff) -> None:
    async def main() -> None:
        async with FakeApi() as api:
            node = sc.node("node-1", ["192.168.1.1"])
            api.add_list(SVC_PATH, Reply(status=500, body={}), page([svc("a")], rv="1"),
                         page([svc("a")], rv="5"))
            api.add_watch(SVC_PATH, Reply(events=[ev("ADDED", svc("b", rv="2")), ev("DELETED", svc("b", rv="3"))]),
                          GONE_EVENT)
            api.add_list(SLICE_PATH, page([], rv="1", cont="x"), page([], rv="1"))
            api.add_watch(SLICE_PATH, Reply(status=410, body={}))
            api.add_list(SLICE_PATH, page([], rv="4"))
            api.add_list(NODE_PATH, page([node], rv="1"))
            api.add_watch(NODE_PATH, Reply(events=[bookmark("9")]))
            rec = Recorder()
            client = api.client()
            refl = [Reflector(client, res, on_replace=rec.on_replace, on_event=rec.on_event)
                    for res in (SERVICES, ENDPOINT_SLICES, node_resource("node-1"))]
            tasks = [asyncio.create_task(r.run()) for r in refl]
            await until(lambda: [r.relists for r in refl] == [2, 2, 1]
                        and len(api.watch_requests(NODE_PATH)) == 2, "every script")
            for t in tasks:
                await stop(t)
            await client.close()

            assert len(api.requests) >= 12
            assert {q.method for q in api.requests} == {"GET"}
            assert {q.path for q in api.requests} == {SVC_PATH, SLICE_PATH, NODE_PATH}
            for q in api.requests:
                assert q.headers["Accept"] == "application/json"
                assert q.headers["User-Agent"] == "pyproxy"

    run(main)


# -- credentials --------------------------------------------------------------------------------

def _kubeconfig(server: str, user: dict[str, Any]) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "tester"}}],
    })  # JSON is YAML


def test_from_config_kubeconfig_token_reaches_the_server(tmp_path: Any) -> None:
    async def main() -> None:
        async with FakeApi() as api:
            path = tmp_path / "kubeconfig"
            path.write_text(_kubeconfig(api.host, {"token": "s3cret-token"}))
            client = await KubeClient.from_config(kubeconfig=str(path))
            assert client.host == api.host
            api.add_list(SVC_PATH, page([svc("a")], rv="1"))
            rec = Recorder()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: len(api.watch_requests(SVC_PATH)) == 1, "the watch")
            await stop(task)
            await client.close()

            assert len(api.requests) == 2
            for q in api.requests:  # the list and the watch
                assert q.headers["Authorization"] == "Bearer s3cret-token"
            assert [name_of(o) for o in rec.replaced[0][1]] == ["a"]

    run(main)


def test_from_config_missing_kubeconfig_says_what_to_do(tmp_path: Any) -> None:
    missing = tmp_path / "no-such-kubeconfig"

    async def main() -> None:
        with pytest.raises(KubeError, match="--kubeconfig") as err:
            await KubeClient.from_config(kubeconfig=str(missing))
        assert str(missing) in str(err.value)

    run(main)


def _self_signed(tmp_path: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (cert path, key path): the fake server's and the CA.
    cryptography is a declared test dependency: this test must run, not skip."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-apiserver")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "ca.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_in_cluster_service_account_token_reaches_the_server(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    from pyproxy.sources import credentials

    cert, key = _self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text("in-cluster-token")
    monkeypatch.setattr(credentials, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(credentials, "SERVICE_CERT_FILENAME", cert)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def main() -> None:
        async with FakeApi(ssl_context=server_ctx) as api:
            monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.server.port))
            client = await KubeClient.from_config(kubeconfig=None)
            assert client.host == f"https://127.0.0.1:{api.server.port}"
            api.add_list(SVC_PATH, page([svc("a")], rv="1"))
            rec = Recorder()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: len(api.watch_requests(SVC_PATH)) == 1 or task.done(), "the watch")
            try:
                assert not task.done(), f"reflector died: {task.exception()!r}"
                assert [q.headers.get("Authorization") for q in api.requests] == ["Bearer in-cluster-token"] * 2
            finally:
                if not task.done():
                    await stop(task)
                await client.close()

    run(main)


EXEC_PLUGIN = textwrap.dedent("""\
    import json, pathlib, sys
    count = pathlib.Path(sys.argv[1])
    n = int(count.read_text() or "0") + 1 if count.exists() else 1
    count.write_text(str(n))
    print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                      "status": {"token": f"exec-token-{n}", "expirationTimestamp": sys.argv[2]}}))
    """)


def test_expired_exec_plugin_token_is_refreshed(tmp_path: Any) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EXEC_PLUGIN)
    # Already expired when issued (well inside kubernetes_asyncio's 5-minute skew, and past
    # by the second request): any later request needs a fresh token.
    expiry = (datetime.now(timezone.utc) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def main() -> None:
        async with FakeApi() as api:
            path = tmp_path / "kubeconfig"
            path.write_text(_kubeconfig(api.host, {"exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
                "args": [str(plugin), str(tmp_path / "count"), expiry], "interactiveMode": "Never"}}))
            client = await KubeClient.from_config(kubeconfig=str(path))
            api.add_list(SVC_PATH, page([], rv="1"), page([], rv="2"))
            try:
                await client.get(SVC_PATH, {})
                await client.get(SVC_PATH, {})
            finally:
                await client.close()
            first, second = (q.headers["Authorization"] for q in api.requests)
            assert first.startswith("Bearer exec-token-")
            assert second != first

    run(main)


# -- faults that must never end a reflector (hardening issue, defect 3) --------------------------

def test_a_silent_watch_is_restarted_after_the_idle_timeout(backoff: Backoff) -> None:
    """A half-open connection, or a proxy that keeps the connection but stopped forwarding:
    without a read timeout the reflector would wait forever and the rules would go stale."""
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([svc("a")], rv="40"))
            api.add_watch(SVC_PATH, Reply(events=[ev("ADDED", svc("b", rv="41"))], hold=True),
                          Reply(events=[ev("ADDED", svc("c", rv="42"))], hold=True))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event,
                          idle_timeout=0.3)
            task = asyncio.create_task(r.run())
            await until(lambda: len(rec.events) == 2, "the event of the second watch")
            await stop(task)
            await client.close()
            assert [q.query["resourceVersion"] for q in api.watch_requests(SVC_PATH)][:2] == ["40", "41"]
            assert r.relists == 1  # resumed, not relisted: the version is still good
            # At once, not backed off: a quiet watch is not an error (a server that sends no
            # bookmarks would otherwise push each reconnect towards the 30 s backoff cap).
            assert backoff.delays == []

    run(main)


@pytest.mark.parametrize("body", [[], "a string", 3, None], ids=["list", "string", "number", "null"])
def test_a_list_body_that_is_not_an_object_backs_off_and_recovers(backoff: Backoff, body: Any) -> None:
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, Reply(body=body if body is not None else "null"),
                         Reply(body={"metadata": {"resourceVersion": "1"}, "items": [3]}),
                         page([svc("a")], rv="2"))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await asyncio.wait_for(r.synced.wait(), 2)
            await stop(task)
            await client.close()
            assert backoff.delays == [0.5, 1.0]
            assert [[name_of(o) for o in items] for _, items in rec.replaced] == [["a"]]

    run(main)


@pytest.mark.parametrize("line", [b"[1, 2]\n", b'{"type": "ADDED", "object": [1]}\n', b"null\n"],
                         ids=["array", "object-not-a-mapping", "null"])
def test_a_watch_event_of_the_wrong_shape_resumes_the_watch(backoff: Backoff, line: bytes) -> None:
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([], rv="5"))
            api.add_watch(SVC_PATH, Reply(events=[line]), Reply(events=[ev("ADDED", svc("b", rv="6"))]))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: len(rec.events) == 1, "the event after the bad one")
            await stop(task)
            await client.close()
            assert backoff.delays == [0.5]
            assert [q.query["resourceVersion"] for q in api.watch_requests(SVC_PATH)][:2] == ["5", "5"]

    run(main)


def test_credentials_that_fail_back_off_until_they_work(backoff: Backoff, tmp_path: Any) -> None:
    """An unreadable token file (being rotated, a failed mount) or a failing exec plugin raise
    OSError or anything else from the auth hook: the reflector waits and tries again."""
    from pyproxy.sources.credentials import _token_file

    token = tmp_path / "token"

    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([svc("a")], rv="2"))
            client = KubeClient(host=api.host, ssl_context=False, headers={}, auth=_token_file(str(token)))
            rec = Recorder()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: len(backoff.delays) >= 2, "two failed attempts")
            assert not task.done()
            token.write_text("sekret\n")
            await asyncio.wait_for(r.synced.wait(), 2)
            await stop(task)
            await client.close()
            assert api.list_requests(SVC_PATH)[0].headers["Authorization"] == "Bearer sekret"

    run(main)


def test_an_exception_from_the_store_relists_instead_of_ending_the_reflector(backoff: Backoff) -> None:
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([svc("a")], rv="2"), page([svc("a")], rv="3"))
            api.add_watch(SVC_PATH, Reply(events=[ev("ADDED", svc("boom", rv="3"))]))
            rec = Recorder()

            def on_event(event: str, kind: str, obj: dict[str, Any]) -> None:
                if name_of(obj) == "boom":
                    raise RuntimeError("a bug in the store")
                rec.on_event(event, kind, obj)

            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: r.relists == 2, "the relist after the error")
            assert not task.done()
            await stop(task)
            await client.close()
            assert backoff.delays == [0.5]

    run(main)


def test_api_sockets_have_keepalive_and_a_user_timeout() -> None:
    import socket

    sock = kube._keepalive_socket((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 1)))
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == kube.KEEPALIVE_IDLE
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == kube.KEEPALIVE_COUNT
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == kube.USER_TIMEOUT_MS
    finally:
        sock.close()


@pytest.mark.parametrize("gone", [Reply(status=410, body={"code": 410}), GONE_EVENT], ids=["http-410", "error-event"])
def test_a_410_storm_is_backed_off(backoff: Backoff, gone: Reply) -> None:
    """One 410 relists at once; 410 after 410 with nothing in between backs off, instead of a
    tight loop of LISTs against a server in trouble (the e2e fault proxy counted 2,464 LISTs in
    a few seconds when the 410 came as an ERROR event, which used to count as progress)."""
    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, *[page([svc("a")], rv=str(10 + k)) for k in range(5)])
            api.add_watch(SVC_PATH, *[copy.deepcopy(gone) for _ in range(4)])
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: r.relists == 5, "five lists")
            await stop(task)
            await client.close()
            assert backoff.delays == [0.5, 1.0, 2.0]

    run(main)


def test_not_synced_until_the_last_page_of_a_chunked_list() -> None:
    """Hardening issue, item 13: setting ``synced`` after the first page would let the first
    sync run on a partial view and delete the Services of the pages still to come. Every e2e
    list fits in one page, so only this test would notice."""
    async def main() -> None:
        async with FakeApi() as api:
            gate = asyncio.Event()
            api.add_list(SVC_PATH, page([svc("a"), svc("b")], rv="42", cont="c1"),
                         Reply(body=page([svc("c")], rv="42"), gate=gate))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event, page_size=2)
            task = asyncio.create_task(r.run())
            await until(lambda: len(api.list_requests(SVC_PATH)) == 2, "the request for page 2")
            await asyncio.sleep(0.05)
            assert not r.synced.is_set() and rec.replaced == []
            gate.set()
            await asyncio.wait_for(r.synced.wait(), 2)
            assert [[name_of(o) for o in items] for _, items in rec.replaced] == [["a", "b", "c"]]
            await stop(task)
            await client.close()

    run(main)


def test_a_list_refused_at_our_version_falls_back_to_a_quorum_read(backoff: Backoff) -> None:
    """After an etcd restore the server's versions went back: a list at our (now too large)
    version is refused with 504, so the next one is a quorum read (no version), and then
    lists go back to the cache."""
    too_large = {"kind": "Status", "code": 504, "reason": "Timeout",
                 "message": "Too large resource version: 90, current: 12"}

    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([svc("a")], rv="90"), Reply(status=504, body=too_large),
                         page([svc("b")], rv="12"))
            api.add_watch(SVC_PATH, Reply(status=500, body={}))  # cannot resume: relist
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: r.relists == 2, "the quorum relist")
            await stop(task)
            await client.close()
            versions = [(q.query.get("resourceVersion"), q.query.get("resourceVersionMatch"))
                        for q in api.list_requests(SVC_PATH)]
            assert versions == [("0", None), ("90", "NotOlderThan"), (None, None)]
            assert [[name_of(o) for o in items] for _, items in rec.replaced] == [["a"], ["b"]]

    run(main)


def test_a_server_that_does_not_answer_a_watch_is_backed_off(backoff: Backoff) -> None:
    """No response headers within the idle timeout: a stuck server or proxy; that is an error."""
    async def main() -> None:
        async with FakeApi() as api:
            gate = asyncio.Event()  # never set: the answer never comes
            api.add_list(SVC_PATH, page([svc("a")], rv="40"))
            api.add_watch(SVC_PATH, Reply(gate=gate), Reply(gate=gate), Reply(gate=gate))
            rec = Recorder()
            client = api.client()
            r = Reflector(client, SERVICES, on_replace=rec.on_replace, on_event=rec.on_event,
                          idle_timeout=0.2)
            task = asyncio.create_task(r.run())
            await until(lambda: len(backoff.delays) >= 2, "two backed-off retries")
            await stop(task)
            await client.close()
            assert backoff.delays[:2] == [0.5, 1.0]

    run(main)
