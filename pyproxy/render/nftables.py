"""nftables renderer: desired state → fragments of table ``ip pyproxy``.

Layout (see the README for a line-by-line reading):

* ``services`` (jumped from the nat prerouting and output hooks) does one lookup in the verdict
  map ``service-ips`` keyed on ``daddr . protocol . dport``, then one in ``service-nodeports``
  for NodePorts. Dispatch is O(1) whatever the number of services.
* ``service-HASH-ns/svc/proto/port`` picks an endpoint: one ``dnat`` whose address and port come
  from a shared map ``endpoints-N``, looked up with a random slot of the pool's own region
  (``numgen random mod SLOTS offset O``; see :mod:`pyproxy.render.slots`). Adding, removing or
  replacing an endpoint changes map elements only. ClientIP affinity needs per-client state per
  endpoint: there, affinity sets first, then a uniform cascade to ``endpoint-HASH-…`` chains.
* Services without endpoints have no service chain; the filter hooks look them up in
  ``no-endpoint-services`` / ``no-endpoint-nodeports`` and reject at once.

Random choice: upstream writes ``numgen random mod N vmap { 0 : goto …, 1 : goto … }``. Each such
rule makes the kernel allocate an anonymous set, and the kernel finds a free anonymous-set name by
scanning every set of the table, so a full sync is quadratic in the number of services: measured
here with nft 1.0.6 on kernel 6.18, 10k services × 10 endpoints took 177 s to load. Shared maps
keep the number of sets small (400 at 10k services × 10 endpoints) and every rule's text fixed.
The affinity cascade, ``numgen random mod (N-i) 0 goto endpoint-i`` (the last rule always
matches), is iptables' ``--probability 1/(N-i)`` in nft and needs no set.
"""

from __future__ import annotations

from collections.abc import Mapping

from pyproxy.config import ProxyConfig
from pyproxy.literals import Family
from pyproxy.model.objects import DesiredState, Endpoint, ServicePortState
from pyproxy.model.policy import traffic_policy
from pyproxy.render.fragments import NftFragment
from pyproxy.render.naming import ServiceChains, nft_comment
from pyproxy.render.slots import (
    FIRST_PREFIX,
    MAP_PREFIX,
    SLOTS,
    Place,
    SlotAllocator,
    first_map_name,
    map_name,
    slot_ranges,
)

TABLE_NAME = "pyproxy"

# Base chains: the only chains attached to netfilter hooks. Priorities follow upstream:
# DNAT at dstnat (-100), masquerade at srcnat (100), filter checks at 0 (after DNAT, so
# DNATed packets no longer match the "no endpoints" lookups).
BASE_CHAINS = {
    "nat-prerouting": "type nat hook prerouting priority -100 ;",
    "nat-output": "type nat hook output priority -100 ;",
    "nat-postrouting": "type nat hook postrouting priority 100 ;",
    "filter-prerouting-pre-dnat": "type filter hook prerouting priority -110 ;",
    "filter-output-pre-dnat": "type filter hook output priority -110 ;",
    "filter-input": "type filter hook input priority 0 ;",
    "filter-forward": "type filter hook forward priority 0 ;",
    "filter-output": "type filter hook output priority 0 ;",
}


MISSED = 'drop comment "no endpoint found"'
"""The rule after an endpoint lookup and its fallback (see render_service): never reached while
the maps hold every pool's elements."""


def endpoint_map_spec(family: Family, protocol: str) -> str:
    """A shared endpoint map of one protocol: slot range → address . port (for the dnat
    statement); see :mod:`pyproxy.render.slots`."""
    return f"typeof numgen random mod 2 : {table_family(family)} daddr . {protocol} dport ; flags interval ; " \
        f'comment "random slot to endpoint: {SLOTS} slots a pool" ;'


def first_map_spec(family: Family, protocol: str) -> str:
    """The hash map beside a shared endpoint map: a pool's offset → its first endpoint, for a
    lookup that misses (see :mod:`pyproxy.render.slots`)."""
    return f"typeof numgen random mod 2 : {table_family(family)} daddr . {protocol} dport ; " \
        'comment "first endpoint of each pool, while its slot map commits" ;'


def table_family(family: Family) -> str:
    """The nft table family (and address keyword): ``ip`` or ``ip6``."""
    return "ip6" if family == 6 else "ip"


def addr_type(family: Family) -> str:
    """The nft type of one family's addresses."""
    return "ipv6_addr" if family == 6 else "ipv4_addr"


def sets_for(family: Family) -> dict[str, str]:
    """Declarations of the fixed sets and maps of one family's table."""
    addr = addr_type(family)
    key = f"{addr} . inet_proto . inet_service"
    return {
        "cluster-ips": f"type {addr} ; comment \"active ClusterIPs\" ;",
        "nodeport-ips": f"type {addr} ; comment \"node addresses that accept NodePorts\" ;",
        "service-ips": f"type {key} : verdict ; comment \"ClusterIP, external and LB IP traffic\" ;",
        "service-nodeports": "type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ;",
        "no-endpoint-services": f"type {key} : verdict ; comment \"services with no endpoints\" ;",
        "no-endpoint-nodeports": "type inet_proto . inet_service : verdict ; comment \"NodePorts with no endpoints\" ;",
        "firewall-ips": f"type {key} : verdict ; comment \"LB IPs subject to loadBalancerSourceRanges\" ;",
        "hairpin": f"type {addr} . {addr} ; comment \"endpoint . itself: a pod sent to itself is masqueraded\" ;",
        CLUSTER_IP_PORTS: f"type {key} ; comment \"ClusterIP ports served here: from outside the pod network, masqueraded\" ;",
    }


CLUSTER_IP_PORTS = "cluster-ip-ports"
"""ClusterIP . protocol . port of every service port with a chain: the one rule in ``services``
that marks their traffic from outside the pod network for masquerade looks them up."""


SHARED_SETS = frozenset({"hairpin", "cluster-ips"})
"""Sets whose elements several service ports may each render (two Services with the same pod,
the ports of one Service that share its ClusterIP): an element stays while any of them has it
(the diff counts references)."""


SETS = sets_for(4)


def reached_through_dispatch(set_name: str) -> bool:
    """Whether a set's elements matter only to packets a dispatch element (``service-ips`` and
    the like) has sent to a service chain: the endpoint and first-endpoint maps, and the
    hairpin pairs (marked only after a DNAT). A cold start loads them part by part, before the
    dispatch elements that make any Service reachable."""
    return set_name.startswith((MAP_PREFIX, FIRST_PREFIX)) or set_name == "hairpin"


def render_base(config: ProxyConfig, state: DesiredState, *,
                endpoint_maps: Mapping[str, int] | None = None) -> NftFragment:
    """The fixed chains and maps, the shared endpoint maps (how many of each protocol), and the node
    addresses that accept NodePorts. Independent of the Services: a sync of one change does
    not re-render anything per Service here."""
    mark = config.masquerade_mark
    a = table_family(config.family)
    chains: dict[str, tuple[str, ...]] = {
        "nat-prerouting": ("jump services",),
        "nat-output": ("jump services",),
        "nat-postrouting": ("jump masquerading",),
        "filter-prerouting-pre-dnat": ("ct state new jump firewall-check",),
        "filter-output-pre-dnat": ("ct state new jump firewall-check",),
        "firewall-check": (f"{a} daddr . meta l4proto . th dport vmap @firewall-ips",),
        "filter-input": (
            "ct state new jump nodeport-endpoints-check",
            "ct state new jump service-endpoints-check",
        ),
        "filter-forward": (
            "ct state new jump service-endpoints-check",
            "ct state new jump cluster-ips-check",
        ),
        "filter-output": (
            "ct state new jump service-endpoints-check",
            "ct state new jump cluster-ips-check",
        ),
        "services": (
            *_masquerade_outsiders(config),
            f"{a} daddr . meta l4proto . th dport vmap @service-ips",
            f"{a} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        ),
        "service-endpoints-check": (f"{a} daddr . meta l4proto . th dport vmap @no-endpoint-services",),
        "nodeport-endpoints-check": (
            f"{a} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
        ),
        "cluster-ips-check": (
            f'{a} daddr @cluster-ips goto reject-chain comment "no service on this port of a ClusterIP"',
        ),
        # TCP gets a reset, which the kernel sends at any rate; ICMP errors (for UDP and SCTP)
        # are rate-limited per client (a burst of 6, then 1/s), so under load some UDP clients
        # of a service without endpoints will wait for their own timeout.
        "reject-chain": ("meta l4proto tcp reject with tcp reset", "reject"),
        "mark-for-masquerade": (f"meta mark set meta mark or {mark}",),
        "masquerading": (
            # Hairpin: a pod that reached a Service and was sent to itself must see the
            # node's address as the source, or it would answer itself directly.
            f"ct status dnat {a} saddr . {a} daddr @hairpin meta mark set meta mark or {mark}",
            f"meta mark & {mark} == 0 return",
            f"meta mark set meta mark xor {mark}",
            "masquerade fully-random",
        ),
    }
    elements = {("nodeport-ips", ip): "" for ip in state.nodeport_ips}
    sets = sets_for(config.family)
    if len(config.cluster_cidrs) > 1 and not config.masquerade_all:
        # Several pod networks: a comparison each (see _masquerade_outsiders).
        chains[MASQ_UNLESS_POD] = (*(f"{a} saddr {cidr} return" for cidr in config.cluster_cidrs),
                                   "goto mark-for-masquerade")
    for protocol, count in (endpoint_maps or {}).items():
        for i in range(count):
            sets[map_name(protocol, i)] = endpoint_map_spec(config.family, protocol)
            sets[first_map_name(protocol, i)] = first_map_spec(config.family, protocol)
    return NftFragment(chains=chains, chain_specs=dict(BASE_CHAINS), sets=sets, elements=elements)


def render_service(config: ProxyConfig, sps: ServicePortState, *, place: Place | None = None) -> NftFragment:
    """Every chain, set and map element of one service port; ``place`` says where the slots of
    each of its endpoint pools are (the proxier's :class:`~pyproxy.render.slots.SlotAllocator`;
    None: the port alone in a fresh layout, its pools in map 0)."""
    svc = sps.service
    if place is None:
        alone = SlotAllocator()
        place = lambda local, size: alone.place((svc.name, local), size)  # noqa: E731
    spn = svc.name
    proto = spn.protocol
    a = table_family(config.family)
    names = ServiceChains(spn, mode="nftables")
    comment = nft_comment(str(spn))
    cip_key = f"{svc.cluster_ip} . {proto} . {svc.port}"
    vip_keys = [f"{ip} . {proto} . {svc.port}" for ip in svc.external_vips]
    np_key = f"{proto} . {svc.node_port}"
    # Several ports (and, in a bad file, several Services) share one ClusterIP: a shared set
    # (SHARED_SETS), so an element exists exactly while some port holds it.
    elements: dict[tuple[str, str], str] = {("cluster-ips", svc.cluster_ip): ""}
    chains: dict[str, tuple[str, ...]] = {}
    sets: dict[str, str] = {}

    if svc.uses_firewall:
        # loadBalancerSourceRanges: checked before DNAT (filter prerouting/output at -110),
        # on the LB IPs only; NodePorts and external IPs are not subject to them.
        fw_chain = names.firewall
        allowed = sps.firewall_sources
        # A comparison per range, never a set: an anonymous interval set made by a full sync
        # answers no lookup until the commit has finished, after the rule went live, so for a
        # few milliseconds every allowed client would be dropped (see pyproxy.render.slots).
        # The chain is reached by goto: "return" goes back past firewall-check, to accept.
        chains[fw_chain] = (*(f"{a} saddr {cidr} return" for cidr in allowed), "drop")
        for ip in svc.lb_ips:
            elements[("firewall-ips", f"{ip} . {proto} . {svc.port}")] = f"goto {fw_chain}"

    policy = traffic_policy(sps, node_name=config.hostname)
    endpoints = policy.cluster
    if not endpoints:
        # No service chain at all: the filter hooks reject, so clients fail at once instead
        # of timing out.
        for key in (cip_key, *vip_keys):
            elements[("no-endpoint-services", key)] = "goto reject-chain"
        if svc.node_port:
            elements[("no-endpoint-nodeports", np_key)] = "goto reject-chain"
        return NftFragment(chains=chains, sets=sets, elements=elements)

    service_chain, local_chain = names.cluster, names.local
    masq: list[str] = []
    if config.masquerade_all:
        # ClusterIP traffic only: the external chain also goes to the service chain, and marks
        # its own. A Service with no external address is reached from its ClusterIP alone, so
        # the match would always hold: left out.
        match = f"{a} daddr {svc.cluster_ip} {proto} dport {svc.port} " if svc.externally_accessible else ""
        masq.append(f"{match}jump mark-for-masquerade")

    local = policy.local
    if not svc.affinity_timeout:
        # Endpoints as data: the service chain DNATs through a map from a random slot to an
        # endpoint, so a change of endpoints changes map elements only, never a chain or a
        # rule (nft need not re-read the table; small changes can go straight over netlink).
        def pick(eps: tuple[Endpoint, ...], *, pool_local: bool) -> tuple[str, ...]:
            region = place(pool_local, len(eps))
            m, offset = region.map_name, region.offset
            for (lo, hi), ep in zip(slot_ranges(len(eps)), eps):
                elements[(m, f"{offset + lo}-{offset + hi}")] = f"{ep.ip} . {ep.port}"
                elements[("hairpin", f"{ep.ip} . {ep.ip}")] = ""
            lookup = f"meta l4proto {proto} dnat {a} to numgen random mod {SLOTS} offset {offset} map @{m}"
            # The lookup misses while a full sync that replaced the table is still committing
            # (the slot map is an interval map, searchable only once the commit has finished;
            # see pyproxy.render.slots): the pool's first endpoint answers from a hash map,
            # live with the new rules. Dropping the SYN instead cost the client a 1 s
            # retransmission; falling through would have refused it.
            elements[(region.first_map_name, str(offset))] = f"{eps[0].ip} . {eps[0].port}"
            fallback = f"meta l4proto {proto} dnat {a} to numgen random mod 1 offset {offset} " \
                f"map @{region.first_map_name}"
            return (*masq, lookup, fallback, MISSED)
    else:
        # ClientIP affinity needs a set of clients per endpoint, updated as the endpoint is
        # chosen: one chain per endpoint.
        ep_chains: dict[Endpoint, str] = {}
        affinity: dict[Endpoint, str] = {}
        for ep in dict.fromkeys((*endpoints, *local)):
            ep_chain = names.endpoint(ep)
            ep_chains[ep] = ep_chain
            aff = names.affinity_set(ep)
            affinity[ep] = aff
            sets[aff] = f"type {addr_type(config.family)} ; flags dynamic,timeout ; timeout {svc.affinity_timeout}s ;"
            chains[ep_chain] = (
                f"{a} saddr {ep.ip} jump mark-for-masquerade",  # hairpin: a pod reaching itself
                f"update @{aff} {{ {a} saddr }}",
                f"meta l4proto {proto} dnat to {ep.addr}",
            )

        def pick(eps: tuple[Endpoint, ...], *, pool_local: bool) -> tuple[str, ...]:
            """Affinity first, then a uniform choice: rule i fires with probability 1/(n-i)."""
            rules = [*masq, *(f"{a} saddr @{affinity[ep]} goto {ep_chains[ep]}" for ep in eps)]
            for i, ep in enumerate(eps):
                last = i == len(eps) - 1
                rules.append(f"goto {ep_chains[ep]}" if last
                             else f"numgen random mod {len(eps) - i} 0 goto {ep_chains[ep]}")
            return tuple(rules)

    # The cluster chain serves ClusterIP traffic (internalTrafficPolicy: Cluster) and external
    # traffic that may cross nodes: eTP Cluster, or pod and node sources under eTP Local.
    if policy.cluster_pool_used:
        chains[service_chain] = pick(endpoints, pool_local=False)
    if local:
        chains[local_chain] = pick(local, pool_local=True)
    if config.cluster_cidrs and not config.masquerade_all and (policy.cluster_pool_used or local):
        # Traffic from outside the pod network is masqueraded so replies come back through
        # this node; pod traffic keeps its source IP (the Kubernetes network model). One rule
        # in ``services`` for every Service (a rule a chain was a fifth of a cold start's nft
        # work at 44k Services): its ClusterIP port joins the set that rule looks up.
        elements[(CLUSTER_IP_PORTS, cip_key)] = ""
    if not policy.internal_local:
        elements[("service-ips", cip_key)] = f"goto {service_chain}"
    elif local:
        elements[("service-ips", cip_key)] = f"goto {local_chain}"
    else:
        # internalTrafficPolicy: Local and nothing on this node: drop (as upstream), unlike a
        # service with no endpoints anywhere, which rejects.
        elements[("no-endpoint-services", cip_key)] = "drop"

    if svc.externally_accessible:
        # NodePorts, external IPs and LB IPs are external traffic: internalTrafficPolicy does
        # not apply to them.
        ext_chain = names.external
        if not policy.external_local:
            chains[ext_chain] = (f"jump mark-for-masquerade {comment}", f"goto {service_chain}")
        else:
            rules = []
            # Pods reaching an external address are treated like a trip out to the load
            # balancer and back: every endpoint, no masquerade. A comparison per pod network,
            # never a set (see _masquerade_outsiders).
            rules += [f'{a} saddr {cidr} goto {service_chain} comment "short-circuit pod traffic"'
                      for cidr in config.cluster_cidrs]
            rules += [
                # The node itself: its source address would be the VIP or a node IP, which the
                # endpoint cannot answer directly, so masquerade, and use every endpoint.
                'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
                f'fib saddr type local goto {service_chain} comment "short-circuit local traffic"',
            ]
            if local:
                rules.append(f"goto {local_chain}")
            chains[ext_chain] = tuple(rules)
        for key in vip_keys:
            elements[("service-ips", key)] = f"goto {ext_chain}"
        if svc.node_port:
            elements[("service-nodeports", np_key)] = f"goto {ext_chain}"
        if policy.external_local and not local:
            # eTP Local without a local endpoint: external clients are dropped (the load
            # balancer's health check sends them elsewhere); pod and node traffic was DNATed
            # above, before the filter hooks look here.
            for key in vip_keys:
                elements[("no-endpoint-services", key)] = "drop"
            if svc.node_port:
                elements[("no-endpoint-nodeports", np_key)] = "drop"
    return NftFragment(chains=chains, sets=sets, elements=elements)


MASQ_UNLESS_POD = "mark-for-masquerade-unless-pod"
"""With several --cluster-cidr: returns for a source in any of them, else marks for masquerade."""


def _masquerade_outsiders(config: ProxyConfig) -> tuple[str, ...]:
    """The rule of ``services`` that marks ClusterIP traffic from outside the pod network for
    masquerade (none with --masquerade-all, where each service chain marks all of its own, or
    without --cluster-cidr). It matches exactly the packets the service chains' own rule
    matched before: those to a ClusterIP port that has a chain (:data:`CLUSTER_IP_PORTS`), by
    the same key the dispatch map uses, so an external address that happens to equal another
    Service's ClusterIP is not caught.

    One CIDR is a plain comparison (``!= { C }``, which nft writes as one); several jump to a
    shared chain with a comparison each. Never an interval set: one made by a full sync cannot
    be searched until its commit has finished, after the rules went live (see
    pyproxy.render.slots), so for a few milliseconds pod traffic would be masqueraded."""
    if not config.cluster_cidrs or config.masquerade_all:
        return ()
    a = table_family(config.family)
    lookup = f"{a} daddr . meta l4proto . th dport @{CLUSTER_IP_PORTS}"
    if len(config.cluster_cidrs) == 1:
        return (f"{a} saddr != {{ {config.cluster_cidrs[0]} }} {lookup} jump mark-for-masquerade",)
    return (f"{lookup} jump {MASQ_UNLESS_POD}",)
