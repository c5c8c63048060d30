"""iptables renderer: desired state → fragments of our ``PYPROXY-*`` chains (pure).

Same structure as upstream kube-proxy's iptables mode, with our own prefix so the two never
touch each other's chains:

* nat ``PYPROXY-SERVICES`` (from PREROUTING and OUTPUT): one rule per ClusterIP and port,
  jumping to ``PYPROXY-SVC-<hash>``; its last rule sends node addresses to ``PYPROXY-NODEPORTS``.
* ``PYPROXY-SVC-<hash>``: ClientIP affinity (``-m recent``), then uniform random choice with
  ``-m statistic --probability 1/(n-i)``; each ``PYPROXY-SEP-<hash>`` marks hairpin traffic for
  masquerade and DNATs.
* filter ``PYPROXY-SERVICES`` / ``PYPROXY-EXTERNAL-SERVICES``: REJECT for services with no
  endpoints (REJECT is only valid in the filter table).
"""

from __future__ import annotations

from pyproxy.config import ProxyConfig
from pyproxy.model.objects import DesiredState, Endpoint, ServicePortState
from pyproxy.render.fragments import IptFragment
from pyproxy.render.naming import IPT_PREFIX, ipt_endpoint_hash, ipt_service_hash

P = IPT_PREFIX
SERVICES = P + "SERVICES"
EXTERNAL_SERVICES = P + "EXTERNAL-SERVICES"
NODEPORTS = P + "NODEPORTS"
POSTROUTING = P + "POSTROUTING"
MARK_MASQ = P + "MARK-MASQ"
MASQ_NON_POD = P + "MASQ-NON-POD"
FORWARD = P + "FORWARD"

# (table, chain) of the chains every sync owns; service chains come and go.
TOP_CHAINS = (
    ("filter", SERVICES),
    ("filter", EXTERNAL_SERVICES),
    ("filter", FORWARD),
    ("nat", SERVICES),
    ("nat", NODEPORTS),
    ("nat", POSTROUTING),
    ("nat", MARK_MASQ),
    ("nat", MASQ_NON_POD),
)

# Jumps from the built-in chains into ours: the only rules we add outside our chains. Each is
# (table, built-in chain, rule arguments). Inserted at the top, checked with -C first.
HOOK_JUMPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("filter", "INPUT", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                         "pyproxy externally-visible service portals", "-j", EXTERNAL_SERVICES)),
    ("filter", "FORWARD", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                           "pyproxy externally-visible service portals", "-j", EXTERNAL_SERVICES)),
    ("filter", "FORWARD", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                           "pyproxy service portals", "-j", SERVICES)),
    ("filter", "OUTPUT", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                          "pyproxy service portals", "-j", SERVICES)),
    ("filter", "FORWARD", ("-m", "comment", "--comment", "pyproxy forwarding rules", "-j", FORWARD)),
    ("nat", "PREROUTING", ("-m", "comment", "--comment", "pyproxy service portals", "-j", SERVICES)),
    ("nat", "OUTPUT", ("-m", "comment", "--comment", "pyproxy service portals", "-j", SERVICES)),
    ("nat", "POSTROUTING", ("-m", "comment", "--comment", "pyproxy postrouting rules", "-j", POSTROUTING)),
)


def quote(text: str) -> str:
    """iptables-restore argument quoting for comments (they hold spaces)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def probability(n: int) -> str:
    """1/n with ten decimals, as upstream formats it (``%0.10f``)."""
    return f"{1.0 / n:.10f}"


def _proto(proto: str) -> str:
    return f"-m {proto} -p {proto}"


def render_base(config: ProxyConfig, state: DesiredState) -> IptFragment:
    """Fixed rules of the top-level chains (services add theirs through ``top_rules``)."""
    mark = config.masquerade_mark
    chains: dict[tuple[str, str], tuple[str, ...]] = {
        ("nat", POSTROUTING): (
            f"-m mark ! --mark {mark}/{mark} -j RETURN",
            # Clear the bit so a packet re-entering the stack (e.g. IPsec) is not masqueraded twice.
            f"-j MARK --xor-mark {mark}",
            '-m comment --comment "pyproxy service traffic requiring SNAT" -j MASQUERADE --random-fully',
        ),
        ("nat", MARK_MASQ): (f"-j MARK --or-mark {mark}",),
        ("filter", FORWARD): (
            # Hosts whose FORWARD policy is DROP still pass service traffic.
            f'-m comment --comment "pyproxy forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT',
            '-m comment --comment "pyproxy forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
        ),
    }
    if len(config.cluster_cidrs) > 1:
        chains[("nat", MASQ_NON_POD)] = tuple(
            f"-s {c} -j RETURN" for c in config.cluster_cidrs
        ) + (f"-j {MARK_MASQ}",)
    tail = []
    comment = '-m comment --comment "pyproxy service nodeports; NOTE: this must be the last rule in this chain"'
    for ip in state.nodeport_ips:
        tail.append(f"{comment} -d {ip}/32 -j {NODEPORTS}")
    return IptFragment(chains=chains, top_rules={("nat", SERVICES): tuple(tail)})


def render_service(config: ProxyConfig, sps: ServicePortState) -> IptFragment:
    svc = sps.service
    spn = svc.name
    proto = svc.name.protocol
    dst = f"-d {svc.cluster_ip}/32 --dport {svc.port}"
    endpoints = sps.usable_endpoints
    top: dict[tuple[str, str], list[str]] = {}
    if not endpoints:
        # A TCP reset is not rate-limited; ICMP port-unreachable (UDP, SCTP) is, per client.
        reject = "-j REJECT --reject-with tcp-reset" if proto == "tcp" else "-j REJECT"
        top[("filter", SERVICES)] = [
            f"-m comment --comment {quote(f'{spn} has no endpoints')} {_proto(proto)} {dst} {reject}"
        ]
        if svc.node_port:
            top[("filter", EXTERNAL_SERVICES)] = [
                f"-m comment --comment {quote(f'{spn} has no endpoints')} -m addrtype --dst-type LOCAL "
                f"{_proto(proto)} --dport {svc.node_port} {reject}"
            ]
        return IptFragment(top_rules={k: tuple(v) for k, v in top.items()})

    h = ipt_service_hash(spn)
    svc_chain = f"{P}SVC-{h}"
    svl_chain = f"{P}SVL-{h}"
    chains: dict[tuple[str, str], tuple[str, ...]] = {}
    masq: list[str] = []
    cip_comment = f"-m comment --comment {quote(f'{spn} cluster IP')} {_proto(proto)} {dst}"
    if config.masquerade_all:
        masq.append(f"{cip_comment} -j {MARK_MASQ}")
    elif len(config.cluster_cidrs) == 1:
        masq.append(f"{cip_comment} ! -s {config.cluster_cidrs[0]} -j {MARK_MASQ}")
    elif config.cluster_cidrs:
        masq.append(f"{cip_comment} -j {MASQ_NON_POD}")

    local = sps.local_endpoints(config.hostname) if svc.internal_local else ()
    sep_of = {ep: f"{P}SEP-{ipt_endpoint_hash(spn, ep)}" for ep in dict.fromkeys((*endpoints, *local))}

    def pick(eps: tuple[Endpoint, ...]) -> tuple[str, ...]:
        rules = list(masq)
        if svc.affinity_timeout:
            rules += [f"-m comment --comment {quote(f'{spn} -> {ep.addr}')} -m recent --name {sep_of[ep]} "
                      f"--rcheck --seconds {svc.affinity_timeout} --reap -j {sep_of[ep]}" for ep in eps]
        for i, ep in enumerate(eps):
            stat = "" if i == len(eps) - 1 else f"-m statistic --mode random --probability {probability(len(eps) - i)} "
            rules.append(f"-m comment --comment {quote(f'{spn} -> {ep.addr}')} {stat}-j {sep_of[ep]}")
        return tuple(rules)

    if not svc.internal_local or svc.node_port:
        chains[("nat", svc_chain)] = pick(endpoints)
    if not svc.internal_local:
        top[("nat", SERVICES)] = [f"{cip_comment} -j {svc_chain}"]
    elif local:
        chains[("nat", svl_chain)] = pick(local)
        top[("nat", SERVICES)] = [f"{cip_comment} -j {svl_chain}"]
    else:
        # internalTrafficPolicy: Local with nothing on this node: drop, as upstream does.
        top[("filter", SERVICES)] = [
            f"-m comment --comment {quote(f'{spn} has no local endpoints')} {_proto(proto)} {dst} -j DROP"]
    seps = list(sep_of.items())

    c = f"-m comment --comment {quote(str(spn))}"
    for ep, sep in seps:
        recent = f"-m recent --name {sep} --set " if svc.affinity_timeout else ""
        chains[("nat", sep)] = (
            f"{c} -s {ep.ip}/32 -j {MARK_MASQ}",
            f"{c} {recent}{_proto(proto)} -j DNAT --to-destination {ep.addr}",
        )

    if svc.node_port:
        ext = f"{P}EXT-{h}"
        top[("nat", NODEPORTS)] = [f"{c} {_proto(proto)} --dport {svc.node_port} -j {ext}"]
        chains[("nat", ext)] = (
            f"-m comment --comment {quote(f'masquerade traffic for {spn} external destinations')} -j {MARK_MASQ}",
            f"-j {svc_chain}",
        )
    return IptFragment(chains=chains, top_rules={k: tuple(v) for k, v in top.items()})
