"""``pyproxy explain``: what this node does with one packet, in plain words (pure).

It reads the desired state (the model), not the kernel: the same decisions the renderers turn
into rules, written out. A netns test checks its answers against real traffic.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from pyproxy.config import ProxyConfig
from pyproxy.model.objects import DesiredState, Endpoint, ServicePortState
from pyproxy.render.naming import ipt_endpoint_hash, ipt_service_hash, nft_endpoint_base, nft_service_base


@dataclass
class Explanation:
    """The outcome for one packet; ``verdict`` is dnat, reject, drop or pass."""

    verdict: str
    why: str
    service: str = ""
    path: str = ""
    """clusterip or nodeport."""
    chains: list[str] = field(default_factory=list)
    candidates: list[tuple[str, float]] = field(default_factory=list)
    """(ip:port, probability of a new connection going there)."""
    masquerade: bool = False
    masquerade_why: str = ""
    affinity_timeout: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, "why": self.why, "service": self.service, "path": self.path,
                "chains": self.chains, "candidates": [{"endpoint": e, "probability": p} for e, p in self.candidates],
                "masquerade": self.masquerade, "masquerade_why": self.masquerade_why,
                "affinity_timeout": self.affinity_timeout}


def _in(ip: str, cidrs: tuple[str, ...]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(c) for c in cidrs)


def explain(state: DesiredState, config: ProxyConfig, *, dst: str, port: int, proto: str,
            src: str | None = None) -> Explanation:
    proto = proto.lower()
    nodeport = dst in state.nodeport_ips
    for sps in sorted(state.services.values(), key=lambda s: s.service.name):
        svc = sps.service
        if svc.name.protocol != proto:
            continue
        if nodeport and svc.node_port == port:
            return _decide(sps, config, src, path="nodeport")
        if svc.cluster_ip == dst and svc.port == port:
            return _decide(sps, config, src, path="clusterip")
    if any(s.service.cluster_ip == dst for s in state.services.values()):
        if config.mode == "nftables":
            return Explanation("reject", f"{dst} is a ClusterIP but no Service port matches "
                               f"{port}/{proto.upper()}: nftables mode refuses it (cluster-ips-check)")
        return Explanation("pass", f"{dst} is a ClusterIP but no Service port matches {port}/{proto.upper()}: "
                           "iptables mode leaves the packet alone (it is routed as addressed)")
    return Explanation("pass", f"{dst}:{port}/{proto.upper()} is not a service address on this node: "
                       "pyproxy leaves the packet alone")


def _decide(sps: ServicePortState, config: ProxyConfig, src: str | None, *, path: str) -> Explanation:
    svc = sps.service
    name = str(svc.name)
    where = "NodePort" if path == "nodeport" else "ClusterIP"
    if path == "clusterip" and svc.internal_local:
        eps = sps.local_endpoints(config.hostname)
        if not eps:
            if not sps.usable_endpoints:
                return Explanation("reject", f"{name} has no usable endpoint anywhere: refused at once",
                                   service=name, path=path)
            return Explanation("drop", f"{name} has internalTrafficPolicy: Local and no usable endpoint on "
                               f"{config.hostname}: dropped", service=name, path=path)
        pool = f"this node's endpoints (internalTrafficPolicy: Local, {len(eps)})"
    else:
        eps = sps.usable_endpoints
        if not eps:
            return Explanation("reject", f"{name} has no usable endpoint: refused at once "
                               "(a TCP reset; ICMP port unreachable for UDP)", service=name, path=path)
        ready = any(e.ready for e in sps.endpoints)
        pool = "its ready endpoints" if ready else "its serving endpoints that are terminating (none is ready)"
    chains = _chains(config, sps, eps, path)
    share = 1.0 / len(eps)
    out = Explanation("dnat", f"{where} of {name}: a new connection goes to one of {pool}, uniformly at random",
                      service=name, path=path, chains=chains,
                      candidates=[(e.addr, share) for e in eps], affinity_timeout=svc.affinity_timeout)
    if path == "nodeport":
        out.masquerade, out.masquerade_why = True, "NodePort traffic is always masqueraded (replies must come back here)"
    elif config.masquerade_all:
        out.masquerade, out.masquerade_why = True, "--masquerade-all"
    elif config.cluster_cidrs and src and not _in(src, config.cluster_cidrs):
        out.masquerade, out.masquerade_why = True, f"the source {src} is outside --cluster-cidr"
    elif src and any(e.ip == src for e in eps):
        out.masquerade_why = f"only if {src} gets itself as the backend (hairpin)"
    else:
        out.masquerade_why = "a pod keeps its own source address" if src else "the source decides (give --from)"
    return out


def _chains(config: ProxyConfig, sps: ServicePortState, eps: tuple[Endpoint, ...], path: str) -> list[str]:
    svc = sps.service
    if config.mode == "iptables":
        h = ipt_service_hash(svc.name)
        first = [f"PYPROXY-EXT-{h}", f"PYPROXY-SVC-{h}"] if path == "nodeport" else \
            [f"PYPROXY-{'SVL' if svc.internal_local else 'SVC'}-{h}"]
        return [*first, *(f"PYPROXY-SEP-{ipt_endpoint_hash(svc.name, e)}" for e in eps)]
    base = nft_service_base(svc.name)
    first = [f"external-{base}", f"service-{base}"] if path == "nodeport" else \
        [f"{'local' if svc.internal_local else 'service'}-{base}"]
    return [*first, *(f"endpoint-{nft_endpoint_base(svc.name, e)}" for e in eps)]


def render_text(e: Explanation, *, packet: str) -> str:
    lines = [f"packet: {packet}", f"verdict: {e.verdict.upper()} — {e.why}"]
    if e.chains:
        head = [c for c in e.chains if not c.startswith(("endpoint-", "PYPROXY-SEP-"))]
        tail = [c for c in e.chains if c not in head]
        lines.append("path through the rules: " + " → ".join(head) + f" → one of {len(tail)} endpoint chains:")
        lines.extend(f"    {c}" for c in tail)
    for endpoint, p in e.candidates:
        lines.append(f"  → {endpoint}  probability {p:.1%}")
    if e.affinity_timeout:
        lines.append(f"ClientIP affinity: a client seen in the last {e.affinity_timeout}s returns to its backend")
    if e.verdict == "dnat":
        lines.append(f"source NAT: {'yes' if e.masquerade else 'no'} — {e.masquerade_why}")
    return "\n".join(lines)
