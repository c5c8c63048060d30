"""The listeners of the userspace mode: one TCP or UDP socket per service port (asyncio)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from pyproxy.userspace.balancer import Balancer

log = logging.getLogger("pyproxy.userspace")

CONNECT_TIMEOUT = 2.0
CHUNK = 256 * 1024
MAX_UDP_SESSIONS = 4096
"""Client addresses one UDP relay serves at once; each holds a socket (a file descriptor), so a
flood of spoofed sources must not exhaust them. Datagrams of further clients are dropped until
sessions idle out."""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class TcpRelay:
    """Accepts on ``port``; for each client, connects to a backend (the next one if refused)."""

    def __init__(self, name: str, port: int, balancer: Balancer) -> None:
        self.name = name
        self.port = port
        self.balancer = balancer
        self.server: asyncio.base_events.Server | None = None
        self.active: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "0.0.0.0", self.port, reuse_address=True,
                                                 backlog=1024)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.active):
            task.cancel()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        client_ip = cwriter.get_extra_info("peername")[0]
        try:
            for ep in self.balancer.candidates(client_ip):
                try:
                    breader, bwriter = await asyncio.wait_for(asyncio.open_connection(*ep), CONNECT_TIMEOUT)
                except (OSError, asyncio.TimeoutError) as err:
                    log.debug("%s: %s:%d failed (%s), trying the next backend", self.name, *ep, err)
                    continue
                self.balancer.used(client_ip, ep)
                try:
                    await asyncio.gather(_pipe(creader, bwriter), _pipe(breader, cwriter))
                finally:
                    bwriter.close()
                return
            log.debug("%s: no backend accepted a connection from %s", self.name, client_ip)
        finally:
            cwriter.close()
            self.active.discard(task)


class _BackendSide(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, client: tuple[str, int]) -> None:
        self.relay = relay
        self.client = client
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.relay.transport is not None:
            self.relay.transport.sendto(data, self.client)
        session = self.relay.sessions.get(self.client)
        if session is not None:
            session[1] = time.monotonic()


class UdpRelay(asyncio.DatagramProtocol):
    """One session per client address: a connected socket to the chosen backend, forgotten after
    ``idle_timeout`` seconds without traffic (the client IP is lost, as in every userspace proxy)."""

    def __init__(self, name: str, port: int, balancer: Balancer, idle_timeout: float = 30.0,
                 max_sessions: int = MAX_UDP_SESSIONS) -> None:
        self.name = name
        self.port = port
        self.balancer = balancer
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.dropped = 0
        """Datagrams dropped because every session slot was taken."""
        self._opening: set[tuple[str, int]] = set()
        self.transport: Any = None
        self.sessions: dict[tuple[str, int], list[Any]] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=("0.0.0.0", self.port),
                                            family=socket.AF_INET, reuse_port=False)
        self._reaper = asyncio.create_task(self._reap())

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for backend, _ in self.sessions.values():
            backend.close()
        self.sessions.clear()
        if self.transport is not None:
            self.transport.close()

    def forget_backends_not_in(self, endpoints: tuple[tuple[str, int], ...]) -> None:
        """Close sessions to backends that are gone: the client's next datagram picks anew."""
        live = set(endpoints)
        for client, (backend, _) in list(self.sessions.items()):
            if backend.get_extra_info("peername") not in live:
                backend.close()
                del self.sessions[client]

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.idle_timeout / 4))
            now = time.monotonic()
            for client, (backend, last) in list(self.sessions.items()):
                if now - last > self.idle_timeout:
                    backend.close()
                    del self.sessions[client]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        session = self.sessions.get(addr)
        if session is not None:
            session[0].sendto(data)
            session[1] = time.monotonic()
            return
        if len(self.sessions) + len(self._opening) >= self.max_sessions:
            if not self.dropped:
                log.warning("%s: %d UDP clients at once, the most a relay serves; dropping "
                            "datagrams of new clients until sessions idle out", self.name, self.max_sessions)
            self.dropped += 1
            return
        self._opening.add(addr)
        asyncio.ensure_future(self._open(data, addr))

    async def _open(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            await self._open_session(data, addr)
        finally:
            self._opening.discard(addr)

    async def _open_session(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        for ep in self.balancer.candidates(addr[0]):
            try:
                backend, _ = await loop.create_datagram_endpoint(lambda: _BackendSide(self, addr), remote_addr=ep)
            except OSError:
                continue
            self.balancer.used(addr[0], ep)
            old = self.sessions.get(addr)
            if old is not None:  # two first datagrams raced: keep one session
                backend.close()
                old[0].sendto(data)
                return
            self.sessions[addr] = [backend, time.monotonic()]
            backend.sendto(data)
            return
