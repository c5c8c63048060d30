"""internalTrafficPolicy: Local in both renderers (pure)."""

from __future__ import annotations

import pytest

from pyproxy.config import ProxyConfig
from pyproxy.model.parse import Invalid, parse_service
from pyproxy.render import iptables as ipt
from pyproxy.render import nftables as nft
from tests import scenario as sc
from tests.unit.helpers import build, fragment_pool

CFG = ProxyConfig(hostname="node-1", cluster_cidrs=("10.244.0.0/16",))


def _state(nodes, node_port=None):
    svc = sc.service("web", "10.96.0.10", [sc.port(80, name="http", node_port=node_port)],
                     svc_type="NodePort" if node_port else "ClusterIP")
    svc["spec"]["internalTrafficPolicy"] = "Local"
    sl = sc.endpoint_slice("web", [f"10.244.1.{10 + i}" for i in range(len(nodes))], [sc.port(8080, name="http")])
    for ep, node in zip(sl["endpoints"], nodes):
        ep["nodeName"] = node
    return next(iter(build([svc, sl]).services.values()))


def test_policy_is_parsed_and_validated():
    svc = sc.service("web", "10.96.0.10", [sc.port(80)])
    svc["spec"]["internalTrafficPolicy"] = "Local"
    assert parse_service(svc)[0].internal_local
    svc["spec"]["internalTrafficPolicy"] = "Nearby"
    with pytest.raises(Invalid, match="internalTrafficPolicy"):
        parse_service(svc)


def test_nft_clusterip_goes_to_local_endpoints_only():
    frag = nft.render_service(CFG, _state(["node-1", "node-2", "node-1"], node_port=30080))
    target = frag.elements[("service-ips", "10.96.0.10 . tcp . 80")]
    assert target.startswith("goto local-")
    assert sorted(fragment_pool(frag, target[len("goto "):])) == ["10.244.1.10:8080", "10.244.1.12:8080"]
    # NodePort traffic still uses every endpoint.
    ext = frag.chains[frag.elements[("service-nodeports", "tcp . 30080")][len("goto "):]]
    assert len(fragment_pool(frag, ext[-1][len("goto "):])) == 3


def test_nft_no_local_endpoint_drops_instead_of_rejecting():
    frag = nft.render_service(CFG, _state(["node-2"]))
    assert frag.elements == {("no-endpoint-services", "10.96.0.10 . tcp . 80"): "drop",
                             ("cluster-ips", "10.96.0.10"): ""}


def test_iptables_svl_chain_and_drop():
    frag = ipt.render_service(CFG, _state(["node-1", "node-2"]))
    jump = frag.top_rules[("nat", ipt.SERVICES)][0]
    assert "-j PYPROXY-SVL-" in jump
    svl = frag.chains[("nat", jump.split("-j ")[-1])]
    assert sum("-j PYPROXY-SEP-" in r for r in svl) == 1
    none = ipt.render_service(CFG, _state(["node-2"]))
    assert none.top_rules[("filter", ipt.SERVICES)][0].endswith("-j DROP")
    assert "has no local endpoints" in none.top_rules[("filter", ipt.SERVICES)][0]


def test_explain_follows_the_same_decisions():
    from pyproxy.explain import explain
    from pyproxy.model.objects import DesiredState

    sps = _state(["node-1", "node-2"])
    state = DesiredState(services={sps.service.name: sps})
    e = explain(state, CFG, dst="10.96.0.10", port=80, proto="tcp", src="10.244.1.5")
    assert e.verdict == "dnat" and [c[0] for c in e.candidates] == ["10.244.1.10:8080"]
    assert not e.masquerade and e.chains[0].startswith("local-")
    outside = explain(state, CFG, dst="10.96.0.10", port=80, proto="tcp", src="192.168.1.1")
    assert outside.masquerade and "cluster-cidr" in outside.masquerade_why
    sps = _state(["node-2"])
    dropped = explain(DesiredState(services={sps.service.name: sps}), CFG, dst="10.96.0.10", port=80, proto="tcp")
    assert dropped.verdict == "drop"
    assert explain(state, CFG, dst="10.96.0.10", port=81, proto="tcp").verdict == "reject"  # nft mode
    assert explain(state, CFG, dst="10.1.2.3", port=80, proto="tcp").verdict == "pass"


@pytest.mark.parametrize("policy", ["internal", "external"])
def test_local_fallback_uses_serving_terminating_endpoints_never_non_serving(policy: str):
    """Hardening issue, item 14: with no ready local endpoint, a Local policy falls back to the
    local endpoints that are terminating but still serving, and never to those that stopped
    serving (upstream's CategorizeEndpoints), in both renderers."""
    svc = sc.service("web", "10.96.0.10", [sc.port(80, name="http", node_port=30080)], svc_type="NodePort")
    if policy == "internal":
        svc["spec"]["internalTrafficPolicy"] = "Local"
    else:
        svc["spec"]["externalTrafficPolicy"] = "Local"
    ips = ["10.244.1.10", "10.244.1.11", "10.244.1.12"]
    sl = sc.endpoint_slice("web", ips, [sc.port(8080, name="http")])
    conds = [{"ready": False, "serving": True, "terminating": True},   # local, still serving
             {"ready": False, "serving": False, "terminating": True},  # local, stopped serving
             {"ready": True}]                                          # ready, on another node
    for ep, cond, node in zip(sl["endpoints"], conds, ["node-1", "node-1", "node-2"]):
        ep["conditions"], ep["nodeName"] = cond, node
    state = next(iter(build([svc, sl]).services.values()))
    assert [e.ip for e in state.local_endpoints("node-1")] == ["10.244.1.10"]
    frag = nft.render_service(CFG, state)
    local = next(c for c in frag.chains if c.startswith("local-"))
    assert fragment_pool(frag, local) == ["10.244.1.10:8080"]
    ipt_text = "\n".join(r for rules in ipt.render_service(CFG, state).chains.values() for r in rules)
    assert "10.244.1.10:8080" in ipt_text and "10.244.1.11" not in ipt_text
