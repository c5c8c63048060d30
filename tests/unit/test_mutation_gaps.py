"""Tests written after a mutation pass over pyproxy/model, pyproxy/render and pyproxy/sources
(mutmut, unit tier): each kills plausible bugs that survived every earlier unit test.
The README's Testing section has the numbers."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from pyproxy.config import ProxyConfig
from pyproxy.model import parse as parse_mod
from pyproxy.model.objects import DesiredState, ServicePortName
from pyproxy.model.parse import Invalid, parse_service, parse_slice
from pyproxy.model.state import StateBuilder
from pyproxy.render import iptables as ipt
from pyproxy.render import nftables as nft
from pyproxy.render import userspace as us
from pyproxy.render.naming import ipt_service_hash
from pyproxy.render.naming import NFT_COMMENT_MAX, NFT_NAME_MAX, _truncate, nft_comment
from pyproxy.sources import file as file_source
from tests import scenario as sc
from tests.unit.helpers import build, sps
from tests.unit.test_reflector import SVC_PATH, Backoff, FakeApi, Recorder, Reply, backoff, page, svc, until

CFG = ProxyConfig(hostname="node-1", cluster_cidrs=("10.244.0.0/16",))


# -- parse: boundaries ---------------------------------------------------------------------------

@pytest.mark.parametrize(("port", "ok"), [(0, False), (1, True), (65535, True), (65536, False)])
def test_port_boundaries(port: int, ok: bool):
    svc = sc.service("web", "10.96.0.10", [sc.port(port, name="http")])
    if ok:
        assert parse_service(svc)[0].port == port
    else:
        with pytest.raises(Invalid, match="1-65535"):
            parse_service(svc)


def test_a_63_character_zone_is_a_valid_label_value_and_node_hints_are_node_names():
    sl = sc.endpoint_slice("web", ["10.244.0.5"], [sc.port(8080, name="http")])
    sl["endpoints"][0]["zone"] = "z" * 63
    assert parse_slice(sl).endpoints[0].zone == "z" * 63
    sl["endpoints"][0]["hints"] = {"forNodes": [{"name": "Node_1"}]}  # a label value, not a node name
    with pytest.raises(Invalid, match="forNodes.*DNS-1123 subdomain"):
        parse_slice(sl)


# -- the store ------------------------------------------------------------------------------------

def _svc(name: str, ip: str, ports: list[int], ep: str = "10.244.1.1") -> list[dict[str, Any]]:
    return [sc.service(name, ip, [sc.port(p, name=f"p{p}") for p in ports]),
            sc.endpoint_slice(name, [ep], [sc.port(8080, name=f"p{p}") for p in ports])]


def _names(state: DesiredState) -> list[str]:
    return sorted({k.name for k in state.services})


def test_a_conflict_does_not_stop_the_claims_of_the_services_after_it():
    b = StateBuilder(node_name="node-1")
    b.replace_all([*_svc("a", "10.96.0.10", [80]), *_svc("b", "10.96.0.10", [80]),
                   *_svc("c", "10.96.0.11", [80]), *_svc("d", "10.96.0.11", [80])])
    state = b.build()
    assert _names(state) == ["a", "c"]
    # c and d, processed after the conflict of b: c still claimed its port, so d is refused.
    assert sorted(p.name for p in state.problems) == ["b", "d"]


def test_an_owner_that_drops_a_port_releases_it_and_keeps_the_others():
    b = StateBuilder(node_name="node-1")
    b.replace_all([*_svc("a", "10.96.0.10", [80, 81]), *_svc("b", "10.96.0.10", [81])])
    assert _names(b.build()) == ["a"]
    b.replace_all([*_svc("a", "10.96.0.10", [80]), *_svc("b", "10.96.0.10", [81]),
                   *_svc("c", "10.96.0.10", [80])])
    state = b.build()
    assert _names(state) == ["a", "b"]  # b gets 81 once a lets go; a keeps 80 against c
    assert [p.name for p in state.problems] == ["c"]


def test_unchanged_services_do_not_hide_changed_ones():
    """Twenty Services touched but merging the same, twenty with a new endpoint, in one build:
    whatever order the set of touched Services comes in, every change is merged."""
    b = StateBuilder(node_name="node-1")
    objs = [o for i in range(40) for o in _svc(f"s{i}", f"10.96.0.{i + 1}", [80])]
    b.replace_all(objs)
    b.build()
    changed = copy.deepcopy(objs)
    for i in range(40):
        if i % 2:
            changed[2 * i]["metadata"]["labels"] = {"touched": "yes"}  # re-parsed, merges the same
        else:
            changed[2 * i + 1]["endpoints"][0]["addresses"] = [f"10.244.9.{i + 1}"]
    b.replace_all(changed)
    state = b.build()
    for i in range(0, 40, 2):
        (ep,) = state.services[ServicePortName("test", f"s{i}", "p80", "tcp")].endpoints
        assert ep.ip == f"10.244.9.{i + 1}"


def test_an_owner_named_last_keeps_what_it_still_wants_and_frees_the_rest_when_deleted():
    """The owner sorts after the newcomer, so it must not even briefly drop the claims it keeps;
    and once deleted it must free every claim it held."""
    b = StateBuilder(node_name="node-1")
    b.replace_all(_svc("zeta", "10.96.0.10", [80, 81]))
    b.build()  # zeta owns both ports before beta arrives
    b.replace_all([*_svc("zeta", "10.96.0.10", [80, 81]), *_svc("beta", "10.96.0.10", [81])])
    assert _names(b.build()) == ["zeta"]
    b.replace_all([*_svc("zeta", "10.96.0.10", [80]), *_svc("beta", "10.96.0.10", [81]),
                   *_svc("alpha", "10.96.0.10", [80])])
    state = b.build()
    assert _names(state) == ["beta", "zeta"] and [p.name for p in state.problems] == ["alpha"]
    b.replace_all([*_svc("beta", "10.96.0.10", [81]), *_svc("alpha", "10.96.0.10", [80])])
    state = b.build()
    assert _names(state) == ["alpha", "beta"] and state.problems == ()


def test_an_unchanged_object_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch):
    calls = []
    real = parse_mod.parse_service
    monkeypatch.setattr("pyproxy.model.store.parse_service", lambda obj, **kw: calls.append(1) or real(obj, **kw))
    b = StateBuilder(node_name="node-1")
    objs = _svc("a", "10.96.0.10", [80])
    b.replace_all(objs)
    b.replace_all(copy.deepcopy(objs))
    assert len(calls) == 1


def test_another_nodes_deletion_does_not_forget_ours():
    b = StateBuilder(node_name="node-1")
    b.replace_all([sc.node("node-1", ["192.168.1.1"])])
    b.delete_object(sc.node("node-2", ["192.168.1.2"]))
    assert b.node is not None and b.node.addresses == ("192.168.1.1",)
    b.delete_object(sc.node("node-1", ["192.168.1.1"]))
    assert b.node is None


def test_our_node_followed_by_another_nodes_object_in_a_file_is_kept():
    b = StateBuilder(node_name="node-1")
    b.replace_all([sc.node("node-1", ["192.168.1.1"]), sc.node("node-2", ["192.168.1.2"])])
    assert b.node is not None and b.node.name == "node-1"


def test_node_hints_reach_the_merged_endpoints():
    sl = sc.endpoint_slice("web", ["10.244.0.5", "10.244.0.6"], [sc.port(8080, name="http")])
    sl["endpoints"][0]["hints"] = {"forNodes": [{"name": "node-1"}]}
    sl["endpoints"][1]["hints"] = {"forNodes": [{"name": "node-2"}]}
    state = build([sc.service("web", "10.96.0.10", [sc.port(80, name="http")]), sl])
    (st,) = state.services.values()
    assert st.topology_mode == "PreferSameNode"
    assert [e.ip for e in st.usable_endpoints] == ["10.244.0.5"]


# -- renderers ------------------------------------------------------------------------------------

def test_names_and_comments_are_cut_only_beyond_the_limit():
    assert _truncate("x" * NFT_NAME_MAX) == "x" * NFT_NAME_MAX
    assert len(_truncate("x" * (NFT_NAME_MAX + 1))) == NFT_NAME_MAX
    assert nft_comment("y" * NFT_COMMENT_MAX) == f'comment "{"y" * NFT_COMMENT_MAX}"'
    cut = nft_comment("y" * (NFT_COMMENT_MAX + 1))
    assert len(cut) == len('comment ""') + NFT_COMMENT_MAX and cut.endswith('..."')


def test_iptables_affinity_keeps_the_masquerade_rule_first():
    st = sps(["10.244.1.1", "10.244.1.2"], affinity=60)
    chain = ipt.render_service(CFG, st).chains[("nat", f"PYPROXY-SVC-{ipt_service_hash(st.service.name)}")]
    assert chain[0].endswith("! -s 10.244.0.0/16 -j PYPROXY-MARK-MASQ")
    assert sum("--rcheck" in r for r in chain) == 2


def test_iptables_source_ranges_apply_to_lb_ips_only():
    from tests.unit.test_external import lb_state

    st = lb_state(ranges=["203.0.113.0/24"], external_ips=["192.168.60.30"])
    top = ipt.render_service(ProxyConfig(mode="iptables", hostname="node-1"), st).top_rules[("nat", ipt.SERVICES)]
    ext_rule = next(r for r in top if "192.168.60.30" in r)
    lb_rule = next(r for r in top if "192.168.60.20" in r)
    assert "-j PYPROXY-EXT-" in ext_rule and "-j PYPROXY-FW-" in lb_rule


@pytest.mark.parametrize(("cidrs", "chain"), [(("10.244.0.0/16",), False), (("10.244.0.0/16", "10.245.0.0/16"), True)])
def test_iptables_masq_non_pod_chain_only_for_several_cluster_cidrs(cidrs: tuple[str, ...], chain: bool):
    base = ipt.render_base(ProxyConfig(cluster_cidrs=cidrs), DesiredState())
    assert (("nat", ipt.MASQ_NON_POD) in base.chains) is chain


def test_nft_cluster_policy_nodeport_has_no_drop_elements():
    st = sps(["10.244.1.1"], node_port=30080)
    frag = nft.render_service(CFG, st)
    assert not any(key[0].startswith("no-endpoint") for key in frag.elements), frag.elements


def test_userspace_render_redirects_only_with_a_relay_and_endpoints():
    st = sps(["10.244.1.1"], node_port=30080)
    frag = us.render_service(st, 36000)
    (chain, rules), = frag.chains.items()
    assert chain.startswith("redirect-") and rules[0].startswith("meta l4proto tcp redirect to :36000")
    assert frag.elements == {("service-ips", "10.96.0.10 . tcp . 80"): f"goto {chain}",
                             ("service-nodeports", "tcp . 30080"): f"goto {chain}",
                             ("cluster-ips", "10.96.0.10"): ""}
    for frag in (us.render_service(st, None), us.render_service(sps([], node_port=30080), 36000)):
        assert frag.chains == {}
        assert frag.elements == {("no-endpoint-services", "10.96.0.10 . tcp . 80"): "goto reject-chain",
                                 ("no-endpoint-nodeports", "tcp . 30080"): "goto reject-chain",
                                 ("cluster-ips", "10.96.0.10"): ""}
    guarded = us.guard_relays(nft.render_base(CFG, DesiredState()), (36000, 36001))
    assert guarded.chains["filter-input"][0].endswith("ct status ! dnat drop")
    assert {k for k in guarded.elements if k[0] == us.RELAY_PORTS} == {(us.RELAY_PORTS, "36000"), (us.RELAY_PORTS, "36001")}


# -- sources --------------------------------------------------------------------------------------

def test_only_lists_are_flattened():
    objs = list(file_source._flatten({"kind": "ConfigMap", "items": [{"kind": "Service"}]}, "f"))
    assert objs == [{"kind": "ConfigMap", "items": [{"kind": "Service"}]}]


def test_deep_block_nesting_counts_as_risky():
    depth = 600
    text = "".join(f"{' ' * k}k{k}:\n" for k in range(depth)) + " " * depth + "v: 1\n"
    assert "[" not in text and "{" not in text
    assert file_source._depth_bound(text) >= depth and file_source._risky(text)


def test_a_watch_that_ends_at_once_with_nothing_backs_off(backoff: Backoff) -> None:
    """A server or proxy that closes every watch at once must not be reconnected in a loop."""
    from pyproxy.sources import kube

    async def main() -> None:
        async with FakeApi() as api:
            api.add_list(SVC_PATH, page([svc("a")], rv="5"))
            api.add_watch(SVC_PATH, *[Reply(events=[]) for _ in range(4)])
            rec = Recorder()
            client = api.client()
            r = kube.Reflector(client, kube.SERVICES, on_replace=rec.on_replace, on_event=rec.on_event)
            task = asyncio.create_task(r.run())
            await until(lambda: len(backoff.delays) >= 3, "three backed-off reconnects")
            task.cancel()
            await client.close()

    asyncio.run(asyncio.wait_for(main(), 5))
    assert backoff.delays[:3] == [0.5, 1.0, 2.0]


__all__ = ["backoff"]  # the fixture, imported for the test above


@pytest.mark.parametrize("inline", [True, False], ids=["data", "files"])
def test_kubeconfig_ca_and_client_certificate_reach_a_server_that_requires_them(tmp_path: Any, inline: bool):
    """The TLS half of the kubeconfig loader: the CA (inline or as a file next to the
    kubeconfig) verifies the server, the client certificate and key (inline or as files)
    authenticate us to a server that refuses anyone without one."""
    import base64
    import json
    import ssl

    from pyproxy.sources.kube import KubeClient
    from tests.unit.test_reflector import _self_signed

    ca, key = _self_signed(tmp_path)  # one self-signed certificate: server, client and CA at once
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    server_ctx.load_cert_chain(ca, key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    b64 = lambda path: base64.b64encode(open(path, "rb").read()).decode()  # noqa: E731

    async def main() -> None:
        async with FakeApi(ssl_context=server_ctx) as api:
            cluster: dict[str, Any] = {"server": f"https://127.0.0.1:{api.server.port}"}
            user: dict[str, Any] = {}
            if inline:
                cluster["certificate-authority-data"] = b64(ca)
                user = {"client-certificate-data": b64(ca), "client-key-data": b64(key)}
            else:
                cluster["certificate-authority"] = "ca.crt"  # relative: next to the kubeconfig
                user = {"client-certificate": "ca.crt", "client-key": "server.key"}
            cfg = tmp_path / "kubeconfig"
            cfg.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "t",
                "clusters": [{"name": "c", "cluster": cluster}], "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}]}))
            api.add_list(SVC_PATH, page([svc("a")], rv="1"))
            client = await KubeClient.from_config(kubeconfig=str(cfg))
            try:
                got = await client.get(SVC_PATH, {})
            finally:
                await client.close()
            assert [i["metadata"]["name"] for i in got["items"]] == ["a"]

    asyncio.run(asyncio.wait_for(main(), 10))


def test_kubeconfig_user_and_cluster_are_picked_by_name_and_basic_auth_works(tmp_path: Any):
    import base64
    import json

    from pyproxy.sources.credentials import from_kubeconfig

    cfg = tmp_path / "kubeconfig"
    cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "second",
        "clusters": [{"name": "one", "cluster": {"server": "http://10.0.0.1"}}, "junk",
                     {"name": "two", "cluster": {"server": "http://10.0.0.2"}}],
        "users": [{"name": "u1", "user": {"token": "t1"}}, {"name": "u2", "user": {"username": "me", "password": "pw"}}],
        "contexts": [{"name": "first", "context": {"cluster": "one", "user": "u1"}},
                     {"name": "second", "context": {"cluster": "two", "user": "u2"}}]}))
    creds = from_kubeconfig(str(cfg))
    assert creds is not None and creds.host == "http://10.0.0.2"
    assert creds.headers == {"Authorization": "Basic " + base64.b64encode(b"me:pw").decode()}


def test_an_owner_that_runs_into_a_conflict_lets_go_of_everything():
    """An excluded Service holds nothing: the ports it had owned go to whoever wants them."""
    b = StateBuilder(node_name="node-1")
    b.replace_all([*_svc("a", "10.96.0.10", [80]), *_svc("b", "10.96.0.10", [82])])
    assert _names(b.build()) == ["a", "b"]
    b.replace_all([*_svc("a", "10.96.0.10", [80, 82]), *_svc("b", "10.96.0.10", [82])])
    state = b.build()
    assert _names(state) == ["b"]
    (problem,) = state.problems
    assert (problem.kind, problem.namespace, problem.name) == ("Service", "test", "a")
    assert problem.reason == "10.96.0.10 port 82/TCP is already used by Service test/b"
    b.replace_all([*_svc("a", "10.96.0.10", [80, 82]), *_svc("b", "10.96.0.10", [82]),
                   *_svc("c", "10.96.0.10", [80])])
    assert _names(b.build()) == ["b", "c"]  # a, excluded, no longer holds port 80
