"""The userspace proxier: listeners in an asyncio loop of their own, nft redirects to them."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import Any

from pyproxy.config import ProxyConfig
from pyproxy.literals import Mode
from pyproxy.model.objects import DesiredState, ServicePortName, ServicePortState
from pyproxy.nft.executor import NftExecutor
from pyproxy.proxier.base import SyncResult
from pyproxy.proxier.nftables import NftProxier
from pyproxy.render.slots import Place
from pyproxy.render import userspace as render
from pyproxy.render.fragments import NftFragment
from pyproxy.userspace.balancer import Balancer
from pyproxy.userspace.relay import TcpRelay, UdpRelay

log = logging.getLogger("pyproxy.userspace")

PORT_RANGE = (36000, 39999)


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (faster relays), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    log.info("userspace relays run on uvloop")
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class UserspaceProxier(NftProxier):
    """Like the nftables proxier, but each service port's chain redirects to a local listener
    that copies bytes to a backend chosen round-robin (with ClientIP affinity), trying the next
    backend when one refuses. Backends see the node's address, not the client's."""

    mode: Mode = "userspace"

    def __init__(self, *, config: ProxyConfig, executor: NftExecutor, udp_timeout: float = 30.0,
                 port_range: tuple[int, int] = PORT_RANGE) -> None:
        super().__init__(config=config, executor=executor, gc_period=0)
        self.udp_timeout = udp_timeout
        self.port_range = port_range
        self.ports: dict[ServicePortName, int] = {}
        self.relays: dict[ServicePortName, Any] = {}
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="userspace-relays", daemon=True)
        self._thread.start()

    def _free_port(self, taken: set[int]) -> int | None:
        used = set(self.ports.values()) | taken
        return next((p for p in range(*self.port_range) if p not in used), None)

    def _render_service(self, sps: ServicePortState, *, place: Place) -> NftFragment:
        return render.render_service(sps, self.ports.get(sps.service.name))

    def _render_base(self, state: DesiredState, *, maps: Mapping[str, int]) -> NftFragment:
        # The relays this ruleset redirects to (those about to be retired are not among them).
        ports = tuple(sorted(p for n, p in self.ports.items() if n in state.services))
        return render.guard_relays(super()._render_base(state, maps=maps), ports)

    async def _prepare(self, state: DesiredState) -> None:
        """Before the kernel commit: start the relays new redirects will point at and give the
        others their new endpoints. Relays of removed Services keep their ports until the
        commit succeeds (see :meth:`_retire`)."""
        want = {n: s for n, s in state.services.items() if s.usable_endpoints}
        for name, sps in want.items():
            eps = tuple((e.ip, e.port) for e in sps.usable_endpoints)
            relay = self.relays.get(name)
            if relay is None:
                relay = await self._start_relay(name, eps, sps.service.affinity_timeout)
                if relay is None:
                    continue
                self.relays[name] = relay
            else:
                relay.balancer.update(eps, sps.service.affinity_timeout)
                if isinstance(relay, UdpRelay):
                    relay.forget_backends_not_in(eps)

    async def _retire(self, state: DesiredState) -> None:
        """After the commit: no redirect points at these relays any more, so their ports may
        be handed to other Services. Done before the commit, a refused ruleset would leave the
        old ClusterIP redirected to a port a new Service took: relayed to the wrong backends."""
        want = {n for n, s in state.services.items() if s.usable_endpoints}
        for name in [n for n in self.relays if n not in want]:
            await self.relays.pop(name).stop()
            self.ports.pop(name, None)
        for name in [n for n in self.ports if n not in self.relays]:
            self.ports.pop(name)

    async def _start_relay(self, name: ServicePortName, eps: tuple[tuple[str, int], ...],
                           affinity: int) -> Any:
        """A listener on a free port of the range. A port can be taken by someone else, e.g. an
        outgoing connection's ephemeral port (the kernel hands those out from the same range):
        then try the next, a few times."""
        if name.protocol == "sctp":
            log.warning("userspace: %s is SCTP, which this mode does not relay", name)
            return None
        taken: set[int] = set()
        for _ in range(20):
            port = self._free_port(taken)
            if port is None:
                break
            balancer = Balancer()
            balancer.update(eps, affinity)
            relay = (UdpRelay(str(name), port, balancer, self.udp_timeout) if name.protocol == "udp"
                     else TcpRelay(str(name), port, balancer))
            try:
                await relay.start()
            except OSError as err:
                log.info("userspace: port %d is taken for %s (%s); trying another", port, name, err)
                taken.add(port)
                continue
            self.ports[name] = port
            return relay
        log.warning("userspace: no free port for %s in %d-%d; it gets no relay", name, *self.port_range)
        return None

    def sync(self, state: DesiredState) -> SyncResult:
        # Listeners first, so a redirect never points at a port nobody listens on; retired
        # listeners last, so a port is never reused while a redirect may still point at it.
        asyncio.run_coroutine_threadsafe(self._prepare(state), self.loop).result(timeout=60)
        result = super().sync(state)
        asyncio.run_coroutine_threadsafe(self._retire(state), self.loop).result(timeout=60)
        return result

    def cleanup(self) -> bool:
        found = super().cleanup()
        asyncio.run_coroutine_threadsafe(self._stop_all(), self.loop).result(timeout=30)
        return found

    async def _stop_all(self) -> None:
        for relay in self.relays.values():
            await relay.stop()
        self.relays.clear()
        self.ports.clear()
