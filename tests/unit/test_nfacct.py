"""The localhost NodePort packet counter: the nfacct codec and client (against a scripted
socket), the rule the iptables renderer adds, the proxier's handling of a kernel with or
without nfacct, and the metric as /metrics serves it. tests/netns/test_localhost_nodeports.py
counts real connections."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from pyproxy import metrics
from pyproxy.config import ProxyConfig
from pyproxy.health import metrics_app
from pyproxy.ipt import nfacct as na
from pyproxy.ipt.executor import FakeIptables, IptablesError
from pyproxy.ipt.restore import RestorePayload
from pyproxy.proxier.iptables import MATCH_PROBE, IptProxier
from pyproxy.render import iptables as r
from pyproxy.render.naming import ServiceChains
from tests import scenario as sc
from tests.unit.helpers import build, sps

NAME = "localhost_nps_accepted_pkts"
METRIC = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total"
LOCALHOST = ProxyConfig(mode="iptables", localhost_nodeports=True)
COUNTING = f"-m nfacct --nfacct-name {NAME}"


@pytest.fixture(autouse=True)
def _no_reader_left():
    """The metric is process-wide: no test leaves its reader to the next."""
    yield
    metrics.LOCALHOST_NODEPORTS_ACCEPTED.read_with(None)
    metrics.INVALID_DROPPED.read_with(None)


def _scrape() -> str:
    """What /metrics serves, through the HTTP handler the daemon runs."""
    async def main() -> str:
        async with TestServer(metrics_app("iptables"), host="127.0.0.1") as server:
            async with aiohttp.ClientSession() as session:
                async with session.get(server.make_url("/metrics")) as resp:
                    assert resp.status == 200
                    return await resp.text()
    return asyncio.run(main())


def _metric_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if METRIC in line]


# -- the codec ----------------------------------------------------------------------------

def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def test_a_new_request_is_the_kernels_nfacct_new_with_create_and_never_replace():
    data = na.request(na.NFNL_MSG_ACCT_NEW, NAME, seq=7)
    length, kind, flags, seq, port = struct.unpack_from("=IHHII", data)
    assert (length, kind, seq, port) == (len(data), 7 << 8 | 0, 7, 0)
    # NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE; NLM_F_REPLACE (0x100) would zero the counts,
    # NLM_F_EXCL (0x200) would turn "it exists" into an error.
    assert flags == 0x1 | 0x4 | 0x400
    assert data[16:20] == b"\0\0\0\0"  # nfgenmsg: AF_UNSPEC, version 0, resource 0
    assert data[20:] == _attr(1, NAME.encode() + b"\0")
    assert len(data) % 4 == 0


def test_a_get_request_asks_for_an_acknowledgement_only():
    data = na.request(na.NFNL_MSG_ACCT_GET, "x", seq=1)
    _, kind, flags, _, _ = struct.unpack_from("=IHHII", data)
    assert (kind, flags) == (7 << 8 | 1, 0x1 | 0x4)
    assert data[20:] == struct.pack("=HH", 6, 1) + b"x\0" + b"\0\0"


@pytest.mark.parametrize("name", ["", "x" * 32, "a\0b"])
def test_names_the_kernel_would_refuse_or_cut_are_refused(name):
    with pytest.raises(ValueError):
        na.request(na.NFNL_MSG_ACCT_NEW, name, seq=1)
    na.check_name("x" * 31)  # the longest the kernel keeps whole


def _answer(name: str, packets: int, nbytes: int, use: int | None = 1) -> bytes:
    """The payload of the kernel's answer to a GET (what an nfacct GET printed on this kernel:
    name, packets, bytes, use; counts big-endian)."""
    body = (b"\0\0\0\0" + _attr(1, name.encode() + b"\0") + _attr(2, struct.pack("!Q", packets))
            + _attr(3, struct.pack("!Q", nbytes)))
    return body + (_attr(4, struct.pack("!I", use)) if use is not None else b"")


def test_decode_reads_big_endian_counts_past_padding_and_unknown_attributes():
    payload = _answer("dummy-metric", 123, 54321) + _attr(8, b"\0" * 4)  # NFACCT_PAD
    assert na.decode(payload) == na.Counter("dummy-metric", 123, 54321, use=1)
    big = na.decode(_answer(NAME, 2**40 + 5, 2**63, use=None))
    assert (big.packets, big.bytes, big.use) == (2**40 + 5, 2**63, 0)


@pytest.mark.parametrize("payload", [
    b"\0\0\0\0" + _attr(1, b"x\0"),  # no counts
    b"\0\0\0\0" + _attr(2, struct.pack("!Q", 1)) + _attr(3, struct.pack("!Q", 1)),  # no name
    b"\0\0\0\0" + _attr(1, b"x\0") + _attr(2, b"\1\2") + _attr(3, struct.pack("!Q", 1)),  # short
])
def test_decode_refuses_what_is_not_an_object(payload):
    with pytest.raises(ValueError):
        na.decode(payload)


# -- the client, against a scripted socket -----------------------------------------------

class ScriptedSocket:
    """Answers each request with ``script(seq, kind)``: (type, seq, payload) messages."""

    def __init__(self, script):
        self.script = script
        self.sent: list[bytes] = []
        self.pending: list[bytes] = []
        self.closed = False

    def bind(self, _addr):
        pass

    def settimeout(self, _t):
        pass

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        _, kind, _, seq, _ = struct.unpack_from("=IHHII", data)
        for answer in self.script(seq, kind & 0xFF):
            if isinstance(answer, BaseException):
                self.pending.append(answer)  # type: ignore[arg-type]
                continue
            mtype, mseq, payload = answer
            self.pending.append(struct.pack("=IHHII", 16 + len(payload), mtype, 0, mseq, 0) + payload)
        return len(data)

    def recv(self, _size: int) -> bytes:
        item = self.pending.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.closed = True


def _ack(seq: int, code: int = 0):
    return 2, seq, struct.pack("=i", -code) + b"\0" * 16


def _client(monkeypatch, script) -> tuple[na.Nfacct, list[ScriptedSocket]]:
    made: list[ScriptedSocket] = []

    def socket_in(netns):
        assert netns == "node-ns"  # the client's namespace reaches the socket
        made.append(ScriptedSocket(script))
        return made[-1]

    monkeypatch.setattr(na, "socket_in", socket_in)
    return na.Nfacct(netns="node-ns"), made


def test_ensure_takes_ebusy_as_there_already(monkeypatch):
    objects: dict[str, int] = {}

    def kernel(seq, command):
        if command == na.NFNL_MSG_ACCT_NEW:
            code = errno.EBUSY if NAME in objects else 0
            objects.setdefault(NAME, 41)
            return [_ack(seq, code)]
        if NAME not in objects:
            return [_ack(seq, errno.ENOENT)]
        return [(7 << 8, seq, _answer(NAME, objects[NAME], 0)), _ack(seq)]

    client, made = _client(monkeypatch, kernel)
    assert client.get(NAME) is None
    client.ensure(NAME)
    client.ensure(NAME)  # EBUSY: exists, fine
    counter = client.get(NAME)
    assert counter is not None and counter.packets == 41
    assert len(made) == 1  # one socket, kept


def test_other_refusals_are_errors_and_late_answers_are_skipped(monkeypatch):
    def kernel(seq, command):
        if command == na.NFNL_MSG_ACCT_NEW:
            return [_ack(seq, errno.EPERM)]
        # An answer to an earlier request first (it timed out), then ours.
        return [(7 << 8, seq - 1, _answer(NAME, 1, 0)), _ack(seq - 1),
                (7 << 8, seq, _answer(NAME, 2, 0)), _ack(seq)]

    client, _ = _client(monkeypatch, kernel)
    with pytest.raises(na.NfacctError) as err:
        client.ensure(NAME)
    assert err.value.errno == errno.EPERM
    counter = client.get(NAME)
    assert counter is not None and counter.packets == 2


def test_a_timeout_is_an_error_and_the_next_request_gets_a_new_socket(monkeypatch):
    calls = []

    def kernel(seq, command):
        calls.append(seq)
        if len(calls) == 1:
            return [socket.timeout("timed out")]
        return [(7 << 8, seq, _answer(NAME, 3, 0)), _ack(seq)]

    client, made = _client(monkeypatch, kernel)
    with pytest.raises(na.NfacctError):
        client.get(NAME)
    assert made[0].closed
    counter = client.get(NAME)
    assert counter is not None and counter.packets == 3 and len(made) == 2


def test_an_acknowledged_get_without_an_object_is_an_error(monkeypatch):
    client, _ = _client(monkeypatch, lambda seq, command: [_ack(seq)])
    with pytest.raises(na.NfacctError):
        client.get(NAME)


def test_delete_is_the_kernels_del_true_false_or_busy(monkeypatch):
    """DEL (3) carries the name and asks for an acknowledgement: ENOENT is "none there",
    EBUSY (a rule still uses it) an error the caller decides about."""
    data = na.request(na.NFNL_MSG_ACCT_DEL, NAME, seq=5)
    _, kind, flags, _, _ = struct.unpack_from("=IHHII", data)
    assert (kind, flags) == (7 << 8 | 3, 0x1 | 0x4) and data[20:] == _attr(1, NAME.encode() + b"\0")
    objects = {NAME: 1}
    busy = {"busy"}

    def kernel(seq, command):
        assert command == na.NFNL_MSG_ACCT_DEL
        return [_ack(seq, errno.EBUSY if busy else 0 if objects.pop(NAME, None) else errno.ENOENT)]

    client, _ = _client(monkeypatch, kernel)
    with pytest.raises(na.NfacctError) as err:
        client.delete(NAME)
    assert err.value.errno == errno.EBUSY and objects
    busy.clear()
    assert client.delete(NAME) is True and not objects
    assert client.delete(NAME) is False


def test_cleanup_deletes_the_counter_unless_another_programs_rule_uses_it(caplog):
    from pyproxy.cleanup import _clean_nfacct

    fake = na.FakeNfacct(packets={NAME: 9, "ct_state_invalid_dropped_pkts": 3, "someone-elses": 1})
    assert _clean_nfacct(None, fake) == [f"nfacct object {NAME}", "nfacct object ct_state_invalid_dropped_pkts"]
    assert fake.packets == {"someone-elses": 1}
    assert _clean_nfacct(None, fake) == []  # idempotent
    fake = na.FakeNfacct(packets={NAME: 9}, in_use={NAME})
    with caplog.at_level("INFO", logger="pyproxy.cleanup"):
        assert _clean_nfacct(None, fake) == []
    assert fake.packets == {NAME: 9} and "another program's rule uses it" in caplog.text
    # a kernel without nfacct: nothing to remove, nothing to warn about
    caplog.clear()
    assert _clean_nfacct(None, na.FakeNfacct(fail=errno.EPROTONOSUPPORT)) == []
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# -- the rule ----------------------------------------------------------------------------

def _nodeports(cfg: ProxyConfig, st, counter: str | None = NAME) -> tuple[str, ...]:
    return r.render_service(cfg, st, localhost_counter=counter).top_rules.get(("nat", r.NODEPORTS), ())


def test_the_localhost_rule_counts_first_and_jumps_where_the_nodeport_rule_does():
    st = sps(["10.244.1.1"], node_port=30080)
    ext = ServiceChains(st.service.name, mode="iptables").external
    counted, plain = _nodeports(LOCALHOST, st)
    assert counted.endswith(f"-m tcp -p tcp -d 127.0.0.0/8 --dport 30080 {COUNTING} -j {ext}")
    assert plain.endswith(f"-m tcp -p tcp --dport 30080 -j {ext}")
    assert counted.split(" -m tcp")[0] == plain.split(" -m tcp")[0]  # the same comment
    udp = sps(["10.244.1.1"], node_port=30053, protocol="udp", port=53)
    assert "-m udp -p udp -d 127.0.0.0/8 --dport 30053 " + COUNTING in _nodeports(LOCALHOST, udp)[0]


@pytest.mark.parametrize("cfg", [
    ProxyConfig(mode="iptables"),  # localhost NodePorts off (the default)
    ProxyConfig(mode="iptables", localhost_nodeports=True, nodeport_addresses=("192.168.1.0/24",)),
    ProxyConfig(mode="iptables", localhost_nodeports=True, family=6),
])
def test_no_counting_rule_without_localhost_nodeports(cfg):
    rules = _nodeports(cfg, sps(["10.244.1.1"], node_port=30080))
    assert len(rules) == 1 and "nfacct" not in rules[0]


def test_no_counting_rule_without_the_object_a_nodeport_or_endpoints():
    assert len(_nodeports(LOCALHOST, sps(["10.244.1.1"], node_port=30080), counter=None)) == 1
    assert _nodeports(LOCALHOST, sps(["10.244.1.1"])) == ()
    assert _nodeports(LOCALHOST, sps([], node_port=30080)) == ()


# -- the proxier -------------------------------------------------------------------------

class KernelLikeIptables(FakeIptables):
    """FakeIptables that refuses the nfacct match as a kernel does: when the object does not
    exist in ``nfacct``, or always when ``has_match`` is False (no xt_nfacct)."""

    def __init__(self, nfacct: na.FakeNfacct, *, has_match: bool = True) -> None:
        super().__init__()
        self.nfacct = nfacct
        self.has_match = has_match

    def restore(self, payload: RestorePayload) -> None:
        for rules in payload.rewrite.values():
            for rule in rules:
                if "-m nfacct" not in rule:
                    continue
                if not self.has_match:
                    raise IptablesError("Couldn't load match `nfacct':No such file or directory")
                name = rule.split("--nfacct-name ")[1].split()[0]
                if name not in self.nfacct.packets:
                    raise IptablesError("RULE_APPEND failed (No such file or directory)")
        super().restore(payload)


def _objects(node_port: int = 30080):
    return [sc.service("web", "10.96.0.10", [sc.port(80, name="http", node_port=node_port)],
                       svc_type="NodePort"),
            sc.endpoint_slice("web", ["10.244.1.1"], [sc.port(8080, name="http")])]


def _counting_rules(fake: FakeIptables) -> list[str]:
    return [rule for rules in fake.chains.values() for rule in rules if "nfacct" in rule]


def test_the_object_is_made_before_the_rules_and_the_metric_reads_it():
    nfacct = na.FakeNfacct()
    fake = KernelLikeIptables(nfacct)
    proxier = IptProxier(config=LOCALHOST, executor=fake, nfacct=nfacct)
    assert proxier.sync(build(_objects(), nodeport_ips=("192.168.1.1",))).full
    assert nfacct.requests[0] == ("ensure", NAME) and NAME in nfacct.packets
    assert len(_counting_rules(fake)) == 1
    assert ("nat", MATCH_PROBE) not in fake.chains  # the match check leaves nothing behind
    nfacct.packets[NAME] = 7
    assert _metric_lines(_scrape()) == [
        f"# HELP {METRIC} Number of packets accepted on nodeports of loopback interface",
        f"# TYPE {METRIC} counter",
        f"{METRIC} 7.0",
    ]
    nfacct.packets[NAME] = 12  # read at each scrape, not at sync
    assert f"{METRIC} 12.0" in _metric_lines(_scrape())


def test_partial_syncs_keep_counting_new_nodeports():
    nfacct = na.FakeNfacct()
    fake = KernelLikeIptables(nfacct)
    proxier = IptProxier(config=LOCALHOST, executor=fake, nfacct=nfacct)
    proxier.sync(build([]))
    assert not _counting_rules(fake)  # no NodePort yet, the object made all the same
    assert NAME in nfacct.packets and f"{METRIC} 0.0" in _metric_lines(_scrape())
    assert not proxier.sync(build(_objects())).full
    assert len(_counting_rules(fake)) == 1
    assert [req for req in nfacct.requests if req[0] == "ensure"] == [("ensure", NAME)]  # full syncs only


def test_without_nfacct_the_rules_go_without_the_match_and_nothing_is_exported(caplog):
    nfacct = na.FakeNfacct(fail=errno.EPROTONOSUPPORT)
    fake = KernelLikeIptables(nfacct)
    proxier = IptProxier(config=LOCALHOST, executor=fake, nfacct=nfacct)
    with caplog.at_level(logging.WARNING, logger="pyproxy.iptables"):
        proxier.sync(build(_objects()))
        proxier.needs_full = True
        proxier.sync(build(_objects()))
    assert not _counting_rules(fake) and ("nat", r.NODEPORTS) in fake.chains
    assert nfacct.requests.count(("ensure", NAME)) == 2  # tried on each full sync
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nfnetlink_acct" in warnings[0] and METRIC in warnings[0]
    assert _metric_lines(_scrape()) == []


def test_without_the_match_the_rules_go_without_it_and_nothing_is_exported(caplog):
    nfacct = na.FakeNfacct()
    fake = KernelLikeIptables(nfacct, has_match=False)
    proxier = IptProxier(config=LOCALHOST, executor=fake, nfacct=nfacct)
    with caplog.at_level(logging.WARNING, logger="pyproxy.iptables"):
        result = proxier.sync(build(_objects()))
    assert result.full and not _counting_rules(fake) and ("nat", r.NODEPORTS) in fake.chains
    assert ("nat", MATCH_PROBE) not in fake.chains
    assert any("xt_nfacct" in rec.getMessage() for rec in caplog.records)
    assert _metric_lines(_scrape()) == []
    # Tried again on the next full sync: a kernel that gained the module counts from then on.
    fake.has_match = True
    proxier.needs_full = True
    proxier.sync(build(_objects()))
    assert len(_counting_rules(fake)) == 1 and f"{METRIC} 0.0" in _metric_lines(_scrape())


def test_nothing_is_made_or_exported_with_localhost_nodeports_off():
    nfacct = na.FakeNfacct()
    fake = KernelLikeIptables(nfacct)
    IptProxier(config=ProxyConfig(mode="iptables"), executor=fake, nfacct=nfacct).sync(build(_objects()))
    assert nfacct.requests == [] and not _counting_rules(fake)
    assert _metric_lines(_scrape()) == []


def test_the_other_familys_proxier_leaves_the_metric_alone():
    nfacct = na.FakeNfacct()
    v4 = IptProxier(config=LOCALHOST, executor=KernelLikeIptables(nfacct), nfacct=nfacct)
    v6 = IptProxier(config=ProxyConfig(mode="iptables", localhost_nodeports=True, family=6),
                    executor=FakeIptables(family=6))
    v4.sync(build(_objects()))
    v6.sync(build([]))
    v6.needs_full = True
    v6.sync(build([]))
    assert f"{METRIC} 0.0" in _metric_lines(_scrape())


def test_an_unreadable_counter_is_left_out_of_the_scrape():
    nfacct = na.FakeNfacct()
    proxier = IptProxier(config=LOCALHOST, executor=KernelLikeIptables(nfacct), nfacct=nfacct)
    proxier.sync(build(_objects()))
    nfacct.fail = errno.EIO
    text = _scrape()
    assert _metric_lines(text) == [] and "kubeproxy_sync_proxy_rules_duration_seconds" in text


def test_a_broken_reader_does_not_break_the_scrape():
    def broken() -> int:
        raise RuntimeError("bug")

    metrics.LOCALHOST_NODEPORTS_ACCEPTED.read_with(broken)
    text = _scrape()
    assert _metric_lines(text) == [] and "kubeproxy_sync_proxy_rules_duration_seconds" in text


def test_the_factory_gives_the_iptables_proxier_an_nfacct_client_of_its_namespace(monkeypatch):
    """A client for the localhost counter or the INVALID-drop counter; neither is wanted with
    localhost NodePorts off and conntrack liberal (no INVALID drop then, as upstream)."""
    from pyproxy import sysctls
    from pyproxy.factory import make_proxier

    read: list[tuple[str, str | None]] = []
    liberal = {"value": None}

    def fake_read(path, *, netns=None):
        read.append((path, netns))
        return liberal["value"]

    monkeypatch.setattr(sysctls, "read", fake_read)
    on = make_proxier(LOCALHOST, iptables_backend="nft", netns="pyproxy-unit-never-made")
    assert isinstance(on, IptProxier) and isinstance(on.nfacct, na.Nfacct) and on.drop_invalid
    assert on.nfacct.netns == "pyproxy-unit-never-made"
    assert read == [(sysctls.TCP_BE_LIBERAL, "pyproxy-unit-never-made")]  # the rules' namespace
    for value, drops in ((None, True), (0, True), (1, False)):
        liberal["value"] = value
        p = make_proxier(ProxyConfig(mode="iptables"), iptables_backend="nft", netns="pyproxy-unit-never-made")
        assert isinstance(p, IptProxier) and p.drop_invalid == drops
        assert (p.nfacct is not None) == drops


@pytest.mark.parametrize("flag, rules", [("--iptables-localhost-nodeports", 1), ("--no-iptables-localhost-nodeports", 0)])
def test_render_prints_the_counting_rule_a_sync_writes(flag, rules, capsys):
    """`pyproxy render` asks no kernel for the object: it shows the rules a sync writes on a
    kernel with nfacct (the counting rule when localhost NodePorts are on)."""
    from pathlib import Path

    from pyproxy.cli import main

    demo = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
    assert main(["render", "--source-file", str(demo), "--proxy-mode", "iptables", "--ip-families", "4", flag]) == 0
    out = capsys.readouterr().out
    counting = [line for line in out.splitlines() if f"--nfacct-name {NAME}" in line]
    assert len(counting) == rules, out
    if rules:
        assert f"-d 127.0.0.0/8 --dport 30080 -m nfacct --nfacct-name {NAME} -j PYPROXY-EXT-" in counting[0]


# -- INVALID drop -------------------------------------------------------------------------

INVALID_NAME = "ct_state_invalid_dropped_pkts"
INVALID_METRIC = "kubeproxy_iptables_ct_state_invalid_dropped_packets_total"
FORWARD = ("filter", "PYPROXY-FORWARD")


def test_invalid_packets_are_dropped_first_in_forward_and_counted_as_upstream():
    nfacct = na.FakeNfacct()
    fake = KernelLikeIptables(nfacct)
    proxier = IptProxier(config=ProxyConfig(mode="iptables"), executor=fake, nfacct=nfacct, drop_invalid=True)
    assert proxier.sync(build(_objects())).full
    assert fake.chains[FORWARD][0] == f"-m conntrack --ctstate INVALID -m nfacct --nfacct-name {INVALID_NAME} -j DROP"
    assert nfacct.requests[0] == ("ensure", INVALID_NAME) and NAME not in nfacct.packets
    nfacct.packets[INVALID_NAME] = 5
    lines = [line for line in _scrape().splitlines() if INVALID_METRIC in line]
    assert lines == [f"# HELP {INVALID_METRIC} packets dropped by iptables to work around conntrack problems",
                     f"# TYPE {INVALID_METRIC} counter", f"{INVALID_METRIC} 5.0"]
    assert _metric_lines(_scrape()) == []  # localhost NodePorts off: that one is not exported


def test_both_counters_with_localhost_nodeports_on():
    nfacct = na.FakeNfacct()
    fake = KernelLikeIptables(nfacct)
    IptProxier(config=LOCALHOST, executor=fake, nfacct=nfacct, drop_invalid=True).sync(build(_objects()))
    assert {NAME, INVALID_NAME} <= set(nfacct.packets) and len(_counting_rules(fake)) == 2
    text = _scrape()
    assert f"{METRIC} 0.0" in text and f"{INVALID_METRIC} 0.0" in text


def test_without_nfacct_invalid_packets_are_still_dropped_uncounted():
    nfacct = na.FakeNfacct(fail=errno.EPROTONOSUPPORT)
    fake = KernelLikeIptables(nfacct)
    IptProxier(config=ProxyConfig(mode="iptables"), executor=fake, nfacct=nfacct, drop_invalid=True).sync(build(_objects()))
    assert fake.chains[FORWARD][0] == "-m conntrack --ctstate INVALID -j DROP"
    assert INVALID_METRIC not in _scrape()


def test_liberal_conntrack_no_invalid_rule_no_counter():
    nfacct = na.FakeNfacct()
    fake = KernelLikeIptables(nfacct)
    IptProxier(config=ProxyConfig(mode="iptables"), executor=fake, nfacct=nfacct).sync(build(_objects()))
    assert not any("INVALID" in rule for rules in fake.chains.values() for rule in rules)
    assert nfacct.requests == [] and INVALID_METRIC not in _scrape()
