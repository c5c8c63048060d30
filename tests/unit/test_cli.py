"""pyproxy.cli.main: the render command, error messages and exit codes, and the file source."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from pyproxy.cli import main
from pyproxy.sources.file import SourceError, file_stamp, load_objects
from tests import scenario as sc

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "examples" / "demo.yaml")
DEMO_IPS = ("10.96.0.10", "10.96.0.20", "10.96.0.30")


def _render(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["render", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_render_demo(capsys, mode):
    code, out, err = _render(capsys, "--source-file", DEMO, "--hostname-override", "node-a",
                             "--proxy-mode", mode, "--cluster-cidr", "10.244.0.0/16")
    assert code == 0, err
    for ip in DEMO_IPS:
        assert ip in out
    assert "192.168.50.2" in out  # the Node's address takes NodePorts
    assert "30080" in out
    if mode == "nftables":
        assert out.startswith("add table ip pyproxy\n")
        assert "10.96.0.10 . tcp . 80 : goto service-" in out
        # Element additions to the base maps are set declarations carrying the elements.
        assert ('add map ip pyproxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : '
                'verdict ; comment "services with no endpoints" ; '
                'elements = { 10.96.0.30 . tcp . 80 : goto reject-chain } ; }') in out
        # cluster-ips comes from every Service's ClusterIP, each once.
        cips = next(line for line in out.splitlines()
                    if line.startswith("add set ip pyproxy cluster-ips {") and "elements" in line)
        assert sorted(cips.split("elements = { ")[1].split(" }")[0].split(", ")) == sorted(DEMO_IPS)
        # Chain contents are chain declarations carrying the rules, never "add rule".
        assert "add rule " not in out and "add element " not in out
        assert "timeout 60s" in out  # sticky's affinity
        assert "dnat to 10.244.1.10:" in out and "dnat to 10.244.1.11:" in out
    else:
        assert "*filter" in out and "*nat" in out and out.rstrip().endswith("COMMIT")
        assert "--to-destination 10.244.1.10:" in out and "--to-destination 10.244.1.11:" in out
        assert "-d 10.96.0.30/32 --dport 80 -j REJECT --reject-with tcp-reset" in out
        assert "--rcheck --seconds 60 --reap" in out


def test_render_default_mode_is_nftables(capsys):
    code, out, _ = _render(capsys, "--source-file", DEMO, "--hostname-override", "node-a")
    assert code == 0 and out.startswith("add table ip pyproxy")


def test_render_is_deterministic(capsys):
    args = ("--source-file", DEMO, "--hostname-override", "node-a")
    _, first, _ = _render(capsys, *args)
    _, second, _ = _render(capsys, *args)
    assert first == second


def test_render_masquerade_flags(capsys):
    _, out, _ = _render(capsys, "--source-file", DEMO, "--hostname-override", "node-a",
                        "--cluster-cidr", "10.244.0.0/16", "--iptables-masquerade-bit", "3")
    assert ("ip saddr != { 10.244.0.0/16 } ip daddr . meta l4proto . th dport @cluster-ip-ports "
            "jump mark-for-masquerade") in out
    assert "meta mark set meta mark or 0x8" in out


def test_nodeport_addresses_filter(capsys):
    _, out, _ = _render(capsys, "--source-file", DEMO, "--hostname-override", "node-a",
                        "--nodeport-addresses", "192.168.0.0/16")
    assert ('add set ip pyproxy nodeport-ips { type ipv4_addr ; comment "node addresses that accept '
            'NodePorts" ; elements = { 192.168.50.2 } ; }') in out


def test_malformed_yaml_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Service\nmetadata: {name: [unclosed\n")
    code, out, err = _render(capsys, "--source-file", str(bad), "--hostname-override", "node-a")
    assert code == 2 and out == ""
    assert "not valid YAML" in err and "fix the file" in err and str(bad) in err


def test_missing_file_exits_2(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    code, out, err = _render(capsys, "--source-file", str(missing), "--hostname-override", "node-a")
    assert code == 2 and out == ""
    assert "cannot read --source-file" in err and "check the path" in err


def test_yaml_that_is_not_an_object_exits_2(capsys, tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    code, _, err = _render(capsys, "--source-file", str(bad), "--hostname-override", "node-a")
    assert code == 2 and "expected a Kubernetes object" in err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--cluster-cidr", "10.244.0.0"), ("--cluster-cidr", "banana"), ("--cluster-cidr", "10.244.0.0/16,x"),
     ("--nodeport-addresses", "300.0.0.0/8")],
)
def test_bad_cidr_exits_2_with_a_hint(capsys, flag, value):
    code, out, err = _render(capsys, "--source-file", DEMO, "--hostname-override", "node-a", flag, value)
    assert code == 2 and out == ""
    assert flag in err and "10.244.0.0/16" in err and "is not a CIDR" in err


def test_ipv6_cidrs_go_to_the_ipv6_family(capsys):
    code, out, _ = _render(capsys, "--source-file", DEMO, "--hostname-override", "node-a",
                           "--cluster-cidr", "10.244.0.0/16,fd00:10::/64")
    assert code == 0 and "fd00:10::/64" not in out  # no IPv6 Service in the demo: no ip6 table shown
    assert "10.244.0.0/16" in out


@pytest.mark.parametrize("value", ["5", "4,4", "4,6,6", ""])
def test_bad_ip_families_exit_2(capsys, value):
    code, _, err = _render(capsys, "--source-file", DEMO, "--hostname-override", "node-a",
                           "--ip-families", value)
    assert code == 2 and "--ip-families" in err and "4,6" in err


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_render_shows_each_family(capsys, tmp_path, mode):
    svc = sc.service("ds", "10.96.0.40", [sc.port(80, name="http")])
    svc["spec"]["clusterIPs"] = ["10.96.0.40", "fd00:96::40"]
    v4 = sc.endpoint_slice("ds", ["10.244.1.10"], [sc.port(8080, name="http")], suffix="v4")
    v6 = sc.endpoint_slice("ds", ["fd00:244:1::10"], [sc.port(8080, name="http")], suffix="v6")
    v6["addressType"] = "IPv6"
    path = tmp_path / "ds.yaml"
    path.write_text(sc.dump([svc, v4, v6]))
    code, out, _ = _render(capsys, "--source-file", str(path), "--hostname-override", "node-1",
                           "--proxy-mode", mode, "--cluster-cidr", "10.244.0.0/16,fd00:244::/32")
    assert code == 0
    if mode == "nftables":  # the endpoints are map data
        assert "10.244.1.10 . 8080" in out and "fd00:244:1::10 . 8080" in out
        assert "add table ip pyproxy" in out and "add table ip6 pyproxy" in out
        assert "ip6 saddr != { fd00:244::/32 }" in out
    else:
        assert "10.244.1.10:8080" in out and "[fd00:244:1::10]:8080" in out
        assert "# IPv6: ip6tables-restore input" in out and "-d fd00:96::40/128" in out
    code, out, _ = _render(capsys, "--source-file", str(path), "--hostname-override", "node-1",
                           "--proxy-mode", mode, "--ip-families", "6")
    assert code == 0 and "10.244.1.10" not in out and "fd00:244:1::10" in out


def test_bad_masquerade_bit_exits_2(capsys):
    code, _, err = _render(capsys, "--source-file", DEMO, "--hostname-override", "node-a",
                           "--iptables-masquerade-bit", "32")
    assert code == 2 and "0 and 31" in err


def test_no_command_exits_2(capsys):
    assert main([]) == 2
    _, err = capsys.readouterr()
    assert "give a command" in err and "usage:" in err


def test_run_help_mentions_once(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out, _ = capsys.readouterr()
    assert "--once" in out and "--source-file" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "pyproxy 0.1.0" in capsys.readouterr().out


def test_unknown_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["render", "--source-file", DEMO, "--proxy-mode", "ipvs"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_one_invalid_service_among_good_ones(capsys, caplog, tmp_path):
    objs = [
        sc.node("node-a", ["192.168.50.2"]),
        sc.service("good", "10.96.0.10", [sc.port(80, name="http")]),
        sc.endpoint_slice("good", ["10.244.1.1"], [sc.port(8080, name="http")]),
        sc.service("bad", "10.96.0.300", [sc.port(80, name="http")]),
        sc.service("also-good", "10.96.0.11", [sc.port(53, name="dns", protocol="UDP")]),
    ]
    path = tmp_path / "cluster.yaml"
    path.write_text(sc.dump(objs))
    with caplog.at_level(logging.WARNING, logger="pyproxy"):
        code, out, _ = _render(capsys, "--source-file", str(path), "--hostname-override", "node-a")
    assert code == 0
    assert "10.96.0.10 . tcp . 80" in out and "10.96.0.11 . udp . 53" in out
    assert "10.96.0.300" not in out
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Service test/bad" in warnings[0] and "10.96.0.300" in warnings[0]


# -- the file source -------------------------------------------------------------------------


def _write(tmp_path, docs) -> str:
    path = tmp_path / "src.yaml"
    path.write_text(yaml.safe_dump_all(docs) if isinstance(docs, list) else docs)
    return str(path)


def test_kind_list_is_flattened(tmp_path):
    svc = sc.service("a", "10.96.0.1", [sc.port(80)])
    sl = sc.endpoint_slice("a", ["10.244.1.1"], [sc.port(8080)])
    path = _write(tmp_path, [{"apiVersion": "v1", "kind": "List", "items": [svc, sl]},
                             sc.node("n", ["192.168.1.1"])])
    objs = load_objects(path)
    assert [o["kind"] for o in objs] == ["Service", "EndpointSlice", "Node"]
    assert objs[0] == svc


def test_typed_list_items_get_their_kind(tmp_path):
    svc = sc.service("a", "10.96.0.1", [sc.port(80)])
    del svc["kind"]
    path = _write(tmp_path, [{"apiVersion": "v1", "kind": "ServiceList", "items": [svc]}])
    (obj,) = load_objects(path)
    assert obj["kind"] == "Service" and obj["metadata"]["name"] == "a"


def test_typed_list_items_keep_an_explicit_kind(tmp_path):
    path = _write(tmp_path, [{"kind": "ServiceList", "items": [{"kind": "Node", "metadata": {"name": "x"}}]}])
    assert load_objects(path)[0]["kind"] == "Node"


def test_nested_lists_and_empty_documents(tmp_path):
    text = "---\n---\nkind: List\nitems:\n- kind: List\n  items:\n  - {kind: Service, metadata: {name: a}}\n"
    objs = load_objects(_write(tmp_path, text))
    assert objs == [{"kind": "Service", "metadata": {"name": "a"}}]


def test_list_with_non_list_items_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="'items' of a List must be a list"):
        load_objects(_write(tmp_path, "kind: List\nitems: {a: 1}\n"))


def test_list_items_that_are_not_objects_are_errors(tmp_path):
    with pytest.raises(SourceError, match=r"items\[0\]"):
        load_objects(_write(tmp_path, "kind: List\nitems: [3]\n"))


def test_unknown_kinds_pass_through_and_are_ignored_by_render(tmp_path, capsys):
    docs = [{"kind": "ConfigMap", "metadata": {"name": "c"}}, sc.node("node-a", ["192.168.1.1"]),
            sc.service("a", "10.96.0.1", [sc.port(80)])]
    path = _write(tmp_path, docs)
    assert [o["kind"] for o in load_objects(path)] == ["ConfigMap", "Node", "Service"]
    code, out, _ = _render(capsys, "--source-file", path, "--hostname-override", "node-a")
    assert code == 0 and "10.96.0.1" in out


def test_render_of_kind_list_file(tmp_path, capsys):
    items = [sc.node("node-a", ["192.168.1.1"]), sc.service("a", "10.96.0.1", [sc.port(80, name="http")]),
             sc.endpoint_slice("a", ["10.244.1.1"], [sc.port(8080, name="http")])]
    path = _write(tmp_path, [{"apiVersion": "v1", "kind": "List", "items": items}])
    code, out, _ = _render(capsys, "--source-file", path, "--hostname-override", "node-a")
    assert code == 0 and "10.96.0.1 . tcp . 80 : goto service-" in out


@pytest.mark.parametrize("text", ["kind:\nmetadata: {name: x}\n", "kind: 5\n"], ids=["null", "int"])
def test_document_with_null_or_non_string_kind(tmp_path, capsys, text):
    # A missing or non-string kind is ignored like an unknown kind: no crash, no error.
    path = _write(tmp_path, text)
    objs = load_objects(path)
    assert len(objs) == 1 and not isinstance(objs[0]["kind"], str)
    code, out, err = _render(capsys, "--source-file", path, "--hostname-override", "node-a")
    assert code == 0, err
    assert out.startswith("add table ip pyproxy\n")


def test_file_stamp(tmp_path):
    path = tmp_path / "f.yaml"
    assert file_stamp(str(path)) is None
    path.write_text("a: 1\n")
    first = file_stamp(str(path))
    assert first is not None and first[1] == 5
    path.write_text("a: 12\n")
    assert file_stamp(str(path)) != first


@pytest.mark.parametrize(("eff", "want", "missing"), [
    ("0000000000001000", ("NET_ADMIN",), []),
    ("0000000000001000", ("NET_ADMIN", "NET_RAW"), ["NET_RAW"]),
    ("00000000a80425fb", ("NET_ADMIN",), ["NET_ADMIN"]),  # a container's default set: no NET_ADMIN
    ("000001ffffffffff", ("NET_ADMIN", "NET_RAW"), []),
])
def test_missing_capabilities_reads_the_effective_set(tmp_path, eff, want, missing):
    from pyproxy.hostnet import missing_capabilities

    status = tmp_path / "status"
    status.write_text(f"Name:\tpyproxy\nCapInh:\t0000000000000000\nCapPrm:\t{eff}\nCapEff:\t{eff}\n")
    assert missing_capabilities(want, status=str(status)) == missing


def test_run_without_net_admin_says_which_capability_is_missing(monkeypatch, capsys):
    import pyproxy.hostnet

    monkeypatch.setattr(pyproxy.hostnet, "missing_capabilities", lambda names, **_: ["NET_ADMIN"])
    assert main(["run", "--source-file", "examples/demo.yaml", "--once"]) == 2
    err = capsys.readouterr().err
    assert "needs the NET_ADMIN capability" in err and "securityContext.capabilities.add" in err


def test_no_usable_iptables_is_a_message_not_a_traceback(monkeypatch, capsys):
    from pyproxy.ipt import executor

    def none_found() -> str:
        raise executor.IptablesError("no iptables-nft-save or iptables-legacy-save found; install the iptables package")

    monkeypatch.setattr(executor, "detect_backend", none_found)
    assert main(["run", "--source-file", "examples/demo.yaml", "--once", "--proxy-mode", "iptables"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyproxy: no iptables") and "Traceback" not in err
