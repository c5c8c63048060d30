"""Remove everything pyproxy may have installed, in every mode and backend, touching nothing else."""

from __future__ import annotations

import logging
import shutil

from pyproxy.config import ProxyConfig
from pyproxy.ipt.executor import BACKENDS, IptablesCli, IptablesError
from pyproxy.nft.executor import NftCli, NftError
from pyproxy.proxier.iptables import IptProxier

log = logging.getLogger("pyproxy.cleanup")

NFT_TABLES = (("ip", "pyproxy"), ("ip6", "pyproxy"))


def cleanup_other_modes(*, mode: str, iptables_backend: str | None = None,
                        netns: str | None = None) -> list[str]:
    """At start-up, remove what another mode (or the other iptables backend) left behind.

    Quietly: nothing is logged unless something was there. The kernel's conntrack entries
    keep established connections' NAT, so switching modes breaks none of them.
    """
    removed: list[str] = []
    if mode == "iptables" and shutil.which("nft"):
        try:
            for family, table in NFT_TABLES:
                if NftCli(netns=netns).delete_table(family, table):
                    removed.append(f"nft table {family} {table}")
        except NftError as err:
            log.warning("could not remove nftables leftovers: %s", err)
    for backend in BACKENDS:
        if mode == "iptables" and backend == iptables_backend:
            continue
        if shutil.which(f"iptables-{backend}-restore") is None:
            continue
        proxier = IptProxier(config=ProxyConfig(mode="iptables"),
                             executor=IptablesCli(backend=backend, netns=netns))
        try:
            if proxier.cleanup():
                removed.append(f"iptables-{backend} PYPROXY-* chains")
        except IptablesError as err:
            log.warning("could not remove iptables-%s leftovers: %s", backend, err)
    if removed:
        log.info("removed leftovers of another proxy mode: %s", ", ".join(removed))
    return removed


def cleanup_all(*, netns: str | None = None) -> list[str]:
    """Delete our nft tables and our iptables chains and jumps; return what was removed.

    Idempotent: a second run finds nothing and succeeds.
    """
    removed: list[str] = []
    if shutil.which("nft"):
        nft = NftCli(netns=netns)
        for family, table in NFT_TABLES:
            try:
                if nft.delete_table(family, table):
                    removed.append(f"nft table {family} {table}")
            except NftError as err:
                log.warning("could not delete nft table %s %s: %s", family, table, err)
    for backend in BACKENDS:
        if shutil.which(f"iptables-{backend}-restore") is None:
            continue
        proxier = IptProxier(config=ProxyConfig(mode="iptables"),
                             executor=IptablesCli(backend=backend, netns=netns))
        try:
            if proxier.cleanup():
                removed.append(f"iptables-{backend} PYPROXY-* chains")
        except IptablesError as err:
            log.warning("could not clean iptables-%s: %s", backend, err)
    return removed
