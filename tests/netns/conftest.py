"""Fixtures for tests that load real rules into fresh network namespaces and send packets.

They need root and the nft, iptables and ip binaries. Run by hand, they are skipped with the
reason when those are missing; under ``scripts/test.sh`` (``PYPROXY_ALL_TIERS=1``) or in CI
(``CI=true``) a missing prerequisite is a failure, so a broken setup can never pass as "all
skipped".
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import Topology, ns_exec
from lab.preflight import missing
from tests import scenario as sc

MODES = ["nftables", "iptables-nft", "iptables-legacy"]
ALL_MODES = [*MODES, "userspace"]
NODE = "node-1"

WEB_IP, SELF_IP, EMPTY_IP, DNS_IP, STICKY_IP, CHAT_IP = (
    "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13", "10.96.0.14", "10.96.0.15")
WEB_NODEPORT, EMPTY_NODEPORT = 30080, 30081
AFFINITY_TIMEOUT = 2


@pytest.fixture(scope="session")
def topo() -> Iterator[Topology]:
    why = missing()
    if why:
        if os.environ.get("CI") or os.environ.get("PYPROXY_ALL_TIERS"):
            pytest.fail(f"netns tests cannot run here: {why} (scripts/test.sh --unit runs the unit "
                        "tests alone)")
        pytest.skip(why)
    # pod0..pod2 are backends; pod3 is a client pod that backs nothing.
    with Topology.create(pods=4) as t:
        yield t


def base_objects(topo: Topology) -> list[dict]:
    backends = [p.ip for p in topo.pods[:3]]
    tcp = [sc.port(8080, name="http", protocol="TCP")]
    udp = [sc.port(8080, name="dns", protocol="UDP")]
    return [
        sc.node(NODE, [topo.node_ip]),
        sc.service("web", WEB_IP, [sc.port(80, name="http", node_port=WEB_NODEPORT)], svc_type="NodePort"),
        sc.endpoint_slice("web", backends, tcp),
        sc.service("self", SELF_IP, [sc.port(80, name="http")]),
        sc.endpoint_slice("self", [topo.pods[0].ip], tcp),
        sc.service("empty", EMPTY_IP, [sc.port(80, name="http", node_port=EMPTY_NODEPORT),
                                       sc.port(80, name="dns", protocol="UDP")], svc_type="NodePort"),
        sc.service("dns", DNS_IP, [sc.port(53, name="dns", protocol="UDP")]),
        sc.endpoint_slice("dns", backends, udp),
        sc.service("sticky", STICKY_IP, [sc.port(80, name="http")], affinity_timeout=AFFINITY_TIMEOUT),
        sc.endpoint_slice("sticky", backends, tcp),
        # Long-lived connections: the echo answers every line (port 8083).
        sc.service("chat", CHAT_IP, [sc.port(80, name="chat")]),
        sc.endpoint_slice("chat", backends, [sc.port(8083, name="chat")]),
    ]


def mode_flags(mode: str) -> list[str]:
    if mode in ("nftables", "userspace"):
        return ["--proxy-mode", mode]
    return ["--proxy-mode", "iptables", "--iptables-backend", mode.split("-", 1)[1]]


class Programmed:
    """Rules loaded by ``pyproxy run --once`` into the node namespace for one mode. Userspace
    mode cannot be run once (its relays live in the process), so there ``pyproxy run`` keeps
    running in the background and follows the file; ``apply`` waits for it to sync."""

    def __init__(self, topo: Topology, mode: str, path: Path) -> None:
        self.topo = topo
        self.mode = mode
        self.path = path
        self.background = False
        """Keep ``pyproxy run`` running (as userspace mode must), e.g. for its listeners."""
        self.proc: subprocess.Popen[str] | None = None
        self.log = path.with_suffix(".log")

    @property
    def userspace(self) -> bool:
        return self.mode == "userspace"

    def flags(self, *extra: str) -> list[str]:
        return ["--source-file", str(self.path), "--hostname-override", NODE, "--cluster-cidr",
                self.topo.cluster_cidr, *mode_flags(self.mode), *extra]

    def apply(self, objects: list[dict], *extra: str) -> str:
        if self.userspace or self.background:
            return self._apply_background(objects, *extra)
        self.path.write_text(sc.dump(objects))
        proc = self.topo.pyproxy("run", "--once", *self.flags(*extra))
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    def _syncs(self) -> int:
        return self.log.read_text().count("synced ") if self.log.exists() else 0

    def _apply_background(self, objects: list[dict], *extra: str) -> str:
        before = self._syncs()
        if self.proc is not None and extra != self._extra:
            self.stop()
            before = 0
        self.path.write_text(sc.dump(objects))
        if self.proc is None:
            self._extra = extra
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.topo.node_ns, sys.executable, "-m", "pyproxy", "run",
                 "--min-sync-period", "0.1", *self.flags(*extra)],
                stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), text=True)  # noqa: SIM115
        deadline = time.monotonic() + 20
        while self._syncs() <= before:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"no sync after writing the file:\n{self.log.read_text()}"
            time.sleep(0.05)
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def _programmed(topo: Topology, mode: str, path: Path) -> Iterator[Programmed]:
    cleanup = topo.pyproxy("cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    prog = Programmed(topo, mode, path)
    try:
        prog.apply(base_objects(topo))
        yield prog
    finally:
        prog.stop()
        cleanup = topo.pyproxy("cleanup")
        assert cleanup.returncode == 0, cleanup.stderr
        # Conntrack entries would carry one mode's NAT decisions into the next test.
        ns_exec(topo.node_ns, ["conntrack", "-F"])


@pytest.fixture(params=ALL_MODES)
def programmed(request: pytest.FixtureRequest, topo: Topology, tmp_path: Path) -> Iterator[Programmed]:
    """The base objects loaded in every mode, userspace included."""
    yield from _programmed(topo, request.param, tmp_path / "cluster.yaml")


@pytest.fixture(params=MODES)
def kernel(request: pytest.FixtureRequest, topo: Topology, tmp_path: Path) -> Iterator[Programmed]:
    """The base objects loaded in the kernel modes (features userspace mode does not have)."""
    yield from _programmed(topo, request.param, tmp_path / "cluster.yaml")
