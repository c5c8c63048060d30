"""pyproxy.model.parse: API objects (dicts) → model values, or Invalid / Skipped."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pyproxy.model.objects import Endpoint, NodeInfo, ServicePort, ServicePortName
from pyproxy.model.parse import (
    DEFAULT_AFFINITY_TIMEOUT,
    Invalid,
    Skipped,
    object_key,
    parse_node,
    parse_service,
    parse_slice,
)
from tests import scenario as sc

# -- Services -------------------------------------------------------------------------------


def _svc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}
    base.update(spec)
    return {"kind": "Service", "metadata": {"name": "web", "namespace": "demo"}, "spec": base}


def test_cluster_ip_service():
    ports = parse_service(_svc())
    assert ports == (
        ServicePort(ServicePortName("demo", "web", "http", "tcp"), "10.96.0.10", 80, 0, 0),
    )


def test_namespace_defaults_to_default():
    obj = _svc()
    del obj["metadata"]["namespace"]
    assert parse_service(obj)[0].name.namespace == "default"


def test_multi_port_service_keeps_order_and_names():
    obj = sc.service("web", "10.96.0.10", [sc.port(80, name="http"), sc.port(443, name="https"),
                                           sc.port(53, name="dns", protocol="UDP")])
    ports = parse_service(obj)
    assert [(p.name.port, p.name.protocol, p.port) for p in ports] == [
        ("http", "tcp", 80), ("https", "tcp", 443), ("dns", "udp", 53)]
    assert {p.cluster_ip for p in ports} == {"10.96.0.10"}


def test_nodeport_service():
    obj = sc.service("web", "10.96.0.10", [sc.port(80, name="http", node_port=30080)], svc_type="NodePort")
    (port,) = parse_service(obj)
    assert port.node_port == 30080 and port.port == 80


def test_cluster_ip_is_canonicalised():
    (port,) = parse_service(_svc(clusterIP="172.30.0.041", clusterIPs=["172.30.0.041"]))
    assert port.cluster_ip == "172.30.0.41"


def test_dual_stack_picks_the_ip_of_our_family():
    obj = _svc(clusterIPs=["fd00::10", "10.96.0.10"])
    assert parse_service(obj, family=4)[0].cluster_ip == "10.96.0.10"
    assert parse_service(obj, family=6)[0].cluster_ip == "fd00::10"


@pytest.mark.parametrize(
    ("affinity", "want"),
    [
        ({"sessionAffinity": "ClientIP"}, DEFAULT_AFFINITY_TIMEOUT),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {}}, DEFAULT_AFFINITY_TIMEOUT),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {}}}, DEFAULT_AFFINITY_TIMEOUT),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}, 60),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}}, 1),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}}, 86400),
        ({"sessionAffinity": "None"}, 0),
        ({}, 0),
    ],
)
def test_session_affinity_timeout(affinity, want):
    assert DEFAULT_AFFINITY_TIMEOUT == 10800
    (port,) = parse_service(_svc(**affinity))
    assert port.affinity_timeout == want


@pytest.mark.parametrize("timeout", [0, 86401, -5, "x", "60", True, 1.5, None])
def test_invalid_affinity_timeout(timeout):
    obj = _svc(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}})
    with pytest.raises(Invalid, match="timeoutSeconds"):
        parse_service(obj)


def test_unknown_session_affinity_is_invalid():
    with pytest.raises(Invalid, match="sessionAffinity"):
        parse_service(_svc(sessionAffinity="Cookie"))


@pytest.mark.parametrize(
    "spec",
    [
        {"clusterIP": "None"},
        {"clusterIP": ""},
        {"clusterIP": "None", "clusterIPs": ["None"]},
        {"clusterIP": None, "clusterIPs": None},
        {"clusterIPs": []},
    ],
    ids=["None", "empty", "None-list", "null", "empty-list"],
)
def test_headless_service_is_skipped(spec):
    obj = _svc(**spec)
    if "clusterIP" not in spec:
        del obj["spec"]["clusterIP"]
    with pytest.raises(Skipped, match="headless"):
        parse_service(obj)


def test_external_name_is_skipped():
    obj = _svc(type="ExternalName", externalName="example.com")
    del obj["spec"]["clusterIP"]
    with pytest.raises(Skipped, match="ExternalName"):
        parse_service(obj)


@pytest.mark.parametrize(
    "label",
    ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"],
)
def test_labels_that_hand_the_service_elsewhere_are_skipped(label):
    obj = _svc()
    obj["metadata"]["labels"] = {label: "other"}
    with pytest.raises(Skipped):
        parse_service(obj)


def test_ipv6_only_service_is_skipped_for_ipv4():
    obj = _svc(clusterIP="fd00::10", clusterIPs=["fd00::10"])
    with pytest.raises(Skipped, match="IPv4"):
        parse_service(obj, family=4)
    assert parse_service(obj, family=6)[0].cluster_ip == "fd00::10"


def _without(path: tuple[str, ...]) -> dict[str, Any]:
    obj = copy.deepcopy(_svc())
    target = obj
    for p in path[:-1]:
        target = target[p]
    del target[path[-1]]
    return obj


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (_svc(clusterIP="10.96.0.300"), "spec.clusterIPs"),
        (_svc(clusterIP="10.96.0.10", clusterIPs=["bogus"]), "spec.clusterIPs"),
        (_svc(clusterIPs="10.96.0.10"), "spec.clusterIPs"),
        (_svc(ports=[{"port": 0}]), "spec.ports[0].port"),
        (_svc(ports=[{"port": 65536}]), "spec.ports[0].port"),
        (_svc(ports=[{"port": "80"}]), "spec.ports[0].port"),
        (_svc(ports=[{"port": True}]), "spec.ports[0].port"),
        (_svc(ports=[{"name": "a", "port": 80}, {"name": "b"}]), "spec.ports[1].port"),
        (_svc(ports=[{"port": 80, "protocol": "ICMP"}]), "spec.ports[0].protocol"),
        (_svc(ports=[{"port": 80, "protocol": 6}]), "spec.ports[0].protocol"),
        (_svc(ports=[{"port": 80, "nodePort": 70000}]), "spec.ports[0].nodePort"),
        (_svc(ports=[{"port": 80, "nodePort": "30080"}]), "spec.ports[0].nodePort"),
        (_svc(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]), "spec.ports[1]"),
        (_svc(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]), "spec.ports[1]"),
        (_svc(ports=[{"name": 7, "port": 80}]), "spec.ports[0].name"),
        (_svc(ports=["80"]), "spec.ports[0]"),
        (_svc(ports="80"), "spec.ports"),
        (_svc(ports=[]), "spec.ports"),
        (_svc(ports=None), "spec.ports"),
        (_without(("spec",)), "spec"),
        (_without(("metadata", "name")), "metadata.name"),
        ({"kind": "Service", "spec": {}}, "metadata"),
        ({"kind": "Service", "metadata": {"name": ""}, "spec": {}}, "metadata.name"),
        ({"kind": "Service", "metadata": {"name": "x", "namespace": 3}, "spec": {}}, "metadata.namespace"),
        ({"kind": "Service", "metadata": {"name": "x", "labels": ["a"]}, "spec": {}}, "metadata.labels"),
        (_svc(sessionAffinity="ClientIP", sessionAffinityConfig="x"), "spec.sessionAffinityConfig"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_services_name_the_field(obj, field):
    with pytest.raises(Invalid) as exc:
        parse_service(obj)
    assert field in str(exc.value)


def test_duplicate_port_message_names_port_and_protocol():
    with pytest.raises(Invalid, match="duplicate port 80/TCP"):
        parse_service(_svc(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80, "protocol": "TCP"}]))


def test_duplicate_node_port_inside_one_service_is_invalid():
    with pytest.raises(Invalid, match=r"spec\.ports\[1\]: duplicate nodePort 30080/TCP"):
        parse_service(_svc(type="NodePort", ports=[{"name": "a", "port": 80, "nodePort": 30080},
                                                   {"name": "b", "port": 81, "nodePort": 30080}]))


def test_same_node_port_on_two_protocols_is_fine():
    ports = parse_service(_svc(type="NodePort", ports=[
        {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 30053}]))
    assert [(p.node_port, p.name.protocol) for p in ports] == [(30053, "udp"), (30053, "tcp")]


def test_same_port_number_on_two_protocols_is_fine():
    ports = parse_service(_svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                      {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]))
    assert [(p.port, p.name.protocol) for p in ports] == [(53, "udp"), (53, "tcp")]


@pytest.mark.parametrize(
    ("given", "want"),
    [("TCP", "tcp"), ("UDP", "udp"), ("SCTP", "sctp"), ("udp", "udp"), ("Sctp", "sctp"), (None, "tcp")],
)
def test_protocol_is_case_insensitive_and_defaults_to_tcp(given, want):
    port: dict[str, Any] = {"port": 80}
    if given is not None:
        port["protocol"] = given
    assert parse_service(_svc(ports=[port]))[0].name.protocol == want


def test_unnamed_single_port():
    (port,) = parse_service(_svc(ports=[{"port": 80}]))
    assert port.name.port == ""
    assert str(port.name) == "demo/web"


def test_service_port_name_str_matches_kube_proxy():
    assert str(ServicePortName("ns", "svc", "http", "tcp")) == "ns/svc:http"
    assert str(ServicePortName("ns", "svc", "", "udp")) == "ns/svc"


def test_object_key():
    assert object_key({"metadata": {"name": "a", "namespace": "b"}}) == ("b", "a")
    assert object_key({"metadata": {"name": "a"}}) == ("default", "a")
    with pytest.raises(Invalid, match="metadata"):
        object_key("not a dict")


def test_parsing_does_not_mutate_the_object():
    obj = sc.service("web", "10.96.0.010", [sc.port(80, name="http", protocol="udp")], affinity_timeout=5)
    before = copy.deepcopy(obj)
    parse_service(obj)
    assert obj == before


# -- EndpointSlices -------------------------------------------------------------------------


def _slice(endpoints: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }
    obj.update(top)
    return obj


def test_slice_basic_fields():
    sl = parse_slice(_slice([{"addresses": ["10.244.1.10"], "nodeName": "node-a", "zone": "z1"}]))
    assert (sl.namespace, sl.name, sl.service) == ("demo", "web-abc", "web")
    assert sl.ports == (("http", "tcp", 8080),)
    assert sl.endpoints == (Endpoint("10.244.1.10", 8080, True, True, False, "node-a", "z1"),)  # its one port


@pytest.mark.parametrize(
    ("conditions", "want"),
    [
        # (ready, serving, terminating)
        (None, (True, True, False)),
        ({}, (True, True, False)),
        ({"ready": None}, (True, True, False)),
        ({"ready": True}, (True, True, False)),
        ({"ready": False}, (False, True, False)),  # serving nil => true, as kube-proxy reads it
        ({"ready": False, "terminating": True}, (False, True, True)),  # a fallback, as upstream
        ({"ready": False, "serving": True}, (False, True, False)),
        ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
        ({"ready": False, "serving": False, "terminating": True}, (False, False, True)),
        ({"ready": True, "serving": False}, (True, False, False)),
        ({"serving": False}, (True, False, False)),
    ],
)
def test_endpoint_condition_defaults(conditions, want):
    ep: dict[str, Any] = {"addresses": ["10.244.1.10"]}
    if conditions is not None:
        ep["conditions"] = conditions
    (got,) = parse_slice(_slice([ep])).endpoints
    assert (got.ready, got.serving, got.terminating) == want


@pytest.mark.parametrize("address_type", ["IPv6", "FQDN"])
def test_other_address_types_are_skipped(address_type):
    with pytest.raises(Skipped, match=address_type):
        parse_slice(_slice([{"addresses": ["fd00::1"]}], addressType=address_type))


def test_ipv6_slice_is_parsed_for_family_6():
    sl = parse_slice(_slice([{"addresses": ["FD00::0001"]}], addressType="IPv6"), family=6)
    assert sl.endpoints[0].ip == "fd00::1"


@pytest.mark.parametrize(
    "label", ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"])
def test_slices_with_foreign_labels_are_skipped(label):
    obj = _slice([{"addresses": ["10.0.0.1"]}])
    obj["metadata"]["labels"][label] = ""
    with pytest.raises(Skipped):
        parse_slice(obj)


def test_non_canonical_endpoint_ip_is_canonicalised():
    sl = parse_slice(_slice([{"addresses": ["10.244.001.010"]}]))
    assert sl.endpoints[0].ip == "10.244.1.10"


def test_only_the_first_address_is_used():
    sl = parse_slice(_slice([{"addresses": ["10.244.1.10", "10.244.1.99", "not-an-ip"]}]))
    assert [e.ip for e in sl.endpoints] == ["10.244.1.10"]


def test_duplicate_endpoint_after_canonicalisation_is_invalid():
    with pytest.raises(Invalid, match=r"endpoints\[1\].*duplicate endpoint 10.244.1.10"):
        parse_slice(_slice([{"addresses": ["10.244.1.10"]}, {"addresses": ["10.244.1.010"]}]))


def _no_service_label():
    obj = _slice([])
    obj["metadata"]["labels"] = {}
    return obj


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (_no_service_label(), "kubernetes.io/service-name"),
        (_slice([{"addresses": ["10.244.1.300"]}]), "endpoints[0].addresses[0]"),
        (_slice([{"addresses": ["x"]}]), "endpoints[0].addresses[0]"),
        (_slice([{"addresses": []}]), "endpoints[0].addresses"),
        (_slice([{}]), "endpoints[0].addresses"),
        (_slice([{"addresses": ["fd00::1"]}]), "endpoints[0]"),  # wrong family for IPv4
        (_slice([{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}]), "conditions.ready"),
        (_slice([{"addresses": ["10.0.0.1"], "conditions": "x"}]), "endpoints[0].conditions"),
        (_slice([{"addresses": ["10.0.0.1"], "nodeName": 5}]), "endpoints[0].nodeName"),
        (_slice([], addressType="IPv5"), "addressType"),
        (_slice([], addressType=None), "addressType"),
        (_slice([], ports=[{"name": "http", "port": 70000}]), "ports[0].port"),
        (_slice([], ports=[{"name": "http", "port": 80, "protocol": "ICMP"}]), "ports[0].protocol"),
        (_slice([], ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]), "ports[1]"),
        (_slice([], ports="x"), "ports"),
        (_slice("x"), "endpoints"),
        (_slice(["10.0.0.1"]), "endpoints[0]"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_slices_name_the_field(obj, field):
    with pytest.raises(Invalid) as exc:
        parse_slice(obj)
    assert field in str(exc.value)


def test_slice_without_ports_or_endpoints_is_valid_and_empty():
    sl = parse_slice(_slice(None, ports=None))
    assert sl.ports == () and sl.endpoints == ()


# -- Nodes ----------------------------------------------------------------------------------


def test_node_addresses_keep_order_and_ignore_hostname():
    obj = {
        "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"z": "1", "a": "2"}},
        "status": {"addresses": [
            {"type": "Hostname", "address": "node-a"},
            {"type": "ExternalIP", "address": "203.0.113.5"},
            {"type": "InternalIP", "address": "192.168.050.002"},
            {"type": "InternalIP", "address": "fd00::2"},
            {"type": "InternalDNS", "address": "node-a.cluster.local"},
            {"type": "InternalIP", "address": "203.0.113.5"},  # duplicate
        ]},
    }
    node = parse_node(obj)
    assert node == NodeInfo("node-a", ("203.0.113.5", "192.168.50.2"), (("a", "2"), ("z", "1")))
    assert parse_node(obj, family=6).addresses == ("fd00::2",)


def test_node_without_status():
    assert parse_node({"metadata": {"name": "n"}}) == NodeInfo("n", (), ())


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"metadata": {}}, "metadata.name"),
        ({}, "metadata"),
        ({"metadata": {"name": "n"}, "status": {"addresses": "x"}}, "status.addresses"),
        ({"metadata": {"name": "n"}, "status": {"addresses": [{"type": "InternalIP", "address": "1.2.3"}]}},
         "status.addresses[0]"),
        ({"metadata": {"name": "n"}, "status": {"addresses": ["1.2.3.4"]}}, "status.addresses[0]"),
        ({"metadata": {"name": "n"}, "status": "x"}, "status"),
    ],
)
def test_invalid_nodes(obj, field):
    with pytest.raises(Invalid) as exc:
        parse_node(obj)
    assert field in str(exc.value)


# -- names: what the API server accepts passes, nothing else reaches rule text ---------------

LABEL63 = "a" + "b" * 61 + "c"


@pytest.mark.parametrize(("field", "value", "ok"), [
    ("namespace", LABEL63, True),
    ("namespace", LABEL63 + "d", False),
    ("namespace", "Demo", False),
    ("namespace", "has space", False),
    ("namespace", "a.b", False),
    ("name", LABEL63, True),
    ("name", "1st", True),  # relaxed Service name validation: a DNS-1123 label
    ("name", LABEL63 + "d", False),
    ("name", "web.v2", False),  # a subdomain, but Service names are labels
    ("name", "-web", False),
    ("name", "web-", False),
    ("name", 'we"b', False),
    ("name", "web\n-I INPUT 1 -j ACCEPT", False),
    ("name", "caf\u00e9", False),
    ("name", "web\x00", False),
    ("port", LABEL63, True),
    ("port", LABEL63 + "d", False),
    ("port", "HTTP", False),
    ("port", "a b", False),
    ("port", "x\nCOMMIT", False),
])
def test_service_names_are_checked_as_the_api_server_checks_them(field: str, value: str, ok: bool):
    obj = _svc()
    if field == "port":
        obj["spec"]["ports"][0]["name"] = value
    else:
        obj["metadata"][field] = value
    if ok:
        assert parse_service(obj)
        return
    with pytest.raises(Invalid) as err:
        parse_service(obj)
    where = "spec.ports[0].name" if field == "port" else f"metadata.{field}"
    assert str(err.value).startswith(f"{where} must be"), err.value
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("path", "value", "ok"), [
    (("metadata", "name"), "web-" + "x" * 249, True),  # 253: the longest subdomain
    (("metadata", "name"), "web-" + "x" * 250, False),
    (("metadata", "name"), "web.abc12", True),
    (("metadata", "name"), "web abc", False),
    (("metadata", "labels", "kubernetes.io/service-name"), "we b", False),
    (("ports", 0, "name"), "ht\ttp", False),
    (("endpoints", 0, "nodeName"), "node 1", False),
    (("endpoints", 0, "nodeName"), "node-1.example.org", True),
    (("endpoints", 0, "zone"), "zone_A.1", True),
    (("endpoints", 0, "zone"), "zone\n", False),
])
def test_slice_names_are_checked_as_the_api_server_checks_them(path: tuple, value: str, ok: bool):
    obj = sc.endpoint_slice("web", ["10.244.0.5"], [sc.port(8080, name="http")])
    target: Any = obj
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    if ok:
        parse_slice(obj)
        return
    with pytest.raises(Invalid, match="must be"):
        parse_slice(obj)


def test_zone_hints_and_node_names_are_checked():
    obj = sc.endpoint_slice("web", ["10.244.0.5"], [sc.port(8080, name="http")])
    obj["endpoints"][0]["hints"] = {"forZones": [{"name": "bad zone"}]}
    with pytest.raises(Invalid, match=r"hints.forZones\[\].name must be a label value"):
        parse_slice(obj)
    with pytest.raises(Invalid, match="metadata.name must be a DNS-1123 subdomain"):
        parse_node(sc.node("Node_1", ["192.168.1.1"]))
