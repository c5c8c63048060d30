"""Which UDP conntrack entries are stale (pure part of pyproxy.conntrack)."""

from __future__ import annotations

from pyproxy.conntrack import ConntrackCleaner, stale, udp_serving
from tests import scenario as sc
from tests.unit.helpers import build

UDP = [sc.port(5353, name="dns", protocol="UDP")]


def _state(ips, *, node_port=None, conditions=None, nodeport_ips=("192.168.1.1",)):
    return build([
        sc.service("dns", "10.96.0.53", [sc.port(53, name="dns", protocol="UDP", node_port=node_port)],
                   svc_type="NodePort" if node_port else "ClusterIP"),
        sc.endpoint_slice("dns", list(ips), UDP, conditions=conditions),
        sc.service("web", "10.96.0.80", [sc.port(80, name="http")]),
        sc.endpoint_slice("web", ["10.244.1.9"], [sc.port(8080, name="http")]),
    ], nodeport_ips=nodeport_ips)


def test_serving_endpoints_per_udp_service_address():
    serving = udp_serving(_state(["10.244.1.1", "10.244.1.2"], node_port=30053))
    backends = frozenset({("10.244.1.1", 5353), ("10.244.1.2", 5353)})
    assert serving == {("10.96.0.53", 53): backends, ("192.168.1.1", 30053): backends}
    two = udp_serving(_state(["10.244.1.1"], node_port=30053, nodeport_ips=("192.168.1.1", "10.0.0.5")),
                      localhost_nodeports=True)
    assert {k for k in two if k[1] == 30053} == {("192.168.1.1", 30053), ("10.0.0.5", 30053), ("127.0.0.1", 30053)}


def test_tcp_services_are_not_cleaned():
    assert ("10.96.0.80", 80) not in udp_serving(_state(["10.244.1.1"]))


def test_serving_terminating_endpoints_still_count():
    serving = udp_serving(_state(["10.244.1.1"], conditions={"ready": False, "serving": True, "terminating": True}))
    assert serving[("10.96.0.53", 53)] == {("10.244.1.1", 5353)}
    gone = udp_serving(_state(["10.244.1.1"], conditions={"ready": False, "serving": False, "terminating": True}))
    assert gone[("10.96.0.53", 53)] == frozenset()


def test_stale_entries():
    serving = udp_serving(_state(["10.244.1.2"], node_port=30053))
    entries = [
        ("10.96.0.53", 53, "10.244.1.1", 5353),    # to a backend that is gone: stale
        ("10.96.0.53", 53, "10.244.1.2", 5353),    # to the live backend: kept
        ("10.96.0.53", 53, "10.96.0.53", 53),      # made while there were no endpoints (not DNATed): stale
        ("10.96.0.53", 54, "10.244.1.1", 5353),    # another port of that IP: not a service port, kept
        ("192.168.1.1", 30053, "10.244.1.1", 5353),  # NodePort to a gone backend: stale
        ("192.168.1.1", 30053, "10.244.1.2", 5353),  # NodePort to the live backend: kept
        ("8.8.8.8", 53, "8.8.8.8", 53),            # not service traffic: kept
        ("10.96.0.53", 53, "10.244.1.2", 8053),    # live backend IP, but its old targetPort: stale
        ("192.168.1.1", 30053, "10.244.1.2", 8053),  # the same through the NodePort: stale
        ("203.0.113.7", 30053, "203.0.113.7", 30053),  # another host's port 30053: not ours, kept
        ("127.0.0.1", 30053, "10.244.1.1", 5353),  # localhost NodePorts off: not a NodePort flow, kept
    ]
    assert stale(entries, serving) == [0, 2, 4, 7, 8]


def test_a_nodeport_left_without_endpoints_drops_its_flows_and_only_those():
    """Upstream skips this case (it matches NodePort flows on the port alone, which would take
    every flow to that port number); matched on the node's addresses, it is safe to clean."""
    serving = udp_serving(_state([], node_port=30053))
    entries = [
        ("192.168.1.1", 30053, "10.244.1.1", 5353),  # to the backend that went: stale
        ("203.0.113.7", 30053, "203.0.113.7", 30053),  # an unrelated flow to that port number: kept
        ("10.96.0.53", 53, "10.244.1.1", 5353),    # the ClusterIP's flow to it: stale
    ]
    assert stale(entries, serving) == [0, 2]


def test_cleaner_runs_only_when_udp_backends_change(monkeypatch):
    calls = []
    monkeypatch.setattr("pyproxy.conntrack.clean", lambda serving, family=4, protocol="udp": calls.append(serving) or 0)
    cleaner = ConntrackCleaner()
    cleaner.after_sync(_state(["10.244.1.1"]))
    cleaner.after_sync(_state(["10.244.1.1"]))
    assert len(calls) == 1
    cleaner.after_sync(_state(["10.244.1.2"]))
    assert len(calls) == 2 and calls[-1][("10.96.0.53", 53)] == {("10.244.1.2", 5353)}


def test_sctp_flows_are_cleaned_like_udp(monkeypatch):
    calls = []
    monkeypatch.setattr("pyproxy.conntrack.clean",
                        lambda serving, family=4, protocol="udp": calls.append((protocol, serving)) or 0)
    state = build([sc.service("s", "10.96.0.50", [sc.port(80, name="s", protocol="SCTP")]),
                   sc.endpoint_slice("s", ["10.244.1.3"], [sc.port(8080, name="s", protocol="SCTP")])])
    ConntrackCleaner().after_sync(state)
    assert calls == [("sctp", {("10.96.0.50", 80): frozenset({("10.244.1.3", 8080)})})]


def test_an_entry_gone_between_dump_and_delete_does_not_stop_the_cleanup(monkeypatch):
    """pyroute2 raises NetlinkError (ENOENT), not OSError, when an entry expired after the dump;
    the other stale entries are still deleted."""
    import pyroute2
    from types import SimpleNamespace

    from pyroute2.netlink.exceptions import NetlinkError

    from pyproxy import conntrack

    def entry(dst, port, reply_src):
        return SimpleNamespace(tuple_orig=SimpleNamespace(daddr=dst, dport=port),
                               tuple_reply=SimpleNamespace(saddr=reply_src, sport=5353))

    entries = [entry("10.96.0.53", 53, "10.244.9.9"), entry("10.96.0.53", 53, "10.244.9.8")]
    deleted = []

    class FakeConntrack:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def dump_entries(self, **kw):
            return list(entries)

        def delete(self, e):
            if e is entries[0]:
                raise NetlinkError(2, "No such file or directory")
            deleted.append(e)

    monkeypatch.setattr(pyroute2, "Conntrack", FakeConntrack)
    serving = udp_serving(_state(["10.244.1.1"]))
    assert conntrack.clean(serving) == 1
    assert deleted == [entries[1]]


def test_a_tcp_only_change_skips_the_walk_over_every_service(monkeypatch):
    """After a change of TCP service ports only, the cleaner looks at nothing (the builder says
    which ports changed); a UDP change, or a state from elsewhere, is looked at in full."""
    from pyproxy.model.state import StateBuilder

    calls, walks = [], []
    monkeypatch.setattr("pyproxy.conntrack.clean", lambda serving, family=4, protocol="udp": calls.append(serving) or 0)
    real = udp_serving
    monkeypatch.setattr("pyproxy.conntrack.udp_serving", lambda state, protocol="udp", **kw: walks.append(protocol) or real(state, protocol, **kw))
    objs = [sc.service("dns", "10.96.0.53", [sc.port(53, name="dns", protocol="UDP")]),
            sc.endpoint_slice("dns", ["10.244.1.1"], UDP),
            sc.service("web", "10.96.0.80", [sc.port(80, name="http")]),
            sc.endpoint_slice("web", ["10.244.1.9"], [sc.port(8080, name="http")])]
    builder = StateBuilder(node_name="node-1")
    builder.replace_all(objs)
    cleaner = ConntrackCleaner()
    cleaner.after_sync(builder.build())
    assert len(calls) == 1 and walks
    walks.clear()
    builder.upsert(sc.endpoint_slice("web", ["10.244.1.7"], [sc.port(8080, name="http")]))
    cleaner.after_sync(builder.build())
    assert walks == [] and len(calls) == 1
    builder.upsert(sc.endpoint_slice("dns", ["10.244.1.2"], UDP))
    cleaner.after_sync(builder.build())
    assert walks and len(calls) == 2 and calls[-1][("10.96.0.53", 53)] == {("10.244.1.2", 5353)}
