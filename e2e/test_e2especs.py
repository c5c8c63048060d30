"""Kubernetes' own Service e2e specs against pyproxy (issue 14): the quick subset
(``lab.e2especs.QUICK``) from upstream's ``e2e.test``, built here from the cluster's version, on a
real-node lab with pyproxy installed by its chart (nftables mode) and cluster DNS. Every chosen
spec must run and pass. ``python3 -m lab.e2especs --full --proxies ...`` runs all of them, for
upstream kube-proxy too, side by side."""

from __future__ import annotations

from pathlib import Path

from e2e.harness import FIGURES, require_real_nodes
from lab import e2especs


def test_upstreams_quick_service_specs_pass_against_pyproxy(tmp_path: Path) -> None:
    require_real_nodes("upstream's e2e specs")
    run = e2especs.run_one("pyproxy", "nftables", focus=e2especs.QUICK, out=tmp_path, timeout_minutes=20,
                           images=e2especs.QUICK_IMAGES, nodes=2)
    FIGURES["upstream e2e specs (quick subset), pyproxy nftables"] = \
        f"{sum(s.state == 'passed' for s in run.specs.values())} of {len(run.specs)} passed in {run.seconds:.0f} s"
    assert not run.error, run.error
    # Each regex of QUICK names one spec: all of them ran (none excluded, none unknown).
    assert len(run.specs) == len(e2especs.QUICK), sorted(run.specs)
    failed = {n: s.failure for n, s in run.specs.items() if s.state != "passed"}
    assert not failed, failed
