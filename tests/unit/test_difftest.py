"""The differential harness's pure parts: the generator, the probe outcome, the shrinker's steps."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from lab.diff import gen
from lab.diff.probe import Outcome, outcome
from lab.diff.run import _simpler, parse_seeds


def _out(answers: list[tuple[str, str, str]], errors: list[str] = (), source: str = "-") -> Outcome:  # type: ignore[assignment]
    results = [list(a) for a in answers] + [[source, "!" + e, ""] for e in errors]
    return outcome({"results": results})


def test_a_seed_always_gives_the_same_cluster_and_seeds_differ():
    assert gen.generate(42) == gen.generate(42)
    assert len({gen.generate(s) for s in range(30)}) == 30


def test_generated_addresses_are_unique_and_in_their_ranges():
    for seed in range(200):
        c = gen.generate(seed)
        ips = [ip for s in c.services for ip in (*s.cluster_ips, *s.external_ips, *(x for x, _ in s.lb_ips))]
        assert len(ips) == len(set(ips)), seed
        node_ports = [p.node_port for s in c.services for p in s.ports if p.node_port]
        assert len(node_ports) == len(set(node_ports)), seed
        for s in c.services:
            for ip in s.cluster_ips:
                net = "10.96.0.0/16" if ":" not in ip else "fd00:96::/108"
                assert ipaddress.ip_address(ip) in ipaddress.ip_network(net)
            assert [6 if ":" in ip else 4 for ip in s.cluster_ips] == list(s.families) or s.headless
            if not s.has_node_ports:
                assert all(p.node_port == 0 for p in s.ports)
            assert len({(p.port, p.protocol) for p in s.ports}) == len(s.ports)
            if len(s.ports) > 1:
                assert all(p.name for p in s.ports) and len({p.name for p in s.ports}) == len(s.ports)


def test_every_node_port_of_a_cluster_is_named_and_distinct_health_checks_included():
    """The API server draws an unnamed healthCheckNodePort at random, which can take a NodePort a
    later Service names (a CI run failed on it): every port is chosen here, none twice."""
    with_health = 0
    for seed in range(300):
        objs = [o for o in gen.objects(gen.generate(seed)) if o["kind"] == "Service"]
        ports = [p["nodePort"] for o in objs for p in o["spec"].get("ports", []) if "nodePort" in p]
        for o in objs:
            spec = o["spec"]
            local_lb = spec["type"] == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"
            assert ("healthCheckNodePort" in spec) == local_lb, (seed, o["metadata"]["name"])
            if local_lb:
                ports.append(spec["healthCheckNodePort"])
                with_health += 1
        assert len(ports) == len(set(ports)), seed
        assert all(30000 <= p <= 32766 for p in ports), seed
    assert with_health > 20


def test_objects_carry_the_label_the_harness_deletes_by():
    objs = gen.objects(gen.generate(3))
    assert objs and all(o["metadata"]["labels"][gen.LABEL] == "1" for o in objs)
    slices = [o for o in objs if o["kind"] == "EndpointSlice"]
    assert all(o["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] != "endpointslice-controller.k8s.io"
               for o in slices)


def test_every_service_address_is_probed_from_every_vantage_point():
    c = gen.Cluster(seed=1, services=(gen.Svc(name="a", type="NodePort", families=(4, 6),
                                              cluster_ips=("10.96.1.1", "fd00:96::101"),
                                              ports=(gen.Port("", "UDP", 53, node_port=30053),)),))
    keys = {t.key for t in gen.targets(c)}
    for v in ("pod", "node", "ext"):
        assert f"{v} -> udp 10.96.1.1:53" in keys
        assert f"{v} -> udp [fd00:96::101]:53" in keys
        assert f"{v} -> udp 192.168.50.2:30053" in keys
        assert f"{v} -> udp [fd00:50::2]:30053" in keys
        assert f"{v} -> tcp 10.96.1.1:7" in keys  # a port the service does not have
        assert f"{v} -> tcp 10.96.255.254:80" in keys  # an unallocated ClusterIP
    ext = [t for t in gen.targets(c) if t.vantage == "ext" and ":" not in t.ip]
    assert all(t.sources == gen.EXT_SOURCES for t in ext)


def test_outcomes_compare_backends_client_addresses_and_errors():
    a = _out([("-", "pod0", "10.244.1.100"), ("-", "pod1", "10.244.1.100")])
    assert a.same(_out([("-", "pod1", "10.244.1.100"), ("-", "pod0", "10.244.1.100")]))
    assert not a.same(_out([("-", "pod0", "10.244.1.100")] * 2))  # one backend fewer
    assert not a.same(_out([("-", "pod0", "10.244.1.1"), ("-", "pod1", "10.244.1.1")]))  # masqueraded
    assert not a.same(_out([("-", "pod0", "10.244.1.100"), ("-", "pod1", "10.244.1.100")], ["refused"]))
    assert _out([], ["timeout"] * 2).same(_out([], ["timeout"] * 2))
    assert not _out([], ["timeout"] * 2).same(_out([], ["refused"] * 2))


def test_client_addresses_are_compared_per_source_where_both_sides_answered():
    # Source b met only the refusing endpoint on one side, by chance: not a difference.
    one = _out([("a", "pod1", "a"), ("b", "pod1", "b"), ("b", "!refused", "")])
    other = _out([("a", "pod1", "a"), ("b", "!refused", ""), ("a", "!refused", "")])
    assert one.same(other)
    # The same source seen as itself on one side and masqueraded on the other: a difference.
    assert not one.same(_out([("a", "pod1", "10.244.1.1"), ("b", "!refused", "")]))


def test_affinity_compares_stickiness_not_which_endpoint_was_picked():
    one = _out([("-", "pod2", "10.244.1.100")] * 8)
    other = _out([("-", "pod4", "10.244.1.100")] * 8)
    assert one.sticky and other.sticky and one.same(other, affinity=True)
    assert not one.same(other)  # without affinity, two single backends that differ differ
    # An endpoint that refuses is picked and sticks like any other.
    refusing = _out([], ["refused"] * 8)
    assert refusing.sticky and refusing.same(one, affinity=True)
    spread = _out([("-", "pod2", "10.244.1.100"), ("-", "pod4", "10.244.1.100")] * 4)
    assert not spread.sticky and not one.same(spread, affinity=True)
    # Sticky on both sides, but the backend saw a different client address: differs.
    assert not one.same(_out([("-", "pod4", "10.244.1.1")] * 8), affinity=True)
    mixed = _out([("-", "pod2", "10.244.1.100")] * 8 + [("-", "pod3", "10.244.1.100")])
    assert mixed.pods == {"pod2", "pod3"} and not mixed.sticky and mixed.tries == 9
    # Several sources, each sticky to its own endpoint.
    two = _out([("a", "pod1", "a"), ("b", "pod2", "b")] * 3)
    assert two.sticky and two.same(_out([("a", "pod3", "a"), ("b", "pod3", "b")] * 3), affinity=True)


def test_every_shrink_step_is_smaller_or_simpler_and_still_valid():
    for seed in range(40):
        c = gen.generate(seed)
        for smaller in _simpler(c):
            assert smaller != c
            assert len(smaller.services) <= len(c.services)
            gen.objects(smaller)  # renders
            for s in smaller.services:
                names = {p.name for p in s.ports}
                assert all(sp.name in names for sl in s.slices for sp in sl.ports)
                assert all(sl.family in s.families for sl in s.slices)


def test_no_generated_cluster_holds_a_duplicate_upstream_resolves_at_random():
    dups = 0
    for seed in range(300):
        c = gen.generate(seed)
        assert not gen.ambiguous(c), seed
        for s in c.services:
            pods = [(sl.family, ep.pod) for sl in s.slices for ep in sl.endpoints]
            dups += len(pods) - len(set(pods))
    assert dups > 20  # duplicates are generated, only the defined kinds


def test_source_ranges_of_the_other_family_only_are_a_documented_deviation():
    from lab.diff.deviations import explain
    from lab.diff.run import Mismatch

    svc = gen.Svc(name="lb", type="LoadBalancer", cluster_ips=("10.96.1.1",),
                  ports=(gen.Port("", "TCP", 80, node_port=30080),), lb_ips=(("203.0.113.100", ""),),
                  source_ranges=("fd00:50::/64",))
    cluster = gen.Cluster(seed=1, services=(svc,))
    (target,) = [t for t in gen.targets(cluster) if t.vantage == "pod" and t.ip == "203.0.113.100"]
    dropped, refused = _out([], ["timeout"] * 2), _out([], ["refused"] * 8)
    assert explain(Mismatch(seed=1, target=target, upstream=refused, pyproxy=dropped), cluster)
    # The other way round, or with a range of the family, is not that deviation.
    assert not explain(Mismatch(seed=1, target=target, upstream=dropped, pyproxy=refused), cluster)
    both = gen.Cluster(seed=1, services=(replace(svc, source_ranges=("fd00:50::/64", "10.0.0.0/8")),))
    assert not explain(Mismatch(seed=1, target=target, upstream=refused, pyproxy=dropped), both)


def test_seed_lists():
    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
