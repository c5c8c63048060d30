"""``pyproxy explain``: what this node does with one packet, in plain words (pure).

It reads the desired state (the model), not the kernel: the same decisions the renderers turn
into rules, written out. A netns test checks its answers against real traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pyproxy.config import ProxyConfig
from pyproxy.literals import Path, Verdict
from pyproxy.model.ipaddr import ip_in_cidrs
from pyproxy.model.objects import DesiredState, ServicePortState
from pyproxy.model.policy import firewall_applies, traffic_policy
from pyproxy.render.naming import ServiceChains
from pyproxy.render.slots import MAP_PREFIX, SLOTS, slot_ranges


@dataclass
class Explanation:
    """The outcome for one packet; ``verdict`` is dnat, reject, drop or pass."""

    verdict: Verdict
    why: str
    service: str = ""
    path: Path | Literal[""] = ""
    """clusterip, nodeport, externalip or loadbalancer."""
    chains: list[str] = field(default_factory=list)
    endpoint_map: str = ""
    """nftables, without ClientIP affinity: the shared maps from a random slot to the endpoint
    (``endpoints-*``; which one, and the pool's offset in it, is in the service chain's rule:
    the proxier places pools as they come, so only the kernel knows)."""
    candidates: list[tuple[str, float]] = field(default_factory=list)
    """(ip:port, probability of a new connection going there)."""
    masquerade: bool = False
    masquerade_why: str = ""
    affinity_timeout: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, "why": self.why, "service": self.service, "path": self.path,
                "chains": self.chains, "endpoint_map": self.endpoint_map, "candidates": [{"endpoint": e, "probability": p} for e, p in self.candidates],
                "masquerade": self.masquerade, "masquerade_why": self.masquerade_why,
                "affinity_timeout": self.affinity_timeout}


PATH_NAMES = {"clusterip": "ClusterIP", "nodeport": "NodePort", "externalip": "external IP",
              "loadbalancer": "LoadBalancer IP"}


def explain(state: DesiredState, config: ProxyConfig, *, dst: str, port: int, proto: str,
            src: str | None = None, src_is_node: bool = False) -> Explanation:
    """What happens to a new connection ``src`` → ``dst:port/proto`` on this node.

    ``src_is_node``: the packet starts on the node itself (its own address as source)."""
    proto = proto.lower()
    nodeport = dst in state.nodeport_ips
    src_is_node = src_is_node or bool(src and src in state.nodeport_ips)
    for sps in sorted(state.services.values(), key=lambda s: s.service.name):
        svc = sps.service
        if svc.name.protocol != proto:
            continue
        if nodeport and svc.node_port == port:
            return _decide(sps, config, src, path="nodeport", src_is_node=src_is_node)
        if svc.port != port:
            continue
        if svc.cluster_ip == dst:
            return _decide(sps, config, src, path="clusterip", src_is_node=src_is_node)
        if dst in svc.external_ips:
            return _decide(sps, config, src, path="externalip", src_is_node=src_is_node)
        if dst in svc.lb_ips:
            return _decide(sps, config, src, path="loadbalancer", src_is_node=src_is_node)
    if any(s.service.cluster_ip == dst for s in state.services.values()):
        if config.mode == "nftables":
            return Explanation("reject", f"{dst} is a ClusterIP but no Service port matches "
                               f"{port}/{proto.upper()}: nftables mode refuses it (cluster-ips-check)")
        return Explanation("pass", f"{dst} is a ClusterIP but no Service port matches {port}/{proto.upper()}: "
                           "iptables mode leaves the packet alone (it is routed as addressed)")
    return Explanation("pass", f"{dst}:{port}/{proto.upper()} is not a service address on this node: "
                       "pyproxy leaves the packet alone")


def _firewall(sps: ServicePortState, src: str | None) -> Explanation | None:
    """loadBalancerSourceRanges, checked before anything else on an LB IP."""
    svc = sps.service
    allowed = sps.firewall_sources
    name = str(svc.name)
    if src is None:
        return Explanation("drop", f"{name} admits only sources in loadBalancerSourceRanges "
                           f"({', '.join(allowed) or 'none of this family'}): give --from to know", service=name,
                           path="loadbalancer")
    if not allowed or not ip_in_cidrs(src, allowed):
        return Explanation("drop", f"{src} is outside {name}'s loadBalancerSourceRanges "
                           f"({', '.join(allowed) or 'none of this family'}): dropped before DNAT",
                           service=name, path="loadbalancer")
    return None


def _decide(sps: ServicePortState, config: ProxyConfig, src: str | None, *, path: Path,
            src_is_node: bool = False) -> Explanation:
    svc = sps.service
    name = str(svc.name)
    where = PATH_NAMES[path]
    external = path != "clusterip"
    policy = traffic_policy(sps, node_name=config.hostname)
    if path == "loadbalancer" and firewall_applies(sps, policy, mode=config.mode):
        blocked = _firewall(sps, src)
        if blocked is not None:
            return blocked
    if not policy.cluster:
        return Explanation("reject", f"{name} has no usable endpoint: refused at once "
                           "(a TCP reset; ICMP port unreachable for UDP)", service=name, path=path)
    from_pod = bool(src and config.cluster_cidrs and ip_in_cidrs(src, config.cluster_cidrs))
    pool = policy.pool(external=external, from_pod=from_pod, from_node=src_is_node)
    eps = pool.endpoints
    if pool.local:
        which = "externalTrafficPolicy" if external else "internalTrafficPolicy"
        if not eps:
            return Explanation("drop", f"{name} has {which}: Local and no usable endpoint on "
                               f"{config.hostname}: dropped", service=name, path=path)
        words = f"this node's endpoints ({which}: Local, {len(eps)})"
    else:
        ready = any(e.ready for e in sps.endpoints)
        words = "its ready endpoints" if ready else "its serving endpoints that are terminating (none is ready)"
        if pool.short_circuit:
            who = "a pod" if from_pod else "the node itself"
            words += f" (externalTrafficPolicy: Local does not apply to {who})"
        if ready and sps.topology_mode:
            scope = f"node {sps.node.name}" if sps.topology_mode == "PreferSameNode" else f"zone {sps.node.zone}"
            words += f", narrowed by topology hints to those for {scope}"
    names = ServiceChains(svc.name, mode=config.mode)
    chains = _chains(names, sps, path, local=pool.local)
    endpoint_map = ""
    if config.mode == "nftables" and not svc.affinity_timeout:
        endpoint_map = f"{MAP_PREFIX}*"
        shares = [(hi - lo + 1) / SLOTS for lo, hi in slot_ranges(len(eps))]
    else:
        chains += [names.endpoint(e) for e in eps]
        shares = [1.0 / len(eps)] * len(eps)
    out = Explanation("dnat", f"{where} of {name}: a new connection goes to one of {words}, uniformly at random",
                      service=name, path=path, chains=chains,
                      endpoint_map=endpoint_map, candidates=[(e.addr, p) for e, p in zip(eps, shares)],
                      affinity_timeout=svc.affinity_timeout)
    if external and not policy.external_local:
        out.masquerade, out.masquerade_why = True, (
            f"{where} traffic is masqueraded under externalTrafficPolicy: Cluster (replies must come back here)")
    elif external and src_is_node:
        out.masquerade, out.masquerade_why = True, "traffic from the node itself is masqueraded"
    elif external:
        out.masquerade_why = ("a pod keeps its own source address" if from_pod
                              else "externalTrafficPolicy: Local keeps the client's address")
    elif config.masquerade_all:
        out.masquerade, out.masquerade_why = True, "--masquerade-all"
    elif config.cluster_cidrs and src and not ip_in_cidrs(src, config.cluster_cidrs):
        out.masquerade, out.masquerade_why = True, f"the source {src} is outside --cluster-cidr"
    elif src and any(e.ip == src for e in eps):
        out.masquerade_why = f"only if {src} gets itself as the backend (hairpin)"
    else:
        out.masquerade_why = "a pod keeps its own source address" if src else "the source decides (give --from)"
    return out


def _chains(names: ServiceChains, sps: ServicePortState, path: str, *, local: bool) -> list[str]:
    """The service's own chains a packet on ``path`` goes through, before the endpoint."""
    svc = sps.service
    policy = names.local if local else names.cluster
    first = [names.external, policy] if path != "clusterip" else [policy]
    if path == "loadbalancer" and svc.uses_firewall:
        first.insert(0, names.firewall)
    return first


def render_text(e: Explanation, *, packet: str) -> str:
    lines = [f"packet: {packet}", f"verdict: {e.verdict.upper()} — {e.why}"]
    if e.chains:
        head = [c for c in e.chains if not c.startswith(("endpoint-", "PYPROXY-SEP-"))]
        tail = [c for c in e.chains if c not in head]
        if e.endpoint_map:
            lines.append("path through the rules: " + " → ".join(head) +
                         " → a random slot of the pool's own region, looked up in a shared map "
                         f"@{e.endpoint_map} (the chain's rule names it), picks the endpoint:")
        elif tail:
            lines.append("path through the rules: " + " → ".join(head) +
                         f" → one of {len(tail)} endpoint chains:")
            lines.extend(f"    {c}" for c in tail)
        else:
            lines.append("path through the rules: " + " → ".join(head) + ", which DNATs to the one endpoint")
    for endpoint, p in e.candidates:
        lines.append(f"  → {endpoint}  probability {p:.1%}")
    if e.affinity_timeout:
        lines.append(f"ClientIP affinity: a client seen in the last {e.affinity_timeout}s returns to its backend")
    if e.verdict == "dnat":
        lines.append(f"source NAT: {'yes' if e.masquerade else 'no'} — {e.masquerade_why}")
    return "\n".join(lines)
