"""Small builders shared by the unit tests: model values and desired states from dicts."""

from __future__ import annotations

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
