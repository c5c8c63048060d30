"""The pure parts of bench/latency.py: node mapping, schedules, change ids, latency attribution."""

import pytest

from bench.latency import (BASE_PORT, _fmt, answer_id, cadence_period, change_body, change_offsets, cpu_model,
                           go_duration, header, latencies, percentile, plan_runs)


def test_subset_of_proxies_gets_nodes_one_to_n_and_upstream_defaults_rows_last():
    runs = plan_runs("pyproxy:nftables,kube-proxy:nftables", 0.1, upstream_defaults=True)
    assert [(r.label, r.node, r.min_sync) for r in runs] == [
        ("pyproxy nftables", 1, 0.1),
        ("kube-proxy nftables", 2, 0.1),
        ("kube-proxy nftables (upstream defaults)", 3, 1.0),
    ]


def test_only_kube_proxy_subset_maps_to_node_one():
    runs = plan_runs("kube-proxy:iptables", 0.1, upstream_defaults=False)
    assert [(r.kind, r.mode, r.node) for r in runs] == [("kube-proxy", "iptables", 1)]


def test_all_proxies_by_default_and_no_redundant_upstream_row():
    runs = plan_runs("", 1.0, upstream_defaults=True)
    assert [r.node for r in runs] == [1, 2, 3, 4]
    assert not any(r.upstream_defaults for r in runs)  # min-sync-period 1 s is upstream's already


def test_unknown_proxy_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        plan_runs("pyproxy:ipvs", 0.1, upstream_defaults=True)


def test_go_duration():
    assert go_duration(0.1) == "100ms"
    assert go_duration(1) == "1000ms"
    assert go_duration(30) == "30000ms"
    assert go_duration(0) == "1ns"  # 0 would be defaulted to 1 s by kube-proxy


def test_cadence_schedule_is_fixed():
    assert cadence_period("isolated", 2.0, 5) == 2.0
    assert cadence_period("steady", 2.0, 50) == pytest.approx(0.02)
    assert change_offsets(4, 0.2) == pytest.approx([0.0, 0.2, 0.4, 0.6])
    with pytest.raises(ValueError):
        cadence_period("steady", 2.0, 0)


def test_each_change_is_identifiable():
    ips = ["10.244.5.10", "10.244.5.11"]
    a, b = change_body(7, ips), change_body(8, ips)
    assert a["ports"][0]["port"] == BASE_PORT + 7 and b["ports"][0]["port"] == BASE_PORT + 8
    assert a["endpoints"][0]["addresses"] != b["endpoints"][0]["addresses"]
    assert answer_id("pod-a/7") == 7
    assert answer_id("pod-a") is None and answer_id("error:timeout") is None


def test_latency_counts_a_later_change_as_serving_an_earlier_one():
    sent = [(1, 10.0), (2, 10.2), (3, 10.4), (4, 10.6)]
    seen = [(9.0, 0), (10.05, None), (10.1, 1), (10.5, 3), (10.55, 2), (11.0, 4)]
    # change 2 was never seen on its own: the batch with 3 serves it; a stale 2 after 3 is ignored.
    assert latencies(sent, seen) == pytest.approx({1: 0.1, 2: 0.3, 3: 0.1, 4: 0.4})


def test_latency_missed_changes_are_none():
    assert latencies([(1, 0.0), (2, 1.0)], [(0.5, 1)]) == {1: 0.5, 2: None}


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    vals = [float(i) for i in range(1, 101)]
    assert percentile(vals, 99) == 99.0
    assert percentile(vals, 100) == 100.0
    assert percentile([5.0], 99) == 5.0


def test_cpu_model_and_header():
    assert cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert cpu_model("") == "unknown CPU"
    seq = header(sequential=True, min_sync=0.1, upstream_defaults=True, machine_text="2 CPUs")
    assert "each proxy alone on the CPU" in seq[0]
    conc = header(sequential=False, min_sync=0.1, upstream_defaults=False, machine_text="2 CPUs")
    assert "all proxies under the same load" in conc[0] and "Machine: 2 CPUs" in conc[1]


def test_table_columns():
    row = {"services": 1000, "endpoints": 10, "proxy": "kube-proxy nftables (upstream defaults)", "min_sync_s": 1.0,
           "cadence": "isolated, 1 per 2 s (10 changes)", "startup_s": 1.234, "p50_ms": 80.0, "p99_ms": 900.0,
           "missed": 1, "cpu_s": 6.5, "peak_rss_mb": 89.0}
    lines = _fmt([row]).splitlines()
    assert lines[0] == ("| services × endpoints | proxy | min-sync-period | cadence | startup s | p50 ms | p99 ms "
                        "| CPU s | peak RSS MB |")
    assert lines[2] == ("| 1,000 × 10 | kube-proxy nftables (upstream defaults) | 1 s | isolated, 1 per 2 s "
                        "(10 changes) | 1.23 | 80 | 900 (1 missed) | 6.5 | 89 |")
