"""pyproxy.render.nftables: service ports → nft chains, sets and map elements."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from pyproxy.config import ProxyConfig
from pyproxy.model.objects import DesiredState, Endpoint, ServicePortState
from pyproxy.render import nftables as r
from pyproxy.render.naming import NFT_NAME_MAX, ServiceChains, nft_endpoint_base, nft_service_base
from pyproxy.render.slots import Region
from tests.unit.helpers import sps, spn

CFG = ProxyConfig()
THREE = ["10.244.1.1", "10.244.1.2", "10.244.1.3"]


def _service_chain(frag):
    (name,) = [c for c in frag.chains if c.startswith("service-")]
    return name, frag.chains[name]


def _endpoint_chains(frag):
    return {c: rules for c, rules in frag.chains.items() if c.startswith("endpoint-")}


def _map_elements(frag, name):
    return {k: v for (m, k), v in frag.elements.items() if m == name}


def test_three_endpoints_are_data_in_a_slot_map():
    """Without ClientIP affinity a service chain DNATs through a shared map from a random slot
    of the pool's region to an endpoint: endpoints are map elements, not chains."""
    st = sps(THREE)
    frag = r.render_service(CFG, st, place=lambda local, n: Region("tcp", 2, 5))
    name, rules = _service_chain(frag)
    emap = "endpoints-tcp-2"
    offset = 5 * r.SLOTS
    lookup = f"meta l4proto tcp dnat ip to numgen random mod {r.SLOTS} offset {offset} map @{emap}"
    # A lookup that misses (the slot map still committing) takes the pool's first endpoint from
    # a hash map; should that miss too, the packet is dropped, never refused.
    fallback = f"meta l4proto tcp dnat ip to numgen random mod 1 offset {offset} map @first-tcp-2"
    assert rules == (lookup, fallback, r.MISSED)
    assert r.MISSED.startswith("drop ")
    assert {k: v for k, v in frag.elements.items() if k[0] == "first-tcp-2"} == {
        ("first-tcp-2", str(offset)): "10.244.1.1 . 8080"}
    assert frag.sets == {}  # the shared maps are the base fragment's
    third = r.SLOTS // 3
    assert _map_elements(frag, emap) == {
        f"{offset}-{offset + third - 1}": "10.244.1.1 . 8080",
        f"{offset + third}-{offset + 2 * third - 1}": "10.244.1.2 . 8080",
        f"{offset + 2 * third}-{offset + r.SLOTS - 1}": "10.244.1.3 . 8080",
    }
    assert not _endpoint_chains(frag)
    assert name == f"service-{nft_service_base(st.service.name)}"
    # Readable names: the namespace, service, protocol and port name are in the chain name.
    assert name.endswith("-test/web/tcp/http")
    base = r.render_base(CFG, DesiredState(), endpoint_maps={"tcp": 3, "udp": 1})
    assert base.sets[emap] == ('typeof numgen random mod 2 : ip daddr . tcp dport ; flags interval ; '
                               f'comment "random slot to endpoint: {r.SLOTS} slots a pool" ;')
    assert {m for m in base.sets if m.startswith("endpoints-")} == {
        "endpoints-tcp-0", "endpoints-tcp-1", "endpoints-tcp-2", "endpoints-udp-0"}
    # Each with its first-endpoint map: a hash map (no interval flag), live as soon as committed.
    assert {m for m in base.sets if m.startswith("first-")} == {
        "first-tcp-0", "first-tcp-1", "first-tcp-2", "first-udp-0"}
    assert "interval" not in base.sets["first-tcp-2"] and "tcp dport" in base.sets["first-tcp-2"]


@pytest.mark.parametrize("n", range(1, 60))
def test_slot_ranges_tile_the_slots_evenly(n):
    ranges = r.slot_ranges(n)
    assert ranges[0][0] == 0 and ranges[-1][1] == r.SLOTS - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    sizes = {hi - lo + 1 for lo, hi in ranges}
    if r.SLOTS % n == 0:  # every count up to 18, and many more
        assert sizes == {r.SLOTS // n}
    else:
        assert max(sizes) - min(sizes) == 1
    assert n > 18 or r.SLOTS % n == 0


def test_changing_one_endpoint_changes_elements_only():
    before = r.render_service(CFG, sps(THREE))
    after = r.render_service(CFG, sps([THREE[0], THREE[1], "10.244.1.9"]))
    assert before.chains == after.chains and before.sets == after.sets
    assert before.elements != after.elements


def test_service_ips_element_and_cluster_ips():
    st = sps(THREE, cluster_ip="10.96.0.10", port=80)
    frag = r.render_service(CFG, st)
    name, _ = _service_chain(frag)
    assert frag.elements[("service-ips", "10.96.0.10 . tcp . 80")] == f"goto {name}"
    # cluster-ips is a shared set: each port holds its ClusterIP (ports share it), so the base
    # fragment does not depend on the Services.
    assert frag.elements[("cluster-ips", "10.96.0.10")] == ""
    assert "cluster-ips" in r.SHARED_SETS
    assert not any(k[0].startswith("no-endpoint") for k in frag.elements)
    base = r.render_base(CFG, DesiredState(services={st.service.name: st}))
    assert not any(k[0] == "cluster-ips" for k in base.elements)


def test_hairpin_is_data_too():
    """Each endpoint of a data-path service is an ``ep . ep`` element of the shared hairpin
    set, which the base chain masquerading looks up after DNAT."""
    st = sps(THREE, target_port=8080)
    frag = r.render_service(CFG, st)
    assert {k for (m, k) in frag.elements if m == "hairpin"} == {f"{ip} . {ip}" for ip in THREE}
    base = r.render_base(CFG, DesiredState())
    assert base.chains["masquerading"][0] == (
        "ct status dnat ip saddr . ip daddr @hairpin meta mark set meta mark or 0x4000")
    assert "hairpin" in r.SHARED_SETS


def test_affinity_endpoint_chain_has_hairpin_then_dnat():
    st = sps(THREE, target_port=8080, affinity=30)
    frag = r.render_service(CFG, st)
    for ep in st.endpoints:
        rules = frag.chains[f"endpoint-{nft_endpoint_base(st.service.name, ep)}"]
        assert rules[0] == f"ip saddr {ep.ip} jump mark-for-masquerade"
        assert rules[-1] == f"meta l4proto tcp dnat to {ep.ip}:8080"
    assert not any(m == "hairpin" for (m, _) in frag.elements)  # the chains do it


def test_single_endpoint_is_data_too():
    """A pool of one is a region like any other: replacing its endpoint, or growing it, changes
    map elements only (the rule stays)."""
    st = sps(["10.244.1.1"])
    frag = r.render_service(CFG, st)
    _, rules = _service_chain(frag)
    assert rules[-3:] == (f"meta l4proto tcp dnat ip to numgen random mod {r.SLOTS} offset 0 map @endpoints-tcp-0",
                          "meta l4proto tcp dnat ip to numgen random mod 1 offset 0 map @first-tcp-0", r.MISSED)
    assert _map_elements(frag, "endpoints-tcp-0") == {f"0-{r.SLOTS - 1}": "10.244.1.1 . 8080"}
    assert frag.sets == {} and ("hairpin", "10.244.1.1 . 10.244.1.1") in frag.elements
    grown = r.render_service(CFG, sps(["10.244.1.1", "10.244.1.2"]))
    assert grown.chains == frag.chains and grown.elements != frag.elements


def test_only_usable_endpoints_are_in_the_map():
    svc = sps([]).service
    eps = (Endpoint("10.244.1.1", 8080, ready=True), Endpoint("10.244.1.2", 8080, ready=False, serving=False))
    frag = r.render_service(CFG, ServicePortState(svc, (*eps, Endpoint("10.244.1.3", 8080, ready=True))))
    assert sorted(_map_elements(frag, "endpoints-tcp-0").values()) == ["10.244.1.1 . 8080", "10.244.1.3 . 8080"]


def test_affinity_sets_and_rules():
    st = sps(THREE, affinity=60)
    frag = r.render_service(CFG, st)
    _, rules = _service_chain(frag)
    assert len(frag.sets) == 3
    for ep in st.endpoints:
        base = nft_endpoint_base(st.service.name, ep)
        aff, chain = f"affinity-{base}", f"endpoint-{base}"
        assert frag.sets[aff] == "type ipv4_addr ; flags dynamic,timeout ; timeout 60s ;"
        assert f"ip saddr @{aff} goto {chain}" in rules
        ep_rules = frag.chains[chain]
        assert ep_rules[0] == f"ip saddr {ep.ip} jump mark-for-masquerade"
        assert f"update @{aff} {{ ip saddr }}" in ep_rules
        # The client is remembered before the DNAT, which must come last.
        assert ep_rules[-1] == f"meta l4proto tcp dnat to {ep.ip}:8080"
    # Affinity lookups come before the random choice.
    first_numgen = next(i for i, rule in enumerate(rules) if rule.startswith("numgen"))
    assert all(rule.startswith("ip saddr @affinity-") for rule in rules[:first_numgen])
    assert first_numgen == 3


def test_no_affinity_no_affinity_sets():
    assert not any(name.startswith("affinity-") for name in r.render_service(CFG, sps(THREE)).sets)


@pytest.mark.parametrize(
    ("config", "shared", "want"),
    [
        # With --cluster-cidr one rule of "services" marks the traffic of every ClusterIP port
        # in the set (the chain has no rule of its own).
        (ProxyConfig(cluster_cidrs=("10.244.0.0/16",)),
         "ip saddr != { 10.244.0.0/16 } ip daddr . meta l4proto . th dport @cluster-ip-ports "
         "jump mark-for-masquerade", None),
        (ProxyConfig(cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16")),  # a shared chain: see below
         "ip daddr . meta l4proto . th dport @cluster-ip-ports jump mark-for-masquerade-unless-pod", None),
        # --masquerade-all: the service chain marks all of its ClusterIP traffic itself.
        (ProxyConfig(masquerade_all=True), None,
         "ip daddr 10.96.0.10 tcp dport 80 jump mark-for-masquerade"),
        (ProxyConfig(masquerade_all=True, cluster_cidrs=("10.244.0.0/16",)), None,
         "ip daddr 10.96.0.10 tcp dport 80 jump mark-for-masquerade"),
        (ProxyConfig(), None, None),
    ],
    ids=["one-cidr", "two-cidrs", "masquerade-all", "all-wins", "neither"],
)
def test_masquerade_rule(config, shared, want):
    base = r.render_base(config, DesiredState())
    assert [rule for rule in base.chains["services"] if "masquerade" in rule] == ([shared] if shared else [])
    assert base.chains["services"][-2].endswith("vmap @service-ips")  # marked before the dispatch
    # With a NodePort the service chain is also reached from the external chain: the rule
    # names the ClusterIP and port.
    frag = r.render_service(config, sps(THREE, affinity=30, node_port=30080))
    _, rules = _service_chain(frag)
    masq = [rule for rule in rules if "mark-for-masquerade" in rule]
    assert (("cluster-ip-ports", "10.96.0.10 . tcp . 80") in frag.elements) == (shared is not None)
    if want is None:
        assert masq == []
    else:
        assert masq == [want]
        assert rules[0] == want  # before affinity and the random choice
    # Without any external address it is reached from its ClusterIP alone: no match needed.
    frag = r.render_service(config, sps(THREE, affinity=30))
    _, rules = _service_chain(frag)
    masq = [rule for rule in rules if "mark-for-masquerade" in rule]
    assert masq == (["jump mark-for-masquerade"] if want else [])
    assert (("cluster-ip-ports", "10.96.0.10 . tcp . 80") in frag.elements) == (shared is not None)


def test_cluster_ip_ports_only_for_ports_with_a_chain():
    cfg = ProxyConfig(cluster_cidrs=("10.244.0.0/16",))
    assert not any(k[0] == "cluster-ip-ports" for k in r.render_service(cfg, sps([])).elements)
    assert ("cluster-ip-ports", "10.96.0.10 . tcp . 80") in r.render_service(cfg, sps(THREE)).elements


def test_nodeport_external_chain():
    st = sps(THREE, node_port=30080)
    frag = r.render_service(CFG, st)
    svc_chain, _ = _service_chain(frag)
    ext = f"external-{nft_service_base(st.service.name)}"
    assert frag.chains[ext] == ('jump mark-for-masquerade comment "test/web:http"', f"goto {svc_chain}")
    assert frag.elements[("service-nodeports", "tcp . 30080")] == f"goto {ext}"


def test_no_nodeport_no_external_chain():
    frag = r.render_service(CFG, sps(THREE))
    assert not any(c.startswith("external-") for c in frag.chains)
    assert not any(k[0] == "service-nodeports" for k in frag.elements)


@pytest.mark.parametrize("node_port", [0, 30081])
def test_no_endpoints(node_port):
    frag = r.render_service(CFG, sps([], node_port=node_port, cluster_ip="10.96.0.12", port=80))
    assert frag.chains == {} and frag.sets == {}
    want = {
        ("no-endpoint-services", "10.96.0.12 . tcp . 80"): "goto reject-chain",
    }
    if node_port:
        want[("no-endpoint-nodeports", "tcp . 30081")] = "goto reject-chain"
    # Even without endpoints the ClusterIP is listed: a port it does not serve is refused.
    want[("cluster-ips", "10.96.0.12")] = ""
    assert frag.elements == want


def test_only_non_serving_endpoints_count_as_none():
    svc = sps([]).service
    st = ServicePortState(svc, (Endpoint("10.244.1.1", 8080, ready=False, serving=False),))
    frag = r.render_service(CFG, st)
    assert frag.chains == {}
    assert ("no-endpoint-services", "10.96.0.10 . tcp . 80") in frag.elements


@pytest.mark.parametrize("proto", ["udp", "sctp"])
def test_other_protocols(proto):
    st = sps(["10.244.1.1"], protocol=proto, port=53, target_port=5353, node_port=30053)
    frag = r.render_service(CFG, st)
    assert ("service-ips", f"10.96.0.10 . {proto} . 53") in frag.elements
    assert ("service-nodeports", f"{proto} . 30053") in frag.elements
    _, rules = _service_chain(frag)
    # Each protocol has maps of its own (their data is typed tcp/udp/sctp dport).
    assert rules[-3] == f"meta l4proto {proto} dnat ip to numgen random mod {r.SLOTS} offset 0 map @endpoints-{proto}-0"
    assert rules[-2].endswith(f"map @first-{proto}-0")
    two = r.render_service(CFG, sps(["10.244.1.1", "10.244.1.2"], protocol=proto, port=53, target_port=5353))
    _, rules = _service_chain(two)
    assert sorted(_map_elements(two, rules[-3].rsplit("@", 1)[1]).values()) == [
        "10.244.1.1 . 5353", "10.244.1.2 . 5353"]
    assert f"/{proto}/" in _service_chain(frag)[0]
    empty = r.render_service(CFG, sps([], protocol=proto, port=53, node_port=30053))
    assert ("no-endpoint-services", f"10.96.0.10 . {proto} . 53") in empty.elements
    assert ("no-endpoint-nodeports", f"{proto} . 30053") in empty.elements


def test_masquerade_rule_names_the_protocol():
    cfg = ProxyConfig(masquerade_all=True)
    _, rules = _service_chain(r.render_service(cfg, sps(["10.244.1.1"], protocol="udp", port=53, node_port=30053)))
    assert rules[0] == "ip daddr 10.96.0.10 udp dport 53 jump mark-for-masquerade"


def test_render_is_deterministic():
    assert r.render_service(CFG, sps(THREE, affinity=5)) == r.render_service(CFG, sps(list(reversed(THREE)), affinity=5))


def test_names_are_distinct_per_service_and_endpoint():
    a = r.render_service(CFG, sps(THREE, name="a"))
    b = r.render_service(CFG, sps(THREE, name="b"))
    assert not set(a.chains) & set(b.chains)


def test_long_names_are_truncated():
    long = "x" * 253
    for affinity in (0, 30):
        st = sps(["10.244.1.1"], name=long, namespace="n" * 63, port_name="p" * 15, affinity=affinity)
        frag = r.render_service(CFG, st)
        assert all(len(c) <= NFT_NAME_MAX + len("local-endpoints-") <= 255 for c in [*frag.chains, *frag.sets])
        assert all(c.endswith("...") for c in [*frag.chains, *frag.sets])


def test_endpoint_names_replace_ipv6_colons():
    base = nft_endpoint_base(spn(), Endpoint("fd00::1", 80))
    assert ":" not in base and "fd00..1" in base


# -- the base fragment -----------------------------------------------------------------------


def test_base_fragment():
    cfg = ProxyConfig(masquerade_bit=14)
    frag = r.render_base(cfg, DesiredState(nodeport_ips=("192.168.1.1", "192.168.1.2")))
    assert frag.chain_specs == r.BASE_CHAINS
    assert set(frag.chain_specs) <= set(frag.chains)
    assert frag.sets == r.SETS
    assert frag.elements == {("nodeport-ips", "192.168.1.1"): "", ("nodeport-ips", "192.168.1.2"): ""}
    assert frag.chains["mark-for-masquerade"] == ("meta mark set meta mark or 0x4000",)
    assert frag.chains["masquerading"][1] == "meta mark & 0x4000 == 0 return"
    assert frag.chains["reject-chain"] == ("meta l4proto tcp reject with tcp reset", "reject")
    # Every jump or goto in the base fragment lands on a chain it defines.
    targets = {m for rules in frag.chains.values() for rule in rules
               for m in re.findall(r"(?:jump|goto) (\S+)", rule)}
    assert targets <= set(frag.chains)
    # Every @set it uses is declared.
    used = {m for rules in frag.chains.values() for rule in rules for m in re.findall(r"@(\S+)", rule)}
    assert used <= set(frag.sets)


def test_a_shared_cluster_ip_stays_while_any_port_holds_it():
    # Two ports of one Service, and another Service sharing the ClusterIP on another port.
    from pyproxy.nft.executor import FakeNft
    from pyproxy.proxier.nftables import NftProxier

    svcs = [sps(["10.244.1.1"], port_name="http", port=80, cluster_ip="10.96.0.20"),
            sps(["10.244.1.1"], port_name="https", port=443, cluster_ip="10.96.0.20"),
            sps(["10.244.1.2"], name="twin", port=8000, cluster_ip="10.96.0.20"),
            sps([], name="empty", cluster_ip="10.96.0.21")]
    assert r.render_base(CFG, DesiredState(services={s.service.name: s for s in svcs})).elements == {}
    fake = FakeNft()
    proxier = NftProxier(config=CFG, executor=fake, gc_period=0)

    def cluster_ips(keep):
        proxier.sync(DesiredState(services={s.service.name: s for s in keep}))
        return set(fake.dump().elements["cluster-ips"])

    assert cluster_ips(svcs) == {"10.96.0.20", "10.96.0.21"}
    assert cluster_ips(svcs[2:]) == {"10.96.0.20", "10.96.0.21"}
    assert cluster_ips(svcs[3:]) == {"10.96.0.21"}
    assert cluster_ips([]) == set()


@pytest.mark.parametrize(("bit", "mark"), [(0, "0x1"), (14, "0x4000"), (31, "0x80000000")])
def test_masquerade_mark(bit, mark):
    frag = r.render_base(ProxyConfig(masquerade_bit=bit), DesiredState())
    assert frag.chains["mark-for-masquerade"] == (f"meta mark set meta mark or {mark}",)




# -- the random choice is uniform ------------------------------------------------------------

_NUMGEN = re.compile(r"^numgen random mod (\d+) 0 goto (\S+)$")
_GOTO = re.compile(r"^goto (\S+)$")


def _choice_probabilities(rules: tuple[str, ...]) -> dict[str, Fraction]:
    """Exact probability that a packet ends in each chain, walking the rules in order."""
    reach = Fraction(1)
    out: dict[str, Fraction] = {}
    for rule in rules:
        if m := _NUMGEN.match(rule):
            p = reach * Fraction(1, int(m.group(1)))
            out[m.group(2)] = out.get(m.group(2), Fraction(0)) + p
            reach -= p
        elif m := _GOTO.match(rule):
            out[m.group(1)] = out.get(m.group(1), Fraction(0)) + reach
            reach = Fraction(0)
        else:
            raise AssertionError(f"unexpected rule in the cascade: {rule!r}")
    assert reach == 0, "some packets fall through the service chain"
    return out


@pytest.mark.parametrize("n", range(1, 11))
def test_cascade_is_exactly_uniform(n):
    """ClientIP affinity keeps a chain per endpoint, chosen by a cascade of numgen rules."""
    st = sps([f"10.244.1.{i + 1}" for i in range(n)], affinity=10)
    frag = r.render_service(CFG, st)
    _, rules = _service_chain(frag)
    probs = _choice_probabilities(tuple(x for x in rules if not x.startswith("ip saddr @affinity-")))
    assert set(probs) == set(_endpoint_chains(frag))
    assert len(probs) == n
    assert all(p == Fraction(1, n) for p in probs.values()), probs


def test_several_pod_cidrs_are_comparisons_in_one_shared_chain_never_a_set():
    """Two or more --cluster-cidr: an inline set would be an anonymous set in every service
    chain (10k sets, and the kernel's set-name walk is quadratic), and any interval set made by
    a full sync answers no lookup until its commit ends (pod traffic masqueraded meanwhile): a
    shared chain compares the source with each CIDR instead."""
    cfg = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16"))
    base = r.render_base(cfg, DesiredState())
    assert base.chains[r.MASQ_UNLESS_POD] == ("ip saddr 10.244.0.0/16 return", "ip saddr 10.245.0.0/16 return",
                                             "goto mark-for-masquerade")
    assert not any("interval" in spec for name, spec in base.sets.items() if not name.startswith("endpoints-"))
    frag = r.render_service(cfg, sps(THREE, node_port=30080))
    assert all("{" not in rule for rules in frag.chains.values() for rule in rules)
    one = ProxyConfig(cluster_cidrs=("10.244.0.0/16",))
    assert r.MASQ_UNLESS_POD not in r.render_base(one, DesiredState()).chains  # one CIDR: a comparison
    assert r.MASQ_UNLESS_POD not in r.render_base(ProxyConfig(cluster_cidrs=cfg.cluster_cidrs, masquerade_all=True),
                                                  DesiredState()).chains
