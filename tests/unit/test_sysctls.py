"""The conntrack sysctls: what kube-proxy's settings ask of the host, and writing only what differs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyproxy import sysctls
from pyproxy.settings import ConntrackSettings


def _values(writes: list[sysctls.Write]) -> dict[str, int]:
    return {os.path.basename(w.path): w.value for w in writes}


def test_defaults_are_kube_proxys():
    writes = sysctls.wanted(ConntrackSettings(), cpus=2, proc="/p")
    assert _values(writes) == {"nf_conntrack_max": 131072, "hashsize": 32768,
                               "nf_conntrack_tcp_timeout_established": 86400,
                               "nf_conntrack_tcp_timeout_close_wait": 3600}
    assert [w.only_raise for w in writes[:2]] == [True, True]


@pytest.mark.parametrize(("per_core", "cpus", "floor", "expected"), [
    (32768, 2, 131072, 131072),     # below the floor: the floor
    (32768, 8, 131072, 262144),     # scaled
    (32768, 64, 131072, 1048576),   # capped
    (0, 64, 131072, 0),             # left to the host
])
def test_conntrack_max(per_core, cpus, floor, expected):
    assert sysctls.conntrack_max(ConntrackSettings(max_per_core=per_core, min=floor), cpus=cpus) == expected


def test_zero_leaves_each_value_alone_and_the_options_add_theirs():
    settings = ConntrackSettings(max_per_core=0, tcp_established_timeout=0, tcp_close_wait_timeout=0)
    assert sysctls.wanted(settings, cpus=4) == []
    settings = ConntrackSettings(max_per_core=0, tcp_established_timeout=0, tcp_close_wait_timeout=0,
                                 tcp_be_liberal=True, udp_timeout=45, udp_stream_timeout=300)
    assert _values(sysctls.wanted(settings, cpus=4)) == {
        "nf_conntrack_udp_timeout": 45, "nf_conntrack_udp_timeout_stream": 300, "nf_conntrack_tcp_be_liberal": 1}


def _files(tmp_path: Path, **values: int) -> dict[str, Path]:
    out = {}
    for name, value in values.items():
        out[name] = tmp_path / name
        out[name].write_text(f"{value}\n")
    return out


def test_apply_writes_what_differs_and_never_lowers_a_table_size(tmp_path):
    f = _files(tmp_path, big=500000, small=1000, timeout=60, same=3600)
    writes = [sysctls.Write(str(f["big"]), 131072, only_raise=True),
              sysctls.Write(str(f["small"]), 131072, only_raise=True),
              sysctls.Write(str(f["timeout"]), 3600), sysctls.Write(str(f["same"]), 3600)]
    f["same"].chmod(0o444)  # nothing to write: a read-only file is no problem
    assert sysctls.apply(writes) == []
    assert {k: int(p.read_text()) for k, p in f.items()} == {"big": 500000, "small": 131072, "timeout": 3600,
                                                          "same": 3600}


def test_a_value_that_cannot_be_written_is_a_warning_with_what_to_do(tmp_path, caplog):
    f = _files(tmp_path, nf_conntrack_tcp_timeout_close_wait=60)
    writes = [sysctls.Write(str(f["nf_conntrack_tcp_timeout_close_wait"]), 3600),
              sysctls.Write(str(tmp_path / "missing"), 1)]
    os.rename(f["nf_conntrack_tcp_timeout_close_wait"], tmp_path / "dir")
    (tmp_path / "nf_conntrack_tcp_timeout_close_wait").mkdir()  # reads fail like a read-only /proc/sys write
    before = sysctls.FAILURES.labels("nf_conntrack_tcp_timeout_close_wait")._value.get()
    problems = sysctls.apply(writes)
    assert len(problems) == 2 and "cannot set 3600" in problems[0]
    assert sysctls.FAILURES.labels("nf_conntrack_tcp_timeout_close_wait")._value.get() == before + 1
    assert "--conntrack-tcp-timeout-close-wait=0" in caplog.text and "--init-only" in caplog.text


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--conntrack-tcp-timeout-close-wait", "soon", "1s, 500ms or 1m30s"),
    ("--conntrack-udp-timeout", "-5", "cannot be negative"),
])
def test_bad_durations_are_usage_errors(flag, value, message, capsys):
    from pyproxy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--source-file", "x", flag, value])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_duration_flags_take_go_durations_or_seconds(tmp_path):
    from pyproxy.cli import build_parser

    args = build_parser().parse_args(["run", "--conntrack-tcp-timeout-established", "1h30m",
                                      "--conntrack-udp-timeout", "45"])
    assert args.conntrack_tcp_timeout_established == 5400 and args.conntrack_udp_timeout == 45
    assert args.conntrack_tcp_timeout_close_wait == 3600 and not args.init_only
