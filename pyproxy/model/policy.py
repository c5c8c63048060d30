"""Which endpoints a Service port's traffic may reach: the traffic policies, decided once.

Both renderers turn a :class:`TrafficPolicy` into chains and rules, and ``pyproxy explain``
asks it which endpoints one packet can reach (:meth:`TrafficPolicy.pool`), so the words and
the rules cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyproxy.model.objects import Endpoint, ServicePortState


@dataclass(frozen=True, slots=True)
class Pool:
    """The endpoints one new connection can go to, and why those."""

    endpoints: tuple[Endpoint, ...]
    local: bool
    """Limited to this node's endpoints by a Local traffic policy."""
    short_circuit: bool
    """externalTrafficPolicy: Local applies, but not to this source (a pod or the node itself:
    upstream sends them to every endpoint, as if they went out to the load balancer and back)."""


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """A Service port's endpoint pools on this node."""

    cluster: tuple[Endpoint, ...]
    """Cluster-wide usable endpoints (ready, narrowed by topology; else terminating serving)."""
    local: tuple[Endpoint, ...]
    """This node's usable endpoints, when some traffic of the port is limited to them."""
    internal_local: bool
    """internalTrafficPolicy: Local (the ClusterIP reaches ``local`` only)."""
    external: bool
    """The port takes external traffic (a NodePort, external IPs or LB IPs)."""
    external_local: bool
    """externalTrafficPolicy: Local on a port that takes external traffic."""

    @property
    def cluster_pool_used(self) -> bool:
        """Some traffic goes to every endpoint: the ClusterIP under internalTrafficPolicy:
        Cluster, or external traffic (eTP Cluster, or pods and the node under eTP Local)."""
        return not self.internal_local or self.external

    def pool(self, *, external: bool, from_pod: bool = False, from_node: bool = False) -> Pool:
        """The endpoints a new connection can reach: to an external destination (NodePort,
        external IP, LB IP) or to the ClusterIP, from a pod, from the node itself, or from
        elsewhere."""
        short = external and self.external_local and (from_pod or from_node)
        limited = (self.external_local if external else self.internal_local) and not short
        return Pool(endpoints=self.local if limited else self.cluster, local=limited, short_circuit=short)


def traffic_policy(sps: ServicePortState, *, node_name: str) -> TrafficPolicy:
    """The pools of ``sps`` on the node ``node_name``."""
    svc = sps.service
    local = sps.local_endpoints(node_name) if svc.uses_local_endpoints else ()
    return TrafficPolicy(cluster=sps.usable_endpoints, local=local, internal_local=svc.internal_local,
                         external=svc.externally_accessible,
                         external_local=svc.external_local and svc.externally_accessible)


def firewall_applies(sps: ServicePortState, policy: TrafficPolicy, *, mode: str) -> bool:
    """Whether ``loadBalancerSourceRanges`` filter this port's LB IPs. In iptables mode only
    while the port has endpoints, as upstream's iptables proxier writes it: without them the
    no-endpoints reject answers every source, inside the ranges or not (upstream's nftables
    mode filters either way, and so does ours). Found by the differential test (seed 105):
    pyproxy's iptables firewall dropped even the allowed sources of an endpoint-less port."""
    if not sps.service.uses_firewall:
        return False
    return mode != "iptables" or bool(policy.cluster or policy.local)
