"""The userspace proxier's listeners (real sockets on high ports, a fake nft)."""

from __future__ import annotations

import socket

from pyproxy.config import ProxyConfig
from pyproxy.nft.executor import FakeNft
from pyproxy.userspace.proxier import UserspaceProxier
from tests.unit.helpers import sps


def _free_range(n: int) -> int:
    """A start port with n free ports after it (best effort: ask the kernel, then check)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", 0))
            start = probe.getsockname()[1]
        if start + n > 65535:
            continue
        try:
            socks = []
            for p in range(start, start + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def test_a_taken_port_is_skipped_not_fatal():
    start = _free_range(4)
    squatter = socket.socket()
    squatter.bind(("0.0.0.0", start))  # e.g. an outgoing connection's ephemeral port
    squatter.listen()
    proxier = UserspaceProxier(config=ProxyConfig(mode="userspace"), executor=FakeNft(),
                               port_range=(start, start + 4))
    try:
        state = sps(["10.244.1.10"])
        from pyproxy.model.objects import DesiredState

        proxier.sync(DesiredState(services={state.service.name: state}))
        assert proxier.ports[state.service.name] == start + 1
        with socket.create_connection(("127.0.0.1", start + 1), timeout=2):
            pass  # the relay listens there
    finally:
        proxier.cleanup()
        squatter.close()


def test_a_refused_ruleset_keeps_the_old_relays_and_their_ports():
    """Hardening issue, defect 8: relays were reconciled before the kernel commit, so when the
    commit failed the removed Service's port went to a new Service while the kernel still
    redirected the old ClusterIP there: relayed to the wrong backends."""
    from pyproxy.model.objects import DesiredState
    from pyproxy.proxier.base import SyncFailed

    start = _free_range(4)
    fake = FakeNft()
    proxier = UserspaceProxier(config=ProxyConfig(mode="userspace"), executor=fake,
                               port_range=(start, start + 4))
    try:
        old = sps(["10.244.1.10"], name="old", cluster_ip="10.96.0.10")
        proxier.sync(DesiredState(services={old.service.name: old}))
        assert proxier.ports == {old.service.name: start}
        new = sps(["10.244.9.9"], name="new", cluster_ip="10.96.0.11")
        fake.fail_next = "refused"
        try:
            proxier.sync(DesiredState(services={new.service.name: new}))
        except SyncFailed:
            pass
        # The kernel still redirects the old ClusterIP to `start`: that port still relays to
        # the old backends, and the new Service got another one.
        assert proxier.ports[old.service.name] == start
        assert proxier.ports[new.service.name] != start
        proxier.sync(DesiredState(services={new.service.name: new}))  # accepted this time
        assert old.service.name not in proxier.ports and new.service.name in proxier.ports
        elems = fake.dump().elements["relay-ports"]
        assert set(elems) == {str(proxier.ports[new.service.name])}
    finally:
        proxier.cleanup()


def test_udp_sessions_are_capped():
    """One socket per client address: a flood of sources must not exhaust file descriptors."""
    import asyncio

    from pyproxy.userspace.balancer import Balancer
    from pyproxy.userspace.relay import UdpRelay

    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        backend = echo.get_extra_info("sockname")
        balancer = Balancer()
        balancer.update((backend,), 0)
        start = _free_range(1)
        relay = UdpRelay("test/udp", start, balancer, max_sessions=3)
        await relay.start()
        clients = []
        for _ in range(6):
            t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=("127.0.0.1", start))
            t.sendto(b"x")
            clients.append(t)
        await asyncio.sleep(0.3)
        assert len(relay.sessions) == 3 and relay.dropped == 3
        for t in clients:
            t.close()
        await relay.stop()
        echo.close()

    asyncio.run(main())
