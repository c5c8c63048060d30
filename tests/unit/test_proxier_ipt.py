"""IptProxier against FakeIptables: full and partial restores, stale chains, hook jumps."""

from __future__ import annotations

import copy

import pytest

from pyproxy.config import ProxyConfig
from pyproxy.ipt.executor import FakeIptables
from pyproxy.ipt.restore import RestorePayload
from pyproxy.model.objects import DesiredState, ServicePortName
from pyproxy.model.state import StateBuilder
from pyproxy.proxier.base import SyncFailed
from pyproxy.proxier.iptables import IptProxier
from pyproxy.render import iptables as r
from pyproxy.render.naming import ipt_service_hash
from tests import scenario as sc
from tests.unit.helpers import build, many_services

CFG = ProxyConfig(mode="iptables", cluster_cidrs=("10.244.0.0/16",))
TCP = [sc.port(8080, name="http")]
WEB = ServicePortName("test", "web", "http", "tcp")
WEB_SVC = f"PYPROXY-SVC-{ipt_service_hash(WEB)}"
TOP = set(r.TOP_CHAINS)


def _proxier(config: ProxyConfig = CFG) -> tuple[IptProxier, FakeIptables]:
    fake = FakeIptables()
    return IptProxier(config=config, executor=fake), fake


def _fresh_chains(state: DesiredState, config: ProxyConfig = CFG):
    proxier, fake = _proxier(config)
    assert proxier.sync(state).full
    return fake.chains


def _web(ips=("10.244.1.1", "10.244.1.2"), **kw):
    return [sc.service("web", "10.96.0.10", [sc.port(80, name="http", node_port=kw.get("node_port"))],
                       affinity_timeout=kw.get("affinity"),
                       svc_type="NodePort" if kw.get("node_port") else "ClusterIP"),
            sc.endpoint_slice("web", list(ips), TCP, conditions=kw.get("conditions"))]


def _other():
    return [sc.service("other", "10.96.0.11", [sc.port(53, name="dns", protocol="UDP")]),
            sc.endpoint_slice("other", ["10.244.2.1"], [sc.port(5353, name="dns", protocol="UDP")])]


def _chains_of(fake: FakeIptables, table: str = "nat") -> set[str]:
    return {c for t, c in fake.chains if t == table}


def test_first_sync_is_full_and_programs_everything():
    proxier, fake = _proxier()
    result = proxier.sync(build([*_web(), *_other()], nodeport_ips=("192.168.1.1",)))
    assert result.full and result.changed_services == 2 and result.operations > 0
    assert TOP <= set(fake.chains)
    assert ("nat", WEB_SVC) in fake.chains
    assert sum(c.startswith("PYPROXY-SEP-") for c in _chains_of(fake)) == 3
    assert result.operations == fake.payloads[0].lines()
    assert proxier.needs_full is False


def test_hook_jumps_are_ensured_on_the_full_sync():
    proxier, fake = _proxier()
    proxier.sync(build(_web()))
    assert sorted(fake.jumps) == sorted(r.HOOK_JUMPS)
    fake.jumps.clear()
    proxier.sync(build(_web(("10.244.1.9",))))  # partial: the jumps are not re-checked
    assert fake.jumps == []
    proxier.needs_full = True
    proxier.sync(build(_web(("10.244.1.9",))))
    assert sorted(fake.jumps) == sorted(r.HOOK_JUMPS)


def test_identical_resync_sends_nothing():
    proxier, fake = _proxier()
    objs = [*_web(), *_other()]
    proxier.sync(build(objs))
    result = proxier.sync(build(copy.deepcopy(objs)))
    assert (result.full, result.operations, result.changed_services) == (False, 0, 0)
    assert len(fake.payloads) == 1


def test_partial_sync_rewrites_only_the_changed_service():
    proxier, fake = _proxier()
    builder = StateBuilder(node_name="node-1")
    objs = many_services(200)
    builder.replace_all(objs)
    proxier.sync(builder.build())
    before = dict(fake.chains)
    # svc-7 gets a new endpoint.
    objs2 = copy.deepcopy(objs)
    sl = next(o for o in objs2 if o["metadata"]["name"] == "svc-7-a")
    sl["endpoints"][1]["addresses"] = ["10.200.0.1"]
    builder.replace_all(objs2)
    state = builder.build()
    result = proxier.sync(state)
    assert not result.full and result.changed_services == 1
    payload = fake.payloads[-1]
    svc7 = ServicePortName("test", "svc-7", "http", "tcp")
    svc7_chain = ("nat", f"PYPROXY-SVC-{ipt_service_hash(svc7)}")
    new_seps = {k for k in fake.chains if k not in before}
    old_seps = {k for k in before if k not in fake.chains}
    assert len(new_seps) == 1 and len(old_seps) == 1
    assert set(payload.rewrite) <= {svc7_chain} | new_seps | TOP
    assert svc7_chain in payload.rewrite and new_seps <= set(payload.rewrite)
    assert payload.delete == old_seps
    assert result.operations == payload.lines() < 20
    assert fake.chains == _fresh_chains(state)


def test_deleted_service_chains_are_in_payload_delete():
    proxier, fake = _proxier()
    proxier.sync(build([*_web(node_port=30080, affinity=10), *_other()]))
    state = build(_other())
    web_chains = set(fake.chains) - set(_fresh_chains(state))
    # SVC, EXT and two SEP chains of web.
    assert {c.rsplit("-", 1)[0] for _, c in web_chains} == {"PYPROXY-SVC", "PYPROXY-EXT", "PYPROXY-SEP"}
    assert len(web_chains) == 4 and ("nat", WEB_SVC) in web_chains
    result = proxier.sync(state)
    payload = fake.payloads[-1]
    assert not result.full and result.changed_services == 1
    assert payload.delete == web_chains
    assert not set(payload.rewrite) - TOP  # the other service's chains are not rewritten
    assert ("nat", "PYPROXY-SERVICES") in payload.rewrite  # the jump to web's chain is gone
    assert fake.chains == _fresh_chains(state)


TRANSITIONS = {
    "add-endpoint": (_web(), _web(("10.244.1.1", "10.244.1.2", "10.244.1.3"))),
    "remove-endpoint": (_web(), _web(("10.244.1.1",))),
    "endpoints-to-none": (_web(node_port=30080), _web((), node_port=30080)),
    "none-to-endpoints": (_web((), node_port=30080), _web(node_port=30080)),
    "add-nodeport": (_web(), _web(node_port=30080)),
    "remove-nodeport": (_web(node_port=30080), _web()),
    "add-affinity": (_web(), _web(affinity=60)),
    "remove-affinity": (_web(affinity=60), _web()),
    "change-affinity-timeout": (_web(affinity=60), _web(affinity=120)),
    "delete-service": (_web() + _other(), _other()),
    "delete-all": (_web() + _other(), []),
    "add-service": (_other(), _web() + _other()),
    "multi-port-delete": ([sc.service("m", "10.96.0.20", [sc.port(80, name="a"), sc.port(81, name="b")]),
                           sc.endpoint_slice("m", ["10.244.3.1"], [sc.port(80, name="a"), sc.port(81, name="b")]),
                           *_other()], _other()),
}


@pytest.mark.parametrize(("before", "after"), TRANSITIONS.values(), ids=TRANSITIONS.keys())
def test_incremental_sync_matches_a_fresh_full_sync(before, after):
    proxier, fake = _proxier()
    proxier.sync(build(before))
    state = build(after)
    result = proxier.sync(state)
    assert not result.full and result.operations > 0
    assert fake.chains == _fresh_chains(state)


def test_nodeport_ips_change_rewrites_only_the_nodeport_dispatch():
    proxier, fake = _proxier()
    proxier.sync(build(_web(node_port=30080), nodeport_ips=("192.168.1.1",)))
    result = proxier.sync(build(_web(node_port=30080), nodeport_ips=("192.168.1.2",)))
    assert not result.full and result.changed_services == 0
    # The DNAT dispatch (nat) and the reject/drop dispatch (filter) follow the addresses.
    assert set(fake.payloads[-1].rewrite) == {("nat", "PYPROXY-SERVICES"), ("filter", "PYPROXY-EXTERNAL-SERVICES")}
    assert fake.chains[("nat", "PYPROXY-SERVICES")][-1].endswith("-d 192.168.1.2/32 -j PYPROXY-NODEPORTS")
    assert fake.chains[("filter", "PYPROXY-EXTERNAL-SERVICES")][-1].endswith("-d 192.168.1.2/32 -j PYPROXY-NODEPORTS")


def test_full_sync_deletes_stale_chains():
    proxier, fake = _proxier()
    stale = ("nat", "PYPROXY-SVC-STALESTALESTALE1")
    foreign = ("nat", "KUBE-SVC-NOTOURS")
    fake.chains[stale] = ["-j RETURN"]
    fake.chains[foreign] = ["-j RETURN"]
    fake.chains[("filter", "PYPROXY-SEP-OLD")] = []
    proxier.sync(build(_web()))
    payload = fake.payloads[-1]
    assert payload.delete == {stale, ("filter", "PYPROXY-SEP-OLD")}
    assert stale not in fake.chains and ("filter", "PYPROXY-SEP-OLD") not in fake.chains
    assert fake.chains[foreign] == ["-j RETURN"]  # not ours: untouched


def test_partial_sync_after_full_does_not_resurrect_deleted_chains():
    proxier, fake = _proxier()
    fake.chains[("nat", "PYPROXY-SVC-STALE")] = []
    proxier.sync(build(_web()))
    proxier.sync(build(_web(("10.244.1.1",))))
    assert ("nat", "PYPROXY-SVC-STALE") not in fake.chains


def test_failed_restore_raises_and_forces_full():
    proxier, fake = _proxier()
    proxier.sync(build(_web()))
    before = dict(fake.chains)
    fake.fail_next = "boom"
    state = build(_web(("10.244.1.5",)))
    with pytest.raises(SyncFailed, match="boom"):
        proxier.sync(state)
    assert proxier.needs_full and fake.chains == before
    result = proxier.sync(state)
    assert result.full and not proxier.needs_full
    assert fake.chains == _fresh_chains(state)
    assert proxier.sync(state).operations == 0


def test_failed_first_sync_is_retried_as_full():
    proxier, fake = _proxier()
    fake.fail_next = "no iptables"
    state = build(_web())
    with pytest.raises(SyncFailed):
        proxier.sync(state)
    assert fake.chains == {} and fake.jumps == []
    assert proxier.sync(state).full
    assert sorted(fake.jumps) == sorted(r.HOOK_JUMPS)


def test_cleanup_removes_chains_and_jumps():
    proxier, fake = _proxier()
    proxier.sync(build([*_web(), *_other()]))
    fake.chains[("nat", "KUBE-OTHER")] = []
    assert proxier.cleanup() is True
    assert fake.chains == {("nat", "KUBE-OTHER"): []}
    assert fake.jumps == []
    assert proxier.needs_full
    assert proxier.cleanup() is False


def test_render_text_changes_nothing():
    proxier, fake = _proxier()
    text = proxier.render_text(build(_web()))
    assert fake.payloads == [] and fake.chains == {}
    assert f":{WEB_SVC} - [0:0]" in text


def test_fake_iptables_refuses_a_jump_to_a_missing_chain():
    fake = FakeIptables()
    payload = RestorePayload(rewrite={("nat", "PYPROXY-SERVICES"): ("-j PYPROXY-SVC-MISSING",)})
    with pytest.raises(Exception, match="missing chain"):
        fake.restore(payload)
    assert fake.chains == {}


def test_restore_payload_render_and_lines():
    payload = RestorePayload(
        rewrite={("nat", "PYPROXY-B"): ("-j RETURN",), ("nat", "PYPROXY-A"): ("-j ACCEPT", "-j RETURN"),
                 ("filter", "PYPROXY-F"): ()},
        delete={("nat", "PYPROXY-OLD")},
    )
    assert payload.render().splitlines() == [
        "*filter", ":PYPROXY-F - [0:0]", "COMMIT",
        "*nat", ":PYPROXY-A - [0:0]", ":PYPROXY-B - [0:0]", ":PYPROXY-OLD - [0:0]",
        "-A PYPROXY-A -j ACCEPT", "-A PYPROXY-A -j RETURN", "-A PYPROXY-B -j RETURN",
        "-X PYPROXY-OLD", "COMMIT",
    ]
    # A declaration line per rewritten chain plus its rules; two lines per deleted chain.
    assert payload.lines() == (1 + 1) + (1 + 2) + (1 + 0) + 2
    assert not RestorePayload() and RestorePayload().render() == ""


def test_a_rule_with_a_line_break_is_never_sent():
    """Defence in depth behind the parser: a payload line that would start a command of its
    own (``-I INPUT 1 -j ACCEPT``, ``COMMIT``) is refused whole, by the real executor as by
    the fake, and render refuses to print it."""
    from pyproxy.ipt.executor import IptablesCli, IptablesError
    from pyproxy.ipt.restore import RestorePayload
    from tests.unit.helpers import sps

    bad = RestorePayload(rewrite={("nat", "PYPROXY-SVC-X"): ("-j ACCEPT\n-I INPUT 1 -j ACCEPT",)})
    with pytest.raises(IptablesError, match="line break"):
        FakeIptables().restore(bad)
    calls: list[object] = []
    cli = IptablesCli(backend="nft")
    cli._run = lambda *a, **k: calls.append(a)  # type: ignore[method-assign]
    with pytest.raises(IptablesError, match="line break"):
        cli.restore(bad)
    assert calls == []  # nothing reached iptables-restore
    # And the renderer writes names only through comments, which cannot hold a line break.
    state = DesiredState(services={s.service.name: s for s in (sps(["10.244.0.5"], name="x\nCOMMIT"),)})
    text = IptProxier(config=ProxyConfig(), executor=FakeIptables()).render_text(state)
    assert "test/x?COMMIT:http" in text
    assert text.count("\nCOMMIT\n") == 2  # the filter and nat tables' own
