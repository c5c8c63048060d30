"""KubeProxyConfiguration files: durations, field mapping, flags overriding, round trip."""

from __future__ import annotations

import pytest
import yaml

from pyproxy.cli import main
from pyproxy.kpconfig import parse_duration, to_flags


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1.0), ("500ms", 0.5), ("1m30s", 90.0), ("0s", 0.0), ("1h", 3600.0), ("250us", 0.00025), (2, 2.0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "1", "1x", "s", "1s2", True, None])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_fields_map_to_flags_and_unknown_ones_are_reported():
    flags, ignored = to_flags({
        "kind": "KubeProxyConfiguration", "mode": "nftables", "clusterCIDR": "10.244.0.0/16",
        "nodePortAddresses": ["192.168.0.0/16", "10.0.0.0/8"], "clientConnection": {"kubeconfig": "/k"},
        "nftables": {"masqueradeAll": True, "masqueradeBit": 13, "minSyncPeriod": "1s"},
        "conntrack": {"maxPerCore": 0}, "oomScoreAdj": -999,
    })
    assert flags == {"proxy-mode": "nftables", "cluster-cidr": "10.244.0.0/16",
                     "nodeport-addresses": "192.168.0.0/16,10.0.0.0/8", "kubeconfig": "/k",
                     "masquerade-all": True, "iptables-masquerade-bit": 13, "min-sync-period": 1.0,
                     "conntrack-max-per-core": 0}
    assert ignored == ["oomScoreAdj"]


def test_conntrack_fields_of_either_version_become_flags_render_ignores(tmp_path, capsys):
    v1alpha1 = {"conntrack": {"maxPerCore": 0, "min": 5, "tcpEstablishedTimeout": "1h",
                              "tcpCloseWaitTimeout": "0s", "tcpBeLiberal": True, "udpTimeout": "45s",
                              "udpStreamTimeout": "2m"}}
    expected = {"conntrack-max-per-core": 0, "conntrack-min": 5, "conntrack-tcp-timeout-established": 3600.0,
                "conntrack-tcp-timeout-close-wait": 0.0, "conntrack-tcp-be-liberal": True,
                "conntrack-udp-timeout": 45.0, "conntrack-udp-timeout-stream": 120.0}
    assert to_flags(v1alpha1)[0] == expected
    assert to_flags({"linux": v1alpha1})[0] == expected  # v1alpha2
    path = tmp_path / "kp.yaml"
    path.write_text(yaml.safe_dump({"kind": "KubeProxyConfiguration", **v1alpha1}))
    out = tmp_path / "effective.yaml"
    assert main(["run", "--config", str(path), "--write-config-to", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["conntrack"] == {
        "maxPerCore": 0, "min": 5, "tcpEstablishedTimeout": "3600s", "tcpCloseWaitTimeout": "0s",
        "tcpBeLiberal": True, "udpTimeout": "45s", "udpStreamTimeout": "120s"}
    src = tmp_path / "cluster.yaml"
    src.write_text("")
    assert main(["render", "--config", str(path), "--source-file", str(src)]) == 0


def test_bad_field_value_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "kp.yaml"
    path.write_text("kind: KubeProxyConfiguration\niptables: {minSyncPeriod: soon}\n")
    assert main(["render", "--config", str(path), "--source-file", "x"]) == 2
    assert "duration" in capsys.readouterr().err


def test_command_line_overrides_the_file_and_write_config_round_trips(tmp_path, capsys):
    path = tmp_path / "kp.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                                    "kind": "KubeProxyConfiguration", "mode": "iptables",
                                    "clusterCIDR": "10.244.0.0/16",
                                    "iptables": {"masqueradeAll": True, "minSyncPeriod": "2s"}}))
    out = tmp_path / "effective.yaml"
    assert main(["run", "--config", str(path), "--min-sync-period", "0.3", "--write-config-to", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    assert written["mode"] == "iptables" and written["clusterCIDR"] == "10.244.0.0/16"
    assert written["iptables"]["masqueradeAll"] is True
    assert written["iptables"]["minSyncPeriod"] == "0.3s"  # the flag won
    again = tmp_path / "again.yaml"
    assert main(["run", "--config", str(out), "--write-config-to", str(again)]) == 0
    assert yaml.safe_load(again.read_text()) == written


def test_render_takes_the_fields_it_has_from_runs_configuration(tmp_path, capsys):
    """The chart's KubeProxyConfiguration holds run's settings (sync periods, bind addresses,
    conntrack): render and explain leave those out; a plain flag file's unknown flag is still an
    error (a typo must not pass silently)."""
    path = tmp_path / "kp.yaml"
    path.write_text(yaml.safe_dump({"kind": "KubeProxyConfiguration", "mode": "nftables",
                                    "nftables": {"minSyncPeriod": "1s", "masqueradeAll": True},
                                    "healthzBindAddress": "0.0.0.0:10256"}))
    src = tmp_path / "cluster.yaml"
    src.write_text("")
    assert main(["render", "--config", str(path), "--source-file", str(src), "--hostname-override", "n"]) == 0
    plain = tmp_path / "flags.yaml"
    plain.write_text("min-sync-period: 1\n")
    with pytest.raises(SystemExit):
        main(["render", "--config", str(plain), "--source-file", str(src)])
    assert "unrecognized arguments: --min-sync-period" in capsys.readouterr().err
