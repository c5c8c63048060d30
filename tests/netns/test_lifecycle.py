"""Bad input, cleanup, incremental syncs, failed applies, restarts and file watching,
each checked in the kernel and with real traffic, in every mode."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyproxy.config import ProxyConfig
from pyproxy.ipt.executor import IptablesCli
from lab.netns import Topology, ns_exec
from pyproxy.model.nodeports import nodeport_ips
from pyproxy.model.state import StateBuilder
from tests.nftlayout import canonical_listing
from pyproxy.nft.executor import NftCli
from pyproxy.proxier.base import SyncFailed
from pyproxy.proxier.iptables import IptProxier
from pyproxy.proxier.nftables import NftProxier
from pyproxy.render import nftables as nft_render
from tests import scenario as sc
from tests.netns.conftest import MODES, NODE, WEB_IP, Programmed, base_objects, mode_flags

pytestmark = pytest.mark.netns


def _kernel_rules(topo: Topology, mode: str) -> str:
    if mode in ("nftables", "userspace"):
        return ns_exec(topo.node_ns, ["nft", "list", "ruleset"]).stdout
    backend = mode.split("-", 1)[1]
    return ns_exec(topo.node_ns, [f"iptables-{backend}-save"]).stdout


def test_malformed_objects_are_skipped_and_the_rest_programmed(programmed: Programmed):
    topo = programmed.topo
    objects = base_objects(topo)
    bad_ip = sc.service("bad-ip", "10.96.0.300", [sc.port(80)])
    port_zero = sc.service("port-zero", "10.96.0.41", [sc.port(0)])
    bad_proto = sc.service("bad-proto", "10.96.0.42", [sc.port(80, protocol="ICMP")])
    no_spec = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "no-spec", "namespace": "test"}}
    dup_eps = sc.endpoint_slice("web", [topo.pods[0].ip, topo.pods[0].ip],
                                [sc.port(8080, name="http")], suffix="dup")
    big_port = sc.endpoint_slice("web", [topo.pods[1].ip], [sc.port(70000, name="http")], suffix="big")
    stderr = programmed.apply([bad_ip, *objects, port_zero, bad_proto, no_spec, dup_eps, big_port])
    for name in ("bad-ip", "port-zero", "bad-proto", "no-spec", "web-dup", "web-big"):
        assert f"test/{name}" in stderr, f"{name} not reported:\n{stderr}"
    assert "10.96.0.300" in stderr and "70000" in stderr
    probe = topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=30)
    assert probe.errors == {} and set(probe.pods) == {"pod0", "pod1", "pod2"}
    rules = _kernel_rules(topo, programmed.mode)
    for ip in ("10.96.0.41", "10.96.0.42"):
        assert ip not in rules


def test_cleanup_removes_ours_in_every_mode_and_nothing_else(programmed: Programmed):
    topo = programmed.topo
    node = topo.node_ns
    # Plant foreign rules: a table of someone else's and rules in the built-in chains.
    assert ns_exec(node, ["nft", "add", "table", "ip", "foreign"]).returncode == 0
    assert ns_exec(node, ["nft", "add", "chain", "ip", "foreign", "keep"]).returncode == 0
    assert ns_exec(node, ["nft", "add", "rule", "ip", "foreign", "keep", "ip", "saddr", "192.0.2.1", "drop"]).returncode == 0
    for backend in ("nft", "legacy"):
        assert ns_exec(node, [f"iptables-{backend}", "-A", "INPUT", "-s", "192.0.2.7", "-j", "DROP"]).returncode == 0
        assert ns_exec(node, [f"iptables-{backend}", "-t", "nat", "-N", "FOREIGN-CHAIN"]).returncode == 0
    try:
        assert topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=3).errors == {}
        first = topo.pyproxy("cleanup")
        assert first.returncode == 0, first.stderr
        again = topo.pyproxy("cleanup")  # idempotent
        assert again.returncode == 0 and "nothing of pyproxy" in again.stderr
        ruleset = ns_exec(node, ["nft", "list", "ruleset"]).stdout
        assert "pyproxy" not in ruleset.replace("foreign", "")
        assert "table ip foreign" in ruleset and "192.0.2.1" in ruleset
        for backend in ("nft", "legacy"):
            saved = ns_exec(node, [f"iptables-{backend}-save"]).stdout
            assert "PYPROXY" not in saved and "pyproxy" not in saved
            assert "-A INPUT -s 192.0.2.7/32 -j DROP" in saved
            assert ":FOREIGN-CHAIN" in saved
        # With the rules gone the ClusterIP no longer leads anywhere.
        assert topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=2, timeout=1).answers == []
    finally:
        ns_exec(node, ["nft", "delete", "table", "ip", "foreign"])
        for backend in ("nft", "legacy"):
            ns_exec(node, [f"iptables-{backend}", "-D", "INPUT", "-s", "192.0.2.7", "-j", "DROP"])
            ns_exec(node, [f"iptables-{backend}", "-t", "nat", "-X", "FOREIGN-CHAIN"])


def _proxier(topo: Topology, mode: str):
    config = ProxyConfig(mode=mode.split("-")[0], hostname=NODE, cluster_cidrs=(topo.cluster_cidr,))
    if mode == "nftables":
        return NftProxier(config=config, executor=NftCli(netns=topo.node_ns))
    return IptProxier(config=config, executor=IptablesCli(backend=mode.split("-", 1)[1], netns=topo.node_ns))


def _state(builder: StateBuilder, objects: list[dict], topo: Topology):
    builder.replace_all(objects)
    return builder.build(nodeport_ips=nodeport_ips(node=builder.node, interface_ips=(), cidrs=()))


@pytest.mark.parametrize("mode", MODES)
def test_incremental_sync_sends_only_the_change(topo: Topology, mode: str):
    assert topo.pyproxy("cleanup").returncode == 0
    proxier = _proxier(topo, mode)
    builder = StateBuilder(node_name=NODE)
    objects = base_objects(topo)
    try:
        full = proxier.sync(_state(builder, objects, topo))
        assert full.full
        assert proxier.sync(_state(builder, copy.deepcopy(objects), topo)).operations == 0
        # pod2 leaves the web service: one endpoint change.
        changed = copy.deepcopy(objects)
        web_slice = next(o for o in changed if o["metadata"]["name"] == "web-a")
        web_slice["endpoints"] = web_slice["endpoints"][:2]
        result = proxier.sync(_state(builder, changed, topo))
        assert not result.full and result.changed_services == 1
        if mode == "nftables":
            assert result.operations <= 20, result
        probe = topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=60)
        assert probe.errors == {} and set(probe.pods) == {"pod0", "pod1"}
        rules = _kernel_rules(topo, mode)
        pod2 = topo.pod("pod2").ip
        if mode == "nftables":
            # web's endpoints are map elements: the change went to the kernel as one netlink
            # batch (no nft process), and left no garbage; pod2 is gone from web's pool.
            assert proxier.executor.paths["netlink"] >= 1
            assert proxier.garbage == []
            listing = ns_exec(topo.node_ns, ["nft", "list", "table", "ip", "pyproxy"]).stdout
            blocks, orphans = canonical_listing(listing)
            assert orphans == []
            (web_chain,) = [b for b in blocks if b.startswith("chain service-") and "/web/tcp/" in b.split("\n")[0]]
            assert f"{pod2} . 8080" not in web_chain and f"{topo.pod('pod0').ip} . 8080" in web_chain
            # The sticky service (ClientIP affinity) keeps its chain per endpoint.
            assert f"sticky/tcp/http__{pod2}" in rules
        else:
            # The endpoint's chain is gone from the kernel, not just unreferenced.
            assert rules.count(f"--to-destination {pod2}:8080") == 2  # still in sticky and dns
    finally:
        assert topo.pyproxy("cleanup").returncode == 0


@pytest.mark.parametrize("mode", MODES)
def test_failed_apply_keeps_previous_rules_then_full_resync(topo: Topology, mode: str, monkeypatch):
    assert topo.pyproxy("cleanup").returncode == 0
    proxier = _proxier(topo, mode)
    builder = StateBuilder(node_name=NODE)
    objects = base_objects(topo)
    try:
        proxier.sync(_state(builder, objects, topo))
        broken = copy.deepcopy(objects)
        broken.append(sc.service("new", "10.96.0.50", [sc.port(80, name="http")]))
        broken.append(sc.endpoint_slice("new", [topo.pods[1].ip], [sc.port(8080, name="http")]))
        # Make the kernel refuse the next ruleset: a DNAT to a port the kernel cannot parse.
        if mode == "nftables":
            real = nft_render.render_service

            def bad(config, sps, **kw):
                frag = real(config, sps, **kw)
                if sps.service.name.name != "new":
                    return frag
                return type(frag)(chains={k: (*v, "dnat to nonsense") for k, v in frag.chains.items()},
                                  sets=frag.sets, elements=frag.elements)

            monkeypatch.setattr(nft_render, "render_service", bad)
        else:
            from pyproxy.render import iptables as ipt_render

            real_ipt = ipt_render.render_service

            def bad_ipt(config, sps, **kw):
                frag = real_ipt(config, sps, **kw)
                if sps.service.name.name != "new":
                    return frag
                return type(frag)(chains={k: (*v, "-j NO-SUCH-TARGET-X") for k, v in frag.chains.items()},
                                  top_rules=frag.top_rules)

            monkeypatch.setattr(ipt_render, "render_service", bad_ipt)
        before = _kernel_rules(topo, mode)
        with pytest.raises(SyncFailed, match="previous rules kept"):
            proxier.sync(_state(builder, broken, topo))
        assert proxier.needs_full
        assert _kernel_rules(topo, mode).replace(" ", "") .count("10.96.0.50") == 0
        assert len(_kernel_rules(topo, mode)) == pytest.approx(len(before), abs=200)  # counters may differ
        assert topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=10).errors == {}
        monkeypatch.undo()
        result = proxier.sync(_state(builder, broken, topo))
        assert result.full
        probe = topo.probe(topo.pod("pod3").ns, "10.96.0.50:80", count=3)
        assert probe.errors == {} and set(probe.pods) == {"pod1"}
    finally:
        assert topo.pyproxy("cleanup").returncode == 0


def test_restart_under_load_drops_no_connection(programmed: Programmed):
    """Re-running pyproxy (a full sync each time, as after a restart) while a client loops."""
    if programmed.userspace:
        pytest.skip("a userspace proxy's restart drops what it relays, by design (README)")
    topo = programmed.topo
    client = subprocess.Popen(
        ["ip", "netns", "exec", topo.pod("pod3").ns, sys.executable, "-m", "lab.client",
         "--target", f"{WEB_IP}:80", "--count", "1500", "--timeout", "2", "--deadline", "60"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(4):
            programmed.apply(base_objects(topo))
        out, _ = client.communicate(timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()

    data = json.loads(out)
    assert data["errors"] == {}
    assert len(data["answers"]) == 1500


def _fillers(count: int, endpoints: int) -> list[dict]:
    """``count`` Services of ``endpoints`` endpoints each, on addresses nobody probes: they only
    make the table (and so a full sync's commit) large."""
    objects: list[dict] = []
    tcp = [sc.port(8080, name="http", protocol="TCP")]
    for i in range(count):
        name = f"filler-{i}"
        objects.append(sc.service(name, f"10.97.{i // 250}.{i % 250 + 1}", [sc.port(80, name="http")]))
        objects.append(sc.endpoint_slice(name, [f"10.250.{(i * endpoints + j) // 250 % 250}.{(i * endpoints + j) % 250 + 1}"
                                                for j in range(endpoints)], tcp))
    return objects


def test_full_syncs_over_a_large_live_table_answer_every_first_syn(topo: Topology, tmp_path: Path):
    """A restart (or the hourly full sync) replaces a large table under load; every new
    connection must be answered on its first SYN, with the same source address as always. The
    clients' timeout (0.9 s) is below the SYN retransmission (1 s), so a SYN dropped or
    refused while the new table goes live is a failure here, where a 2 s timeout would hide it
    as a slow connect. What a full sync creates and a lookup needs at once: the endpoint maps
    (pod3 to a ClusterIP), the pod networks (two --cluster-cidr: pod3 must keep its address)
    and a LoadBalancer's two source ranges (an allowed external client)."""
    from tests.netns.test_external import LB_IP, _objects

    assert topo.pyproxy("cleanup").returncode == 0
    allowed = topo.client_sources[0]
    # JSON, as kubectl writes it: read at JSON speed (a YAML dump of 4,000 objects takes 20 s).
    path = tmp_path / "cluster.json"
    objects = _objects(topo, ranges=[f"{allowed}/32", "203.0.113.0/24"]) + _fillers(2000, 10)
    path.write_text(json.dumps({"kind": "List", "items": objects}))
    argv = ["run", "--once", "--source-file", str(path), "--hostname-override", NODE,
            "--cluster-cidr", f"{topo.cluster_cidr},172.16.0.0/12", "--ip-families", "4", *mode_flags("nftables")]

    def full_sync() -> None:
        proc = topo.pyproxy(*argv)
        assert proc.returncode == 0, proc.stderr

    def client(ns: str, target: str, report: Path, *extra: str) -> subprocess.Popen[str]:
        # The report goes to a file: it is larger than a pipe holds.
        with open(report, "w") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "lab.client", "--target", target,
                 "--count", "200000", "--timeout", "0.9", "--interval", "0", "--reset-close", "--deadline", "120",
                 *extra], stdout=out, text=True)

    try:
        full_sync()
        reports = {"pod": tmp_path / "pod.json", "ext": tmp_path / "ext.json"}
        clients = [client(topo.pod("pod3").ns, f"{WEB_IP}:80", reports["pod"]),
                   client(topo.client_ns, f"{LB_IP}:80", reports["ext"], "--source", allowed)]
        try:
            time.sleep(0.5)
            for _ in range(5):
                full_sync()
        finally:
            for c in clients:
                c.send_signal(signal.SIGTERM)
            for c in clients:
                try:
                    c.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    c.kill()
                    c.wait()
        for name, report in reports.items():
            data = json.loads(report.read_text())
            assert len(data["answers"]) > 200, (name, data["errors"])
            assert data["errors"] == {}, (name, data["failures"])
            assert max(data["durations"]) < 0.9, name
            if name == "pod":
                assert {seen for _, seen, _ in data["answers"]} == {topo.pod("pod3").ip}
    finally:
        assert topo.pyproxy("cleanup").returncode == 0
        ns_exec(topo.node_ns, ["conntrack", "-F"])


@pytest.mark.parametrize("mode", ["nftables", "iptables-nft"])
def test_run_follows_the_source_file(topo: Topology, mode: str, tmp_path: Path):
    assert topo.pyproxy("cleanup").returncode == 0
    path = tmp_path / "cluster.yaml"
    objects = base_objects(topo)
    web_slice = next(o for o in objects if o["metadata"]["name"] == "web-a")
    web_slice["endpoints"] = web_slice["endpoints"][:1]  # only pod0
    path.write_text(sc.dump(objects))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", topo.node_ns, sys.executable, "-m", "pyproxy", "run",
         "--source-file", str(path), "--hostname-override", NODE, "--cluster-cidr",
         topo.cluster_cidr, "--min-sync-period", "0.2", *mode_flags(mode)],
        stderr=subprocess.PIPE, text=True,
    )

    def wait_for(pods: set[str]) -> set[str]:
        seen: set[str] = set()
        for _ in range(50):
            probe = topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=20, timeout=1)
            seen = set(probe.pods)
            if seen == pods:
                break
            time.sleep(0.2)
        return seen

    try:
        assert wait_for({"pod0"}) == {"pod0"}
        objects = base_objects(topo)
        path.write_text(sc.dump(objects))
        assert wait_for({"pod0", "pod1", "pod2"}) == {"pod0", "pod1", "pod2"}
        path.write_text("this: [is not: valid yaml")  # a broken save must not drop the rules
        time.sleep(0.6)
        assert set(topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=20).pods) == {"pod0", "pod1", "pod2"}
    finally:
        # SIGTERM, as a kubelet stops a pod (file mode used to handle SIGINT only, and died).
        os.kill(proc.pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "not valid YAML" in err
    assert proc.returncode == 0 and "rules stay in place" in err, err[-2000:]
    # Normal exit keeps the rules: restarts must not drop traffic.
    assert topo.probe(topo.pod("pod3").ns, f"{WEB_IP}:80", count=5).errors == {}
    assert topo.pyproxy("cleanup").returncode == 0


def test_switching_modes_removes_leftovers_and_keeps_established_connections(topo: Topology, tmp_path: Path):
    """nftables → iptables (nft backend) → iptables (legacy backend) → nftables, with one TCP
    connection open through a ClusterIP all along: it keeps working (conntrack keeps its NAT)
    and each start removes what the previous mode left."""
    from tests.netns.conftest import CHAT_IP

    assert topo.pyproxy("cleanup").returncode == 0
    path = tmp_path / "cluster.yaml"
    path.write_text(sc.dump(base_objects(topo)))

    def run(mode: str) -> None:
        proc = topo.pyproxy("run", "--once", "--source-file", str(path), "--hostname-override", NODE,
                            "--cluster-cidr", topo.cluster_cidr, *mode_flags(mode))
        assert proc.returncode == 0, proc.stderr

    run("nftables")
    conn = subprocess.Popen(
        ["ip", "netns", "exec", topo.pod("pod3").ns, sys.executable, "-m", "lab.client",
         "--target", f"{CHAT_IP}:80", "--hold", "--timeout", "3"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:


        first = json.loads(conn.stdout.readline())["pod"]
        assert first in {"pod0", "pod1", "pod2"}
        for mode in ("iptables-nft", "iptables-legacy", "nftables"):
            run(mode)
            nft = ns_exec(topo.node_ns, ["nft", "list", "tables"]).stdout
            saves = {b: ns_exec(topo.node_ns, [f"iptables-{b}-save"]).stdout for b in ("nft", "legacy")}
            if mode == "nftables":
                assert "pyproxy" in nft and all("PYPROXY" not in t for t in saves.values())
            else:
                backend = mode.split("-", 1)[1]
                other = "legacy" if backend == "nft" else "nft"
                assert "table ip pyproxy" not in nft
                assert "PYPROXY-SERVICES" in saves[backend] and "PYPROXY" not in saves[other]
            conn.stdin.write("again\n")
            conn.stdin.flush()
            # The same connection, after the switch: same backend, still answering.
            assert json.loads(conn.stdout.readline())["pod"] == first, mode
    finally:
        conn.stdin.close()
        conn.wait(timeout=10)
        assert topo.pyproxy("cleanup").returncode == 0
