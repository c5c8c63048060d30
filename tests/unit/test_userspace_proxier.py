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
