"""Build Service / EndpointSlice / Node objects as the API would return them."""

from __future__ import annotations

from typing import Any

import yaml


def service(name: str, cluster_ip: str, ports: list[dict[str, Any]], *, namespace: str = "test",
            affinity_timeout: int | None = None, svc_type: str = "ClusterIP") -> dict[str, Any]:
    spec: dict[str, Any] = {"type": svc_type, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                            "ports": ports}
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def port(number: int, *, name: str = "", protocol: str = "TCP", node_port: int | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"name": name, "port": number, "protocol": protocol}
    if node_port:
        p["nodePort"] = node_port
    return p


def endpoint_slice(service_name: str, ips: list[str], ports: list[dict[str, Any]], *,
                   namespace: str = "test", suffix: str = "a", node: str = "node-1",
                   conditions: dict[str, bool] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{service_name}-{suffix}", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": [
            {"addresses": [ip], "conditions": dict(conditions or {"ready": True}), "nodeName": node}
            for ip in ips
        ],
    }


def node(name: str, addresses: list[str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}


def dump(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)
