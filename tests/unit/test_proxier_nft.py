"""NftProxier against FakeNft: full syncs, diffs, deletions, deferred deletion (garbage) and
failure recovery."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest

from pyproxy.config import ProxyConfig
from pyproxy.model.objects import DesiredState
from pyproxy.model.state import StateBuilder
from pyproxy.nft.executor import FakeNft, FakeTable
from pyproxy.proxier import nftables as nft_proxier
from pyproxy.proxier.base import SyncFailed
from pyproxy.proxier.nftables import NftProxier
from pyproxy.render import nftables as nft_render
from pyproxy.render.nftables import SETS
from tests import scenario as sc
from tests.nftlayout import canonical_fake
from tests.unit.helpers import build, fake_dnat_targets, many_services, service_objects

CFG = ProxyConfig(cluster_cidrs=("10.244.0.0/16",))
NODE = sc.node("node-1", ["192.168.1.1"])
TCP = [sc.port(8080, name="http")]


# A gc_period no test outlives: garbage goes only with a sync that deletes something anyway.
LATER = 3600.0



def _same(table, want) -> bool:
    """Two fake tables program the same: equal once each rule's endpoint lookup is shown as
    its pool's own slots (where pools sit in the shared maps depends on history), with no map
    element left that no rule reaches."""
    got, orphans = canonical_fake(table)
    wanted, orphans_wanted = canonical_fake(want)
    assert orphans == [] and orphans_wanted == [], (orphans, orphans_wanted)
    assert got == wanted
    return True

def _proxier(config: ProxyConfig = CFG, *, gc_period: float = 0.0) -> tuple[NftProxier, FakeNft]:
    """gc_period=0 (the default here): what is gone is deleted in the same sync, so the fake's
    table can be compared with a fresh full sync."""
    fake = FakeNft()
    return NftProxier(config=config, executor=fake, gc_period=gc_period), fake


_CHAIN_REF = re.compile(r"(?:goto|jump) ([A-Za-z0-9_./-]+)")
_SET_REF = re.compile(r"@([A-Za-z0-9_./-]+)")


def _referenced(table: FakeTable) -> set[str]:
    """Chains and sets named by some rule or map element."""
    texts = [rule for rules in table.chains.values() for rule in rules]
    texts += [value for elems in table.elements.values() for value in elems.values()]
    return {name for text in texts for name in (*_CHAIN_REF.findall(text), *_SET_REF.findall(text))}


def _minus_garbage(proxier: NftProxier, table: FakeTable) -> FakeTable:
    """``table`` without the proxier's garbage, after checking the garbage is harmless: every
    garbage chain is empty, and nothing refers to a garbage chain or set."""
    assert not set(proxier.garbage) & _referenced(table)
    for name in proxier.garbage:
        if name in table.chains:
            assert table.chains[name] == [], name
        else:
            assert name in table.sets, name
    def keep(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in proxier.garbage}

    return dataclasses.replace(table, chains=keep(table.chains), chain_specs=keep(table.chain_specs),
                               sets=keep(table.sets), elements=keep(table.elements))


def _fresh_table(state: DesiredState, config: ProxyConfig = CFG):
    proxier, fake = _proxier(config)
    result = proxier.sync(state)
    assert result.full
    return fake.dump()


def _web(ips=("10.244.1.1", "10.244.1.2"), **kw):
    return [sc.service("web", "10.96.0.10", [sc.port(80, name="http", node_port=kw.get("node_port"))],
                       affinity_timeout=kw.get("affinity"),
                       svc_type="NodePort" if kw.get("node_port") else "ClusterIP"),
            sc.endpoint_slice("web", list(ips), TCP, conditions=kw.get("conditions"))]


def _other():
    return [sc.service("other", "10.96.0.11", [sc.port(53, name="dns", protocol="UDP")]),
            sc.endpoint_slice("other", ["10.244.2.1"], [sc.port(5353, name="dns", protocol="UDP")])]


def test_first_sync_is_full_and_programs_everything():
    proxier, fake = _proxier()
    state = build([NODE, *_web(), *_other()], nodeport_ips=("192.168.1.1",))
    result = proxier.sync(state)
    assert result.full and result.changed_services == 2 and result.operations > 0
    assert proxier.needs_full is False
    table = fake.dump()
    assert table is not None
    assert "10.96.0.10 . tcp . 80" in table.elements["service-ips"]
    assert "10.96.0.11 . udp . 53" in table.elements["service-ips"]
    assert table.elements["nodeport-ips"] == {"192.168.1.1": ""}
    assert table.chain_specs["nat-prerouting"].startswith("type nat hook prerouting")
    assert fake_dnat_targets(table) == {"10.244.1.1:8080", "10.244.1.2:8080", "10.244.2.1:5353"}
    # The first op replaces the table as a whole.
    first = fake.transactions[0].render().splitlines()[:3]
    assert first == ["add table ip pyproxy", "delete table ip pyproxy",
                     'add table ip pyproxy { comment "rules for pyproxy" ; }']


def test_identical_resync_sends_nothing():
    proxier, fake = _proxier()
    objs = [NODE, *_web(), *_other()]
    proxier.sync(build(objs))
    result = proxier.sync(build(copy.deepcopy(objs)))  # equal but not identical states
    assert not result.full and result.operations == 0 and result.changed_services == 0
    assert len(fake.transactions) == 3  # the first sync's three (a cold start), then nothing


def test_identical_resync_from_the_same_builder_sends_nothing():
    proxier, fake = _proxier()
    builder = StateBuilder(node_name="node-1")
    builder.replace_all([*_web(), *_other()])
    proxier.sync(builder.build())
    builder.replace_all([*_web(), *_other()])
    result = proxier.sync(builder.build())
    assert (result.full, result.operations, result.changed_services) == (False, 0, 0)


def _one_endpoint_change_among_1000_services(gc_period: float):
    proxier, fake = _proxier(gc_period=gc_period)
    builder = StateBuilder(node_name="node-1")
    objs = many_services(1000)
    builder.replace_all(objs)
    first = proxier.sync(builder.build())
    assert first.full and first.changed_services == 1000
    # Replace one endpoint of svc-500.
    objs2 = list(objs)
    i = next(k for k, o in enumerate(objs2) if o["metadata"]["name"] == "svc-500-a")
    changed = copy.deepcopy(objs2[i])
    changed["endpoints"][1]["addresses"] = ["10.200.0.1"]
    objs2[i] = changed
    builder.replace_all(objs2)
    state = builder.build()
    result = proxier.sync(state)
    assert not result.full
    assert result.changed_services == 1
    assert 0 < result.operations <= 20
    return proxier, fake, state


def test_one_endpoint_change_among_1000_services_changes_elements_only():
    """Endpoints are data: replacing one endpoint swaps its slot map element and its hairpin
    element, and touches no chain, rule or set declaration (which is what lets such a change
    go straight to the kernel over netlink)."""
    proxier, fake, state = _one_endpoint_change_among_1000_services(0)
    assert _same(fake.dump(), _fresh_table(state))
    assert proxier.garbage == []
    tx = fake.transactions[-1]
    assert {op.kind for op in tx.ops} == {"element"}
    lines = tx.render().splitlines()
    deletes = sorted(line for line in lines if line.startswith("delete "))
    assert len(deletes) == 2 and deletes[0].startswith("delete element ip pyproxy endpoints-tcp-")
    assert deletes[1].startswith("delete element ip pyproxy hairpin")
    assert "10.101.2.1 . 10.101.2.1" in deletes[1]
    assert any("10.200.0.1 . 8080" in line for line in lines if line.startswith("add map ip pyproxy endpoints-tcp-"))
    assert any("10.200.0.1 . 10.200.0.1" in line for line in lines if line.startswith("add set ip pyproxy hairpin"))



def _sync_both(before: list, after: list, config: ProxyConfig = CFG, nodeport_before=(), nodeport_after=()):
    """Sync ``before`` then ``after`` incrementally; return (result, fake, fresh table of after)."""
    proxier, fake = _proxier(config)
    proxier.sync(build(before, nodeport_ips=nodeport_before))
    state = build(after, nodeport_ips=nodeport_after)
    result = proxier.sync(state)
    return result, fake, _fresh_table(state, config)


# Each transition must leave exactly what a fresh full sync of the new state leaves.
TRANSITIONS = {
    "add-endpoint": (_web(), _web(("10.244.1.1", "10.244.1.2", "10.244.1.3"))),
    "remove-endpoint": (_web(), _web(("10.244.1.1",))),
    "replace-endpoints": (_web(), _web(("10.244.1.7", "10.244.1.8"))),
    "endpoints-to-none": (_web(), _web(())),
    "none-to-endpoints": (_web(()), _web()),
    "not-ready": (_web(), _web(conditions={"ready": False})),
    "terminating-fallback": (_web(conditions={"ready": False}),
                             _web(conditions={"ready": False, "serving": True, "terminating": True})),
    "add-nodeport": (_web(), _web(node_port=30080)),
    "remove-nodeport": (_web(node_port=30080), _web()),
    "nodeport-no-endpoints": (_web(node_port=30080), _web((), node_port=30080)),
    "change-nodeport": (_web(node_port=30080), _web(node_port=30090)),
    "add-affinity": (_web(), _web(affinity=60)),
    "remove-affinity": (_web(affinity=60), _web()),
    "affinity-endpoint-change": (_web(affinity=60), _web(("10.244.1.1", "10.244.1.9"), affinity=60)),
    "delete-service": (_web() + _other(), _other()),
    "delete-all": (_web() + _other(), []),
    "add-service": (_other(), _web() + _other()),
    "from-empty": ([], _web(node_port=30080, affinity=10)),
    "change-cluster-ip": (_web(), [sc.service("web", "10.96.0.99", [sc.port(80, name="http")]),
                                    sc.endpoint_slice("web", ["10.244.1.1"], TCP)]),
    "change-port": (_web(), [sc.service("web", "10.96.0.10", [sc.port(8000, name="http")]),
                              sc.endpoint_slice("web", ["10.244.1.1"], TCP)]),
    "rename-port": (_web(), [sc.service("web", "10.96.0.10", [sc.port(80, name="web")]),
                              sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="web")])]),
    "change-target-port": (_web(), [_web()[0], sc.endpoint_slice("web", ["10.244.1.1", "10.244.1.2"],
                                                                    [sc.port(9090, name="http")])]),
    "service-becomes-invalid": (_web() + _other(),
                                [sc.service("web", "10.96.0.300", [sc.port(80, name="http")]), *_other()]),
}


@pytest.mark.parametrize(("before", "after"), TRANSITIONS.values(), ids=TRANSITIONS.keys())
def test_incremental_sync_matches_a_fresh_full_sync(before, after):
    result, fake, fresh = _sync_both(before, after)
    assert not result.full
    assert result.operations > 0
    assert _same(fake.dump(), fresh)


@pytest.mark.parametrize(("before", "after"), TRANSITIONS.values(), ids=TRANSITIONS.keys())
def test_incremental_sync_with_deferred_deletion(before, after):
    # Whatever is left for later is flushed and unreferenced; the rest is what a full sync makes.
    proxier, fake = _proxier(gc_period=LATER)
    proxier.sync(build(before))
    state = build(after)
    result = proxier.sync(state)
    assert not result.full and result.operations > 0
    tx = fake.transactions[-1]
    if tx.has_deletes:  # paying for the table fetch anyway: the garbage went too
        assert proxier.garbage == []
    assert _same(_minus_garbage(proxier, fake.dump()), _fresh_table(state))


MULTI_PORT = [
    sc.service("multi", "10.96.0.20", [sc.port(80, name="http"), sc.port(443, name="https")]),
    sc.endpoint_slice("multi", ["10.244.3.1"], [sc.port(8080, name="http"), sc.port(8443, name="https")]),
]


def test_deleting_a_multi_port_service():
    # Both ports used to own the ('cluster-ips', ClusterIP) element: deleted twice, nft refused.
    result, fake, fresh = _sync_both(MULTI_PORT + _other(), _other())
    assert not result.full and result.changed_services == 2
    assert _same(fake.dump(), fresh)
    assert fake.dump().elements["cluster-ips"] == {"10.96.0.11": ""}
    deletes = [line for line in fake.transactions[-1].render().splitlines()
               if line.startswith("delete element ip pyproxy cluster-ips")]
    assert deletes == ["delete element ip pyproxy cluster-ips { 10.96.0.20 }"]


SHARED_IP = {
    "remove-one-port": (MULTI_PORT, [sc.service("multi", "10.96.0.20", [sc.port(80, name="http")]),
                                     MULTI_PORT[1]]),
    # Two Services may share a ClusterIP on different ports; deleting one must not drop it.
    "delete-service-sharing-the-ip": (
        [*MULTI_PORT[:1], sc.service("twin", "10.96.0.20", [sc.port(8000, name="http")])],
        MULTI_PORT[:1]),
}


@pytest.mark.parametrize(("before", "after"), SHARED_IP.values(), ids=SHARED_IP.keys())
def test_removing_one_user_of_a_shared_cluster_ip(before, after):
    result, fake, fresh = _sync_both(before, after)
    assert not result.full and result.changed_services == 1
    assert _same(fake.dump(), fresh)
    assert fake.dump().elements["cluster-ips"] == {"10.96.0.20": ""}
    assert "cluster-ips" not in fake.transactions[-1].render()  # the element was not touched


def test_duplicate_nodeport_inside_one_service_does_not_break_the_ruleset():
    dup = sc.service("dup", "10.96.0.50", [sc.port(80, name="a", node_port=30080),
                                           sc.port(81, name="b", node_port=30080)], svc_type="NodePort")
    dup_slice = sc.endpoint_slice("dup", ["10.244.5.1"], [sc.port(80, name="a"), sc.port(81, name="b")])
    proxier, fake = _proxier()
    state = build([*_web(), dup, dup_slice])
    assert [(p.name, p.reason) for p in state.problems] == [
        ("dup", "spec.ports[1]: duplicate nodePort 30080/TCP")]
    proxier.sync(state)
    table = fake.dump()
    assert set(table.elements["service-ips"]) == {"10.96.0.10 . tcp . 80"}
    assert table.elements["service-nodeports"] == {}
    assert "10.96.0.50" not in table.elements["cluster-ips"]


def test_multi_port_service_full_sync_has_one_cluster_ip_element():
    table = _fresh_table(build(MULTI_PORT))
    assert table.elements["cluster-ips"] == {"10.96.0.20": ""}
    assert set(table.elements["service-ips"]) == {"10.96.0.20 . tcp . 80", "10.96.0.20 . tcp . 443"}


def test_nodeport_ips_change_is_a_partial_sync():
    result, fake, fresh = _sync_both(_web(node_port=30080), _web(node_port=30080),
                                     nodeport_before=("192.168.1.1",), nodeport_after=("192.168.1.2",))
    assert not result.full and result.changed_services == 0 and result.operations == 2
    assert fake.dump().elements["nodeport-ips"] == {"192.168.1.2": ""}
    assert _same(fake.dump(), fresh)


def test_deleting_a_service_leaves_no_trace():
    proxier, fake = _proxier()
    proxier.sync(build([*_web(node_port=30080, affinity=30), *_other()]))
    assert any("web" in c for c in fake.dump().chains)
    state = build(_other())
    result = proxier.sync(state)
    assert result.changed_services == 1 and not result.full
    table = fake.dump()
    assert not any("/web/" in name for name in [*table.chains, *table.sets])
    assert not any("10.96.0.10" in key for elems in table.elements.values() for key in elems)
    assert table == _fresh_table(state)


def test_affinity_sets_come_and_go():
    proxier, fake = _proxier()
    proxier.sync(build(_web()))
    assert not any(s.startswith("affinity-") for s in fake.dump().sets)
    proxier.sync(build(_web(affinity=60)))
    aff = {s: spec for s, spec in fake.dump().sets.items() if s.startswith("affinity-")}
    assert len(aff) == 2 and all("timeout 60s" in spec for spec in aff.values())
    proxier.sync(build(_web()))
    assert not any(s.startswith("affinity-") for s in fake.dump().sets)


def test_adding_and_removing_an_affinity_service():
    proxier, fake = _proxier()
    proxier.sync(build(_other()))
    assert fake.dump().sets.keys() - set(SETS) == {"endpoints-udp-0", "first-udp-0"}  # other's pool of one
    state = build([*_other(), *_web(("10.244.1.1", "10.244.1.2", "10.244.1.3"), affinity=30)])
    result = proxier.sync(state)
    assert not result.full and result.changed_services == 1
    aff = [s for s in fake.dump().sets if s.startswith("affinity-")]
    assert len(aff) == 3 and all("/web/" in s for s in aff)
    # Each set is used by the service chain (lookup) and its endpoint chain (update).
    rules = [rule for rules in fake.dump().chains.values() for rule in rules]
    for s in aff:
        assert sum(f"@{s}" in rule for rule in rules) == 2
    assert _same(fake.dump(), _fresh_table(state))
    result = proxier.sync(build(_other()))
    assert not result.full
    assert fake.dump().sets.keys() - set(SETS) == {"endpoints-udp-0", "first-udp-0"}


def test_affinity_timeout_change_forces_a_full_sync():
    proxier, fake = _proxier()
    proxier.sync(build(_web(affinity=60)))
    result = proxier.sync(build(_web(affinity=120)))
    assert result.full  # a set's type cannot change in place
    assert all("timeout 120s" in spec for s, spec in fake.dump().sets.items() if s.startswith("affinity-"))
    assert _same(fake.dump(), _fresh_table(build(_web(affinity=120))))


def test_failed_sync_forces_a_full_resync():
    proxier, fake = _proxier()
    proxier.sync(build(_web()))
    fake.fail_next = "boom"
    state = build(_web(("10.244.1.1", "10.244.1.5")))
    before = fake.dump()
    with pytest.raises(SyncFailed, match="boom"):
        proxier.sync(state)
    assert proxier.needs_full is True
    assert fake.dump() == before  # the old ruleset stays
    result = proxier.sync(state)
    assert result.full and result.changed_services == 1
    assert proxier.needs_full is False
    assert _same(fake.dump(), _fresh_table(state))
    assert proxier.sync(state).operations == 0


def test_failed_first_sync_is_retried_as_full():
    proxier, fake = _proxier()
    fake.fail_next = "no nft"
    state = build(_web())
    with pytest.raises(SyncFailed):
        proxier.sync(state)
    assert fake.dump() is None
    assert proxier.sync(state).full
    assert _same(fake.dump(), _fresh_table(state))


def test_partial_sync_ops_are_ordered_so_references_resolve():
    # FakeNft checks references op by op, so a successful run proves the phase order.
    proxier, fake = _proxier()
    proxier.sync(build(_web(affinity=5, node_port=30080)))
    proxier.sync(build(_web(("10.244.1.3",), node_port=30081)))
    proxier.sync(build(_web((), node_port=30081)))
    proxier.sync(build(_web(("10.244.1.4", "10.244.1.5"), affinity=5)))
    state = build(_web(("10.244.1.4", "10.244.1.5"), affinity=5))
    assert _same(fake.dump(), _fresh_table(state))
    assert not any(t.error for t in fake.transactions)


def test_render_text_is_the_full_transaction_and_changes_nothing():
    proxier, fake = _proxier()
    state = build(_web(node_port=30080))
    text = proxier.render_text(state)
    assert fake.transactions == [] and proxier.needs_full
    assert text.startswith("add table ip pyproxy\ndelete table ip pyproxy\n")
    assert "10.96.0.10 . tcp . 80 : goto service-" in text
    proxier.sync(state)
    # A cold start applies it in parts (structure, endpoint data, dispatch); over a table, at once.
    structure, data, dispatch = fake.transactions
    assert "element" not in {op.kind for op in structure.ops}
    assert {op.kind for op in data.ops} == {op.kind for op in dispatch.ops} == {"element"}
    proxier.needs_full = True
    proxier.sync(state)
    assert fake.transactions[-1].render() == text


def test_cleanup_deletes_the_table_and_forces_full():
    proxier, fake = _proxier()
    proxier.sync(build(_web()))
    assert proxier.cleanup() is True
    assert fake.dump() is None and proxier.needs_full
    assert proxier.cleanup() is False
    assert proxier.sync(build(_web())).full


@pytest.mark.parametrize("n", [1, 3])
def test_full_sync_counts_every_service(n):
    proxier, _ = _proxier()
    objs = []
    for i in range(n):
        objs.extend(service_objects(i))
    assert proxier.sync(build(objs)).changed_services == n


# -- deferred deletion (garbage) -------------------------------------------------------------
# Only ClientIP affinity keeps chains per endpoint (every other service's endpoints are map
# elements), so these tests use sticky services.


def _sticky(ips=("10.244.1.1", "10.244.1.2"), **kw):
    return _web(ips, **{"affinity": 30, **kw})


def _garbage_chains(proxier: NftProxier) -> list[str]:
    """The garbage that is endpoint chains (each comes with its affinity set)."""
    return [g for g in proxier.garbage if g.startswith("endpoint-")]


def _other_sticky():
    svc, sl = _other()
    svc["spec"]["sessionAffinity"] = "ClientIP"
    svc["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 30}}
    return [svc, sl]


def _endpoint_chain(table: FakeTable, ip: str) -> str:
    (name,) = [c for c in table.chains if c.startswith("endpoint-") and f"__{ip}/" in c]
    return name


def test_gc_period_defaults_to_a_minute():
    assert NftProxier(config=CFG, executor=FakeNft()).gc_period == 60


def test_removed_endpoint_chain_is_flushed_and_left_for_later():
    proxier, fake = _proxier(gc_period=LATER)
    proxier.sync(build([*_sticky(), *_other_sticky()]))
    gone = _endpoint_chain(fake.dump(), "10.244.1.2")
    state = build([*_sticky(("10.244.1.1",)), *_other_sticky()])
    result = proxier.sync(state)
    assert not result.full and result.changed_services == 1
    tx = fake.transactions[-1]
    assert not tx.has_deletes and "delete" not in tx.render()
    assert f"flush chain ip pyproxy {gone}" in tx.render().splitlines()
    assert _garbage_chains(proxier) == [gone]
    table = fake.dump()
    assert table.chains[gone] == []  # still there, empty
    assert gone not in _referenced(table)  # and nothing leads to it
    assert _minus_garbage(proxier, table) == _fresh_table(state)


def test_a_later_sync_that_deletes_anything_deletes_the_garbage_too():
    proxier, fake = _proxier(gc_period=LATER)
    proxier.sync(build([*_sticky(), *_other_sticky()]))
    gone = [_endpoint_chain(fake.dump(), "10.244.1.2")]
    proxier.sync(build([*_sticky(("10.244.1.1",)), *_other_sticky()]))
    # A sync that deletes nothing (an endpoint added elsewhere) leaves the garbage alone...
    proxier.sync(build([*_sticky(("10.244.1.1",)), *_other_sticky(),
                        sc.service("third", "10.96.0.12", [sc.port(80, name="http")]),
                        sc.endpoint_slice("third", ["10.244.4.1"], TCP)]))
    assert not fake.transactions[-1].has_deletes
    assert _garbage_chains(proxier) == gone
    # ...and one that shrinks the service chain of "web" to nothing adds more garbage.
    proxier.sync(build([*_sticky(()), *_other_sticky(), sc.service("third", "10.96.0.12", [sc.port(80, name="http")]),
                        sc.endpoint_slice("third", ["10.244.4.1"], TCP)]))
    assert fake.transactions[-1].has_deletes  # the service-ips element of web went
    assert proxier.garbage == []
    # A service removed: its elements are deleted, and so are the garbage chains.
    proxier, fake = _proxier(gc_period=LATER)
    proxier.sync(build([*_sticky(), *_other_sticky()]))
    gone = _endpoint_chain(fake.dump(), "10.244.1.2")
    proxier.sync(build([*_sticky(("10.244.1.1",)), *_other_sticky()]))
    assert _garbage_chains(proxier) == [gone]
    other_chains = [c for c in fake.dump().chains if "/other/" in c]
    assert len(other_chains) == 2  # service and endpoint chain
    state = build(_sticky(("10.244.1.1",)))
    proxier.sync(state)
    tx = fake.transactions[-1]
    lines = tx.render().splitlines()
    assert tx.has_deletes
    assert "delete element ip pyproxy service-ips { 10.96.0.11 . udp . 53 }" in lines
    assert f"delete chain ip pyproxy {gone}" in lines
    # The other service's chains went in the same sync: flushed first, deleted after.
    for chain in other_chains:
        assert lines.index(f"flush chain ip pyproxy {chain}") < lines.index(f"delete chain ip pyproxy {chain}")
    assert proxier.garbage == []
    assert gone not in fake.dump().chains
    assert _same(fake.dump(), _fresh_table(state))


def test_gc_period_zero_leaves_nothing_behind():
    proxier, fake = _proxier(gc_period=0)
    proxier.sync(build(_sticky(affinity=30)))
    old = fake.dump()
    gone = _endpoint_chain(old, "10.244.1.2")
    state = build(_sticky(("10.244.1.1",), affinity=30))
    proxier.sync(state)
    tx = fake.transactions[-1]
    lines = tx.render().splitlines()
    assert f"delete chain ip pyproxy {gone}" in lines
    assert f"delete set ip pyproxy affinity-{gone.removeprefix('endpoint-')}" in lines
    assert proxier.garbage == []
    assert gone not in fake.dump().chains
    assert _same(fake.dump(), _fresh_table(state))


def test_endpoint_back_before_collection_is_revived_not_deleted():
    proxier, fake = _proxier(gc_period=LATER)
    proxier.sync(build([*_sticky(affinity=30), *_other_sticky()]))
    table = fake.dump()
    gone = _endpoint_chain(table, "10.244.1.2")
    rules = list(table.chains[gone])
    aff = f"affinity-{gone.removeprefix('endpoint-')}"
    assert aff in table.sets
    proxier.sync(build([*_sticky(("10.244.1.1",), affinity=30), *_other_sticky()]))
    assert proxier.garbage == sorted([gone, aff])
    # The endpoint comes back: its chain is filled again, not deleted, and is garbage no more.
    state = build([*_sticky(affinity=30), *_other_sticky()])
    proxier.sync(state)
    tx = fake.transactions[-1]
    assert "delete" not in tx.render()
    assert proxier.garbage == []
    table = fake.dump()
    assert table.chains[gone] == rules
    assert gone in _referenced(table) and aff in _referenced(table)
    assert table == _fresh_table(state)
    # A later deleting sync does not take it away.
    state = build(_sticky(affinity=30))
    proxier.sync(state)
    assert fake.transactions[-1].has_deletes
    assert fake.dump().chains[gone] == rules
    assert _same(fake.dump(), _fresh_table(state))


def test_garbage_older_than_gc_period_is_deleted_by_the_next_sync(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(nft_proxier.time, "monotonic", lambda: now[0])
    proxier, fake = _proxier(gc_period=60)
    proxier.sync(build(_sticky()))
    gone = _endpoint_chain(fake.dump(), "10.244.1.2")
    state = build(_sticky(("10.244.1.1",)))
    proxier.sync(state)
    assert _garbage_chains(proxier) == [gone]
    runs = len(fake.transactions)
    now[0] += 59
    assert proxier.sync(state).operations == 0  # not old enough: nothing to do
    assert len(fake.transactions) == runs and _garbage_chains(proxier) == [gone]
    now[0] += 1
    result = proxier.sync(state)  # nothing changed, but the garbage is due
    assert not result.full and result.changed_services == 0 and result.operations == 2
    aff = f"affinity-{gone.removeprefix('endpoint-')}"
    assert fake.transactions[-1].render().splitlines() == [
        f"delete chain ip pyproxy {gone}", f"delete set ip pyproxy {aff}"]
    assert proxier.garbage == [] and _same(fake.dump(), _fresh_table(state))
    assert proxier.sync(state).operations == 0


def test_removed_affinity_sets_wait_as_garbage():
    proxier, fake = _proxier(gc_period=LATER)
    proxier.sync(build([*_sticky(affinity=60), *_other()]))
    aff = sorted(s for s in fake.dump().sets if s.startswith("affinity-"))
    assert len(aff) == 2
    state = build([*_web(), *_other()])  # affinity off: web's endpoints become map elements
    proxier.sync(state)
    assert not fake.transactions[-1].has_deletes
    assert proxier.garbage == sorted([*aff, *(a.replace("affinity-", "endpoint-", 1) for a in aff)])
    assert _same(_minus_garbage(proxier, fake.dump()), _fresh_table(state))
    state = build(_web())
    proxier.sync(state)  # deletes the other service's elements, and the sets
    assert proxier.garbage == [] and _same(fake.dump(), _fresh_table(state))


def test_a_full_sync_starts_without_garbage():
    proxier, fake = _proxier(gc_period=LATER)
    proxier.sync(build(_sticky()))
    proxier.sync(build(_sticky(("10.244.1.1",))))
    assert len(proxier.garbage) == 2  # an endpoint chain and its affinity set
    fake.fail_next = "boom"
    state = build(_sticky(("10.244.1.1", "10.244.1.3")))
    with pytest.raises(SyncFailed):
        proxier.sync(state)
    assert len(proxier.garbage) == 2  # the kernel kept the old ruleset, garbage included
    assert proxier.sync(state).full
    assert proxier.garbage == [] and _same(fake.dump(), _fresh_table(state))


def test_affinity_set_back_from_the_garbage_with_another_timeout():
    proxier, fake = _proxier(gc_period=LATER)
    proxier.sync(build(_sticky(affinity=60)))
    proxier.sync(build(_web()))
    assert len(proxier.garbage) == 4  # two affinity sets, two endpoint chains
    state = build(_sticky(affinity=120))
    # "add set" would keep the waiting set's 60s timeout: the proxier rebuilds instead.
    assert proxier.sync(state).full
    specs = [spec for name, spec in fake.dump().sets.items() if name.startswith("affinity-")]
    assert len(specs) == 2
    assert all("timeout 120s" in spec for spec in specs), specs


def test_render_text_refuses_to_print_half_a_ruleset():
    """A name the model should have refused (here built by hand, past the parser) makes the
    transaction record an error; render must say so instead of printing what came before."""
    from tests.unit.helpers import sps

    state = DesiredState(services={s.service.name: s for s in (
        sps(["10.244.0.5"], name="a-fine-one"), sps(["10.244.0.6"], name="bad name", cluster_ip="10.96.0.11"))})
    proxier, _ = _proxier()
    with pytest.raises(SyncFailed, match="invalid (chain|map) name"):
        proxier.render_text(state)


def test_replacing_the_one_endpoint_of_a_service_changes_elements_only():
    """A pool of one is data like any other: replacing its pod swaps the pool's map element and
    the hairpin pair, with nothing to rewrite (an element-only transaction, which goes over
    netlink), so the old pair goes at once."""
    proxier, fake = _proxier(gc_period=LATER)
    proxier.sync(build([*_web(("10.244.1.1",)), *_other()]))
    state = build([*_web(("10.244.1.7",)), *_other()])
    result = proxier.sync(state)
    tx = fake.transactions[-1]
    assert not result.full and {op.kind for op in tx.ops} == {"element"}
    assert proxier.garbage == []
    assert "10.244.1.1 . 10.244.1.1" not in fake.dump().elements["hairpin"]
    assert _same(fake.dump(), _fresh_table(state))
    # Two pools that share a pod: the pair stays while either holds it.
    state = build([*_web(("10.244.1.7", "10.244.1.1")), *_other()])
    proxier.sync(state)
    state = build([*_web(("10.244.1.7",)), *_other()])
    proxier.sync(state)
    assert proxier.garbage == [] and _same(fake.dump(), _fresh_table(state))


def test_a_sync_after_a_build_renders_only_what_the_builder_says_changed(monkeypatch):
    """The cost of a sync follows the change: when the state follows the one applied last, the
    proxier renders the changed ports only; a state from elsewhere gets a walk over all of them,
    with the same result."""
    proxier, fake = _proxier()
    builder = StateBuilder(node_name="node-1")
    objs = many_services(200)
    builder.replace_all(objs)
    proxier.sync(builder.build())
    rendered = []
    real = proxier._render_service
    monkeypatch.setattr(proxier, "_render_service", lambda sps, **kw: rendered.append(sps.service.name.name) or real(sps, **kw))
    i = next(k for k, o in enumerate(objs) if o["metadata"]["name"] == "svc-50-a")
    changed = copy.deepcopy(objs[i])
    changed["endpoints"][0]["addresses"] = ["10.200.0.9"]
    builder.upsert(changed)
    state = builder.build()
    assert not proxier.sync(state).full
    assert rendered == ["svc-50", "svc-50"]  # the old fragment and the new one
    assert _same(fake.dump(), _fresh_table(state))
    rendered.clear()
    objs[i] = changed
    other = build([o for o in objs if not o["metadata"]["name"].startswith("svc-7-")])
    assert other.changes.since != state.changes.generation
    assert not proxier.sync(other).full
    assert rendered == ["svc-7", "svc-7"]  # the walk found the one port that differs (its slice went)
    assert _same(fake.dump(), _fresh_table(other))


def _varied_cluster() -> list[dict]:
    """Service ports of every shape a part may hold: plain, NodePort, affinity, UDP, none."""
    objs = [NODE, *_web(node_port=30080), *_other()]
    for i in range(12):
        objs += service_objects(i, endpoints=i % 4, node_port=30100 + i if i % 3 == 0 else None,
                                affinity=30 if i % 5 == 0 else None)
    return objs


def test_a_cold_start_in_parts_leaves_what_one_transaction_leaves():
    """A cold start sends its chains in parts (each while the next is rendered), then every
    element: the table ends as a full sync over an existing table leaves it, and each part
    declares the sets its rules name (nft resolves ``@set`` from its own script)."""
    state = build(_varied_cluster(), nodeport_ips=("192.168.1.1",))
    proxier, fake = _proxier()
    proxier.cold_start_part = 2
    result = proxier.sync(state)
    assert result.full and result.operations == sum(len(tx.ops) for tx in fake.transactions)
    *pairs, dispatch = fake.transactions
    chains, data = pairs[0::2], pairs[1::2]
    assert len(chains) == len(data) == -(-len(state.services) // 2) >= 7
    assert all("element" not in {op.kind for op in tx.ops} for tx in chains)
    # Each part's endpoint data goes right after its chains, into maps declared by then; what
    # makes a Service reachable (dispatch, ClusterIPs) comes last, at once.
    declared_so_far: set[str] = set()
    for part, elems in zip(chains, data):
        declared = {op.name for op in part.ops if op.kind in ("set", "map")}
        named = {ref for op in part.ops if op.kind == "chain" for rule in op.rules for ref in _SET_REF.findall(rule)}
        assert named <= declared, named - declared
        declared_so_far |= declared
        assert {op.kind for op in elems.ops} <= {"element"}
        assert {op.name for op in elems.ops} <= declared_so_far
        assert all(nft_render.reached_through_dispatch(op.name) for op in elems.ops)
    assert {op.kind for op in dispatch.ops} == {"element"}
    assert not any(nft_render.reached_through_dispatch(op.name) for op in dispatch.ops)
    assert {"service-ips", "cluster-ips", "service-nodeports"} <= {op.name for op in dispatch.ops}
    assert sum(len(tx.ops) for tx in data) > 0
    # The same state again over the table: one transaction, the same table.
    restart, again = _proxier()
    again.tables = copy.deepcopy(fake.tables)
    assert restart.sync(state).full and len(again.transactions) == 1
    assert _same(fake.dump(), again.dump())
    # Both layouts give every pool its own region: the same lookups, the same endpoints.
    assert fake_dnat_targets(fake.dump()) == fake_dnat_targets(again.dump())
    # And the proxier goes on from the parts it applied: a change is a diff.
    objs = _varied_cluster()
    objs[2]["endpoints"][0]["addresses"] = ["10.244.1.9"]
    changed = build(objs, nodeport_ips=("192.168.1.1",))
    assert not proxier.sync(changed).full
    assert _same(fake.dump(), _fresh_table(changed))


def test_a_refused_part_stops_the_cold_start_and_the_next_sync_starts_over():
    class RefusesSecond(FakeNft):
        runs = 0

        def run(self, tx):
            self.runs += 1
            if self.runs == 2:
                self.fail_next = "Error: No such file or directory"
            super().run(tx)

    state = build(_varied_cluster(), nodeport_ips=("192.168.1.1",))
    fake = RefusesSecond()
    proxier = NftProxier(config=CFG, executor=fake, gc_period=0)
    proxier.cold_start_part = 3
    with pytest.raises(SyncFailed, match="No such file"):
        proxier.sync(state)
    assert len(fake.transactions) == 1 and proxier.needs_full  # no element was sent
    assert proxier.sync(state).full  # over the half-built table: one transaction replaces it
    assert _same(fake.dump(), _fresh_table(state))
