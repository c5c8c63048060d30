"""Churn soak in the suite (hardening issue): 3,000 Services, 100 EndpointSlice updates a second
for 60 s, a client connecting to a stable Service all along. ``e2e/soak.py`` holds the run; the
10k Services version (``python -m e2e.soak``, ~10 minutes here, most of it creating the objects)
and the long one (``--minutes 30``) are commands. PYPROXY_SOAK_SERVICES and PYPROXY_SOAK_SECONDS
change the size here (3,000 keeps a warm test run under 25 minutes with the real-node tests).
It runs last: its Services stay until the lab is torn down."""

from __future__ import annotations

import os

import pytest

from e2e.soak import soak
from lab.cluster import ClusterLab


def test_churn_soak(lab: ClusterLab, capsys: pytest.CaptureFixture[str]):
    result = soak(lab, services=int(os.environ.get("PYPROXY_SOAK_SERVICES", "3000")), rate=100.0,
                  seconds=float(os.environ.get("PYPROXY_SOAK_SECONDS", "60")))
    with capsys.disabled():
        print("\n" + result.table() + "\n" + result.curve())
    assert result.failed == {} and result.connections > 1000, (
        f"{result.failed} at {result.failures}; pyproxy's log around them:\n" + "\n".join(result.context))
    assert result.updates_sent >= 0.9 * 100 * result.seconds and result.update_errors == 0
    assert result.diff == [], "\n".join(result.diff[:20])
    # Flat: after the warm-up, memory does not keep growing with the number of updates.
    assert result.rss_growth_mb < 30, result.curve()
