"""Random but valid clusters from a seed, and the probes that exercise them.

A cluster is a frozen tree of small specs (:class:`Cluster` → :class:`Svc` → :class:`Slice` →
:class:`Ep`) so the shrinker can drop or simplify one piece with :func:`dataclasses.replace` and
get another valid cluster. Every address is chosen here, ClusterIPs and NodePorts included, so a
cluster created twice (or a shrunk copy of it) keeps its addresses and its probes.

The world every cluster lives in (:mod:`lab.diff.world`) is fixed: one node ``node-1`` at
192.168.50.2 / fd00:50::2 with backend pods ``pod0``..``pod5`` at 10.244.1.10..15 (and
fd00:244:1::10..15) serving TCP and UDP on :data:`LISTENED`, a client pod at 10.244.1.100, the
node itself, and an external client at 192.168.50.1 (plus :data:`EXT_SOURCES`). Endpoints are
those pods; an endpoint "on node-2" is still one of them, only its ``nodeName`` says otherwise,
which is all a proxy looks at.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

PODS = 6
LISTENED = (8080, 8081, 9000)
"""Ports every backend pod serves (TCP and UDP)."""
UNLISTENED = 9999
"""A port no pod serves: an endpoint with it answers with a reset / port unreachable."""
NODE_IP = {4: "192.168.50.2", 6: "fd00:50::2"}
NODEPORT_CIDRS = ("192.168.50.0/24", "fd00:50::/64")
CLUSTER_CIDRS = ("10.244.0.0/16", "fd00:244::/32")
EXT_SOURCES = ("192.168.50.1", "192.168.50.101", "192.168.50.102", "192.168.50.103")
EXT_SOURCE6 = "fd00:50::1"
EXTERNAL_CIDRS = ("203.0.113.0/24", "2001:db8:1::/64")
"""Where externalIPs and LoadBalancer IPs come from: the external client routes them to the node."""
UNUSED_CLUSTER_IP = {4: "10.96.255.254", 6: "fd00:96::fffe"}
"""Inside the service CIDR, never allocated by the generator."""
ZONES = ("zone-a", "zone-b")
LABEL = "pyproxy.dev/difftest"


def pod_ip(index: int, family: int) -> str:
    return f"10.244.1.{10 + index}" if family == 4 else f"fd00:244:1::{10 + index}"


@dataclass(frozen=True)
class Ep:
    pod: int
    ready: bool | None = True
    serving: bool | None = None
    terminating: bool | None = None
    node: str | None = "node-1"
    zone: str | None = None
    hint_zones: tuple[str, ...] = ()
    hint_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SlicePort:
    name: str
    protocol: str
    port: int


@dataclass(frozen=True)
class Slice:
    family: int
    ports: tuple[SlicePort, ...]
    endpoints: tuple[Ep, ...]


@dataclass(frozen=True)
class Port:
    name: str
    protocol: str
    port: int
    node_port: int = 0


@dataclass(frozen=True)
class Svc:
    name: str
    type: str = "ClusterIP"
    """ClusterIP, NodePort, LoadBalancer, ExternalName; ``headless`` is a ClusterIP one with None."""
    headless: bool = False
    families: tuple[int, ...] = (4,)
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[Port, ...] = ()
    affinity_timeout: int = 0
    external_policy: str = "Cluster"
    internal_policy: str = "Cluster"
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[tuple[str, str], ...] = ()
    """(ip, ipMode) of status.loadBalancer.ingress; ipMode "" leaves it unset."""
    source_ranges: tuple[str, ...] = ()
    traffic_distribution: str = ""
    lb_node_ports: bool = True
    """allocateLoadBalancerNodePorts (LoadBalancer only)."""
    slices: tuple[Slice, ...] = ()

    @property
    def has_node_ports(self) -> bool:
        return self.type == "NodePort" or (self.type == "LoadBalancer" and self.lb_node_ports)


@dataclass(frozen=True)
class Cluster:
    seed: int
    zone: str | None = "zone-a"
    """node-1's topology.kubernetes.io/zone label (None: no label)."""
    services: tuple[Svc, ...] = ()


# -- generation -------------------------------------------------------------------------------

def generate(seed: int, *, max_services: int = 6) -> Cluster:
    """A random valid cluster; the same seed always gives the same cluster."""
    rng = random.Random(seed)
    used_ips: set[str] = set()
    used_node_ports: set[int] = set()
    services = tuple(_service(rng, f"s{seed % 100000}-{i}", used_ips, used_node_ports)
                     for i in range(rng.randint(1, max_services)))
    return Cluster(seed=seed, zone=rng.choice(["zone-a", "zone-a", "zone-b", None]), services=services)


def _pick(rng: random.Random, weighted: list[tuple[Any, int]]) -> Any:
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


def _unique(rng: random.Random, make: Any, used: set[Any]) -> Any:
    while True:
        value = make()
        if value not in used:
            used.add(value)
            return value


def _service(rng: random.Random, name: str, used_ips: set[str], used_node_ports: set[int]) -> Svc:
    kind = _pick(rng, [("ClusterIP", 40), ("NodePort", 25), ("LoadBalancer", 25), ("headless", 5),
                       ("ExternalName", 5)])
    if kind == "ExternalName":
        return Svc(name=name, type="ExternalName", families=())
    families = _pick(rng, [((4,), 55), ((6,), 10), ((4, 6), 25), ((6, 4), 10)])
    n_ports = _pick(rng, [(1, 50), (2, 35), (3, 15)])
    ports: list[Port] = []
    seen: set[tuple[int, str]] = set()
    while len(ports) < n_ports:
        proto = _pick(rng, [("TCP", 65), ("UDP", 35)])
        number = rng.choice([80, 81, 53, 443, 5000, 8080])
        if (number, proto) in seen:
            continue
        seen.add((number, proto))
        pname = f"p{len(ports)}" if n_ports > 1 or rng.random() < 0.3 else ""
        node_port = 0
        if kind in ("NodePort", "LoadBalancer"):
            node_port = _unique(rng, lambda: rng.randint(30000, 32760), used_node_ports)
        ports.append(Port(name=pname, protocol=proto, port=number, node_port=node_port))
    headless = kind == "headless"
    svc_type = "ClusterIP" if headless else kind
    cluster_ips: tuple[str, ...] = ()
    if not headless:
        cluster_ips = tuple(_unique(rng, (lambda f=f: _cluster_ip(rng, f)), used_ips) for f in families)
    external = svc_type in ("NodePort", "LoadBalancer")
    lb_ips: tuple[tuple[str, str], ...] = ()
    source_ranges: tuple[str, ...] = ()
    if svc_type == "LoadBalancer":
        lb_ips = tuple((_unique(rng, (lambda f=f: _external_ip(rng, f, lb=True)), used_ips),
                        _pick(rng, [("", 70), ("VIP", 20), ("Proxy", 10)]))
                       for f in families[:_pick(rng, [(1, 70), (2, 30)])])
        if rng.random() < 0.35:
            choices = ["192.168.50.1/32", "192.168.50.101/32", "192.168.50.0/24", "10.244.0.0/16",
                       "203.0.113.0/24", "fd00:50::/64", "fd00:244::/32"]
            source_ranges = tuple(sorted(set(rng.sample(choices, rng.randint(1, 3)))))
    external_ips: tuple[str, ...] = ()
    if not headless and rng.random() < 0.2:
        external_ips = tuple(_unique(rng, (lambda f=f: _external_ip(rng, f, lb=False)), used_ips)
                             for f in families[:1])
    svc = Svc(
        name=name, type=svc_type, headless=headless, families=families, cluster_ips=cluster_ips,
        ports=tuple(ports),
        affinity_timeout=_pick(rng, [(0, 75), (10, 5), (60, 10), (10800, 10)]) if not headless else 0,
        external_policy=_pick(rng, [("Cluster", 60), ("Local", 40)]) if external or external_ips else "Cluster",
        internal_policy=_pick(rng, [("Cluster", 80), ("Local", 20)]),
        external_ips=external_ips, lb_ips=lb_ips, source_ranges=source_ranges,
        traffic_distribution=_pick(rng, [("", 70), ("PreferClose", 10), ("PreferSameZone", 10),
                                         ("PreferSameNode", 10)]),
        lb_node_ports=svc_type != "LoadBalancer" or rng.random() < 0.85,
    )
    if not svc.has_node_ports:
        svc = replace(svc, ports=tuple(replace(p, node_port=0) for p in svc.ports))
    slices = []
    for family in families:
        placed: dict[int, Ep] = {}
        for _ in range(_pick(rng, [(0, 10), (1, 60), (2, 25), (3, 5)])):
            slices.append(_slice(rng, family, svc.ports, placed))
    return replace(svc, slices=tuple(slices))


def _cluster_ip(rng: random.Random, family: int) -> str:
    if family == 4:
        return f"10.96.{rng.randint(1, 250)}.{rng.randint(1, 254)}"
    return f"fd00:96::{rng.randint(0x100, 0xfff0):x}"


def _external_ip(rng: random.Random, family: int, *, lb: bool) -> str:
    low, high = (100, 199) if lb else (1, 99)
    return f"203.0.113.{rng.randint(low, high)}" if family == 4 else f"2001:db8:1::{rng.randint(low, high)}"


def _slice(rng: random.Random, family: int, ports: tuple[Port, ...], placed: dict[int, Ep]) -> Slice:
    """One slice; ``placed`` holds the endpoints earlier slices of the same Service and family
    gave each pod. A pod seen again is either the same endpoint (the controller moving it
    between slices) or, next to a non-terminating copy, a terminating one (a pod IP reused
    before the old Pod object is gone): the two duplicates upstream defines. Two different
    non-terminating copies are left out: upstream keeps whichever slice its map yields last."""
    slice_ports = []
    for p in ports:
        if rng.random() < 0.08:
            continue  # this slice does not carry the port: no endpoints for it from here
        number = _pick(rng, [(LISTENED[0], 40), (LISTENED[1], 25), (LISTENED[2], 25), (UNLISTENED, 10)])
        slice_ports.append(SlicePort(name=p.name, protocol=p.protocol, port=number))
    endpoints = []
    for pod in rng.sample(range(PODS), rng.randint(0, 4)):
        ready, serving, terminating = _pick(rng, [
            ((True, None, None), 40), ((True, True, False), 20), ((False, True, True), 10),
            ((False, False, True), 5), ((False, False, False), 5), ((None, None, None), 5),
            ((False, True, False), 5), ((False, None, True), 5), ((True, True, True), 5)])
        node = _pick(rng, [("node-1", 55), ("node-2", 35), (None, 10)])
        zone = _pick(rng, [(None, 30), ("zone-a", 35), ("zone-b", 35)])
        hint_zones = _pick(rng, [((), 50), (("zone-a",), 20), (("zone-b",), 20), (("zone-a", "zone-b"), 10)])
        hint_nodes = _pick(rng, [((), 60), (("node-1",), 20), (("node-2",), 20)])
        ep = Ep(pod=pod, ready=ready, serving=serving, terminating=terminating, node=node, zone=zone,
                hint_zones=hint_zones, hint_nodes=hint_nodes)
        earlier = placed.get(pod)
        if earlier is not None:
            if earlier.terminating or not ep.terminating or rng.random() < 0.5:
                ep = earlier
        else:
            placed[pod] = ep
        endpoints.append(ep)
    return Slice(family=family, ports=tuple(slice_ports), endpoints=tuple(endpoints))


def ambiguous(cluster: Cluster) -> bool:
    """Whether some Service holds one pod twice in a family as two different non-terminating
    endpoints (upstream's pick depends on its map order; see :func:`_slice`)."""
    for svc in cluster.services:
        for family in svc.families:
            seen: dict[int, Ep] = {}
            for sl in svc.slices:
                if sl.family != family:
                    continue
                for ep in sl.endpoints:
                    if ep.terminating:
                        continue
                    if seen.setdefault(ep.pod, ep) != ep:
                        return True
    return False


# -- objects ----------------------------------------------------------------------------------

FAMILY = {4: "IPv4", 6: "IPv6"}


def service_object(svc: Svc, *, health_node_port: int = 0) -> dict[str, Any]:
    """The Service; ``health_node_port`` is its healthCheckNodePort (LoadBalancer, Local only)."""
    meta = {"name": svc.name, "namespace": "default", "labels": {LABEL: "1"}}
    if svc.type == "ExternalName":
        return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
                "spec": {"type": "ExternalName", "externalName": "backend.example.invalid"}}
    spec: dict[str, Any] = {
        "type": svc.type,
        "ipFamilies": [FAMILY[f] for f in svc.families],
        "ipFamilyPolicy": "SingleStack" if len(svc.families) == 1 else "RequireDualStack",
        "ports": [{k: v for k, v in (("name", p.name), ("protocol", p.protocol), ("port", p.port),
                                     ("targetPort", _target_port(p)), ("nodePort", p.node_port)) if v != ""
                   and v != 0} for p in svc.ports],
        "internalTrafficPolicy": svc.internal_policy,
    }
    if svc.headless:
        spec["clusterIP"] = "None"
        spec["clusterIPs"] = ["None"]
    else:
        spec["clusterIP"] = svc.cluster_ips[0]
        spec["clusterIPs"] = list(svc.cluster_ips)
    if svc.type in ("NodePort", "LoadBalancer") or svc.external_ips:
        spec["externalTrafficPolicy"] = svc.external_policy
    if svc.external_ips:
        spec["externalIPs"] = list(svc.external_ips)
    if svc.type == "LoadBalancer":
        spec["allocateLoadBalancerNodePorts"] = svc.lb_node_ports
        if svc.source_ranges:
            spec["loadBalancerSourceRanges"] = list(svc.source_ranges)
        if health_node_port:
            spec["healthCheckNodePort"] = health_node_port
    if svc.affinity_timeout:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": svc.affinity_timeout}}
    if svc.traffic_distribution:
        spec["trafficDistribution"] = svc.traffic_distribution
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def _target_port(p: Port) -> int | str:
    """A named target port for some named ports (no proxy reads it: the EndpointSlice's port
    is what counts, matched by the Service port's name; the API server must still take it).
    Chosen without the random stream, so adding it changed no seed's cluster."""
    return f"t-{p.name}" if p.name and p.port % 2 else p.port


def lb_status(svc: Svc) -> dict[str, Any] | None:
    """The status a cloud controller would write (applied with the status subresource)."""
    if svc.type != "LoadBalancer" or not svc.lb_ips:
        return None
    ingress = [{"ip": ip, **({"ipMode": mode} if mode else {})} for ip, mode in svc.lb_ips]
    return {"status": {"loadBalancer": {"ingress": ingress}}}


def slice_objects(svc: Svc) -> list[dict[str, Any]]:
    out = []
    for i, sl in enumerate(svc.slices):
        endpoints = []
        for ep in sl.endpoints:
            conditions = {k: v for k, v in (("ready", ep.ready), ("serving", ep.serving),
                                            ("terminating", ep.terminating)) if v is not None}
            item: dict[str, Any] = {"addresses": [pod_ip(ep.pod, sl.family)], "conditions": conditions,
                                    "targetRef": {"kind": "Pod", "namespace": "default", "name": f"pod{ep.pod}"}}
            if ep.node:
                item["nodeName"] = ep.node
            if ep.zone:
                item["zone"] = ep.zone
            hints: dict[str, Any] = {}
            if ep.hint_zones:
                hints["forZones"] = [{"name": z} for z in ep.hint_zones]
            if ep.hint_nodes:
                hints["forNodes"] = [{"name": n} for n in ep.hint_nodes]
            if hints:
                item["hints"] = hints
            endpoints.append(item)
        out.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc.name}-{FAMILY[sl.family].lower()}-{i}", "namespace": "default",
                         "labels": {LABEL: "1", "kubernetes.io/service-name": svc.name,
                                    "endpointslice.kubernetes.io/managed-by": "difftest.pyproxy.dev"}},
            "addressType": FAMILY[sl.family],
            "ports": [{"name": p.name, "protocol": p.protocol, "port": p.port} for p in sl.ports],
            "endpoints": endpoints,
        })
    return out


def health_node_ports(cluster: Cluster) -> dict[str, int]:
    """A healthCheckNodePort for each LoadBalancer Service with externalTrafficPolicy Local, chosen
    here from the top of the range down, past every NodePort of the cluster. Left to the API
    server, it is drawn at random and can take a NodePort a later Service of the same cluster
    names, which the API server then refuses for good ("provided port is already allocated")."""
    taken = {p.node_port for s in cluster.services for p in s.ports if p.node_port}
    out: dict[str, int] = {}
    candidate = 32766  # 32767 is the probes' "unallocated nodePort"
    for svc in cluster.services:
        if svc.type == "LoadBalancer" and svc.external_policy == "Local":
            while candidate in taken:
                candidate -= 1
            out[svc.name] = candidate
            taken.add(candidate)
    return out


def objects(cluster: Cluster) -> list[dict[str, Any]]:
    """Services then EndpointSlices (LoadBalancer status is separate: :func:`lb_status`)."""
    health = health_node_ports(cluster)
    return ([service_object(s, health_node_port=health.get(s.name, 0)) for s in cluster.services]
            + [o for s in cluster.services for o in slice_objects(s)])


# -- probes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    vantage: str
    """``pod`` (a client pod on the node), ``node`` (the node itself) or ``ext`` (outside)."""
    ip: str
    port: int
    protocol: str
    what: str
    """Which service address it is, for people: ``s1-0:p0 clusterIP``, ``nodePort``, ..."""
    sources: tuple[str, ...] = field(default=())
    affinity: bool = False
    """The address belongs to a Service port with ClientIP affinity."""
    service: str = ""
    """The Service the address belongs to ("" for the addresses nobody owns)."""

    @property
    def key(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.vantage} -> {self.protocol.lower()} {host}:{self.port}"


def targets(cluster: Cluster) -> list[Target]:
    """Every (vantage × service address × port × protocol), and addresses that must not answer."""
    addresses: list[tuple[str, int, str, str, bool, str]] = []
    taken: set[tuple[str, int, str]] = set()
    for svc in cluster.services:
        if svc.type == "ExternalName" or svc.headless:
            continue
        sticky = svc.affinity_timeout > 0
        for p in svc.ports:
            label = f"{svc.name}:{p.name or p.port}"
            for ip in svc.cluster_ips:
                addresses.append((ip, p.port, p.protocol, f"{label} clusterIP", sticky, svc.name))
            if svc.has_node_ports and p.node_port:
                for f in svc.families:
                    addresses.append((NODE_IP[f], p.node_port, p.protocol, f"{label} nodePort", sticky, svc.name))
            for ip in svc.external_ips:
                addresses.append((ip, p.port, p.protocol, f"{label} externalIP", sticky, svc.name))
            for ip, _ in svc.lb_ips:
                addresses.append((ip, p.port, p.protocol, f"{label} loadBalancer IP", sticky, svc.name))
        for ip in svc.cluster_ips:  # a port the service does not have
            taken.update((ip, p.port, p.protocol) for p in svc.ports)
            if (ip, 7, "TCP") not in taken:
                addresses.append((ip, 7, "TCP", f"{svc.name} clusterIP, unknown port", False, svc.name))
    for f in (4, 6):
        addresses.append((UNUSED_CLUSTER_IP[f], 80, "TCP", "unallocated ClusterIP", False, ""))
        addresses.append((NODE_IP[f], 32767, "UDP", "unallocated nodePort", False, ""))
    out = []
    seen: set[tuple[str, str, int, str]] = set()
    for ip, port, proto, what, sticky, owner in addresses:
        family = 6 if ":" in ip else 4
        for vantage in ("pod", "node", "ext"):
            if (vantage, ip, port, proto) in seen:
                continue
            seen.add((vantage, ip, port, proto))
            sources = (EXT_SOURCES if family == 4 else (EXT_SOURCE6,)) if vantage == "ext" else ()
            out.append(Target(vantage=vantage, ip=ip, port=port, protocol=proto, what=what, sources=sources,
                              affinity=sticky, service=owner))
    return out
