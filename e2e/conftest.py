"""The e2e fixtures: one real cluster (lab.cluster) for the session, pyproxy on every
node in each proxy mode. Needs root and the upstream binaries (built and cached by
lab/build-k8s.sh on first use; a cold build takes ~15 min on 2 cores)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from e2e.harness import ProxyFleet, install_chart, sa_kubeconfig
from lab.cluster import ClusterLab
from lab.preflight import CLUSTER_TOOLS, missing


@pytest.fixture(scope="session")
def lab() -> Iterator[ClusterLab]:
    why = missing(CLUSTER_TOOLS)
    if why:
        if os.environ.get("CI") or os.environ.get("PYPROXY_ALL_TIERS"):
            pytest.fail(f"e2e tests cannot run here: {why} (scripts/test.sh --unit runs the unit "
                        "tests alone)")
        pytest.skip(why)
    cluster = ClusterLab.up(name=f"e2e{os.getpid()}", nodes=2)
    try:
        cluster.kubectl("create", "namespace", "e2e")
        install_chart(cluster)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def sa_config(lab: ClusterLab) -> str:
    return sa_kubeconfig(lab)


@pytest.fixture(scope="module", params=["nftables", "iptables"])
def fleet(request: pytest.FixtureRequest, lab: ClusterLab, sa_config: str) -> Iterator[ProxyFleet]:
    f = ProxyFleet(lab=lab, mode=request.param, kubeconfig=sa_config)
    try:
        f.start_all()
        yield f
    finally:
        f.stop_all()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures e2e tests measured on the way (lab-up and rollout times, memory), printed
    at the end of the run: the numbers a closing note reports."""
    from e2e.harness import FIGURES

    if FIGURES:
        terminalreporter.section("e2e figures")
        for key, value in FIGURES.items():
            terminalreporter.write_line(f"{key}: {value}")
