"""A tiny TCP+UDP echo backend: answers ``<pod name> <client ip>`` so tests see who answered
and which source address the backend saw (masqueraded or not).

Run inside a pod namespace: ``python -m lab.echo --name pod0 --port 8080``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(f"{self.name} {addr[0]}\n".encode(), addr)


BULK_BYTES = 256 * 1024 * 1024


async def serve(name: str, host: str | list[str], ports: list[int], http_ports: list[int] | None = None,
                bulk_ports: list[int] | None = None, stream_ports: list[int] | None = None) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Server speaks first: one line, then close. No request to wait for, so the probe
        # measures connection setup through the proxy, not our parsing.
        peer = writer.get_extra_info("peername")
        writer.write(f"{name} {peer[0]}\n".encode())
        try:
            await writer.drain()
        finally:
            writer.close()

    async def handle_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Just enough HTTP/1.0 for curl: read the request head, answer the same line.
        peer = writer.get_extra_info("peername")
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            body = f"{name} {peer[0]}\n".encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def handle_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A long-lived connection: one answer per line received, until the client closes.
        peer = writer.get_extra_info("peername")
        try:
            while await reader.readline():
                writer.write(f"{name} {peer[0]}\n".encode())
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One bulk stream: 256 MB of zeros, then close (the throughput benchmark).
        block = bytes(1 << 20)
        try:
            for _ in range(BULK_BYTES // len(block)):
                writer.write(block)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    loop = asyncio.get_running_loop()
    servers = []
    hosts = [host] if isinstance(host, str) else list(host)
    if "::" in hosts and not _ipv6_works():
        hosts.remove("::")  # IPv6 disabled in this namespace: serve IPv4 only
    for port in ports:
        # One socket per family: asyncio binds IPv6 sockets IPv6-only, so both can coexist.
        servers.append(await asyncio.start_server(handle, hosts, port, reuse_address=True, backlog=512))
        for h in hosts:
            await loop.create_datagram_endpoint(lambda: _Udp(name), sock=_udp_socket(h, port))
    for port in http_ports or []:
        servers.append(await asyncio.start_server(handle_http, hosts, port, reuse_address=True, backlog=512))
    for port in stream_ports or []:
        servers.append(await asyncio.start_server(handle_stream, hosts, port, reuse_address=True))
    for port in bulk_ports or []:
        servers.append(await asyncio.start_server(handle_bulk, hosts, port, reuse_address=True))
    await serve_until_stopped(servers)


async def serve_until_stopped(servers: Sequence[asyncio.AbstractServer]) -> None:
    """Say "ready" (the parent waits for it), serve until SIGTERM or SIGINT, then close."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def _udp_socket(host: str, port: int):  # type: ignore[no-untyped-def]
    """A bound UDP socket; IPv6 ones IPv6-only (asyncio does that for TCP, not for UDP), so
    an IPv4 socket on the same port can coexist."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    return s


def _ipv6_works() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("::", 0))
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="the name to answer with")
    parser.add_argument("--host", action="append", default=None,
                        help="address to listen on (repeatable; default 0.0.0.0 and ::)")
    parser.add_argument("--port", type=int, action="append", required=True,
                        help="TCP and UDP port to serve (repeatable)")
    parser.add_argument("--http-port", type=int, action="append", default=[],
                        help="port answering HTTP/1.0 requests with the same line (for curl)")
    parser.add_argument("--bulk-port", type=int, action="append", default=[],
                        help="port sending 256 MB of zeros to each client (throughput benchmark)")
    parser.add_argument("--stream-port", type=int, action="append", default=[],
                        help="port answering every line of a long-lived connection")
    parser.add_argument("--address", help="with --gateway: wait for eth0 in this (fresh) network "
                        "namespace, give it this IP/prefix and a default route, then serve; used by "
                        "the lab's pod runner, which starts us under 'unshare --net'")
    parser.add_argument("--gateway")
    parser.add_argument("--address6", help="with --address: an IPv6 address/prefix as well")
    parser.add_argument("--gateway6")
    args = parser.parse_args()
    if args.address:
        _configure_eth0(args.address, args.gateway, args.address6, args.gateway6)
    asyncio.run(serve(args.name, args.host or ["0.0.0.0", "::"], args.port, args.http_port, args.bulk_port, args.stream_port))


def _configure_eth0(address: str, gateway: str | None, address6: str | None = None,
                    gateway6: str | None = None, timeout: float = 20.0) -> None:
    """Bring up lo and eth0 (moved in by the pod runner) with an address and default route
    (and an IPv6 pair for a dual-stack pod)."""
    import socket
    import time

    from pyroute2 import IPRoute

    ip, _, prefix = address.partition("/")
    deadline = time.monotonic() + timeout
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        while not ipr.link_lookup(ifname="eth0"):
            if time.monotonic() > deadline:
                raise SystemExit("echo: eth0 never appeared in this network namespace")
            time.sleep(0.02)
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=idx, address=ip, prefixlen=int(prefix or 24))
        if address6:
            ip6, _, prefix6 = address6.partition("/")
            ipr.addr("add", index=idx, address=ip6, prefixlen=int(prefix6 or 64), flags=0x02)  # no DAD
        ipr.link("set", index=idx, state="up")
        if gateway:
            ipr.route("add", dst="default", gateway=gateway)
        if address6 and gateway6:
            ipr.route("add", dst="::/0", gateway=gateway6, family=socket.AF_INET6)


if __name__ == "__main__":
    main()
