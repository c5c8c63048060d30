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
from pyproxy.model.policy import firewall_applies, traffic_policy
from pyproxy.render.fragments import IptFragment
from pyproxy.render.naming import IPT_PREFIX, ServiceChains, ipt_comment

P = IPT_PREFIX
SERVICES = P + "SERVICES"
EXTERNAL_SERVICES = P + "EXTERNAL-SERVICES"
NODEPORTS = P + "NODEPORTS"
POSTROUTING = P + "POSTROUTING"
MARK_MASQ = P + "MARK-MASQ"
MASQ_NON_POD = P + "MASQ-NON-POD"
FORWARD = P + "FORWARD"
PROXY_FIREWALL = P + "PROXY-FIREWALL"
LOCALNET_FIREWALL = P + "FIREWALL"

LOCALHOST_NODEPORTS_COUNTER = "localhost_nps_accepted_pkts"
"""The nfacct object the localhost NodePort rules count in (upstream's name, so its metric,
``kubeproxy_iptables_localhost_nodeports_accepted_packets_total``, reads the same object)."""

INVALID_DROPPED_COUNTER = "ct_state_invalid_dropped_pkts"
"""The nfacct object the INVALID-drop rule counts in (upstream's name and metric,
``kubeproxy_iptables_ct_state_invalid_dropped_packets_total``)."""

# (table, chain) of the chains every sync owns; service chains come and go.
TOP_CHAINS = (
    ("filter", SERVICES),
    ("filter", EXTERNAL_SERVICES),
    ("filter", FORWARD),
    ("filter", PROXY_FIREWALL),
    ("filter", LOCALNET_FIREWALL),
    ("filter", NODEPORTS),
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
    *(("filter", hook, ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                        "pyproxy load balancer firewall", "-j", PROXY_FIREWALL))
      for hook in ("INPUT", "OUTPUT", "FORWARD")),
    *(("filter", hook, ("-m", "comment", "--comment", "pyproxy localnet firewall", "-j", LOCALNET_FIREWALL))
      for hook in ("INPUT", "OUTPUT")),
    ("nat", "PREROUTING", ("-m", "comment", "--comment", "pyproxy service portals", "-j", SERVICES)),
    ("nat", "OUTPUT", ("-m", "comment", "--comment", "pyproxy service portals", "-j", SERVICES)),
    ("nat", "POSTROUTING", ("-m", "comment", "--comment", "pyproxy postrouting rules", "-j", POSTROUTING)),
)


def probability(n: int) -> str:
    """1/n with ten decimals, as upstream formats it (``%0.10f``)."""
    return f"{1.0 / n:.10f}"


def _proto(proto: str) -> str:
    return f"-m {proto} -p {proto}"


def _host(config: ProxyConfig) -> int:
    """Prefix length of one address: 32, or 128 in ip6tables."""
    return 128 if config.family == 6 else 32


def render_base(config: ProxyConfig, state: DesiredState, *, drop_invalid: bool = False,
                invalid_counter: str | None = None) -> IptFragment:
    """Fixed rules of the top-level chains (services add theirs through ``top_rules``).

    ``drop_invalid``: forwarded packets conntrack holds INVALID are dropped first (counted in
    the nfacct object ``invalid_counter``, if any). A TCP segment outside the window it
    expects (a retransmission after a window probe, a late packet of a long transfer) is
    INVALID: conntrack does not translate it, so the pod's answer would leave with the pod's
    own address, and the client, not knowing that address, resets the connection (upstream
    kubernetes#74839). Not needed when conntrack is liberal (nf_conntrack_tcp_be_liberal=1:
    no segment is INVALID for its window), as upstream decides."""
    mark = config.masquerade_mark
    h = _host(config)
    invalid: tuple[str, ...] = ()
    if drop_invalid:
        count = f" -m nfacct --nfacct-name {invalid_counter}" if invalid_counter else ""
        invalid = (f"-m conntrack --ctstate INVALID{count} -j DROP",)
    chains: dict[tuple[str, str], tuple[str, ...]] = {
        ("nat", POSTROUTING): (
            f"-m mark ! --mark {mark}/{mark} -j RETURN",
            # Clear the bit so a packet re-entering the stack (e.g. IPsec) is not masqueraded twice.
            f"-j MARK --xor-mark {mark}",
            '-m comment --comment "pyproxy service traffic requiring SNAT" -j MASQUERADE --random-fully',
        ),
        ("nat", MARK_MASQ): (f"-j MARK --or-mark {mark}",),
        ("filter", FORWARD): (
            *invalid,
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
        tail.append(f"{comment} -d {ip}/{h} -j {NODEPORTS}")
    if config.localhost_nodeports_active:
        tail.append(f"{comment} -d 127.0.0.0/8 -j {NODEPORTS}")
        # CVE-2020-8558: route_localnet=1 (which localhost NodePorts need) would also let a
        # neighbour reach services bound to 127.0.0.1 by sending packets addressed to it. Drop
        # such martians unless they are replies or were DNATed by us. (kubelet writes the same
        # rule in its own chain; this one does not depend on kubelet.)
        chains[("filter", LOCALNET_FIREWALL)] = (
            '-m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 '
            "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        )
    # The filter side of NodePorts (reject without endpoints, drop under eTP Local) applies on
    # the same addresses as their DNAT, not on every local address: the node may serve that
    # port number on another address.
    filter_tail = [t.replace("pyproxy service nodeports", "pyproxy service nodeports filter") for t in tail]
    return IptFragment(chains=chains, top_rules={("nat", SERVICES): tuple(tail),
                                                 ("filter", EXTERNAL_SERVICES): tuple(filter_tail)})


def render_service(config: ProxyConfig, sps: ServicePortState, *,
                   localhost_counter: str | None = None) -> IptFragment:
    """One Service port's chains and its rules in the top-level chains. ``localhost_counter``:
    the nfacct object (it must exist) that NodePort connections to 127.0.0.0/8 are counted in,
    when localhost NodePorts are on; None: not counted."""
    svc = sps.service
    spn = svc.name
    proto = svc.name.protocol
    m = _host(config)
    dst = f"-d {svc.cluster_ip}/{m} --dport {svc.port}"
    policy = traffic_policy(sps, node_name=config.hostname)
    endpoints = policy.cluster
    top: dict[tuple[str, str], list[str]] = {}
    chains: dict[tuple[str, str], tuple[str, ...]] = {}
    names = ServiceChains(spn, mode="iptables")
    svc_chain, svl_chain, ext_chain, fw_chain = names.cluster, names.local, names.external, names.firewall
    vips = [(ip, "external IP") for ip in svc.external_ips] + [(ip, "loadbalancer IP") for ip in svc.lb_ips]
    firewall = firewall_applies(sps, policy, mode="iptables")

    if firewall:
        # loadBalancerSourceRanges: the nat rule for an LB IP goes through FW-, which sends
        # allowed sources on to EXT- (DNAT); the rest stay addressed to the LB IP, and the
        # filter PROXY-FIREWALL chain drops them (DNATed packets no longer match it).
        for ip in svc.lb_ips:
            top.setdefault(("filter", PROXY_FIREWALL), []).append(
                f"{ipt_comment(f'{spn} traffic not accepted by {fw_chain}')} "
                f"{_proto(proto)} -d {ip}/{m} --dport {svc.port} -j DROP")

    if not endpoints:
        # A TCP reset is not rate-limited; ICMP port-unreachable (UDP, SCTP) is, per client.
        reject = "-j REJECT --reject-with tcp-reset" if proto == "tcp" else "-j REJECT"
        none = ipt_comment(f"{spn} has no endpoints")
        top[("filter", SERVICES)] = [f"{none} {_proto(proto)} {dst} {reject}"]
        ext = [f"{none} {_proto(proto)} -d {ip}/{m} --dport {svc.port} {reject}" for ip, _ in vips]
        if svc.node_port:
            top[("filter", NODEPORTS)] = [f"{none} {_proto(proto)} --dport {svc.node_port} {reject}"]
        if ext:
            top[("filter", EXTERNAL_SERVICES)] = ext
        return IptFragment(top_rules={k: tuple(v) for k, v in top.items()})

    masq: list[str] = []
    cip_comment = f"{ipt_comment(f'{spn} cluster IP')} {_proto(proto)} {dst}"
    if config.masquerade_all:
        masq.append(f"{cip_comment} -j {MARK_MASQ}")
    elif len(config.cluster_cidrs) == 1:
        masq.append(f"{cip_comment} ! -s {config.cluster_cidrs[0]} -j {MARK_MASQ}")
    elif config.cluster_cidrs:
        masq.append(f"{cip_comment} -j {MASQ_NON_POD}")

    local = policy.local
    sep_of = {ep: names.endpoint(ep) for ep in dict.fromkeys((*endpoints, *local))}

    def pick(eps: tuple[Endpoint, ...]) -> tuple[str, ...]:
        rules = list(masq)
        if svc.affinity_timeout:
            rules += [f"{ipt_comment(f'{spn} -> {ep.addr}')} -m recent --name {sep_of[ep]} "
                      f"--rcheck --seconds {svc.affinity_timeout} --reap -j {sep_of[ep]}" for ep in eps]
        for i, ep in enumerate(eps):
            stat = "" if i == len(eps) - 1 else f"-m statistic --mode random --probability {probability(len(eps) - i)} "
            rules.append(f"{ipt_comment(f'{spn} -> {ep.addr}')} {stat}-j {sep_of[ep]}")
        return tuple(rules)

    if policy.cluster_pool_used:
        chains[("nat", svc_chain)] = pick(endpoints)
    if local:
        chains[("nat", svl_chain)] = pick(local)
    if not policy.internal_local:
        top[("nat", SERVICES)] = [f"{cip_comment} -j {svc_chain}"]
    elif local:
        top[("nat", SERVICES)] = [f"{cip_comment} -j {svl_chain}"]
    else:
        # internalTrafficPolicy: Local with nothing on this node: drop, as upstream does.
        top[("filter", SERVICES)] = [
            f"{ipt_comment(f'{spn} has no local endpoints')} {_proto(proto)} {dst} -j DROP"]

    c = ipt_comment(str(spn))
    for ep, sep in sep_of.items():
        recent = f"-m recent --name {sep} --set " if svc.affinity_timeout else ""
        chains[("nat", sep)] = (
            f"{c} -s {ep.ip}/{m} -j {MARK_MASQ}",
            f"{c} {recent}{_proto(proto)} -j DNAT --to-destination {ep.addr}",
        )

    if svc.externally_accessible:
        for ip, kind in vips:
            target = fw_chain if kind == "loadbalancer IP" and firewall else ext_chain
            top.setdefault(("nat", SERVICES), []).append(
                f"{ipt_comment(f'{spn} {kind}')} {_proto(proto)} -d {ip}/{m} "
                f"--dport {svc.port} -j {target}")
        if firewall:
            allowed = [a if "/" in a else f"{a}/{m}" for a in sps.firewall_sources]
            lb = ipt_comment(f"{spn} loadbalancer IP")
            chains[("nat", fw_chain)] = (
                *(f"{lb} -s {cidr} -j {ext_chain}" for cidr in allowed),
                f"{ipt_comment(f'other traffic to {spn} will be dropped by {PROXY_FIREWALL}')}",
            )
        if svc.node_port:
            nodeports = top[("nat", NODEPORTS)] = []
            if localhost_counter and config.localhost_nodeports_active:
                # As upstream: the same jump, first, for 127.0.0.0/8 only, through the nfacct
                # match, which counts every packet it sees (nat sees a connection's first).
                nodeports.append(f"{c} {_proto(proto)} -d 127.0.0.0/8 --dport {svc.node_port} "
                                 f"-m nfacct --nfacct-name {localhost_counter} -j {ext_chain}")
            nodeports.append(f"{c} {_proto(proto)} --dport {svc.node_port} -j {ext_chain}")
        if not policy.external_local:
            chains[("nat", ext_chain)] = (
                f"{ipt_comment(f'masquerade traffic for {spn} external destinations')} -j {MARK_MASQ}",
                f"-j {svc_chain}",
            )
        else:
            rules = [
                f"{ipt_comment(f'pod traffic for {spn} external destinations')} -s {cidr} -j {svc_chain}"
                for cidr in config.cluster_cidrs
            ]
            rules += [
                f"{ipt_comment(f'masquerade LOCAL traffic for {spn} external destinations')} "
                f"-m addrtype --src-type LOCAL -j {MARK_MASQ}",
                f"{ipt_comment(f'route LOCAL traffic for {spn} external destinations')} "
                f"-m addrtype --src-type LOCAL -j {svc_chain}",
            ]
            if local:
                rules.append(f"-j {svl_chain}")
            chains[("nat", ext_chain)] = tuple(rules)
            if not local:
                # External clients are dropped (pod and node traffic was DNATed above).
                none = ipt_comment(f"{spn} has no local endpoints")
                ext = [f"{none} {_proto(proto)} -d {ip}/{m} --dport {svc.port} -j DROP" for ip, _ in vips]
                if svc.node_port:
                    top.setdefault(("filter", NODEPORTS), []).append(
                        f"{none} {_proto(proto)} --dport {svc.node_port} -j DROP")
                top.setdefault(("filter", EXTERNAL_SERVICES), []).extend(ext)
    return IptFragment(chains=chains, top_rules={k: tuple(v) for k, v in top.items()})
