"""Differential testing in the suite (issue 13): a fixed set of seeds, each a random valid
cluster created on the real API server, programmed by upstream kube-proxy in one world and by
pyproxy in an identical other, probed with real packets from a pod, the node and an external
client; every outcome must match or be a documented deviation (lab/diff/deviations.py).
``python3 -m lab.diff --minutes N`` runs new seeds for as long as you give it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.diff.run import run, table
from lab.preflight import CLUSTER_TOOLS, missing

SEEDS = {"nftables": list(range(1, 11)), "iptables": list(range(101, 106))}


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_pyproxy_and_upstream_answer_the_same_probes(mode: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]):
    why = missing(CLUSTER_TOOLS)
    if why:
        if os.environ.get("CI") or os.environ.get("PYPROXY_ALL_TIERS"):
            pytest.fail(f"differential tests cannot run here: {why}")
        pytest.skip(why)
    lines: list[str] = []
    tally = run(seeds=SEEDS[mode], minutes=0, mode=mode, out=tmp_path, shrink_budget=120, log=lines.append)
    with capsys.disabled():
        print("\n" + table(tally, mode))
    assert tally.seeds == len(SEEDS[mode]) and tally.probes > 40 * len(SEEDS[mode])
    unexplained = [m for m in tally.mismatches if not m.reason]
    assert not unexplained, "\n".join(
        [line for line in lines if "UNEXPLAINED" in line]
        + [Path(m.file).read_text() for m in unexplained[:2]])
