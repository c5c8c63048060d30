"""External traffic, traffic policies, topology and health checks in the model and both
renderers (pure; the netns tests send the packets)."""

from __future__ import annotations

import pytest

from pyproxy.config import ProxyConfig
from pyproxy.model.parse import Invalid, parse_service, parse_slice
from pyproxy.model.state import StateBuilder
from pyproxy.render import iptables as ipt
from pyproxy.render import nftables as nft
from pyproxy.service_health import health_checks, response
from tests import scenario as sc
from tests.unit.helpers import build, fragment_pool

CFG = ProxyConfig(hostname="node-1", cluster_cidrs=("10.244.0.0/16",))
IPT = ProxyConfig(mode="iptables", hostname="node-1", cluster_cidrs=("10.244.0.0/16",))


def lb_service(*, etp: str = "Cluster", ranges: list[str] | None = None, ingress: list[dict] | None = None,
               external_ips: list[str] | None = None, hc_port: int = 0) -> dict:
    svc = sc.service("lb", "10.96.0.21", [sc.port(80, name="http", node_port=30090)], svc_type="LoadBalancer")
    svc["spec"]["externalTrafficPolicy"] = etp
    if ranges is not None:
        svc["spec"]["loadBalancerSourceRanges"] = ranges
    if external_ips:
        svc["spec"]["externalIPs"] = external_ips
    if hc_port:
        svc["spec"]["healthCheckNodePort"] = hc_port
    svc["status"] = {"loadBalancer": {"ingress": ingress if ingress is not None else [{"ip": "192.168.60.20"}]}}
    return svc


def lb_state(nodes=("node-1", "node-2"), node_ips=("192.168.50.2",), **kw):
    sl = sc.endpoint_slice("lb", [f"10.244.1.{10 + i}" for i in range(len(nodes))], [sc.port(8080, name="http")])
    for ep, node in zip(sl["endpoints"], nodes):
        ep["nodeName"] = node
    objects = [lb_service(**kw), sl]
    if node_ips:
        objects.append(sc.node("node-1", list(node_ips)))
    return next(iter(build(objects).services.values()))


# -- parsing -------------------------------------------------------------------------------

def test_external_addresses_are_parsed_per_family():
    svc = lb_service(external_ips=["192.168.60.10", "2001:db8::10", "192.168.060.010"],
                     ingress=[{"ip": "192.168.60.20"}, {"ip": "192.168.60.21", "ipMode": "Proxy"},
                              {"hostname": "lb.example"}, {"ip": "2001:db8::20", "ipMode": "VIP"}],
                     ranges=[" 203.0.113.0/25", "2001:db8::/64"])
    (sp,) = parse_service(svc)
    assert sp.external_ips == ("192.168.60.10",)  # sloppy leading zeros, deduplicated
    assert sp.lb_ips == ("192.168.60.20",)  # ipMode Proxy and hostnames skipped
    assert sp.source_ranges == ("203.0.113.0/25",)
    (sp6,) = parse_service({**svc, "spec": {**svc["spec"], "clusterIPs": ["10.96.0.21", "fd00::21"]}}, family=6)
    assert sp6.lb_ips == ("2001:db8::20",) and sp6.source_ranges == ("2001:db8::/64",)


def test_source_ranges_of_the_other_family_only_admit_nobody():
    (sp,) = parse_service(lb_service(ranges=["2001:db8::/64"]))
    assert sp.source_ranges == () and sp.uses_firewall


@pytest.mark.parametrize(("field", "value", "match"), [
    ("externalIPs", ["not-an-ip"], "externalIPs"),
    ("loadBalancerSourceRanges", ["10.0.0.0/33"], "loadBalancerSourceRanges"),
    ("externalTrafficPolicy", "Nearest", "externalTrafficPolicy"),
])
def test_bad_external_fields_make_the_service_invalid(field, value, match):
    svc = lb_service()
    svc["spec"][field] = value
    with pytest.raises(Invalid, match=match):
        parse_service(svc)


def test_external_policy_and_health_port_only_where_upstream_applies_them():
    (sp,) = parse_service(lb_service(etp="Local", hc_port=32100))
    assert sp.external_local and sp.health_check_node_port == 32100
    svc = sc.service("c", "10.96.0.30", [sc.port(80)])
    svc["spec"]["externalTrafficPolicy"] = "Local"
    assert not parse_service(svc)[0].external_local  # a ClusterIP Service is not external
    (sp,) = parse_service(lb_service(etp="Cluster", hc_port=32100))
    assert sp.health_check_node_port == 0


def test_hints_are_parsed():
    sl = sc.endpoint_slice("web", ["10.244.1.10"], [sc.port(8080)])
    sl["endpoints"][0]["hints"] = {"forZones": [{"name": "b"}, {"name": "a"}], "forNodes": [{"name": "n1"}]}
    ep = parse_slice(sl).endpoints[0]
    assert ep.zone_hints == ("a", "b") and ep.node_hints == ("n1",)
    sl["endpoints"][0]["hints"] = {"forZones": "a"}
    with pytest.raises(Invalid, match="forZones"):
        parse_slice(sl)


def test_external_ip_clash_skips_the_later_service():
    a = sc.service("a", "10.96.0.30", [sc.port(80)])
    a["spec"]["externalIPs"] = ["192.168.60.10"]
    b = sc.service("b", "10.96.0.31", [sc.port(80)])
    b["spec"]["externalIPs"] = ["192.168.60.10"]
    slices = [sc.endpoint_slice(n, ["10.244.1.10"], [sc.port(8080)]) for n in ("a", "b")]
    state = build([a, b, *slices])
    assert {s.name for s in state.services} == {"a"}
    assert any("192.168.60.10 port 80/TCP is already used by Service test/a" in str(p) for p in state.problems)


# -- topology ------------------------------------------------------------------------------

def _hinted(zone: str | None):
    sl = sc.endpoint_slice("web", ["10.244.1.10", "10.244.1.11"], [sc.port(8080, name="http")])
    sl["endpoints"][0]["hints"] = {"forZones": [{"name": "a"}]}
    sl["endpoints"][1]["hints"] = {"forZones": [{"name": "b"}]}
    node = sc.node("node-1", ["192.168.50.2"])
    if zone:
        node["metadata"]["labels"] = {"topology.kubernetes.io/zone": zone}
    return [sc.service("web", "10.96.0.10", [sc.port(80, name="http")]), sl, node]


def test_zone_change_remerges_and_keeps_identity_when_nothing_changes():
    b = StateBuilder(node_name="node-1")
    b.replace_all(_hinted("a"))
    first = next(iter(b.build().services.values()))
    assert [e.ip for e in first.usable_endpoints] == ["10.244.1.10"]
    b.replace_all(_hinted("a"))
    assert next(iter(b.build().services.values())) is first  # same Node: same object
    b.replace_all(_hinted("b"))
    second = next(iter(b.build().services.values()))
    assert [e.ip for e in second.usable_endpoints] == ["10.244.1.11"]
    b.replace_all(_hinted(None))
    assert len(next(iter(b.build().services.values())).usable_endpoints) == 2


def test_topology_ignores_not_ready_endpoints_and_falls_back_to_terminating():
    objects = _hinted("a")
    objects[1]["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    state = build(objects)
    # The only ready endpoint is hinted for b: no endpoint for zone a, hints ignored.
    assert [e.ip for e in next(iter(state.services.values())).usable_endpoints] == ["10.244.1.11"]


# -- nftables ------------------------------------------------------------------------------

def test_nft_external_and_lb_ips_go_through_the_external_chain():
    sps = lb_state(external_ips=["192.168.60.10"])
    frag = nft.render_service(CFG, sps)
    ext = frag.elements[("service-ips", "192.168.60.10 . tcp . 80")]
    assert ext == frag.elements[("service-ips", "192.168.60.20 . tcp . 80")]
    assert ext == frag.elements[("service-nodeports", "tcp . 30090")]
    assert frag.chains[ext[len("goto "):]][0].startswith("jump mark-for-masquerade")


def test_nft_firewall_admits_ranges_and_the_lb_ip_when_the_node_is_in_range():
    frag = nft.render_service(CFG, lb_state(ranges=["203.0.113.0/25"]))
    fw = frag.elements[("firewall-ips", "192.168.60.20 . tcp . 80")][len("goto "):]
    # A comparison per range, never a set (an interval set made by a full sync answers nothing
    # until its commit ends: every allowed client would be dropped meanwhile).
    assert frag.chains[fw] == ("ip saddr 203.0.113.0/25 return", "drop")
    frag = nft.render_service(CFG, lb_state(ranges=["192.168.50.0/24"]))
    assert frag.chains[fw] == ("ip saddr 192.168.50.0/24 return", "ip saddr 192.168.60.20 return", "drop")
    frag = nft.render_service(CFG, lb_state(ranges=["2001:db8::/64"]))
    assert frag.chains[fw] == ("drop",)


def test_nft_etp_local():
    frag = nft.render_service(CFG, lb_state(etp="Local"))
    ext = frag.chains[frag.elements[("service-nodeports", "tcp . 30090")][len("goto "):]]
    assert ext[0].startswith("ip saddr 10.244.0.0/16 goto service-")
    assert ext[1].startswith("fib saddr type local jump mark-for-masquerade")
    assert ext[-1].startswith("goto local-")
    assert fragment_pool(frag, ext[-1][len("goto "):]) == ["10.244.1.10:8080"]  # node-1's only
    none = nft.render_service(CFG, lb_state(etp="Local", nodes=("node-2", "node-3")))
    assert none.elements[("no-endpoint-nodeports", "tcp . 30090")] == "drop"
    assert none.elements[("no-endpoint-services", "192.168.60.20 . tcp . 80")] == "drop"
    assert "goto local-" not in " ".join(none.chains[none.elements[("service-nodeports", "tcp . 30090")][5:]])


def test_nft_no_endpoints_rejects_external_addresses_too():
    svc = lb_service(external_ips=["192.168.60.10"])
    frag = nft.render_service(CFG, next(iter(build([svc]).services.values())))
    for key in ("10.96.0.21 . tcp . 80", "192.168.60.10 . tcp . 80", "192.168.60.20 . tcp . 80"):
        assert frag.elements[("no-endpoint-services", key)] == "goto reject-chain"


# -- iptables ------------------------------------------------------------------------------

def test_ipt_lb_with_ranges_goes_through_fw_and_the_firewall_drops_the_rest():
    frag = ipt.render_service(IPT, lb_state(ranges=["192.168.50.0/24"]))
    nat = frag.top_rules[("nat", ipt.SERVICES)]
    lb_rule = next(r for r in nat if "-d 192.168.60.20/32" in r)
    fw = lb_rule.split("-j ")[-1]
    assert fw.startswith("PYPROXY-FW-")
    rules = frag.chains[("nat", fw)]
    assert any("-s 192.168.50.0/24 -j PYPROXY-EXT-" in r for r in rules)
    assert any("-s 192.168.60.20/32 -j PYPROXY-EXT-" in r for r in rules)
    (drop,) = frag.top_rules[("filter", ipt.PROXY_FIREWALL)]
    assert "-d 192.168.60.20/32 --dport 80 -j DROP" in drop


def test_ipt_etp_local_chain_and_drops():
    frag = ipt.render_service(IPT, lb_state(etp="Local"))
    ext = next(v for (t, c), v in frag.chains.items() if c.startswith("PYPROXY-EXT-"))
    assert "-s 10.244.0.0/16 -j PYPROXY-SVC-" in ext[0]
    assert "--src-type LOCAL -j PYPROXY-MARK-MASQ" in ext[1]
    assert ext[-1].startswith("-j PYPROXY-SVL-")
    none = ipt.render_service(IPT, lb_state(etp="Local", nodes=("node-2",)))
    drops = none.top_rules[("filter", ipt.EXTERNAL_SERVICES)]
    assert any("-d 192.168.60.20/32 --dport 80 -j DROP" in r for r in drops)
    assert none.top_rules[("filter", ipt.NODEPORTS)] == (
        '-m comment --comment "test/lb:http has no local endpoints" -m tcp -p tcp --dport 30090 -j DROP',)


def test_ipt_localhost_nodeports_only_when_asked_and_loopback_is_a_nodeport_address():
    from pyproxy.model.objects import DesiredState

    state = DesiredState(nodeport_ips=("192.168.50.2",))
    off = ipt.render_base(IPT, state)
    assert ("filter", ipt.LOCALNET_FIREWALL) not in off.chains
    on_cfg = ProxyConfig(mode="iptables", localhost_nodeports=True)
    on = ipt.render_base(on_cfg, state)
    assert any("-d 127.0.0.0/8 -j PYPROXY-NODEPORTS" in r for r in on.top_rules[("nat", ipt.SERVICES)])
    assert "! --ctstate RELATED,ESTABLISHED,DNAT -j DROP" in on.chains[("filter", ipt.LOCALNET_FIREWALL)][0]
    assert not ProxyConfig(mode="iptables", localhost_nodeports=True,
                           nodeport_addresses=("192.168.50.0/24",)).localhost_nodeports_active
    assert ProxyConfig(mode="iptables", localhost_nodeports=True,
                       nodeport_addresses=("127.0.0.0/8",)).localhost_nodeports_active
    assert not ProxyConfig(mode="nftables", localhost_nodeports=True).localhost_nodeports_active


# -- health check node ports ---------------------------------------------------------------

def test_health_checks_count_ready_local_endpoint_ips():
    sl = sc.endpoint_slice("lb", ["10.244.1.10", "10.244.1.11", "10.244.1.12"], [sc.port(8080, name="http")])
    sl["endpoints"][1]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    sl["endpoints"][2]["nodeName"] = "node-2"
    state = build([lb_service(etp="Local", hc_port=32100), sl])
    (check,) = health_checks(state).values()
    assert (check.namespace, check.name, check.port, check.local_endpoints) == ("test", "lb", 32100, 1)
    status, headers, body = response(check, proxy_healthy=True)
    assert status == 200 and headers["X-Load-Balancing-Endpoint-Weight"] == "1"
    assert body == '{"service":{"namespace":"test","name":"lb"},"localEndpoints":1,"serviceProxyHealthy":true}'
    assert response(check, proxy_healthy=False)[0] == 503


# -- dual-stack ------------------------------------------------------------------------------

def test_family_configs_split_cidrs():
    cfg = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/32"),
                      nodeport_addresses=("primary", "192.168.0.0/16"))
    v4, v6 = cfg.family_configs()
    assert (v4.family, v4.cluster_cidrs, v4.nodeport_addresses) == (4, ("10.244.0.0/16",), ("primary", "192.168.0.0/16"))
    assert (v6.family, v6.cluster_cidrs, v6.nodeport_addresses) == (6, ("fd00:244::/32",), ("primary",))
    assert [c.family for c in ProxyConfig(mode="userspace").family_configs()] == [4]


def _v6_state(**kw):
    svc = sc.service("web", "fd00:96::10", [sc.port(80, name="http")], **kw)
    sl = sc.endpoint_slice("web", ["fd00:244:1::10"], [sc.port(8080, name="http")])
    sl["addressType"] = "IPv6"
    b = StateBuilder(node_name="node-1", family=6)
    b.replace_all([svc, sl])
    return next(iter(b.build().services.values()))


def test_nft_ipv6():
    cfg = ProxyConfig(hostname="node-1", cluster_cidrs=("fd00:244::/32",), family=6)
    base = nft.render_base(cfg, build([]))
    assert "ip6 daddr . meta l4proto . th dport vmap @service-ips" in base.chains["services"]
    assert base.sets["service-ips"].startswith("type ipv6_addr . inet_proto")
    frag = nft.render_service(cfg, _v6_state(affinity_timeout=30))
    rules = " ; ".join(r for chain in frag.chains.values() for r in chain)
    assert "dnat to [fd00:244:1::10]:8080" in rules and "update @affinity-" in rules
    assert "{ ip6 saddr }" in rules
    assert "ip6 saddr != { fd00:244::/32 } ip6 daddr . meta l4proto . th dport @cluster-ip-ports " \
        "jump mark-for-masquerade" in base.chains["services"]
    assert ("cluster-ip-ports", "fd00:96::10 . tcp . 80") in frag.elements
    assert all(spec.startswith("type ipv6_addr") for spec in frag.sets.values())


def test_ipt_ipv6():
    cfg = ProxyConfig(mode="iptables", hostname="node-1", family=6)
    frag = ipt.render_service(cfg, _v6_state())
    rules = " ".join(r for chain in frag.chains.values() for r in chain)
    assert "--to-destination [fd00:244:1::10]:8080" in rules and "-s fd00:244:1::10/128" in rules
    assert "-d fd00:96::10/128 --dport 80" in frag.top_rules[("nat", ipt.SERVICES)][0]
    # Localhost NodePorts are IPv4 only.
    assert not ProxyConfig(mode="iptables", localhost_nodeports=True, family=6).localhost_nodeports_active


def test_explain_external_paths():
    from pyproxy.explain import explain

    # Both endpoints on node-1 (the slice's default node).
    state = build([lb_service(etp="Local", ranges=["203.0.113.0/25"], external_ips=["192.168.60.10"]),
                   sc.endpoint_slice("lb", ["10.244.1.10", "10.244.1.11"], [sc.port(8080, name="http")]),
                   sc.node("node-1", ["192.168.50.2"])], nodeport_ips=("192.168.50.2",))
    denied = explain(state, CFG, dst="192.168.60.20", port=80, proto="tcp", src="198.51.100.7")
    assert denied.verdict == "drop" and "loadBalancerSourceRanges" in denied.why
    ok = explain(state, CFG, dst="192.168.60.20", port=80, proto="tcp", src="203.0.113.9")
    assert ok.verdict == "dnat" and ok.path == "loadbalancer" and not ok.masquerade
    assert ok.chains[0].startswith("firewall-") and ok.chains[2].startswith("local-")
    pod = explain(state, CFG, dst="192.168.60.10", port=80, proto="tcp", src="10.244.2.5")
    assert pod.path == "externalip" and "does not apply to a pod" in pod.why and not pod.masquerade
    node = explain(state, CFG, dst="192.168.50.2", port=30090, proto="tcp", src="192.168.50.2")
    assert node.path == "nodeport" and node.masquerade


def test_explain_ipv6_firewall_admits_the_lb_ip_when_the_node_is_in_range():
    from pyproxy.explain import explain

    svc = lb_service(ranges=["fd00:50::/64"], ingress=[{"ip": "fd00:60::20"}])
    svc["spec"]["clusterIPs"] = ["10.96.0.21", "fd00:96::21"]
    sl = sc.endpoint_slice("lb", ["fd00:244:1::10"], [sc.port(8080, name="http")])
    sl["addressType"] = "IPv6"
    b = StateBuilder(node_name="node-1", family=6)
    b.replace_all([svc, sl, sc.node("node-1", ["fd00:50::2"])])
    state = b.build()
    cfg = ProxyConfig(hostname="node-1", family=6)
    assert explain(state, cfg, dst="fd00:60::20", port=80, proto="tcp", src="fd00:60::20").verdict == "dnat"
    assert explain(state, cfg, dst="fd00:60::20", port=80, proto="tcp", src="fd00:99::1").verdict == "drop"


@pytest.mark.parametrize("config", [CFG, IPT], ids=["nftables", "iptables"])
def test_explain_names_chains_the_renderer_writes(config):
    """One place names a service's chains (render/naming.ServiceChains): every chain explain
    lists (firewall, external, local policy, endpoints) is in the rendered ruleset."""
    from pyproxy.explain import explain
    from pyproxy.ipt.executor import FakeIptables
    from pyproxy.nft.executor import FakeNft
    from pyproxy.proxier.iptables import IptProxier
    from pyproxy.proxier.nftables import NftProxier

    state = build([lb_service(etp="Local", ranges=["203.0.113.0/25"]),
                   sc.endpoint_slice("lb", ["10.244.1.10", "10.244.1.11"], [sc.port(8080, name="http")]),
                   sc.node("node-1", ["192.168.50.2"])], nodeport_ips=("192.168.50.2",))
    proxier = (IptProxier(config=config, executor=FakeIptables()) if config.mode == "iptables"
               else NftProxier(config=config, executor=FakeNft()))
    text = proxier.render_text(state)
    e = explain(state, config, dst="192.168.60.20", port=80, proto="tcp", src="203.0.113.9")
    assert e.verdict == "dnat"
    if config.mode == "nftables":  # firewall, external, local; the endpoints are a map's data
        assert len(e.chains) == 3 and e.endpoint_map == "endpoints-*"
        local_chain = next(line for line in text.splitlines() if line.startswith(f"add chain ip pyproxy {e.chains[-1]} {{"))
        assert " map @endpoints-tcp-" in local_chain
    else:
        assert len(e.chains) == 5  # firewall, external, local, 2 endpoint chains
    missing = [c for c in e.chains if c not in text]
    assert not missing, missing


# -- the traffic-policy decision (model.policy), which explain and both renderers share ------

def test_pool_under_etp_local_depends_on_the_source():
    from pyproxy.model.policy import traffic_policy

    pol = traffic_policy(lb_state(etp="Local"), node_name="node-1")
    assert [e.ip for e in pol.cluster] == ["10.244.1.10", "10.244.1.11"]
    assert [e.ip for e in pol.local] == ["10.244.1.10"]  # node-2's endpoint is not ours
    outside = pol.pool(external=True)
    assert outside.local and not outside.short_circuit and [e.ip for e in outside.endpoints] == ["10.244.1.10"]
    for src in ({"from_pod": True}, {"from_node": True}):
        short = pol.pool(external=True, **src)
        assert short.short_circuit and not short.local and short.endpoints == pol.cluster
    # The ClusterIP is internal traffic: externalTrafficPolicy does not narrow it.
    inside = pol.pool(external=False)
    assert not inside.local and inside.endpoints == pol.cluster and pol.cluster_pool_used


def test_pool_under_itp_local_and_etp_cluster():
    from pyproxy.model.policy import traffic_policy

    svc = lb_service()
    svc["spec"]["internalTrafficPolicy"] = "Local"
    sl = sc.endpoint_slice("lb", ["10.244.1.10", "10.244.2.10"], [sc.port(8080, name="http")])
    sl["endpoints"][0]["nodeName"], sl["endpoints"][1]["nodeName"] = "node-2", "node-2"
    sps = next(iter(build([svc, sl]).services.values()))
    pol = traffic_policy(sps, node_name="node-1")
    assert pol.internal_local and not pol.external_local and pol.local == ()
    assert pol.pool(external=False).local and pol.pool(external=False).endpoints == ()  # dropped
    assert pol.pool(external=True).endpoints == pol.cluster  # NodePort/LB: every endpoint
    assert pol.cluster_pool_used  # external traffic still uses the cluster chain
