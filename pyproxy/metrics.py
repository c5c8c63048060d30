"""Prometheus metrics, named as kube-proxy names them so existing dashboards work."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

log = logging.getLogger("pyproxy.metrics")

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


class KernelCounter:
    """A counter the kernel keeps (an nfacct object), read when ``/metrics`` is scraped. The
    code that programs the rules counting into it says how to read it (``read_with``); until
    then, or when the read gives None or fails, the metric is left out of the scrape, as
    upstream leaves out a counter it cannot read."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self._read: Callable[[], int | None] | None = None
        self._failed = False

    def read_with(self, read: Callable[[], int | None] | None) -> None:
        """Export the value ``read()`` returns from now on; None: export nothing."""
        self._read = read

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        read = self._read
        if read is None:
            return
        try:
            value = read()
        except Exception:  # noqa: BLE001 - one unreadable counter must not break the scrape
            # Logged in full once; a counter that stays unreadable would fill the log.
            log.log(logging.DEBUG if self._failed else logging.WARNING, "cannot read %s",
                    self.name, exc_info=True)
            self._failed = True
            return
        if value is not None:
            yield CounterMetricFamily(self.name, self.documentation, value=value)


LOCALHOST_NODEPORTS_ACCEPTED = KernelCounter(
    "kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
    "Number of packets accepted on nodeports of loopback interface",
)
"""iptables mode with localhost NodePorts: new connections to 127.0.0.1:<NodePort> (the nat
table sees a connection's first packet only), counted by the nfacct object
``localhost_nps_accepted_pkts`` as upstream counts them."""
REGISTRY.register(LOCALHOST_NODEPORTS_ACCEPTED)
INVALID_DROPPED = KernelCounter(
    "kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
    "packets dropped by iptables to work around conntrack problems",
)
"""iptables mode, conntrack not liberal: forwarded packets conntrack holds INVALID, dropped and
counted by the nfacct object ``ct_state_invalid_dropped_pkts`` as upstream counts them."""
REGISTRY.register(INVALID_DROPPED)
