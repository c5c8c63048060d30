"""Prometheus metrics, named as kube-proxy names them so existing dashboards work."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_SYNC_BUCKETS = tuple(0.001 * 2**k for k in range(15))  # kube-proxy's exponential buckets

SYNC_DURATION = Histogram(
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds",
    buckets=_SYNC_BUCKETS,
)
SYNC_FULL_DURATION = Histogram(
    "kubeproxy_sync_full_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for full resyncs",
    buckets=_SYNC_BUCKETS,
)
SYNC_PARTIAL_DURATION = Histogram(
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for partial resyncs",
    buckets=_SYNC_BUCKETS,
)
LAST_SYNC = Gauge(
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "The last time proxy rules were successfully synced",
)
NFT_SYNC_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
    "Cumulative proxy nftables sync failures",
)
NFT_TRANSACTIONS = Counter(
    "pyproxy_nft_transactions_total",
    "nftables transactions applied, by path: nft (a script to nft -f) or netlink (element "
    "changes sent straight to the kernel as one batch)",
    ["path"],
)
IPT_RESTORE_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    "Cumulative proxy iptables restore failures",
)
IPT_PARTIAL_RESTORE_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
    "Cumulative proxy iptables partial restore failures",
)
INVALID_OBJECTS = Gauge(
    "pyproxy_invalid_objects",
    "API objects skipped because they are malformed (see the log for the reason)",
    ["kind"],
)
SYNC_OPERATIONS = Histogram(
    "pyproxy_sync_operations",
    "Commands (nft) or lines (iptables-restore) sent to the kernel per sync",
    buckets=(0, 1, 10, 100, 1000, 10000, 100000, 1000000),
)
