"""Invalid objects are logged and counted once across the IP families' stores."""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY

from pyproxy.model.objects import Problem
from pyproxy.problems import ProblemLog


def _gauge(kind: str) -> float:
    return REGISTRY.get_sample_value("pyproxy_invalid_objects", {"kind": kind}) or 0.0


def test_one_log_line_and_one_count_for_both_families(caplog):
    bad = Problem("Service", "ns", "web", "spec.ports[0].port must be an integer in 1-65535, got 0")
    only6 = Problem("EndpointSlice", "ns", "web-v6", "endpoints[0]: 10.0.0.1 is not IPv6")
    log = ProblemLog()
    with caplog.at_level(logging.WARNING):
        log.report(4, [bad])
        log.report(6, [bad, only6])
        log.report(4, [bad])
    assert sum("ns/web:" in r.message for r in caplog.records) == 1
    assert sum("ns/web-v6" in r.message for r in caplog.records) == 1
    assert _gauge("Service") == 1 and _gauge("EndpointSlice") == 1
    log.report(6, [])  # fixed for IPv6; IPv4 still sees the bad Service
    assert _gauge("Service") == 1 and _gauge("EndpointSlice") == 0
    log.report(4, [])
    assert _gauge("Service") == 0
