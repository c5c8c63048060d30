"""Small builders shared by the unit tests: model values and desired states from dicts."""

from __future__ import annotations

import re

from typing import Any

from pyproxy.model.objects import (
    DesiredState,
    Endpoint,
    ServicePort,
    ServicePortName,
    ServicePortState,
)
from pyproxy.model.state import StateBuilder
from tests import scenario as sc


def spn(name: str = "web", port: str = "http", protocol: str = "tcp", namespace: str = "test") -> ServicePortName:
    return ServicePortName(namespace, name, port, protocol)


def sps(
    ips: list[str],
    *,
    name: str = "web",
    port_name: str = "http",
    protocol: str = "tcp",
    cluster_ip: str = "10.96.0.10",
    port: int = 80,
    target_port: int = 8080,
    node_port: int = 0,
    affinity: int = 0,
    namespace: str = "test",
) -> ServicePortState:
    """A ServicePortState with ready endpoints ``ips`` (all on ``target_port``)."""
    svc = ServicePort(
        name=spn(name, port_name, protocol, namespace),
        cluster_ip=cluster_ip,
        port=port,
        node_port=node_port,
        affinity_timeout=affinity,
    )
    return ServicePortState(svc, tuple(sorted(Endpoint(ip, target_port) for ip in ips)))


def build(objects: list[dict[str, Any]], *, node_name: str = "node-1",
          nodeport_ips: tuple[str, ...] = ()) -> DesiredState:
    b = StateBuilder(node_name=node_name)
    b.replace_all(objects)
    return b.build(nodeport_ips=nodeport_ips)


def service_objects(i: int, *, endpoints: int = 2, node_port: int | None = None,
                    affinity: int | None = None, ready: bool = True) -> list[dict[str, Any]]:
    """Service ``svc-i`` on ClusterIP 10.96.x.y with ``endpoints`` pods in 10.244.x.y/…"""
    cip = f"10.96.{i // 250}.{i % 250 + 1}"
    ips = [f"10.{100 + e}.{i // 250}.{i % 250 + 1}" for e in range(endpoints)]
    svc = sc.service(f"svc-{i}", cip, [sc.port(80, name="http", node_port=node_port)],
                     affinity_timeout=affinity, svc_type="NodePort" if node_port else "ClusterIP")
    objs = [svc]
    if endpoints:
        objs.append(sc.endpoint_slice(f"svc-{i}", ips, [sc.port(8080, name="http")],
                                      conditions={"ready": ready}))
    return objs


def many_services(n: int, **kw: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        out.extend(service_objects(i, **kw))
    return out


def _addr(value: str) -> str:
    """``10.0.0.1 . 80`` (an endpoint map's data) as ``10.0.0.1:80`` (``[fd00::1]:80``)."""
    ip, port = (p.strip() for p in value.split(" . "))
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def chain_targets(chains: dict[str, Any]) -> dict[str, set[str]]:
    """Per chain, the endpoints its rules DNAT to (an endpoint chain's ``dnat to A``)."""
    return {name: {rule.rsplit("dnat to ", 1)[1] for rule in rules if "dnat to " in rule}
            for name, rules in chains.items()}


def fake_dnat_targets(table: Any) -> set[str]:
    """Every endpoint a FakeNft table can DNAT to: endpoint chains (ClientIP affinity) and the
    slot maps' data (every other service)."""
    out = set().union(*chain_targets(table.chains).values())
    for name, elems in table.elements.items():
        if table.sets[name].startswith("typeof numgen"):  # a slot map
            out.update(_addr(v) for v in elems.values())
    return out


def fragment_pool(frag: Any, chain: str) -> list[str]:
    """The endpoints a service fragment's ``chain`` (service-… or local-…) picks from."""
    rules = frag.chains[chain]
    # The endpoint lookup (the rule after it drops what it missed), or the last rule.
    last = next((r for r in rules if " map @" in r), rules[-1])
    if " dnat to " in last:  # a pool of one: the rule DNATs itself
        return [last.rsplit("dnat to ", 1)[1]]
    lookup = re.search(r"mod (\d+) offset (\d+) map @(\S+)", last)
    if lookup:  # the pool's region of a shared map
        mod, offset, name = int(lookup.group(1)), int(lookup.group(2)), lookup.group(3)
        slots = [(lo, v) for (m, k), v in frag.elements.items()
                 if m == name and offset <= (lo := int(k.split("-")[0])) < offset + mod]
        return [_addr(v) for _, v in sorted(slots)]
    targets = [rule.split("goto ", 1)[1] for rule in rules if "goto endpoint-" in rule and "@affinity" not in rule]
    return [t for c in targets for t in chain_targets({c: frag.chains[c]})[c]]
