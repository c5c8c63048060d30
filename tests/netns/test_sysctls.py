"""The conntrack sysctls kube-proxy sets at start: ``pyproxy run --init-only`` (the chart's
privileged init container) and the daemon's own start, in a fresh network namespace, whose
timeouts are its own: the host's stay as they were."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import ns_exec

pytestmark = pytest.mark.netns

NF = "/proc/sys/net/netfilter"


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"pxt-sysctl-{os.getpid()}"  # pxt: scripts/test.sh checks none is left
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _read(ns: str, name: str) -> int:
    return int(ns_exec(ns, ["cat", f"{NF}/{name}"]).stdout)


def _pyproxy(ns: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "pyproxy", "run", *flags],
                          capture_output=True, text=True, timeout=60)


def test_init_only_sets_kube_proxys_timeouts_in_its_namespace_only(ns: str):
    host = {n: int(Path(f"{NF}/{n}").read_text()) for n in ("nf_conntrack_tcp_timeout_close_wait",
                                                             "nf_conntrack_tcp_timeout_established")}
    assert _read(ns, "nf_conntrack_tcp_timeout_close_wait") == 60  # the kernel's, in a new namespace
    # nf_conntrack_max belongs to the host (read-only here): left alone, as the lab's nodes do.
    proc = _pyproxy(ns, "--init-only", "--conntrack-max-per-core", "0")
    assert proc.returncode == 0, proc.stderr
    assert _read(ns, "nf_conntrack_tcp_timeout_close_wait") == 3600
    assert _read(ns, "nf_conntrack_tcp_timeout_established") == 86400
    assert {n: int(Path(f"{NF}/{n}").read_text()) for n in host} == host


def test_zero_leaves_a_value_and_options_set_theirs(ns: str):
    proc = _pyproxy(ns, "--init-only", "--conntrack-max-per-core", "0", "--conntrack-tcp-timeout-close-wait", "0",
                    "--conntrack-udp-timeout", "45s", "--conntrack-udp-timeout-stream", "5m",
                    "--conntrack-tcp-be-liberal")
    assert proc.returncode == 0, proc.stderr
    assert _read(ns, "nf_conntrack_tcp_timeout_close_wait") == 60
    assert (_read(ns, "nf_conntrack_udp_timeout"), _read(ns, "nf_conntrack_udp_timeout_stream"),
            _read(ns, "nf_conntrack_tcp_be_liberal")) == (45, 300, 1)


def test_a_host_value_this_namespace_cannot_raise(ns: str, tmp_path: Path):
    """nf_conntrack_max is the host's and read-only outside its namespace: --init-only fails
    and says what to do; the daemon warns, counts it, and goes on to program the rules."""
    top = int(Path(f"{NF}/nf_conntrack_max").read_text())
    if top >= 1048576:
        pytest.skip("the host's nf_conntrack_max is already at kube-proxy's cap: nothing to raise")
    want = ["--conntrack-max-per-core", "1048576", "--conntrack-min", str(top + 1)]
    proc = _pyproxy(ns, "--init-only", *want)
    assert proc.returncode == 1
    assert "nf_conntrack_max: cannot set" in proc.stderr and "--conntrack-max-per-core" in proc.stderr
    assert _read(ns, "nf_conntrack_tcp_timeout_close_wait") == 3600  # the others are still set

    ns_exec(ns, ["ip", "link", "set", "lo", "up"])
    (tmp_path / "cluster.yaml").write_text("")
    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "pyproxy", "run",
                                   "--source-file", str(tmp_path / "cluster.yaml"), "--ip-families", "4",
                                   "--conntrack-tcp-timeout-established", "2h", *want],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while ns_exec(ns, ["nft", "list", "table", "ip", "pyproxy"]).returncode != 0:
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        metrics = ns_exec(ns, ["curl", "-s", "http://127.0.0.1:10249/metrics"]).stdout
        assert 'pyproxy_sysctl_failures_total{sysctl="nf_conntrack_max"} 1.0' in metrics, metrics[-2000:]
        assert _read(ns, "nf_conntrack_tcp_timeout_established") == 7200
        assert "nf_conntrack_max: cannot set" in log.read_text()
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
