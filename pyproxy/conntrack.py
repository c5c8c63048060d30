"""Stale UDP conntrack cleanup, through netlink (pyroute2), as kube-proxy's CleanStaleEntries.

UDP has no connection to close: a client that keeps sending from the same port keeps its
conntrack entry alive, and with it the NAT decision made when the entry was created. So when
a UDP service's backend goes away (or the service had no endpoints, so packets were not
DNATed at all), the client keeps talking to nothing until it goes quiet for the UDP timeout.
After a sync, delete every UDP entry whose original destination is a service IP and port (or a
NodePort on one of the node's NodePort addresses) and whose reply source, address and port, is
not a serving endpoint of that service:
the next packet creates a fresh entry that goes through the new rules. The port matters: a
Service whose targetPort changes keeps the same endpoint IPs, and its old flows still go to the
old port (upstream's e2e spec "cleanup conntrack entries when UDP service target port changes").

NodePort flows are matched on the node's NodePort addresses and the port, never on the port
alone. Upstream matches the port alone, so it must skip a NodePort whose Service has no serving
endpoint (every UDP flow to that port number, to any host, would go), and so leaves the flows
of a NodePort whose last endpoint went on the dead backend; and with endpoints it deletes a flow
to an unrelated host that happens to use that port number. Here neither happens.
"""

from __future__ import annotations

import logging
import socket
import time

from prometheus_client import Counter, Histogram

from pyproxy.literals import Family
from pyproxy.model.objects import DesiredState

log = logging.getLogger("pyproxy.conntrack")

DELETED = Counter("kubeproxy_conntrack_reconciler_deleted_entries_total",
                  "Cumulative conntrack flows deleted by conntrack reconciler")
FAILURES = Counter("pyproxy_conntrack_cleanup_failures_total",
                   "Conntrack cleanups that failed part-way (netlink errors); the next sync that "
                   "changes UDP backends tries again")
DURATION = Histogram("kubeproxy_conntrack_reconciler_sync_duration_seconds",
                     "ReconcileConntrackFlowsLatency latency in seconds",
                     buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10))

Serving = dict[tuple[str, int], frozenset[tuple[str, int]]]
"""(service IP, port), or (NodePort address, NodePort) → the (IP, port) of serving endpoints."""


CLEANED = {"udp": socket.IPPROTO_UDP, "sctp": 132}
"""Protocols whose flows outlive a backend: no connection close tells the client to move on."""


def udp_serving(state: DesiredState, protocol: str = "udp", *,
                localhost_nodeports: bool = False) -> Serving:
    """What a UDP (or SCTP) flow may legitimately be answered by, per service address.

    Serving endpoints, whatever the traffic policy or topology, as upstream does: an entry to
    an endpoint that still serves is left alone even if it is no longer the preferred one.
    NodePorts on the state's NodePort addresses, and on 127.0.0.1 with ``localhost_nodeports``.
    """
    node_addresses = (*state.nodeport_ips, *(("127.0.0.1",) if localhost_nodeports else ()))
    out: dict[tuple[str, int], set[tuple[str, int]]] = {}
    for sps in state.services.values():
        svc = sps.service
        if svc.name.protocol != protocol:
            continue
        ips = {(e.ip, e.port) for e in sps.endpoints if e.serving}
        for vip in (svc.cluster_ip, *svc.external_vips):
            out.setdefault((vip, svc.port), set()).update(ips)
        if svc.node_port:
            for address in node_addresses:
                out.setdefault((address, svc.node_port), set()).update(ips)
    return {k: frozenset(v) for k, v in out.items()}


def stale(entries: list[tuple[str, int, str, int]], serving: Serving) -> list[int]:
    """Indexes of entries to delete; each is (orig dst IP, orig dst port, reply src IP, reply src port)."""
    doomed = []
    for i, (dst, port, reply_src, reply_port) in enumerate(entries):
        allowed = serving.get((dst, port))
        if allowed is None:
            continue  # not service traffic
        if (reply_src, reply_port) not in allowed:
            doomed.append(i)
    return doomed


def clean(serving: Serving, *, family: Family = 4, protocol: str = "udp") -> int:
    """Delete stale entries of one family and protocol in this network namespace; return how many."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    if not serving:
        return 0
    t0 = time.perf_counter()
    deleted = 0
    with Conntrack() as ct:
        af = socket.AF_INET6 if family == 6 else socket.AF_INET
        entries = [e for e in ct.dump_entries(tuple_orig=NFCTAttrTuple(family=af, proto=CLEANED[protocol]))
                   if (":" in (e.tuple_orig.daddr or "")) == (family == 6)]
        keys = [(_canonical(e.tuple_orig.daddr), e.tuple_orig.dport, _canonical(e.tuple_reply.saddr),
                 e.tuple_reply.sport) for e in entries]
        for i in stale(keys, serving):
            try:
                ct.delete(entries[i])
                deleted += 1
            except (OSError, NetlinkError):
                # Gone already: it expired between the dump and the delete (pyroute2 raises
                # NetlinkError, not OSError, for ENOENT), or another cleaner took it.
                pass
    DELETED.inc(deleted)
    DURATION.observe(time.perf_counter() - t0)
    if deleted:
        log.info("deleted %d stale %s conntrack entries", deleted, protocol.upper())
    return deleted


def _canonical(ip: str | None) -> str:
    """Addresses as the model writes them (IPv6 compressed, lower case)."""
    if not ip or ":" not in ip:
        return ip or ""
    import ipaddress

    return str(ipaddress.IPv6Address(ip))


class ConntrackCleaner:
    """Runs :func:`clean` after syncs that changed what UDP services may be answered by."""

    def __init__(self, *, family: Family = 4, localhost_nodeports: bool = False) -> None:
        self.family = family
        self.localhost_nodeports = localhost_nodeports
        """NodePorts also answer on 127.0.0.1 (iptables mode's localhost NodePorts)."""
        self._last: dict[str, Serving] = {}
        self._generation: int | None = None
        """The state whose serving endpoints ``_last`` holds, when every protocol was cleaned."""

    def after_sync(self, state: DesiredState) -> int:
        changes = state.changes
        if (changes is not None and self._generation is not None and changes.since == self._generation
                and not any(name.protocol in CLEANED for name in changes.names)):
            # Only TCP service ports changed since the last clean: nothing to look at (this
            # keeps a sync's cost following its change, not the number of Services).
            self._generation = changes.generation
            return 0
        deleted = 0
        complete = True
        for protocol in CLEANED:
            serving = udp_serving(state, protocol, localhost_nodeports=self.localhost_nodeports)
            if not serving or serving == self._last.get(protocol):
                continue  # no such service, or nothing changed since the last clean
            try:
                deleted += clean(serving, family=self.family, protocol=protocol)
            except Exception as err:  # noqa: BLE001 - cleanup is best effort, never fatal
                # No conntrack support here, or a netlink error mid-dump: the rules are in
                # place either way. Not remembered as done, so the next change retries.
                FAILURES.inc()
                complete = False
                log.warning("conntrack cleanup of %s failed (retried after the next change): %s: %s",
                            protocol.upper(), type(err).__name__, err)
                continue
            self._last[protocol] = serving
        self._generation = changes.generation if complete and changes is not None else None
        return deleted
