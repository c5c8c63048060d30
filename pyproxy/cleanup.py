"""Remove everything pyproxy may have installed, in every mode and backend, touching nothing else."""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Iterable

from pyproxy.config import ProxyConfig
from pyproxy.ipt.executor import BACKENDS, IptablesCli, IptablesError
from pyproxy.ipt.nfacct import Nfacct, NfacctClient, NfacctError
from pyproxy.literals import Family, IptablesBackend, Mode
from pyproxy.nft.executor import NftCli, NftError
from pyproxy.proxier.iptables import COUNTS, IptProxier
from pyproxy.render.nftables import TABLE_NAME, table_family

log = logging.getLogger("pyproxy.cleanup")

NFACCT_OBJECTS = tuple(count.name for count in COUNTS)
"""The nfacct objects iptables mode may create."""

NFT_TABLES = tuple((table_family(family), TABLE_NAME) for family in (4, 6))
"""The tables the nftables renderer names, one per family (and the userspace mode's guards)."""


def _clean_nft(netns: str | None) -> list[str]:
    removed: list[str] = []
    if not shutil.which("nft"):
        return removed
    nft = NftCli(netns=netns)
    for family, table in NFT_TABLES:
        try:
            if nft.delete_table(family, table):
                removed.append(f"nft table {family} {table}")
        except NftError as err:
            log.warning("could not delete nft table %s %s: %s", family, table, err)
    return removed


def _clean_iptables(backends: Iterable[str], netns: str | None) -> list[str]:
    removed: list[str] = []
    for backend in backends:
        tools: tuple[tuple[Family, str], ...] = ((4, "iptables"), (6, "ip6tables"))
        for family, tool in tools:
            if shutil.which(f"{tool}-{backend}-restore") is None:
                continue
            proxier = IptProxier(config=ProxyConfig(mode="iptables", family=family),
                                 executor=IptablesCli(backend=backend, netns=netns, family=family))
            try:
                if proxier.cleanup():
                    removed.append(f"{tool}-{backend} PYPROXY-* chains")
            except IptablesError as err:
                log.warning("could not clean %s-%s: %s", tool, backend, err)
    return removed


def _clean_nfacct(netns: str | None, client: NfacctClient | None = None) -> list[str]:
    """The nfacct objects iptables mode counts in, once no rule uses them. They have
    kube-proxy's names: while upstream's rules still count in one, the kernel refuses (EBUSY)
    and it stays, for them."""
    nfacct = client if client is not None else Nfacct(netns=netns)
    removed: list[str] = []
    try:
        for name in NFACCT_OBJECTS:
            try:
                if nfacct.delete(name):
                    removed.append(f"nfacct object {name}")
            except NfacctError as err:
                if err.errno == errno.EBUSY:
                    log.info("nfacct object %s kept: another program's rule uses it", name)
                elif err.errno in (errno.EPERM, errno.EACCES):
                    log.warning("could not delete nfacct object %s: %s", name, err)
                else:  # most likely a kernel without nfacct, so without the object
                    log.debug("could not delete nfacct object %s: %s", name, err)
    finally:
        if client is None and isinstance(nfacct, Nfacct):
            nfacct.close()
    return removed


def cleanup_other_modes(*, mode: Mode, iptables_backend: IptablesBackend | None = None,
                        netns: str | None = None) -> list[str]:
    """At start-up, remove what another mode (or the other iptables backend) left behind.

    Quietly: nothing is logged unless something was there. The kernel's conntrack entries
    keep established connections' NAT, so switching modes breaks none of them.
    """
    removed = _clean_nft(netns) if mode == "iptables" else []
    others = [b for b in BACKENDS if not (mode == "iptables" and b == iptables_backend)]
    removed += _clean_iptables(others, netns)
    if mode != "iptables":
        removed += _clean_nfacct(netns)
    if removed:
        log.info("removed leftovers of another proxy mode: %s", ", ".join(removed))
    return removed


def cleanup_all(*, netns: str | None = None) -> list[str]:
    """Delete our nft tables, our iptables chains and jumps, and the nfacct counters (after
    the rules that used them); return what was removed.

    Idempotent: a second run finds nothing and succeeds.
    """
    return _clean_nft(netns) + _clean_iptables(BACKENDS, netns) + _clean_nfacct(netns)
