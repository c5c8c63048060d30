"""Immutable values that describe what a node should do with service traffic."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple

from pyproxy.model.ipaddr import ip_in_cidrs

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
    _hash: int = field(init=False, repr=False, compare=False, default=0)
    """Computed once: the sync looks every service port up in several dicts, and hashing four
    strings each time was a third of a one-endpoint sync at 10k services."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.namespace, self.name, self.port, self.protocol)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        # kube-proxy prints "ns/svc:port", or "ns/svc" for an unnamed port; users grep for it.
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base


NAME_ORDER = attrgetter("namespace", "name", "port", "protocol")
"""A sort key giving ServicePortName's own order (its compared fields, in order) in C: sorting
10k names with the dataclass's ``__lt__`` cost 120k Python calls a full sync."""


class Endpoint(NamedTuple):
    """One backend address of one service port, merged from the EndpointSlices.

    A named tuple, made in C: a cold start makes one per endpoint of the cluster (100k at 10k
    Services), and a frozen dataclass's constructor cost 3.3 µs each against 1.2. Equality,
    hash and order are the fields' in this order, as the dataclass's were."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: tuple[str, ...] = ()
    """``hints.forZones``: the zones whose nodes should prefer this endpoint (topology)."""
    node_hints: tuple[str, ...] = ()
    """``hints.forNodes``: the nodes that should prefer this endpoint (PreferSameNode)."""

    @property
    def addr(self) -> str:
        """``ip:port``, or ``[ip]:port`` for IPv6 (Go's JoinHostPort, which upstream hashes)."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


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
    external_ips: tuple[str, ...] = ()
    """``spec.externalIPs`` of this family: external destinations, like a NodePort."""
    lb_ips: tuple[str, ...] = ()
    """LoadBalancer ingress IPs of this family (``status.loadBalancer.ingress[].ip``), except the
    ones with ``ipMode: Proxy`` (that load balancer proxies itself: packets never carry the VIP)."""
    source_ranges: tuple[str, ...] | None = None
    """``loadBalancerSourceRanges`` of this family, or None when the Service sets none. An empty
    tuple (ranges of the other family only) admits no source at all on this family's LB IPs."""
    external_local: bool = False
    """externalTrafficPolicy: Local: external traffic only to this node's endpoints, client IP kept."""
    health_check_node_port: int = 0
    """LoadBalancer with externalTrafficPolicy: Local: where the health check server listens."""

    @property
    def external_vips(self) -> tuple[str, ...]:
        """External IPs then LB IPs: the addresses besides NodePorts that take external traffic."""
        return (*self.external_ips, *self.lb_ips)

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.external_ips or self.lb_ips)

    @property
    def uses_local_endpoints(self) -> bool:
        """Some traffic of this port is limited to this node's endpoints (either policy)."""
        return self.internal_local or (self.external_local and self.externally_accessible)

    @property
    def uses_firewall(self) -> bool:
        """LoadBalancer IPs with source ranges: traffic to them is filtered before DNAT."""
        return bool(self.lb_ips) and self.source_ranges is not None


@dataclass(frozen=True, slots=True)
class NodeView:
    """What of our Node the per-service decisions depend on (topology, firewall)."""

    name: str = ""
    zone: str = ""
    """The ``topology.kubernetes.io/zone`` label; empty when unset."""
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServicePortState:
    """A service port with the endpoints that back it: the unit a renderer turns into rules."""

    service: ServicePort
    endpoints: tuple[Endpoint, ...] = ()
    """Every endpoint seen for this port, sorted, whatever its condition."""
    node: NodeView = NodeView()
    """Our Node as of the merge: a zone or address change re-merges every service."""

    def local_endpoints(self, node: str) -> tuple[Endpoint, ...]:
        """The usable endpoints on ``node``, with the same ready-then-terminating fallback,
        applied to the node's endpoints alone (as upstream's CategorizeEndpoints does).
        Topology hints do not apply: local is already as close as it gets."""
        mine = tuple(e for e in self.endpoints if e.node_name == node)
        ready = tuple(e for e in mine if e.ready)
        if ready:
            return ready
        return tuple(e for e in mine if e.serving and e.terminating)

    @property
    def topology_mode(self) -> str:
        """``PreferSameNode``, ``PreferSameZone`` or ``""``, as upstream decides from the hints.

        Hints count only when every ready endpoint carries them (a controller that hinted some
        endpoints but not others is mid-update: use them all) and one of them names our node
        (or zone). Otherwise the hints are ignored, so a zone with no hinted endpoint still
        gets traffic.
        """
        ready = [e for e in self.endpoints if e.ready]
        if not ready:
            return ""
        if self.node.name and all(e.node_hints for e in ready) and any(
                self.node.name in e.node_hints for e in ready):
            return "PreferSameNode"
        if self.node.zone and all(e.zone_hints for e in ready) and any(
                self.node.zone in e.zone_hints for e in ready):
            return "PreferSameZone"
        return ""

    @property
    def usable_endpoints(self) -> tuple[Endpoint, ...]:
        """The cluster-wide endpoints (upstream's clusterEndpoints): ready ones, narrowed by the
        topology hints; if none is ready, the serving ones that are terminating (upstream's
        fallback, so a rolling update of the last pod does not refuse connections)."""
        mode = self.topology_mode
        ready = tuple(e for e in self.endpoints if e.ready and (
            not mode
            or (mode == "PreferSameNode" and self.node.name in e.node_hints)
            or (mode == "PreferSameZone" and self.node.zone in e.zone_hints)))
        if ready:
            return ready
        return tuple(e for e in self.endpoints if e.serving and e.terminating)

    @property
    def firewall_sources(self) -> tuple[str, ...]:
        """Sources admitted to the LB IPs under ``loadBalancerSourceRanges``: the ranges, plus
        the LB IPs themselves when a range holds one of our Node's addresses (node-to-VIP
        traffic often comes back with the VIP as its source). Empty: nobody."""
        ranges = tuple(self.service.source_ranges or ())
        if any(ip_in_cidrs(ip, ranges) for ip in self.node.addresses):
            return (*ranges, *self.service.lb_ips)
        return ranges

    @property
    def local_ready_ips(self) -> frozenset[str]:
        """This node's ready, not terminating endpoint IPs: what the health check node port
        counts (over all ports of the Service)."""
        return frozenset(e.ip for e in self.endpoints
                         if e.node_name == self.node.name and e.ready and not e.terminating)


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
    changes: Changes | None = None
    """What differs from the builder's previous state, when this state came from a builder:
    a proxier that applied exactly that previous state may diff only these service ports
    (the cost of a sync then follows the size of the change, not of the cluster). None: diff
    everything."""


@dataclass(frozen=True, slots=True)
class Changes:
    """The service ports a state changed, added or removed since an earlier state."""

    since: int
    """The generation of the earlier state."""
    generation: int
    """This state's generation (unique across builders)."""
    names: frozenset[ServicePortName]
