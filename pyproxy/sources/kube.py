"""Read Services, EndpointSlices and our Node from the Kubernetes API: list, then watch.

A :class:`Reflector` per resource does what client-go's reflector does, which no Python client
does completely (kopf does not synthesize deletions after a relist):

* a chunked LIST (``limit`` + ``continue``) that *replaces* the store, so objects deleted while
  we were not watching disappear (the store computes the synthetic deletes);
* a WATCH from the list's resourceVersion with bookmarks, so a quiet resource still advances
  its resourceVersion and a reconnect does not need a relist;
* a relist on 410 Gone (the resourceVersion is too old) and on any other answer that says the
  watch cannot resume from our version (an ERROR event, an HTTP error such as "too large
  resource version" after an etcd restore); reconnects with exponential backoff and jitter;
* a dead connection is noticed: TCP keepalive probes (a peer that vanished: ~1 min), and a read
  timeout of :data:`WATCH_IDLE_TIMEOUT` on the watch stream (a peer, or a proxy, that keeps the
  connection but stopped sending: the API server sends every watch a bookmark each minute, so a
  silent watch is a stuck one). Either way the watch is restarted from our last version;
* nothing the server sends (a body that is not a JSON object, an event of the wrong shape) and
  nothing local (a token file that cannot be read, an exec plugin that fails) ends the reflector:
  it logs, counts (``pyproxy_reflector_errors_total``), backs off and starts over.

We only ever GET: pyproxy never writes to a watched object. Authentication comes from a
kubeconfig or the in-cluster service account, loaded by kubernetes_asyncio's config loader;
requests go through aiohttp and are parsed as plain dicts (model objects would cost more
than the whole sync at 10k services).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import aiohttp
from prometheus_client import Counter

from pyproxy import gcpolicy
from pyproxy.backoff import Backoff
from pyproxy.sources.errors import KubeError as KubeError  # re-exported: the client raises it

log = logging.getLogger("pyproxy.kube")

REFLECTOR_ERRORS = Counter("pyproxy_reflector_errors_total",
                           "Errors that interrupted a reflector's list or watch, by resource and "
                           "kind of error; each is followed by a backoff and a new watch or list",
                           ["resource", "reason"])
RELISTS = Counter("pyproxy_reflector_relists_total", "Full LISTs that replaced a resource's store",
                  ["resource"])

WATCH_IDLE_TIMEOUT = 90.0
"""Seconds without a byte on a watch before it is restarted. The API server's watch cache sends
a bookmark to every watch that allows them once a minute (``defaultBookmarkFrequency``)."""
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3
"""TCP keepalive: first probe after 30 s of silence, then every 10 s; dead after 3 unanswered."""
USER_TIMEOUT_MS = 60_000
"""TCP_USER_TIMEOUT: a connection whose sent data stays unacknowledged this long is dead."""


def _keepalive_socket(addr_info: Any) -> socket.socket:
    """Sockets for the API connection, with keepalive probes and a user timeout, so that a
    peer that vanished (a node reboot, a NAT entry dropped) is noticed in about a minute."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if family in (socket.AF_INET, socket.AF_INET6):
        for opt, value in ((getattr(socket, "TCP_KEEPIDLE", None), KEEPALIVE_IDLE),
                           (getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL),
                           (getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_COUNT),
                           (getattr(socket, "TCP_USER_TIMEOUT", None), USER_TIMEOUT_MS)):
            if opt is not None:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    return sock

# kube-proxy's informers skip objects carrying either label (see model.parse).
PROXY_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


class Relist(KubeError):
    """The watch cannot resume from our resourceVersion: list again."""


class Gone(Relist):
    """410: our resourceVersion is too old; relist at once."""


class WatchIdle(KubeError):
    """A watch stream sent nothing for the idle timeout: resume it from our version at once."""


class HttpError(KubeError):
    """The API server answered with an HTTP error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Resource:
    kind: str
    path: str
    """Collection path for all namespaces, e.g. ``/api/v1/services``."""
    label_selector: str = ""
    field_selector: str = ""


SERVICES = Resource("Service", "/api/v1/services", label_selector=PROXY_LABEL_SELECTOR)
ENDPOINT_SLICES = Resource("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices",
                           label_selector=PROXY_LABEL_SELECTOR)


def node_resource(name: str) -> Resource:
    return Resource("Node", "/api/v1/nodes", field_selector=f"metadata.name={name}")


class KubeClient:
    """Minimal GET-only API client: JSON lists and streaming watches."""

    def __init__(self, *, host: str, ssl_context: ssl.SSLContext | bool, headers: dict[str, str],
                 user_agent: str = "pyproxy", auth: Callable[[], Awaitable[dict[str, str]]] | None = None) -> None:
        self.host = host.rstrip("/")
        self._ssl = ssl_context
        self._headers = {**headers, "User-Agent": user_agent, "Accept": "application/json"}
        self._auth = auth
        """Fresh auth headers per request: in-cluster tokens are rotated on disk, and exec
        plugins hand out short-lived ones; kubernetes_asyncio's refresh hooks handle both."""
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    async def from_config(cls, *, kubeconfig: str | None) -> Self:
        """From a kubeconfig file, or in-cluster (token + ``KUBERNETES_SERVICE_HOST``)."""
        from pyproxy.sources.credentials import (
            CredentialsError,
            from_kubeconfig,
            in_cluster,
        )

        where = kubeconfig or "the in-cluster service account"
        try:
            creds = from_kubeconfig(kubeconfig) if kubeconfig else in_cluster()
        except (CredentialsError, OSError, ssl.SSLError) as err:
            raise KubeError(f"cannot load credentials from {where}: {err}; pass --kubeconfig "
                            "or run in a pod with a service account") from None
        if creds is not None:
            return cls(host=creds.host, ssl_context=creds.ssl, headers=creds.headers, auth=creds.auth)
        return await cls._from_plugin_config(kubeconfig or "")

    @classmethod
    async def _from_plugin_config(cls, kubeconfig: str) -> Self:
        """A kubeconfig whose user runs an exec or auth-provider plugin: kubernetes_asyncio's
        loader runs it (and runs it again when the token expires)."""
        from kubernetes_asyncio import config as kconfig
        from kubernetes_asyncio.client import Configuration

        cfg = Configuration()
        try:
            loader = await kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        except (kconfig.ConfigException, OSError) as err:
            raise KubeError(f"cannot load credentials from {kubeconfig}: {err}; pass --kubeconfig "
                            "or run in a pod with a service account") from None

        if not cfg.host:
            raise KubeError(f"{kubeconfig or 'the kubeconfig'} names no API server; set the "
                            "cluster's server: field, or pass another --kubeconfig")
        host: str = cfg.host

        async def auth() -> dict[str, str]:
            await loader.load_and_set(cfg)  # re-runs an exec plugin whose token has expired
            out = {}
            for setting in (await cfg.auth_settings()).values():
                if setting.get("in") == "header" and setting.get("value"):
                    out[setting["key"]] = setting["value"]
            return out

        ctx: ssl.SSLContext | bool
        if host.startswith("https"):
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
            if not cfg.verify_ssl:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if cfg.cert_file:
                ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        else:
            ctx = False
        return cls(host=host, ssl_context=ctx, headers={}, auth=auth)

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=8, socket_factory=_keepalive_socket),
                timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=None),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _auth_headers(self) -> dict[str, str]:
        if self._auth is None:
            return {}
        try:
            return await self._auth()
        except Exception as err:  # noqa: BLE001 - a token file or exec plugin failing
            raise KubeError(f"cannot get credentials: {type(err).__name__}: {err}") from None

    async def get(self, path: str, params: dict[str, str], *, timeout: float = 60) -> dict[str, Any]:
        try:
            async with self._sess().get(self.host + path, params=params, headers=await self._auth_headers(),
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await resp.read()
                if resp.status == 410:
                    raise Gone("resourceVersion too old")
                if resp.status != 200:
                    raise HttpError(resp.status, f"GET {path}: HTTP {resp.status}: {_snippet(body)}")
                with gcpolicy.paused(settle=True):  # a LIST: tens of thousands of objects at once
                    data = json.loads(body)
        except ValueError as err:  # not JSON: a proxy's error page, a truncated body
            raise KubeError(f"GET {path}: response is not JSON: {err}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise KubeError(f"GET {path}: {type(err).__name__}: {err}") from None
        if not isinstance(data, dict):
            raise KubeError(f"GET {path}: response is a JSON {type(data).__name__}, not an object")
        return data

    async def watch(self, path: str, params: dict[str, str], on_event: Callable[[dict[str, Any]], None],
                    *, idle_timeout: float = WATCH_IDLE_TIMEOUT) -> None:
        """Stream watch events to ``on_event`` until the server ends the watch, or until nothing
        arrived for ``idle_timeout`` seconds (KubeError)."""
        params = {**params, "watch": "1", "allowWatchBookmarks": "true"}
        streaming = False
        try:
            async with self._sess().get(self.host + path, params=params,
                                        headers=await self._auth_headers(),
                                        timeout=aiohttp.ClientTimeout(total=None, connect=10,
                                                                      sock_read=idle_timeout)) as resp:
                if resp.status == 410:
                    raise Gone("resourceVersion too old")
                if resp.status == 429:  # too many requests: the same watch, later
                    raise KubeError(f"WATCH {path}: HTTP 429: {_snippet(await resp.read())}")
                if resp.status != 200:
                    # "Too large resource version" (an etcd restored from backup), a 500...:
                    # retrying the same version could fail forever; a relist cannot.
                    raise Relist(f"WATCH {path}: HTTP {resp.status}: {_snippet(await resp.read())}")
                buf = b""
                streaming = True
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            try:
                                event = json.loads(line)
                            except ValueError as err:
                                raise KubeError(f"WATCH {path}: event is not JSON: {err}") from None
                            if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
                                raise KubeError(f"WATCH {path}: event is not an object with an "
                                                f"object: {_snippet(line)}")
                            on_event(event)
        except asyncio.TimeoutError:
            if streaming:
                # A quiet stream (a server that sends no bookmarks, or a dead connection):
                # resuming costs one request, not an error.
                raise WatchIdle(f"WATCH {path}: nothing received for {idle_timeout:.0f}s") from None
            raise KubeError(f"WATCH {path}: no answer within {idle_timeout:.0f}s (a dead "
                            "connection or a stuck server); retrying") from None
        except aiohttp.ClientError as err:
            raise KubeError(f"WATCH {path}: {type(err).__name__}: {err}") from None


def _snippet(body: bytes) -> str:
    return body[:300].decode(errors="replace")


ReplaceFn = Callable[[str, list[dict[str, Any]]], object]
EventFn = Callable[[str, str, dict[str, Any]], None]


class Reflector:
    """Keeps one resource's objects flowing into ``on_replace`` / ``on_event``."""

    def __init__(self, client: KubeClient, resource: Resource, *, on_replace: ReplaceFn,
                 on_event: EventFn, page_size: int = 500, watch_timeout: int = 300,
                 max_backoff: float = 30.0, idle_timeout: float = WATCH_IDLE_TIMEOUT) -> None:
        self.client = client
        self.resource = resource
        self.on_replace = on_replace
        self.on_event = on_event
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        """The server ends each watch after this many seconds (``timeoutSeconds``)."""
        self.max_backoff = max_backoff
        self.idle_timeout = idle_timeout
        """Restart a watch that has been silent this long (see :data:`WATCH_IDLE_TIMEOUT`)."""
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.relists = 0
        self._events = 0
        self._gone_in_a_row = 0
        """410s since the last event: a storm of them is backed off."""
        self._quorum_next = False
        """The server refused a list at our version: read the next one from etcd."""

    def _params(self) -> dict[str, str]:
        p = {}
        if self.resource.label_selector:
            p["labelSelector"] = self.resource.label_selector
        if self.resource.field_selector:
            p["fieldSelector"] = self.resource.field_selector
        return p

    def _list_version(self) -> dict[str, str]:
        """Which version the first page may be read at. Not a quorum read of etcd, as client-go
        does not: the very first list at any version (``0``), a relist at our last version or
        newer, both served from the API server's watch cache; at a thousand nodes relisting
        after an API server restart, that is the difference between a cache lookup and a
        thousand etcd range reads. Only after the server refused such a list (its cache is
        behind, etcd was restored: 410 or "too large resource version") is it a quorum read."""
        if self._quorum_next:
            return {}
        if self.resource_version:
            return {"resourceVersion": self.resource_version, "resourceVersionMatch": "NotOlderThan"}
        return {"resourceVersion": "0"}

    async def list_all(self) -> None:
        """Chunked LIST, then replace the store with exactly what the server has."""
        items: list[dict[str, Any]] = []
        cont = ""
        while True:
            params = {**self._params(), "limit": str(self.page_size)}
            if cont:
                params["continue"] = cont  # the token holds the version: none may be given
            else:
                params.update(self._list_version())
            try:
                page = await self.client.get(self.resource.path, params)
            except (Gone, HttpError) as err:
                if not cont and (isinstance(err, Gone) or err.status == 504):
                    self._quorum_next = True
                raise
            page_items = page.get("items") or []
            meta = page.get("metadata") or {}
            if not isinstance(page_items, list) or not all(isinstance(i, dict) for i in page_items) \
                    or not isinstance(meta, dict):
                raise KubeError(f"LIST {self.resource.path}: not a list of objects")
            for item in page_items:
                item.setdefault("kind", self.resource.kind)  # list items carry no kind
                items.append(item)
            cont = meta.get("continue") or ""
            if not cont:
                self.resource_version = str(meta.get("resourceVersion", ""))
                break
        self.relists += 1
        self._quorum_next = False
        RELISTS.labels(resource=self.resource.kind).inc()
        self.on_replace(self.resource.kind, items)
        self.synced.set()
        log.info("listed %d %s objects at resourceVersion %s", len(items), self.resource.kind,
                 self.resource_version)

    def _handle(self, event: dict[str, Any]) -> None:
        self._events += 1
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", "gone"))
            # The server ended the stream with a Status ("too large resource version" after an
            # etcd restore, an internal error): our version cannot be trusted to resume from.
            raise Relist(f"watch error {obj.get('code')}: {obj.get('message', obj)}")
        self._gone_in_a_row = 0  # progress: the next 410 is the ordinary kind again
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = rv
        if kind == "BOOKMARK":
            return
        obj.setdefault("kind", self.resource.kind)
        self.on_event(kind or "", self.resource.kind, obj)

    async def run(self) -> None:
        """Forever: list, watch, and recover. Cancel the task to stop; nothing else ends it."""
        # Wider jitter than the sync loop's: every node's reflectors lose the same API server
        # at once, and their relists are what it must survive.
        backoff = Backoff(initial=0.5, maximum=self.max_backoff, jitter=0.5)
        need_list = True
        while True:
            try:
                if need_list:
                    await self.list_all()
                    need_list = False
                params = {**self._params(), "resourceVersion": self.resource_version,
                          "timeoutSeconds": str(self.watch_timeout)}
                started = time.monotonic()
                self._events = 0
                await self.client.watch(self.resource.path, params, self._handle,
                                        idle_timeout=self.idle_timeout)
                if time.monotonic() - started < 1.0 and not self._events:
                    # A watch the server ends at once with nothing in it (a misbehaving proxy,
                    # an overloaded server): do not reconnect in a tight loop.
                    await asyncio.sleep(backoff.next())
                else:
                    backoff.reset()
                continue
            except WatchIdle as err:
                # Not an error: the next watch starts at once, from our version. A server that
                # does not answer it either is an error (above), and is backed off.
                REFLECTOR_ERRORS.labels(resource=self.resource.kind, reason="idle").inc()
                log.info("%s: %s; resuming the watch", self.resource.kind, err)
                continue
            except Gone:
                need_list = True
                self._gone_in_a_row += 1
                if self._gone_in_a_row == 1:
                    REFLECTOR_ERRORS.labels(resource=self.resource.kind, reason="gone").inc()
                    # The normal case (we were away longer than the server keeps history): at once.
                    log.info("%s: resourceVersion %s expired, relisting", self.resource.kind,
                             self.resource_version)
                    continue
                # 410 right after a relist, again: a server (or proxy) in trouble. Back off
                # rather than hammer it with LISTs.
                reason, what = "gone", f"resourceVersion {self.resource_version} expired again; relisting"
            except Relist as err:
                reason, need_list = "relist", True
                what = f"{err}; relisting"
            except KubeError as err:
                reason, what = "api", str(err)
            except Exception as err:  # noqa: BLE001 - a reflector must never end but by cancel
                # A bug, or input we did not foresee: start over from a fresh list.
                reason, need_list = type(err).__name__, True
                what = f"unexpected {type(err).__name__}: {err}; relisting"
                log.error("%s: reflector error", self.resource.kind, exc_info=err)
            REFLECTOR_ERRORS.labels(resource=self.resource.kind, reason=reason).inc()
            delay = backoff.next()
            log.warning("%s: %s; retrying in %.1fs", self.resource.kind, what, delay)
            await asyncio.sleep(delay)


async def wait_synced(reflectors: list[Reflector]) -> None:
    await asyncio.gather(*(r.synced.wait() for r in reflectors))
