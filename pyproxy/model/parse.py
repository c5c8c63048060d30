"""Turn API objects (plain dicts) into model values, refusing anything malformed.

Each ``parse_*`` function either returns a value or raises :class:`Invalid` with a reason a
person can act on. Nothing here logs or counts: the caller records the problem and goes on
with the other objects, so one bad object never breaks the sync of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from pyproxy.literals import Family
from pyproxy.model.ipaddr import CANONICAL_V4, BadAddress, canonical_cidr, canonical_ip
from pyproxy.model.names import (
    dns_label_problem,
    dns_subdomain_problem,
    label_value_problem,
)
from pyproxy.model.objects import (
    PROTOCOLS,
    Endpoint,
    NodeInfo,
    ServicePort,
    ServicePortName,
)

# Labels kube-proxy's informers exclude: the first hands a Service to another proxy, the second
# marks the headless Services' slices.
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"

DEFAULT_AFFINITY_TIMEOUT = 10800  # the API server's default for ClientIP affinity
MAX_AFFINITY_TIMEOUT = 86400  # the API server's upper bound


class Invalid(ValueError):
    """The object is malformed; the message says what is wrong with it."""


class Skipped(Exception):
    """The object is valid but not ours to program (headless, ExternalName, other family...)."""


@dataclass(frozen=True, slots=True)
class ParsedSlice:
    """The parts of one EndpointSlice we use."""

    namespace: str
    name: str
    service: str
    ports: tuple[tuple[str, str, int], ...]
    """(port name, protocol, port) triples."""
    endpoints: tuple[Endpoint, ...]
    """With the slice's port when it has exactly one, else ``port`` 0: merging sets the port of
    each service port."""


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"{what} must be a mapping, got {type(value).__name__}")
    return value


def _str(value: Any, what: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise Invalid(f"{what} must be a non-empty string, got {value!r}")
    return value


def _port(value: Any, what: str) -> int:
    # bool is an int in Python; the API would never send one, so refuse it.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise Invalid(f"{what} must be an integer in 1-65535, got {value!r}")
    return value


def _protocol(value: Any, what: str) -> str:
    if value is None:
        return "tcp"  # the API default
    if not isinstance(value, str) or value.lower() not in PROTOCOLS:
        raise Invalid(f"{what}: unknown protocol {value!r} (want TCP, UDP or SCTP)")
    return value.lower()


def _bool(value: Any, what: str, *, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Invalid(f"{what} must be true or false, got {value!r}")
    return value


def _named(value: str, what: str, problem: Any) -> str:
    """``value`` if ``problem(value)`` finds nothing wrong with it, else Invalid naming ``what``."""
    why = problem(value)
    if why is not None:
        raise Invalid(f"{what} {why}")
    return value


def object_key(obj: Any) -> tuple[str, str]:
    """``(namespace, name)`` of an API object; raises Invalid when they are missing or are not
    names the API server would accept (a namespace is a DNS label, a name a DNS subdomain)."""
    meta = _mapping(obj.get("metadata") if isinstance(obj, dict) else None, "metadata")
    name = _named(_str(meta.get("name"), "metadata.name"), "metadata.name", dns_subdomain_problem)
    namespace = meta.get("namespace", "default")
    return _named(_str(namespace, "metadata.namespace"), "metadata.namespace", dns_label_problem), name


def _port_name(value: Any, what: str) -> str:
    """A port's name: empty, or a DNS label (Service and EndpointSlice ports alike)."""
    name = _str(value, what, required=False)
    return _named(name, what, dns_label_problem) if name else name


def _labels(obj: dict[str, Any]) -> dict[str, Any]:
    labels = obj["metadata"].get("labels") or {}
    return _mapping(labels, "metadata.labels")


def parse_service(obj: dict[str, Any], *, family: Family = 4,
                  key: tuple[str, str] | None = None) -> tuple[ServicePort, ...]:
    """The ports of one Service for one IP family.

    Raises Skipped for Services kube-proxy ignores and Invalid for malformed ones.
    """
    namespace, name = key or object_key(obj)
    # Service names are DNS labels (a subdomain's dots are refused by the API server).
    _named(name, "metadata.name", dns_label_problem)
    labels = _labels(obj)
    if PROXY_NAME_LABEL in labels:
        raise Skipped(f"label {PROXY_NAME_LABEL} hands it to another proxy")
    if HEADLESS_LABEL in labels:
        raise Skipped("headless")
    spec = _mapping(obj.get("spec"), "spec")
    if spec.get("type") == "ExternalName":
        raise Skipped("type ExternalName")
    cluster_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not isinstance(cluster_ips, list):
        raise Invalid(f"spec.clusterIPs must be a list, got {cluster_ips!r}")
    if not cluster_ips or cluster_ips[0] in ("None", ""):
        raise Skipped("headless (no cluster IP)")
    ours = ""
    for raw in cluster_ips:
        try:
            ip, fam = canonical_ip(raw)
        except BadAddress as err:
            raise Invalid(f"spec.clusterIPs: {err}") from None
        if fam == family and not ours:
            ours = ip
    if not ours:
        raise Skipped(f"no IPv{family} cluster IP")

    affinity_timeout = 0
    affinity = spec.get("sessionAffinity") or "None"
    if affinity == "ClientIP":
        cfg = spec.get("sessionAffinityConfig") or {}
        client = _mapping(_mapping(cfg, "spec.sessionAffinityConfig").get("clientIP") or {},
                          "spec.sessionAffinityConfig.clientIP")
        timeout = client.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not (
            1 <= timeout <= MAX_AFFINITY_TIMEOUT
        ):
            raise Invalid(f"sessionAffinityConfig.clientIP.timeoutSeconds must be 1-86400, got {timeout!r}")
        affinity_timeout = timeout
    elif affinity != "None":
        raise Invalid(f"spec.sessionAffinity must be None or ClientIP, got {affinity!r}")

    itp = spec.get("internalTrafficPolicy") or "Cluster"
    if itp not in ("Cluster", "Local"):
        raise Invalid(f"spec.internalTrafficPolicy must be Cluster or Local, got {itp!r}")
    svc_type = spec.get("type") or "ClusterIP"
    etp = spec.get("externalTrafficPolicy") or "Cluster"
    if etp not in ("Cluster", "Local"):
        raise Invalid(f"spec.externalTrafficPolicy must be Cluster or Local, got {etp!r}")
    # As upstream: the policy only means something for Services reachable from outside, and
    # a ClusterIP Service with externalIPs (of either family) is one (upstream's
    # ExternallyAccessible; found by the differential test, seed 20).
    raw_external = spec.get("externalIPs")
    external_local = etp == "Local" and (
        svc_type in ("NodePort", "LoadBalancer")
        or (svc_type == "ClusterIP" and isinstance(raw_external, list) and bool(raw_external)))
    external_ips = _addresses(raw_external, "spec.externalIPs", family)
    lb_ips: tuple[str, ...] = ()
    source_ranges: tuple[str, ...] | None = None
    health_port = 0
    if svc_type == "LoadBalancer":
        lb_ips = _lb_ingress(obj.get("status"), family)
        raw_ranges = spec.get("loadBalancerSourceRanges")
        if raw_ranges:
            source_ranges = _cidrs(raw_ranges, "spec.loadBalancerSourceRanges", family)
        if external_local and spec.get("healthCheckNodePort"):
            health_port = _port(spec.get("healthCheckNodePort"), "spec.healthCheckNodePort")

    ports = spec.get("ports")
    if not isinstance(ports, list) or not ports:
        raise Invalid("spec.ports must be a non-empty list")
    result = []
    seen: set[tuple[int, str]] = set()
    names: set[tuple[str, str]] = set()
    node_ports: set[tuple[int, str]] = set()
    for i, item in enumerate(ports):
        item = _mapping(item, f"spec.ports[{i}]")
        port = _port(item.get("port"), f"spec.ports[{i}].port")
        proto = _protocol(item.get("protocol"), f"spec.ports[{i}].protocol")
        port_name = _port_name(item.get("name"), f"spec.ports[{i}].name")
        node_port = item.get("nodePort") or 0
        if node_port:
            node_port = _port(node_port, f"spec.ports[{i}].nodePort")
        if (port, proto) in seen:
            raise Invalid(f"spec.ports[{i}]: duplicate port {port}/{proto.upper()}")
        if (port_name, proto) in names:
            raise Invalid(f"spec.ports[{i}]: duplicate port name {port_name!r}")
        if node_port and (node_port, proto) in node_ports:
            raise Invalid(f"spec.ports[{i}]: duplicate nodePort {node_port}/{proto.upper()}")
        if node_port:
            node_ports.add((node_port, proto))
        seen.add((port, proto))
        names.add((port_name, proto))
        result.append(
            ServicePort(
                name=ServicePortName(namespace, name, port_name, proto),
                cluster_ip=ours,
                port=port,
                node_port=node_port,
                affinity_timeout=affinity_timeout,
                internal_local=itp == "Local",
                external_ips=external_ips,
                lb_ips=lb_ips,
                source_ranges=source_ranges,
                external_local=external_local,
                health_check_node_port=health_port,
            )
        )
    return tuple(result)


def _addresses(raw: Any, what: str, family: Family) -> tuple[str, ...]:
    """Canonical IPs of ``family`` from a list; the other family's are skipped (a dual-stack
    Service lists both), a malformed one makes the Service invalid."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise Invalid(f"{what} must be a list, got {raw!r}")
    out: list[str] = []
    for i, item in enumerate(raw):
        try:
            ip, fam = canonical_ip(item)
        except BadAddress as err:
            raise Invalid(f"{what}[{i}]: {err}") from None
        if fam == family and ip not in out:
            out.append(ip)
    return tuple(out)


def _cidrs(raw: Any, what: str, family: Family) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise Invalid(f"{what} must be a list, got {raw!r}")
    out: list[str] = []
    for i, item in enumerate(raw):
        try:
            # The API tolerates spaces around a range (" 203.0.113.0/25"); so do we.
            cidr, fam = canonical_cidr(item.strip() if isinstance(item, str) else item)
        except BadAddress as err:
            raise Invalid(f"{what}[{i}]: {err}") from None
        if fam == family and cidr not in out:
            out.append(cidr)
    return tuple(out)


def _lb_ingress(status: Any, family: Family) -> tuple[str, ...]:
    """LoadBalancer ingress IPs that carry traffic to this node (``ipMode: VIP`` or unset)."""
    lb = _mapping(status or {}, "status").get("loadBalancer") or {}
    ingress = _mapping(lb, "status.loadBalancer").get("ingress") or []
    if not isinstance(ingress, list):
        raise Invalid(f"status.loadBalancer.ingress must be a list, got {ingress!r}")
    ips = []
    for i, item in enumerate(ingress):
        item = _mapping(item, f"status.loadBalancer.ingress[{i}]")
        if not item.get("ip"):
            continue  # a hostname-only ingress: nothing for a proxy to match
        if (item.get("ipMode") or "VIP") == "Proxy":
            continue  # the load balancer proxies: packets arrive addressed to the node
        ips.append(item["ip"])
    return _addresses(ips, "status.loadBalancer.ingress[].ip", family)


def _hints(item: dict[str, Any], i: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    raw_hints = item.get("hints")
    if not raw_hints:
        return (), ()
    hints = _mapping(raw_hints, f"endpoints[{i}].hints")

    def names(key: str) -> tuple[str, ...]:
        raw = hints.get(key) or []
        if not isinstance(raw, list):
            raise Invalid(f"endpoints[{i}].hints.{key} must be a list")
        what = f"endpoints[{i}].hints.{key}[].name"
        rule = label_value_problem if key == "forZones" else dns_subdomain_problem
        return tuple(sorted({_named(_str(_mapping(h, f"endpoints[{i}].hints.{key}[]").get("name"), what),
                                    what, rule) for h in raw}))

    return names("forZones"), names("forNodes")


# Node names and zones repeat across a cluster's endpoints (a few hundred nodes, a hundred
# thousand endpoints): each distinct one is checked once.
_node_name_problem = lru_cache(maxsize=4096)(dns_subdomain_problem)
_zone_problem = lru_cache(maxsize=1024)(label_value_problem)
_NO_CONDITIONS: dict[str, Any] = {}


def _condition(cond: dict[str, Any], key: str, i: int, *, default: bool) -> bool:
    """``_bool`` with the field's name formatted only when the value is bad."""
    value = cond.get(key)
    if value is None or value is True or value is False:
        return default if value is None else value
    return _bool(value, f"endpoints[{i}].conditions.{key}", default=default)


def _endpoint_name(value: Any, i: int, key: str, problem: Callable[[str], str | None]) -> str:
    """``_named(_str(...))`` with the field's name formatted only when the value is bad."""
    if isinstance(value, str) and value and problem(value) is None:
        return value
    what = f"endpoints[{i}].{key}"
    return _named(_str(value, what), what, problem)


def _endpoint(item: Any, i: int, *, family: Family, port: int, seen: set[str]) -> Endpoint:
    """One item of a slice's ``endpoints``. The messages are built only for a bad item: a
    cold start parses every endpoint of the cluster (100k at 10k Services), and formatting
    each field's name up front was half of the parsing time. For the same reason a canonical
    dotted quad is taken as it is and any other address goes through canonical_ip, which
    gives the same result or error."""
    if not isinstance(item, dict):
        _mapping(item, f"endpoints[{i}]")
    addresses = item.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        raise Invalid(f"endpoints[{i}].addresses must be a non-empty list")
    # Like kube-proxy, use the first address only: the API says the others are equivalent.
    ip = addresses[0]
    if family != 4 or not isinstance(ip, str) or CANONICAL_V4.fullmatch(ip) is None:
        try:
            ip, fam = canonical_ip(ip)
        except BadAddress as err:
            raise Invalid(f"endpoints[{i}].addresses[0]: {err}") from None
        if fam != family:
            raise Invalid(f"endpoints[{i}]: {ip} is not IPv{family} but addressType is")
    if ip in seen:
        raise Invalid(f"endpoints[{i}]: duplicate endpoint {ip}")
    seen.add(ip)
    cond = item.get("conditions") or _NO_CONDITIONS
    if not isinstance(cond, dict):
        _mapping(cond, f"endpoints[{i}].conditions")
    # Unknown readiness means ready, and unknown serving means serving: what kube-proxy
    # reads (the API's docs say serving "defers to ready"; upstream ignores that, so a
    # terminating endpoint without the field is a fallback there, and here too — found by
    # the differential test, seed 13).
    ready = _condition(cond, "ready", i, default=True)
    serving = _condition(cond, "serving", i, default=True)
    terminating = _condition(cond, "terminating", i, default=False)
    node_name = item.get("nodeName")
    zone = item.get("zone")
    zone_hints, node_hints = _hints(item, i) if item.get("hints") else ((), ())
    return Endpoint(
        ip,
        port,
        ready,
        serving,
        terminating,
        _endpoint_name(node_name, i, "nodeName", _node_name_problem) if node_name else None,
        _endpoint_name(zone, i, "zone", _zone_problem) if zone else None,
        zone_hints,
        node_hints,
    )


def parse_slice(obj: dict[str, Any], *, family: Family = 4, key: tuple[str, str] | None = None) -> ParsedSlice:
    """One EndpointSlice; raises Skipped (other family, FQDN, headless) or Invalid. ``key``:
    its ``object_key``, when the caller has it already (a cold start checks 20k names)."""
    namespace, name = key or object_key(obj)
    labels = _labels(obj)
    if PROXY_NAME_LABEL in labels or HEADLESS_LABEL in labels:
        raise Skipped("not for this proxy (service-proxy-name or headless label)")
    service = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        raise Invalid(f"label {SERVICE_NAME_LABEL} is missing, so no Service owns this slice")
    _named(service, f"label {SERVICE_NAME_LABEL}", dns_label_problem)
    address_type = obj.get("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise Invalid(f"addressType must be IPv4, IPv6 or FQDN, got {address_type!r}")
    if address_type != f"IPv{family}":
        raise Skipped(f"addressType {address_type}")

    ports: list[tuple[str, str, int]] = []
    raw_ports = obj.get("ports") or []
    if not isinstance(raw_ports, list):
        raise Invalid("ports must be a list")
    for i, item in enumerate(raw_ports):
        item = _mapping(item, f"ports[{i}]")
        port = _port(item.get("port"), f"ports[{i}].port")
        proto = _protocol(item.get("protocol"), f"ports[{i}].protocol")
        port_name = _port_name(item.get("name"), f"ports[{i}].name")
        if any(p[0] == port_name and p[1] == proto for p in ports):
            raise Invalid(f"ports[{i}]: duplicate port name {port_name!r}")
        ports.append((port_name, proto, port))

    endpoints = []
    seen: set[str] = set()
    # With one port (most slices) each endpoint carries it already, so merging can keep the
    # very object (half the endpoints in memory, and no second construction of each).
    slice_port = ports[0][2] if len(ports) == 1 else 0
    raw_eps = obj.get("endpoints") or []
    if not isinstance(raw_eps, list):
        raise Invalid("endpoints must be a list")
    for i, item in enumerate(raw_eps):
        endpoints.append(_endpoint(item, i, family=family, port=slice_port, seen=seen))
    return ParsedSlice(namespace, name, service, tuple(ports), tuple(endpoints))


def parse_node(obj: dict[str, Any], *, family: Family = 4) -> NodeInfo:
    """Our Node: its name, addresses of one family and labels."""
    meta = _mapping(obj.get("metadata"), "metadata")
    name = _named(_str(meta.get("name"), "metadata.name"), "metadata.name", dns_subdomain_problem)
    status = _mapping(obj.get("status") or {}, "status")
    addresses = []
    raw = status.get("addresses") or []
    if not isinstance(raw, list):
        raise Invalid("status.addresses must be a list")
    for i, item in enumerate(raw):
        item = _mapping(item, f"status.addresses[{i}]")
        if item.get("type") not in ("InternalIP", "ExternalIP"):
            continue
        try:
            ip, fam = canonical_ip(item.get("address"))
        except BadAddress as err:
            raise Invalid(f"status.addresses[{i}]: {err}") from None
        if fam == family and ip not in addresses:
            addresses.append(ip)
    labels = _mapping(meta.get("labels") or {}, "metadata.labels")
    return NodeInfo(
        name=name,
        addresses=tuple(addresses),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )
