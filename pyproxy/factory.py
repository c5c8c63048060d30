"""The proxier for a mode and a family, with its real executor: the one place that turns
settings into the objects that program the kernel (and the host setting a mode needs)."""

from __future__ import annotations

import logging

from pyproxy.config import ProxyConfig
from pyproxy.literals import BackendChoice
from pyproxy.proxier.base import Proxier
from pyproxy.settings import SetupError

log = logging.getLogger("pyproxy")


def resolve_backend(config: ProxyConfig, iptables_backend: BackendChoice) -> BackendChoice:
    """``auto`` decided once (it reads both backends' rules), so each family's proxier and the
    cleanup of other modes agree on it."""
    if config.mode != "iptables" or iptables_backend != "auto":
        return iptables_backend
    from pyproxy.ipt.executor import detect_backend

    return detect_backend()


def make_proxier(config: ProxyConfig, *, iptables_backend: BackendChoice = "auto",
                 netns: str | None = None) -> Proxier:
    """The proxier for ``config.mode`` and ``config.family`` with its real executor."""
    if config.localhost_nodeports and not config.localhost_nodeports_active:
        log.warning("--iptables-localhost-nodeports has no effect here: it needs --proxy-mode "
                    "iptables and loopback among --nodeport-addresses (nftables mode has no "
                    "localhost NodePorts, as upstream)")
    if config.mode == "userspace":
        from pyproxy.nft.executor import NftCli
        from pyproxy.userspace.proxier import UserspaceProxier

        return UserspaceProxier(config=config, executor=NftCli(netns=netns))
    if config.mode == "iptables":
        from pyproxy.ipt.executor import IptablesCli, detect_backend
        from pyproxy import sysctls
        from pyproxy.proxier.iptables import IptProxier

        backend = detect_backend(netns=netns) if iptables_backend == "auto" else iptables_backend
        log.info("iptables backend: %s", backend)
        if config.localhost_nodeports_active and netns is None:
            problems = sysctls.apply([sysctls.ROUTE_LOCALNET])
            if problems:
                raise SetupError(
                    f"--iptables-localhost-nodeports needs net.ipv4.conf.all.route_localnet=1 and it "
                    f"cannot be set here ({problems[0]}: /proc/sys is read-only in an unprivileged "
                    "container): set it before pyproxy starts (the Helm chart's init container does "
                    "when config.localhostNodePorts is on), or turn the flag off")
        # Forwarded packets conntrack holds INVALID are dropped unless conntrack is liberal
        # (read as upstream reads it, after `run` set the conntrack sysctls; unreadable: drop).
        liberal = sysctls.read(sysctls.TCP_BE_LIBERAL, netns=netns)
        drop_invalid = not liberal
        if not drop_invalid:
            log.info("nf_conntrack_tcp_be_liberal is set: no rule drops INVALID packets")
        # Connections to localhost NodePorts and INVALID drops are counted in nfacct objects
        # of the same namespace as the rules (kube-proxy's metrics of the same names).
        nfacct = None
        if config.localhost_nodeports_active or drop_invalid:
            from pyproxy.ipt.nfacct import Nfacct

            nfacct = Nfacct(netns=netns)
        return IptProxier(config=config, executor=IptablesCli(backend=backend, netns=netns,
                                                              family=config.family),
                          nfacct=nfacct, drop_invalid=drop_invalid)
    from pyproxy.nft.executor import NftCli
    from pyproxy.proxier.nftables import NftProxier

    return NftProxier(config=config, executor=NftCli(netns=netns))
