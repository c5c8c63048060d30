"""Synthetic clusters for the benchmarks: N services × E endpoints as API dicts."""

from __future__ import annotations

from typing import Any


def service_ip(i: int) -> str:
    # 10.96.0.0/12 holds a million addresses; skip .0 and .255 for readability.
    return f"10.{96 + i // 62500}.{(i // 250) % 250}.{1 + i % 250}"


def endpoint_ip(i: int, j: int) -> str:
    # Never contacted: only the target service's endpoints are real pods.
    return f"10.{200 + j}.{i // 250}.{1 + i % 250}"


def cluster(n_services: int, n_endpoints: int, *, target_ips: list[str] | None = None,
            node_name: str = "node-1", node_ip: str = "192.168.50.2") -> list[dict[str, Any]]:
    """``n_services`` services; the last one, ``zz/target``, is backed by ``target_ips``.

    Each object has a uid and a resourceVersion, as every object `kubectl get -o json` writes
    (and every object the API sends) has.

    The target sorts last, so in iptables mode it is the last rule of PYPROXY-SERVICES: the
    worst case of iptables' linear dispatch, which is what the latency benchmark measures.
    """
    objs: list[dict[str, Any]] = [{
        "kind": "Node", "metadata": {"name": node_name},
        "status": {"addresses": [{"type": "InternalIP", "address": node_ip}]},
    }]
    for i in range(n_services):
        last = i == n_services - 1 and target_ips is not None
        ns, name = ("zz", "target") if last else (f"ns{i % 50}", f"svc{i}")
        objs.append({
            "kind": "Service", "metadata": {"name": name, "namespace": ns, "uid": f"svc-{i}",
                                            "resourceVersion": str(2 * i + 1)},
            "spec": {"clusterIP": service_ip(i), "type": "ClusterIP",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        })
        ips = target_ips if last else [endpoint_ip(i, j) for j in range(n_endpoints)]
        objs.append({
            "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-a", "namespace": ns, "uid": f"eps-{i}",
                         "resourceVersion": str(2 * i + 2),
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node_name}
                          for ip in ips],
        })
    return objs
