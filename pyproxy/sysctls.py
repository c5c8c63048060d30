"""The conntrack sysctls kube-proxy sets at start (its ``conntrack`` section), and route_localnet.

``wanted`` is pure: which values to write, given the settings and the CPU count. ``apply``
reads what the host has and writes ``/proc/sys`` (and the hash size under ``/sys/module``): the
only code here that touches the host. The timeouts are per network namespace, so a hostNetwork
pod sets its node's; ``nf_conntrack_max`` and the hash size are global and writable only from
the host's namespace. In an unprivileged container ``/proc/sys`` is read-only: the Helm chart
runs ``pyproxy run --init-only`` in a privileged init container, and the daemon then finds every
value set. A value the daemon cannot write is a logged warning and a metric, not a crash loop
(upstream exits, which is why kind and rootless setups turn these settings off).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from prometheus_client import Counter

from pyproxy.netns import call_in
from pyproxy.settings import ConntrackSettings

log = logging.getLogger("pyproxy.sysctls")

FAILURES = Counter("pyproxy_sysctl_failures_total", "Sysctls pyproxy had to set and could not",
                   ["sysctl"])

MAX_LIMIT = 1048576
"""kube-proxy's cap on the scaled ``nf_conntrack_max``."""
HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"


@dataclass(frozen=True)
class Write:
    path: str
    """Absolute path of the file (under /proc/sys or /sys/module)."""
    value: int
    only_raise: bool = False
    """Write only if the current value is lower (the table sizes: never shrink the host's)."""


ROUTE_LOCALNET = Write("/proc/sys/net/ipv4/conf/all/route_localnet", 1)
"""What localhost NodePorts need: without it the kernel drops packets to 127.0.0.0/8 once DNAT
sends them out."""


TCP_BE_LIBERAL = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"
"""Set (1): conntrack takes out-of-window TCP packets as valid, so none is INVALID and
iptables mode needs no rule dropping INVALID ones (upstream reads the same)."""


def read(path: str, *, netns: str | None = None) -> int | None:
    """The integer in ``path`` as the namespace ``netns`` (None: ours) sees it; None when it
    cannot be read (no conntrack module loaded, no such namespace)."""
    def value() -> int:
        with open(path, encoding="ascii") as fh:
            return int(fh.read().split()[0])
    try:
        return call_in(netns, value)
    except (OSError, ValueError, IndexError):
        return None


def conntrack_max(settings: ConntrackSettings, *, cpus: int) -> int:
    """The ``nf_conntrack_max`` to ensure, 0 for none (kube-proxy's getConntrackMax)."""
    if settings.max_per_core <= 0:
        return 0
    return min(MAX_LIMIT, max(settings.max_per_core * cpus, settings.min))


def wanted(settings: ConntrackSettings, *, cpus: int, proc: str = "/proc/sys") -> list[Write]:
    """What to make the host hold, in kube-proxy's order."""
    nf = f"{proc}/net/netfilter"
    out = []
    top = conntrack_max(settings, cpus=cpus)
    if top:
        out += [Write(f"{nf}/nf_conntrack_max", top, only_raise=True), Write(HASHSIZE, top // 4, only_raise=True)]
    for name, seconds in (("nf_conntrack_tcp_timeout_established", settings.tcp_established_timeout),
                          ("nf_conntrack_tcp_timeout_close_wait", settings.tcp_close_wait_timeout),
                          ("nf_conntrack_udp_timeout", settings.udp_timeout),
                          ("nf_conntrack_udp_timeout_stream", settings.udp_stream_timeout)):
        if seconds > 0:
            out.append(Write(f"{nf}/{name}", int(seconds)))
    if settings.tcp_be_liberal:
        out.append(Write(f"{nf}/nf_conntrack_tcp_be_liberal", 1))
    return out


def apply(writes: list[Write]) -> list[str]:
    """Write what differs; return one message per value that could not be set (each logged as
    a warning saying what to do, and counted)."""
    problems = []
    for w in writes:
        current: int | None = None
        try:
            with open(w.path, encoding="ascii") as fh:
                current = int(fh.read().split()[0])
            if current == w.value or (w.only_raise and current >= w.value):
                continue
            with open(w.path, "w", encoding="ascii") as fh:
                fh.write(str(w.value))
            log.info("set %s to %d (was %d)", w.path, w.value, current)
        except (OSError, ValueError, IndexError) as err:
            name = os.path.basename(w.path)
            FAILURES.labels(name).inc()
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            problems.append(f"{w.path}: cannot set {w.value} (now {current}): {why}")
            log.warning("%s; run 'pyproxy run --init-only' with the same flags as root in the host's "
                        "network namespace first (the Helm chart's privileged init container does), "
                        "or leave it to the host with %s", problems[-1], _leave_alone_flag(name))
    return problems


def _leave_alone_flag(name: str) -> str:
    if name in ("nf_conntrack_max", "hashsize"):
        return "--conntrack-max-per-core=0"
    return {"nf_conntrack_tcp_timeout_established": "--conntrack-tcp-timeout-established=0",
            "nf_conntrack_tcp_timeout_close_wait": "--conntrack-tcp-timeout-close-wait=0",
            "nf_conntrack_udp_timeout": "--conntrack-udp-timeout=0",
            "nf_conntrack_udp_timeout_stream": "--conntrack-udp-timeout-stream=0",
            "nf_conntrack_tcp_be_liberal": "--no-conntrack-tcp-be-liberal",
            "route_localnet": "--no-iptables-localhost-nodeports"}.get(name, "the matching flag")


def cpu_count() -> int:
    """The host's CPUs, as kube-proxy counts them (not this process's affinity mask)."""
    return os.cpu_count() or 1
