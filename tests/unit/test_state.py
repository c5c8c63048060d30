"""pyproxy.model.state: StateBuilder merging, incrementality, problems, and nodeport_ips."""

from __future__ import annotations

import copy

import pytest

from pyproxy.model.objects import Endpoint, NodeInfo, ServicePortName, ServicePortState
from pyproxy.model.nodeports import nodeport_ips
from pyproxy.model.state import StateBuilder
from tests import scenario as sc
from tests.unit.helpers import sps

HTTP = ServicePortName("test", "web", "http", "tcp")


def _builder(objects, node_name: str = "node-1") -> StateBuilder:
    b = StateBuilder(node_name=node_name)
    b.replace_all(objects)
    return b


def _web(*ports):
    return sc.service("web", "10.96.0.10", list(ports) or [sc.port(80, name="http")])


def _eps(state, name=HTTP):
    return [(e.ip, e.port, e.ready) for e in state.services[name].endpoints]


# -- merging ---------------------------------------------------------------------------------


def test_several_slices_of_one_service_are_merged_and_sorted():
    objs = [
        _web(),
        sc.endpoint_slice("web", ["10.244.2.1", "10.244.0.9"], [sc.port(8080, name="http")], suffix="b"),
        sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")], suffix="a"),
    ]
    state = _builder(objs).build()
    assert list(state.services) == [HTTP]
    assert _eps(state) == [("10.244.0.9", 8080, True), ("10.244.1.1", 8080, True), ("10.244.2.1", 8080, True)]
    assert state.services[HTTP].service.cluster_ip == "10.96.0.10"


@pytest.mark.parametrize("order", ["live first", "terminating first"])
def test_an_address_in_two_slices_takes_the_live_copy_over_a_terminating_one(order: str):
    # A pod IP reused before the old Pod object is gone (found by the differential test against
    # upstream, seed 8): the terminating copy on node-1 and the live one on node-2. Upstream
    # keeps the live one whatever the order; so must we, though the terminating one is "ready".
    old = sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")], suffix="old",
                            conditions={"ready": True, "serving": True, "terminating": True})
    live = sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")], suffix="new", node="node-2",
                             conditions={"ready": False, "serving": False, "terminating": False})
    slices = [live, old] if order == "live first" else [old, live]
    state = _builder([_web(), *slices]).build()
    (ep,) = state.services[HTTP].endpoints
    assert (ep.node_name, ep.ready, ep.terminating) == ("node-2", False, False)
    # Two live copies that differ: the ready one, in either order.
    a = sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")], suffix="a",
                          conditions={"ready": False})
    b = sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")], suffix="b", node="node-2")
    for pair in ([a, b], [b, a]):
        (ep,) = _builder([_web(), *pair]).build().services[HTTP].endpoints
        assert (ep.node_name, ep.ready) == ("node-2", True)


def test_slices_of_other_services_or_namespaces_do_not_leak():
    objs = [
        _web(),
        sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")]),
        sc.endpoint_slice("other", ["10.244.9.9"], [sc.port(8080, name="http")]),
        sc.endpoint_slice("web", ["10.244.8.8"], [sc.port(8080, name="http")], namespace="elsewhere"),
    ]
    state = _builder(objs).build()
    assert _eps(state) == [("10.244.1.1", 8080, True)]


def test_endpoints_are_matched_by_port_name_and_protocol():
    objs = [
        sc.service("dns", "10.96.0.53", [sc.port(53, name="dns", protocol="UDP"),
                                         sc.port(53, name="dns", protocol="TCP"),
                                         sc.port(9153, name="metrics")]),
        sc.endpoint_slice("dns", ["10.244.1.1"], [sc.port(5353, name="dns", protocol="UDP"),
                                                  sc.port(5354, name="dns", protocol="TCP"),
                                                  sc.port(9999, name="metrics", protocol="UDP")]),
    ]
    state = _builder(objs).build()
    udp = ServicePortName("test", "dns", "dns", "udp")
    tcp = ServicePortName("test", "dns", "dns", "tcp")
    metrics = ServicePortName("test", "dns", "metrics", "tcp")
    assert _eps(state, udp) == [("10.244.1.1", 5353, True)]
    assert _eps(state, tcp) == [("10.244.1.1", 5354, True)]
    assert _eps(state, metrics) == []  # the slice's "metrics" port is UDP, the Service's TCP


def test_slice_port_with_a_different_name_is_ignored():
    objs = [_web(), sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="web")])]
    state = _builder(objs).build()
    assert state.services[HTTP].endpoints == ()


def test_same_endpoint_in_two_slices_prefers_the_ready_copy():
    tcp = [sc.port(8080, name="http")]
    not_ready = sc.endpoint_slice("web", ["10.244.1.1"], tcp, suffix="a", conditions={"ready": False})
    ready = sc.endpoint_slice("web", ["10.244.1.1"], tcp, suffix="b", conditions={"ready": True})
    for order in ([not_ready, ready], [ready, not_ready]):
        state = _builder([_web(), *order]).build()
        assert _eps(state) == [("10.244.1.1", 8080, True)]


def test_same_endpoint_in_two_slices_neither_ready_keeps_the_live_one():
    tcp = [sc.port(8080, name="http")]
    a = sc.endpoint_slice("web", ["10.244.1.1"], tcp, suffix="a",
                          conditions={"ready": False, "serving": True, "terminating": True})
    b = sc.endpoint_slice("web", ["10.244.1.1"], tcp, suffix="b", conditions={"ready": False})
    state = _builder([_web(), a, b]).build()
    assert len(state.services[HTTP].endpoints) == 1
    # Upstream's rule: a terminating copy never replaces a live one, a live one always wins.
    assert state.services[HTTP].endpoints[0].terminating is False


def test_endpoint_carries_node_and_zone():
    sl = sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")], node="node-7")
    sl["endpoints"][0]["zone"] = "z1"
    (ep,) = _builder([_web(), sl]).build().services[HTTP].endpoints
    assert (ep.node_name, ep.zone) == ("node-7", "z1")


def test_service_without_slices_has_no_endpoints_but_is_present():
    state = _builder([_web()]).build()
    assert state.services[HTTP].endpoints == ()


def test_slice_without_service_produces_nothing():
    state = _builder([sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")])]).build()
    assert state.services == {}


# -- usable endpoints -----------------------------------------------------------------------


def _ep(ip, ready, serving, terminating):
    return Endpoint(ip, 80, ready=ready, serving=serving, terminating=terminating)


@pytest.mark.parametrize(
    ("endpoints", "usable"),
    [
        ([_ep("1.1.1.1", True, True, False), _ep("1.1.1.2", False, True, True)], ["1.1.1.1"]),
        ([_ep("1.1.1.1", False, True, True), _ep("1.1.1.2", False, True, True)], ["1.1.1.1", "1.1.1.2"]),
        # Not serving: never used, even as a fallback.
        ([_ep("1.1.1.1", False, False, True), _ep("1.1.1.2", False, True, True)], ["1.1.1.2"]),
        ([_ep("1.1.1.1", False, False, True)], []),
        # Serving but not terminating (e.g. not yet ready) is not a fallback either.
        ([_ep("1.1.1.1", False, True, False)], []),
        ([], []),
    ],
)
def test_usable_endpoints_fallback(endpoints, usable):
    st = ServicePortState(sps([]).service, tuple(endpoints))
    assert [e.ip for e in st.usable_endpoints] == usable


def test_usable_endpoints_through_the_builder():
    tcp = [sc.port(8080, name="http")]
    term = sc.endpoint_slice("web", ["10.244.1.1"], tcp, suffix="a",
                             conditions={"ready": False, "serving": True, "terminating": True})
    gone = sc.endpoint_slice("web", ["10.244.1.2"], tcp, suffix="b",
                             conditions={"ready": False, "serving": False, "terminating": True})
    state = _builder([_web(), term, gone]).build()
    assert [e.ip for e in state.services[HTTP].usable_endpoints] == ["10.244.1.1"]
    assert len(state.services[HTTP].endpoints) == 2  # every endpoint is kept, whatever its state


# -- replace_all and delete -----------------------------------------------------------------


def test_replace_all_drops_vanished_service():
    b = _builder([_web(), sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")])])
    assert HTTP in b.build().services
    b.replace_all([sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")])])
    assert b.build().services == {}


def test_replace_all_drops_vanished_slice_endpoints():
    tcp = [sc.port(8080, name="http")]
    b = _builder([_web(), sc.endpoint_slice("web", ["10.244.1.1"], tcp, suffix="a"),
                  sc.endpoint_slice("web", ["10.244.1.2"], tcp, suffix="b")])
    assert len(b.build().services[HTTP].endpoints) == 2
    b.replace_all([_web(), sc.endpoint_slice("web", ["10.244.1.2"], tcp, suffix="b")])
    assert _eps(b.build()) == [("10.244.1.2", 8080, True)]
    b.replace_all([_web()])
    assert b.build().services[HTTP].endpoints == ()


def test_slice_moving_to_another_service():
    tcp = [sc.port(8080, name="http")]
    other = sc.service("other", "10.96.0.11", [sc.port(80, name="http")])
    sl = sc.endpoint_slice("web", ["10.244.1.1"], tcp)
    b = _builder([_web(), other, sl])
    moved = copy.deepcopy(sl)
    moved["metadata"]["labels"]["kubernetes.io/service-name"] = "other"
    b.replace_all([_web(), other, moved])
    state = b.build()
    assert state.services[HTTP].endpoints == ()
    assert _eps(state, ServicePortName("test", "other", "http", "tcp")) == [("10.244.1.1", 8080, True)]


def test_delete_events():
    tcp = [sc.port(8080, name="http")]
    b = StateBuilder()
    b.upsert(_web())
    b.upsert(sc.endpoint_slice("web", ["10.244.1.1"], tcp))
    assert len(b.build().services[HTTP].endpoints) == 1
    b.delete("EndpointSlice", ("test", "web-a"))
    assert b.build().services[HTTP].endpoints == ()
    b.delete("Service", ("test", "web"))
    assert b.build().services == {}
    b.delete("Service", ("test", "never-was"))  # harmless
    assert b.build().services == {}


def test_upsert_ignores_other_kinds():
    b = StateBuilder()
    b.upsert({"kind": "ConfigMap", "metadata": {"name": "x"}})
    b.upsert("not even a dict")  # type: ignore[arg-type]
    state = b.build()
    assert state.services == {} and state.problems == ()


def test_service_changing_cluster_ip_updates_state():
    b = _builder([_web()])
    b.replace_all([sc.service("web", "10.96.0.99", [sc.port(80, name="http")])])
    assert b.build().services[HTTP].service.cluster_ip == "10.96.0.99"


def test_service_becoming_skipped_leaves_the_state():
    b = _builder([_web()])
    assert HTTP in b.build().services
    headless = sc.service("web", "None", [sc.port(80, name="http")])
    b.replace_all([headless])
    state = b.build()
    assert state.services == {} and state.problems == ()
    assert [(s.kind, s.key) for s in b.skips] == [("Service", ("test", "web"))]


# -- problems --------------------------------------------------------------------------------


def test_problems_are_reported_and_cleared_when_fixed():
    bad = sc.service("web", "10.96.0.300", [sc.port(80, name="http")])
    b = _builder([bad])
    state = b.build()
    assert state.services == {}
    (problem,) = state.problems
    assert (problem.kind, problem.namespace, problem.name) == ("Service", "test", "web")
    assert "10.96.0.300" in problem.reason
    assert str(problem).startswith("Service test/web: ")
    b.replace_all([_web()])
    state = b.build()
    assert state.problems == () and HTTP in state.services


def test_problems_are_cleared_when_removed():
    bad_svc = sc.service("bad", "10.96.0.300", [sc.port(80)])
    bad_slice = sc.endpoint_slice("web", ["10.244.1.1", "10.244.1.1"], [sc.port(8080, name="http")])
    b = _builder([_web(), bad_svc, bad_slice])
    assert {(p.kind, p.name) for p in b.build().problems} == {("Service", "bad"), ("EndpointSlice", "web-a")}
    b.replace_all([_web()])
    assert b.build().problems == ()


def test_delete_clears_problem():
    b = StateBuilder()
    b.upsert(sc.service("bad", "10.96.0.300", [sc.port(80)]))
    assert len(b.problems) == 1
    b.delete("Service", ("test", "bad"))
    assert b.problems == ()


def test_problem_becomes_skip_when_object_becomes_valid_but_not_ours():
    b = _builder([sc.service("web", "10.96.0.300", [sc.port(80, name="http")])])
    assert b.problems
    b.replace_all([sc.service("web", "None", [sc.port(80, name="http")])])
    assert b.problems == () and len(b.skips) == 1


def test_one_bad_object_among_good_ones():
    tcp = [sc.port(8080, name="http")]
    objs = [
        _web(), sc.endpoint_slice("web", ["10.244.1.1"], tcp),
        sc.service("bad-ip", "10.96.0.300", [sc.port(80)]),
        sc.service("port-zero", "10.96.0.41", [sc.port(0)]),
        sc.service("bad-proto", "10.96.0.42", [sc.port(80, protocol="ICMP")]),
        {"kind": "Service", "metadata": {"name": "no-spec", "namespace": "test"}},
        {"kind": "Service", "metadata": {"name": "weird", "namespace": "test"}, "spec": {"clusterIP": ["x"]}},
        sc.endpoint_slice("web", ["10.244.1.2", "10.244.1.2"], tcp, suffix="dup"),
        sc.endpoint_slice("web", ["10.244.1.3"], [sc.port(70000, name="http")], suffix="big"),
        sc.service("dns", "10.96.0.53", [sc.port(53, name="dns", protocol="UDP")]),
    ]
    state = _builder(objs).build()
    assert set(state.services) == {HTTP, ServicePortName("test", "dns", "dns", "udp")}
    assert _eps(state) == [("10.244.1.1", 8080, True)]
    assert sorted(p.name for p in state.problems) == sorted(
        ["bad-ip", "port-zero", "bad-proto", "no-spec", "weird", "web-dup", "web-big"])
    # Problems come sorted, so logs and tests are stable.
    assert list(state.problems) == sorted(state.problems, key=str)


def test_wrongly_typed_fields_are_problems_not_crashes():
    # A clusterIPs entry that is a list must be recorded as a problem, not raise.
    weird = {"kind": "Service", "metadata": {"name": "weird", "namespace": "test"},
             "spec": {"clusterIPs": [["10.0.0.1"]], "ports": [{"port": 80}]}}
    b = _builder([weird])
    assert [p.name for p in b.build().problems] == ["weird"]


def test_nameless_service_is_reported_by_replace_all():
    nameless = {"kind": "Service", "metadata": {}, "spec": {}}
    b = _builder([_web(), nameless])
    (problem,) = b.build().problems
    assert (problem.kind, problem.name) == ("Service", "<no name>") and "metadata.name" in problem.reason
    assert set(b.build().services) == {HTTP}
    # Still in the file: still reported. Gone from the file: forgotten.
    b.replace_all([_web(), nameless])
    assert [(p.kind, p.name) for p in b.build().problems] == [("Service", "<no name>")]
    b.replace_all([_web()])
    assert b.build().problems == ()


def test_nameless_slice_is_reported_by_replace_all():
    b = _builder([_web(), {"kind": "EndpointSlice", "metadata": {"namespace": "test"}}])
    assert [(p.kind, p.name) for p in b.build().problems] == [("EndpointSlice", "<no name>")]


def test_nameless_service_is_reported_by_upsert():
    b = StateBuilder()
    b.upsert({"kind": "Service", "metadata": {}, "spec": {}})
    (problem,) = b.problems
    assert problem.name == "<no name>" and "metadata.name" in problem.reason


# -- identity (cheap incremental syncs) ------------------------------------------------------


def test_unchanged_service_keeps_the_same_object():
    tcp = [sc.port(8080, name="http")]
    a = sc.service("a", "10.96.0.1", [sc.port(80, name="http")])
    b_svc = sc.service("b", "10.96.0.2", [sc.port(80, name="http")])
    a_sl = sc.endpoint_slice("a", ["10.244.1.1"], tcp)
    b_sl = sc.endpoint_slice("b", ["10.244.2.1"], tcp)
    builder = _builder([a, b_svc, a_sl, b_sl])
    first = builder.build()
    a_name = ServicePortName("test", "a", "http", "tcp")
    b_name = ServicePortName("test", "b", "http", "tcp")

    a_sl2 = sc.endpoint_slice("a", ["10.244.1.1", "10.244.1.2"], tcp)
    # Fresh but equal dicts for B: equality, not identity, of the input decides.
    builder.replace_all([copy.deepcopy(a), copy.deepcopy(b_svc), a_sl2, copy.deepcopy(b_sl)])
    second = builder.build()
    assert second.services[b_name] is first.services[b_name]
    assert second.services[a_name] is not first.services[a_name]
    assert len(second.services[a_name].endpoints) == 2


def test_rebuilt_but_equal_service_keeps_the_same_object():
    # The Service object changed (a label) but its merged state is equal: keep the object.
    tcp = [sc.port(8080, name="http")]
    builder = _builder([_web(), sc.endpoint_slice("web", ["10.244.1.1"], tcp)])
    first = builder.build()
    relabelled = _web()
    relabelled["metadata"]["labels"] = {"app": "web"}
    builder.replace_all([relabelled, sc.endpoint_slice("web", ["10.244.1.1"], tcp)])
    assert builder.build().services[HTTP] is first.services[HTTP]


def test_build_without_changes_returns_identical_states():
    builder = _builder([_web()])
    first = builder.build()
    second = builder.build()
    assert second.services[HTTP] is first.services[HTTP]
    assert second.services == first.services


# -- the Node --------------------------------------------------------------------------------


def test_another_nodes_object_is_ignored():
    b = _builder([sc.node("node-2", ["192.168.1.2"])], node_name="node-1")
    assert b.node is None
    b.replace_all([sc.node("node-2", ["192.168.1.2"]), sc.node("node-1", ["192.168.1.1"])])
    assert b.node == NodeInfo("node-1", ("192.168.1.1",))


def test_without_node_name_any_node_is_taken():
    b = _builder([sc.node("whatever", ["192.168.1.9"])], node_name="")
    assert b.node is not None and b.node.addresses == ("192.168.1.9",)


def test_bad_node_is_a_problem_and_fixed_node_clears_it():
    bad = {"kind": "Node", "metadata": {"name": "node-1"}, "status": {"addresses": "x"}}
    b = _builder([bad])
    assert [(p.kind, p.name) for p in b.build().problems] == [("Node", "node-1")]
    b.replace_all([sc.node("node-1", ["192.168.1.1"])])
    assert b.build().problems == ()
    assert b.node is not None and b.node.addresses == ("192.168.1.1",)


def test_node_removed_from_source_is_forgotten():
    b = _builder([sc.node("node-1", ["192.168.1.1"])])
    assert nodeport_ips(node=b.node, interface_ips=("10.0.0.1",), cidrs=()) == ("192.168.1.1",)
    b.replace_all([_web()])
    assert b.node is None
    # NodePorts fall back to the interface addresses.
    assert nodeport_ips(node=b.node, interface_ips=("10.0.0.1",), cidrs=()) == ("10.0.0.1",)


def test_node_replaced_by_another_nodes_object_is_forgotten():
    b = _builder([sc.node("node-1", ["192.168.1.1"])])
    b.replace_all([sc.node("node-2", ["192.168.1.2"])])
    assert b.node is None


def test_problem_of_removed_node_is_cleared():
    bad = {"kind": "Node", "metadata": {"name": "node-1"}, "status": {"addresses": "x"}}
    b = _builder([bad])
    b.replace_all([bad])  # still there: still reported
    assert [(p.kind, p.name) for p in b.build().problems] == [("Node", "node-1")]
    b.replace_all([])
    assert b.build().problems == ()


# -- nodeport_ips ----------------------------------------------------------------------------

NODE = NodeInfo("node-1", ("192.168.1.1", "203.0.113.5"))


@pytest.mark.parametrize(
    ("node", "interfaces", "cidrs", "want"),
    [
        # The Node's addresses are preferred over the interfaces.
        (NODE, ("10.0.0.1", "127.0.0.1"), (), ("192.168.1.1", "203.0.113.5")),
        # No Node, or a Node without addresses: the interfaces, loopback left out.
        (None, ("127.0.0.1", "10.0.0.1", "10.0.0.2"), (), ("10.0.0.1", "10.0.0.2")),
        (NodeInfo("node-1"), ("10.0.0.1",), (), ("10.0.0.1",)),
        # CIDRs filter node and interface addresses alike.
        (NODE, ("10.0.0.1", "127.0.0.1"), ("192.168.0.0/16", "10.0.0.0/8"), ("192.168.1.1", "10.0.0.1")),
        (NODE, ("10.0.0.1",), ("172.16.0.0/12",), ()),
        # Loopback is excluded even when a CIDR covers it.
        (None, ("127.0.0.1", "127.1.2.3"), ("127.0.0.0/8",), ()),
        # Duplicates (node address also on an interface) appear once.
        (NODE, ("192.168.1.1", "192.168.1.1"), ("192.168.0.0/16",), ("192.168.1.1",)),
        (NodeInfo("n", ("10.0.0.1", "10.0.0.1")), (), (), ("10.0.0.1",)),
        (None, (), (), ()),
    ],
)
def test_nodeport_ips(node, interfaces, cidrs, want):
    assert nodeport_ips(node=node, interface_ips=interfaces, cidrs=cidrs) == want


def test_build_passes_nodeport_ips_through():
    state = _builder([_web()]).build(nodeport_ips=("192.168.1.1",))
    assert state.nodeport_ips == ("192.168.1.1",)


# -- ClusterIP:port and NodePort conflicts between Services ----------------------------------


def _svc_at(name, ip="10.96.0.10", port=80, node_port=None, proto="TCP", ep="10.244.1.1"):
    return [sc.service(name, ip, [sc.port(port, name="http", protocol=proto, node_port=node_port)],
                       svc_type="NodePort" if node_port else "ClusterIP"),
            sc.endpoint_slice(name, [ep], [sc.port(8080, name="http", protocol=proto)])]


def _names(state):
    return sorted(k.name for k in state.services)


def test_same_cluster_ip_port_first_in_name_order_wins_on_a_fresh_start():
    state = _builder([*_svc_at("zeta"), *_svc_at("alpha", ep="10.244.9.9")]).build()
    assert _names(state) == ["alpha"]
    (problem,) = state.problems
    assert (problem.kind, problem.name) == ("Service", "zeta")
    assert "10.96.0.10 port 80/TCP is already used by Service test/alpha" in problem.reason


def test_same_nodeport_conflicts():
    state = _builder([*_svc_at("a", node_port=30080),
                      *_svc_at("b", ip="10.96.0.11", node_port=30080)]).build()
    assert _names(state) == ["a"]
    assert "NodePort 30080/TCP is already used by Service test/a" in state.problems[0].reason


@pytest.mark.parametrize(
    "other",
    [dict(ip="10.96.0.10", port=81), dict(ip="10.96.0.10", proto="UDP"), dict(ip="10.96.0.11"),
     dict(ip="10.96.0.11", node_port=30081)],
    ids=["other-port", "other-protocol", "other-ip", "other-nodeport"],
)
def test_no_conflict(other):
    state = _builder([*_svc_at("a", node_port=30080), *_svc_at("b", **other)]).build()
    assert _names(state) == ["a", "b"] and state.problems == ()


def test_owner_keeps_its_port_when_a_conflicting_service_arrives():
    b = _builder(_svc_at("zeta"))
    b.build()
    b.replace_all([*_svc_at("zeta"), *_svc_at("alpha", ep="10.244.9.9")])
    state = b.build()
    assert _names(state) == ["zeta"]
    assert [p.name for p in state.problems] == ["alpha"]


def test_conflict_resolves_when_the_owner_goes():
    b = _builder([*_svc_at("a"), *_svc_at("b", ep="10.244.9.9")])
    assert _names(b.build()) == ["a"]
    b.replace_all(_svc_at("b", ep="10.244.9.9"))
    state = b.build()
    assert _names(state) == ["b"] and state.problems == ()
    assert [e.ip for e in next(iter(state.services.values())).endpoints] == ["10.244.9.9"]


def test_conflict_resolves_when_the_loser_moves():
    b = _builder([*_svc_at("a"), *_svc_at("b", ep="10.244.9.9")])
    b.build()
    b.replace_all([*_svc_at("a"), *_svc_at("b", ip="10.96.0.99", ep="10.244.9.9")])
    state = b.build()
    assert _names(state) == ["a", "b"] and state.problems == ()


def test_owner_keeps_its_port_when_its_endpoints_change():
    b = _builder(_svc_at("zeta"))
    b.build()
    b.replace_all([*_svc_at("zeta"), *_svc_at("alpha", ep="10.244.9.9")])
    assert _names(b.build()) == ["zeta"]
    zeta2 = _svc_at("zeta")
    zeta2[1]["endpoints"].append({"addresses": ["10.244.1.2"], "conditions": {"ready": True}})
    b.replace_all([*zeta2, *_svc_at("alpha", ep="10.244.9.9")])
    state = b.build()
    assert _names(state) == ["zeta"]
    assert [p.name for p in state.problems] == ["alpha"]
    (zeta,) = state.services.values()
    assert [e.ip for e in zeta.endpoints] == ["10.244.1.1", "10.244.1.2"]
    # The loser changing does not take the port over either.
    b.replace_all([*zeta2, *_svc_at("alpha", ep="10.244.9.8")])
    assert _names(b.build()) == ["zeta"]
    # Once the owner lets go of the port, the other Service gets it.
    b.replace_all([*_svc_at("zeta", ip="10.96.0.99"), *_svc_at("alpha", ep="10.244.9.8")])
    state = b.build()
    assert _names(state) == ["alpha", "zeta"] and state.problems == ()


def test_duplicate_nodeport_inside_one_service_is_a_problem():
    dup = sc.service("dup", "10.96.0.50", [sc.port(80, name="a", node_port=30080),
                                           sc.port(81, name="b", node_port=30080)], svc_type="NodePort")
    state = _builder([*_svc_at("good"), dup]).build()
    assert _names(state) == ["good"]
    (problem,) = state.problems
    assert problem.name == "dup" and "duplicate nodePort 30080/TCP" in problem.reason


def test_nodeport_addresses_primary_keyword():
    from pyproxy.model.objects import NodeInfo
    from pyproxy.model.nodeports import nodeport_ips

    node = NodeInfo("n", addresses=("192.168.1.5", "10.0.0.5"))
    ifaces = ("127.0.0.1", "192.168.1.5", "172.17.0.1")
    assert nodeport_ips(node=node, interface_ips=ifaces, cidrs=("primary",)) == ("192.168.1.5",)
    # No Node object: the first non-loopback interface address.
    assert nodeport_ips(node=None, interface_ips=ifaces, cidrs=("primary",)) == ("192.168.1.5",)
    # With CIDRs too: the primary address plus what the CIDRs select.
    assert nodeport_ips(node=node, interface_ips=ifaces, cidrs=("primary", "172.17.0.0/16")) == (
        "192.168.1.5", "172.17.0.1")


def test_build_for_node_with_cidrs_reads_the_interfaces_too():
    b = _builder([_web(), {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
                           "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.1"}]}}])
    calls = []

    def interfaces():
        calls.append(1)
        return ("10.0.0.7", "192.168.1.1")

    assert b.build_for_node(cidrs=(), interfaces=interfaces).nodeport_ips == ("192.168.1.1",)
    assert not calls  # the Node's addresses suffice: the namespace is not read
    got = b.build_for_node(cidrs=("10.0.0.0/8", "192.168.0.0/16"), interfaces=interfaces)
    assert set(got.nodeport_ips) == {"192.168.1.1", "10.0.0.7"}


def test_created_and_deleted_services_leave_nothing_behind():
    """Hardening issue, defect 10: the slice index kept an empty entry per Service ever seen."""
    from tests.unit.helpers import service_objects

    b = StateBuilder(node_name="node-1")
    for i in range(200):
        svc, sl = service_objects(i)
        b.upsert(svc)
        b.upsert(sl)
        b.build()
        b.delete("EndpointSlice", (sl["metadata"]["namespace"], sl["metadata"]["name"]))
        b.delete("Service", (svc["metadata"]["namespace"], svc["metadata"]["name"]))
        b.build()
    assert not b.slices_of and not b.slices and not b.services and not b._merged and not b._claims


def test_every_path_agrees_on_which_node_is_ours():
    """Relist, watch event, delete and file replace use the same test (StateBuilder.is_ours)."""
    mine, other = sc.node("a", ["192.168.1.1"]), sc.node("b", ["192.168.1.2"])
    for feed in (lambda b, objs: b.replace("Node", objs), lambda b, objs: b.replace_all(objs),
                 lambda b, objs: [b.upsert(o) for o in objs]):
        b = StateBuilder(node_name="a")
        feed(b, [other])
        assert b.node is None
        feed(b, [other, mine])
        assert b.node is not None and b.node.addresses == ("192.168.1.1",)
        b.delete_object(other)
        assert b.node is not None
        b.delete_object(mine)
        assert b.node is None
    broken = {"kind": "Node", "metadata": ["not", "a", "mapping"]}
    assert not StateBuilder(node_name="a").is_ours(broken) and StateBuilder().is_ours(broken)


# -- what changed between builds -------------------------------------------------------------


def _changed(state):
    return sorted(n.name for n in state.changes.names)


def test_each_build_says_which_service_ports_changed_and_follows_the_previous_one():
    b = _builder([*_svc_at("a"), *_svc_at("b", ip="10.96.0.11", ep="10.244.2.2")])
    first = b.build()
    assert _changed(first) == ["a", "b"]
    b.upsert(sc.endpoint_slice("a", ["10.244.1.7"], [sc.port(8080, name="http")]))
    second = b.build()
    assert _changed(second) == ["a"] and second.changes.since == first.changes.generation
    third = b.build()
    assert _changed(third) == [] and third.changes.since == second.changes.generation
    b.delete("Service", ("test", "b"))
    assert _changed(b.build()) == ["b"]
    # The state is a copy: a later build does not change what an earlier one holds.
    assert "b" in {n.name for n in second.services}


def test_a_resolved_conflict_counts_as_a_change_of_the_service_that_gets_in():
    b = _builder([*_svc_at("a"), *_svc_at("b", ep="10.244.9.9")])
    assert _names(b.build()) == ["a"]
    b.delete("Service", ("test", "a"))
    state = b.build()
    assert _names(state) == ["b"] and _changed(state) == ["a", "b"]


def test_generations_are_unique_across_builders():
    one, two = _builder(_svc_at("a")).build(), _builder(_svc_at("a")).build()
    assert one.changes.generation != two.changes.generation
