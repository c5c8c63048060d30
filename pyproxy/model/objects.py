"""Immutable values that describe what a node should do with service traffic."""

from __future__ import annotations

from dataclasses import dataclass, field

PROTOCOLS = ("tcp", "udp", "sctp")


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """One port of one Service: what kube-proxy calls a ServicePortName."""

    namespace: str
    name: str
    port: str
    """The port's name in the Service (``""`` when the Service has a single unnamed port)."""
    protocol: str
    """``tcp``, ``udp`` or ``sctp``."""

    def __str__(self) -> str:
        # kube-proxy prints "ns/svc:port", or "ns/svc" for an unnamed port; users grep for it.
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One backend address of one service port, merged from the EndpointSlices."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One Service port as the dataplane needs it (one IP family)."""

    name: ServicePortName
    cluster_ip: str
    port: int
    node_port: int = 0
    """0 when the Service has no NodePort."""
    affinity_timeout: int = 0
    """ClientIP session affinity timeout in seconds; 0 means no affinity."""
    internal_local: bool = False
    """internalTrafficPolicy: Local: ClusterIP traffic only to this node's endpoints."""


@dataclass(frozen=True, slots=True)
class ServicePortState:
    """A service port with the endpoints that back it: the unit a renderer turns into rules."""

    service: ServicePort
    endpoints: tuple[Endpoint, ...] = ()
    """Every endpoint seen for this port, sorted, whatever its condition."""

    def local_endpoints(self, node: str) -> tuple[Endpoint, ...]:
        """The usable endpoints on ``node``, with the same ready-then-terminating fallback,
        applied to the node's endpoints alone (as upstream's CategorizeEndpoints does)."""
        mine = tuple(e for e in self.endpoints if e.node_name == node)
        ready = tuple(e for e in mine if e.ready)
        if ready:
            return ready
        return tuple(e for e in mine if e.serving and e.terminating)

    @property
    def usable_endpoints(self) -> tuple[Endpoint, ...]:
        """Ready endpoints; if none is ready, the serving ones that are terminating (upstream's
        fallback, so a rolling update of the last pod does not refuse connections)."""
        ready = tuple(e for e in self.endpoints if e.ready)
        if ready:
            return ready
        return tuple(e for e in self.endpoints if e.serving and e.terminating)


@dataclass(frozen=True, slots=True)
class Problem:
    """An object we skipped, and why. Logged and counted; never fatal to the others."""

    kind: str
    namespace: str
    name: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What we need of our own Node object."""

    name: str
    addresses: tuple[str, ...] = ()
    """InternalIP and ExternalIP addresses, canonical, in the Node's order."""
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DesiredState:
    """Everything one sync programs: the complete, validated picture for one IP family."""

    services: dict[ServicePortName, ServicePortState] = field(default_factory=dict)
    nodeport_ips: tuple[str, ...] = ()
    """Node addresses that accept NodePort traffic."""
    problems: tuple[Problem, ...] = ()
