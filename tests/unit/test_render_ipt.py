"""pyproxy.render.iptables: service ports → PYPROXY-* chains in iptables-restore syntax."""

from __future__ import annotations

import re
import shlex
from fractions import Fraction

import pytest

from pyproxy.config import ProxyConfig
from pyproxy.ipt.executor import FakeIptables
from pyproxy.model.objects import DesiredState, Endpoint, ServicePortState
from pyproxy.proxier.iptables import IptProxier
from pyproxy.render import iptables as r
from pyproxy.render.naming import ipt_comment, ipt_endpoint_hash, ipt_service_hash
from tests import scenario as sc
from tests.unit.helpers import build, sps, spn

CFG = ProxyConfig(mode="iptables")
THREE = ["10.244.1.1", "10.244.1.2", "10.244.1.3"]


# Upstream's TestComputeProbability.
@pytest.mark.parametrize(
    ("n", "want"),
    [
        (1, "1.0000000000"),
        (2, "0.5000000000"),
        (3, "0.3333333333"),
        (10, "0.1000000000"),
        (100000, "0.0000100000"),
        (100001, "0.0000099999"),
    ],
)
def test_probability(n, want):
    assert r.probability(n) == want


def test_probability_strings_are_distinct_and_decreasing_up_to_100000():
    # Upstream checks that every n up to 100000 gives a different string, decreasing.
    prev = 2.0
    for n in range(1, 100001, 7):
        value = float(r.probability(n))
        assert value < prev
        prev = value


def _chains(st: ServicePortState, cfg: ProxyConfig = CFG):
    return r.render_service(cfg, st)


def _svc_chain(st: ServicePortState) -> str:
    return f"PYPROXY-SVC-{ipt_service_hash(st.service.name)}"


def test_chain_names_fit_iptables_limit():
    names = [
        spn("a"),
        spn("x" * 63, "p" * 15, "udp", "n" * 63),
        spn("web", "", "sctp"),
    ]
    for name in names:
        st = sps(THREE, name=name.name, port_name=name.port, protocol=name.protocol,
                 namespace=name.namespace, node_port=30000)
        frag = _chains(st)
        for _table, chain in frag.chains:
            assert len(chain) <= 28, chain
            assert chain.startswith("PYPROXY-")
    for chain in (c for _, c in r.TOP_CHAINS):
        assert len(chain) <= 28


def test_service_and_endpoint_hashes_are_stable_and_distinct():
    a, b = spn("a"), spn("b")
    assert ipt_service_hash(a) == ipt_service_hash(spn("a"))
    assert ipt_service_hash(a) != ipt_service_hash(b)
    assert ipt_service_hash(spn("a", protocol="tcp")) != ipt_service_hash(spn("a", protocol="udp"))
    ep = Endpoint("10.0.0.1", 80)
    assert ipt_endpoint_hash(a, ep) != ipt_endpoint_hash(b, ep)
    assert ipt_endpoint_hash(a, ep) != ipt_endpoint_hash(a, Endpoint("10.0.0.1", 81))


def test_svc_chain_uses_statistic_for_all_but_the_last():
    st = sps(THREE)
    frag = _chains(st)
    rules = frag.chains[("nat", _svc_chain(st))]
    assert len(rules) == 3
    assert "--mode random --probability 0.3333333333 -j PYPROXY-SEP-" in rules[0]
    assert "--mode random --probability 0.5000000000 -j PYPROXY-SEP-" in rules[1]
    assert "statistic" not in rules[2] and " -j PYPROXY-SEP-" in rules[2]
    seps = [shlex.split(rule)[-1] for rule in rules]
    assert len(set(seps)) == 3
    assert all(("nat", sep) in frag.chains for sep in seps)


@pytest.mark.parametrize("n", range(1, 9))
def test_statistic_cascade_is_uniform(n):
    st = sps([f"10.244.1.{i + 1}" for i in range(n)])
    rules = _chains(st).chains[("nat", _svc_chain(st))]
    reach = Fraction(1)
    got = {}
    for rule in rules:
        m = re.search(r"--probability (\S+) ", rule)
        p = Fraction(1) if m is None else Fraction(m.group(1)).limit_denominator(1000)
        got[shlex.split(rule)[-1]] = reach * p
        reach -= reach * p
    assert reach == 0 and len(got) == n
    assert all(v == Fraction(1, n) for v in got.values())


def test_sep_chain_marks_hairpin_and_dnats():
    st = sps(["10.244.1.1"], target_port=8080)
    frag = _chains(st)
    sep = f"PYPROXY-SEP-{ipt_endpoint_hash(st.service.name, st.endpoints[0])}"
    assert frag.chains[("nat", sep)] == (
        '-m comment --comment "test/web:http" -s 10.244.1.1/32 -j PYPROXY-MARK-MASQ',
        '-m comment --comment "test/web:http" -m tcp -p tcp -j DNAT --to-destination 10.244.1.1:8080',
    )


def test_cluster_ip_jump_in_nat_services():
    st = sps(THREE, cluster_ip="10.96.0.10", port=80)
    frag = _chains(st)
    assert frag.top_rules[("nat", "PYPROXY-SERVICES")] == (
        f'-m comment --comment "test/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10/32 --dport 80 '
        f"-j {_svc_chain(st)}",
    )
    assert ("filter", "PYPROXY-SERVICES") not in frag.top_rules


def test_affinity_rules():
    st = sps(THREE, affinity=60)
    frag = _chains(st)
    rules = frag.chains[("nat", _svc_chain(st))]
    recent = [rule for rule in rules if "-m recent" in rule]
    assert len(recent) == 3
    for rule in recent:
        sep = shlex.split(rule)[-1]
        assert f"-m recent --name {sep} --rcheck --seconds 60 --reap -j {sep}" in rule
        assert f"-m recent --name {sep} --set " in frag.chains[("nat", sep)][1]
    # The affinity checks come before the random choice.
    assert all("-m recent" in rule for rule in rules[:3])
    assert all("statistic" in rule for rule in rules[3:5])


def test_no_affinity_no_recent():
    frag = _chains(sps(THREE))
    assert not any("recent" in rule for rules in frag.chains.values() for rule in rules)


@pytest.mark.parametrize(
    ("config", "want"),
    [
        (ProxyConfig(cluster_cidrs=("10.244.0.0/16",)), "! -s 10.244.0.0/16 -j PYPROXY-MARK-MASQ"),
        (ProxyConfig(cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16")), "-j PYPROXY-MASQ-NON-POD"),
        (ProxyConfig(masquerade_all=True), "-j PYPROXY-MARK-MASQ"),
        (ProxyConfig(), None),
    ],
)
def test_masquerade_rule(config, want):
    st = sps(THREE)
    rules = _chains(st, config).chains[("nat", _svc_chain(st))]
    if want is None:
        assert not any("MASQ" in rule for rule in rules)
    else:
        assert rules[0].endswith(want)
        assert "-d 10.96.0.10/32 --dport 80" in rules[0]


def test_masq_non_pod_chain_in_base_for_several_cidrs():
    cfg = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16"))
    base = r.render_base(cfg, DesiredState())
    assert base.chains[("nat", "PYPROXY-MASQ-NON-POD")] == (
        "-s 10.244.0.0/16 -j RETURN", "-s 10.245.0.0/16 -j RETURN", "-j PYPROXY-MARK-MASQ")
    assert ("nat", "PYPROXY-MASQ-NON-POD") not in r.render_base(ProxyConfig(), DesiredState()).chains


@pytest.mark.parametrize(
    ("proto", "reject"),
    [("tcp", "-j REJECT --reject-with tcp-reset"), ("udp", "-j REJECT"), ("sctp", "-j REJECT")],
)
def test_no_endpoints_reject_in_filter(proto, reject):
    st = sps([], protocol=proto, cluster_ip="10.96.0.12", port=80, node_port=30081)
    frag = _chains(st)
    assert frag.chains == {}
    (svc_rule,) = frag.top_rules[("filter", "PYPROXY-SERVICES")]
    (np_rule,) = frag.top_rules[("filter", "PYPROXY-NODEPORTS")]
    assert svc_rule.endswith(f"-m {proto} -p {proto} -d 10.96.0.12/32 --dport 80 {reject}")
    # On the NodePort addresses only (the base jumps there per address), not on every local one.
    assert np_rule.endswith(f"-m {proto} -p {proto} --dport 30081 {reject}") and "addrtype" not in np_rule
    assert "has no endpoints" in svc_rule
    if proto != "tcp":
        assert "tcp-reset" not in svc_rule
    # REJECT is only valid in the filter table.
    assert not any(table == "nat" for table, _ in frag.top_rules)


def test_no_endpoints_without_nodeport_has_no_external_reject():
    frag = _chains(sps([]))
    assert set(frag.top_rules) == {("filter", "PYPROXY-SERVICES")}


def test_nodeport_chains():
    st = sps(THREE, node_port=30080)
    frag = _chains(st)
    ext = f"PYPROXY-EXT-{ipt_service_hash(st.service.name)}"
    assert frag.chains[("nat", ext)] == (
        '-m comment --comment "masquerade traffic for test/web:http external destinations" -j PYPROXY-MARK-MASQ',
        f"-j {_svc_chain(st)}",
    )
    assert frag.top_rules[("nat", "PYPROXY-NODEPORTS")] == (
        f'-m comment --comment "test/web:http" -m tcp -p tcp --dport 30080 -j {ext}',
    )


def test_comment_cannot_carry_a_quote_a_line_break_or_nul_into_the_payload():
    text = ipt_comment('a "b" \\c\n-I INPUT 1 -j ACCEPT\x00é')
    assert text == '-m comment --comment "a ?b? ?c?-I INPUT 1 -j ACCEPT??"'
    assert shlex.split(text)[-1] == "a ?b? ?c?-I INPUT 1 -j ACCEPT??"


def test_comment_is_cut_to_the_match_limit():
    text = shlex.split(ipt_comment("x" * 400))[-1]
    assert len(text) == 255 and text.endswith("...")


def test_base_chains():
    base = r.render_base(ProxyConfig(masquerade_bit=14), DesiredState(nodeport_ips=("192.168.1.1",)))
    assert base.chains[("nat", "PYPROXY-MARK-MASQ")] == ("-j MARK --or-mark 0x4000",)
    assert base.chains[("nat", "PYPROXY-POSTROUTING")][0] == "-m mark ! --mark 0x4000/0x4000 -j RETURN"
    assert "MASQUERADE --random-fully" in base.chains[("nat", "PYPROXY-POSTROUTING")][-1]
    (tail,) = base.top_rules[("nat", "PYPROXY-SERVICES")]
    assert tail.endswith("-d 192.168.1.1/32 -j PYPROXY-NODEPORTS")


def test_every_hook_jump_targets_one_of_our_top_chains():
    top = set(r.TOP_CHAINS)
    for table, _builtin, args in r.HOOK_JUMPS:
        assert (table, args[-1]) in top


# -- the whole ruleset through IptProxier.render_text ---------------------------------------


def _text():
    objs = [
        sc.node("node-1", ["192.168.1.1", "192.168.1.2"]),
        sc.service("web", "10.96.0.10", [sc.port(80, name="http", node_port=30080)], svc_type="NodePort"),
        sc.endpoint_slice("web", ["10.244.1.1", "10.244.1.2"], [sc.port(8080, name="http")]),
        sc.service("zzz", "10.96.0.99", [sc.port(80, name="http")]),
        sc.endpoint_slice("zzz", ["10.244.1.3"], [sc.port(8080, name="http")]),
        sc.service("empty", "10.96.0.12", [sc.port(80, name="http")]),
    ]
    state = build(objs, nodeport_ips=("192.168.1.1", "192.168.1.2"))
    return IptProxier(config=CFG, executor=FakeIptables()).render_text(state)


def _section(text: str, table: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"*{table}")
    end = lines.index("COMMIT", start)
    return lines[start + 1:end]


def test_nodeports_rules_are_last_in_nat_services():
    nat = _section(_text(), "nat")
    services = [line for line in nat if line.startswith("-A PYPROXY-SERVICES ")]
    assert len(services) == 4  # two ClusterIP jumps, then two node addresses
    assert "10.96.0.10/32" in services[0] and "10.96.0.99/32" in services[1]
    assert services[2].endswith("-d 192.168.1.1/32 -j PYPROXY-NODEPORTS")
    assert services[3].endswith("-d 192.168.1.2/32 -j PYPROXY-NODEPORTS")
    assert "must be the last rule" in services[-1]


def test_render_text_structure():
    text = _text()
    filt = _section(text, "filter")
    nat = _section(text, "nat")
    assert text.index("*filter") < text.index("*nat")
    assert any("10.96.0.12/32" in line and "REJECT" in line for line in filt)
    assert not any("REJECT" in line for line in nat)
    declared = {line[1:].split()[0] for line in nat if line.startswith(":")}
    assert {c for t, c in r.TOP_CHAINS if t == "nat"} <= declared
    # Every chain an -A line appends to is declared, and every PYPROXY target exists.
    for section in (filt, nat):
        declared = {line[1:].split()[0] for line in section if line.startswith(":")}
        for line in section:
            if line.startswith("-A "):
                words = shlex.split(line)
                assert words[1] in declared
                target = words[words.index("-j") + 1]
                if target.startswith("PYPROXY-"):
                    assert target in declared, line
