"""KubeProxyConfiguration files: the fields that apply to pyproxy, as command-line flags.

``pyproxy run --config F`` accepts either a plain mapping of flag names (``proxy-mode:
iptables``) or a ``kind: KubeProxyConfiguration`` document as kube-proxy reads it (v1alpha1;
v1alpha2's field names where they differ). Flags given on the command line override the file.
Fields pyproxy has no use for are reported, not silently dropped.
"""

from __future__ import annotations

import re
from typing import Any

KIND = "KubeProxyConfiguration"
API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: Any) -> float:
    """Go's duration syntax ("1s", "500ms", "1m30s", "0s") in seconds; numbers are seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"not a duration: {text!r}")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text.strip()):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(text.strip()):
        raise ValueError(f"not a duration: {text!r} (write it like 1s, 500ms or 1m30s)")
    return total


def _get(doc: dict[str, Any], path: str) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


# (field path, flag, conversion); the first path found wins for a flag.
FIELDS: list[tuple[str, str, str]] = [
    ("mode", "proxy-mode", "str"),
    ("hostnameOverride", "hostname-override", "str"),
    ("clusterCIDR", "cluster-cidr", "str"),
    ("nodePortAddresses", "nodeport-addresses", "list"),
    ("clientConnection.kubeconfig", "kubeconfig", "str"),
    ("linux.masqueradeAll", "masquerade-all", "bool"),
    ("nftables.masqueradeAll", "masquerade-all", "bool"),
    ("iptables.masqueradeAll", "masquerade-all", "bool"),
    ("nftables.masqueradeBit", "iptables-masquerade-bit", "int"),
    ("iptables.masqueradeBit", "iptables-masquerade-bit", "int"),
    ("iptables.localhostNodePorts", "iptables-localhost-nodeports", "bool"),
    ("minSyncPeriod", "min-sync-period", "duration"),
    ("nftables.minSyncPeriod", "min-sync-period", "duration"),
    ("iptables.minSyncPeriod", "min-sync-period", "duration"),
    ("syncPeriod", "sync-period", "duration"),
    ("nftables.syncPeriod", "sync-period", "duration"),
    ("iptables.syncPeriod", "sync-period", "duration"),
    ("healthzBindAddress", "healthz-bind-address", "str"),
    ("metricsBindAddress", "metrics-bind-address", "str"),
    # v1alpha1 has conntrack at the top, v1alpha2 under linux.
    *((f"{base}{field}", flag, conv) for base in ("conntrack.", "linux.conntrack.") for field, flag, conv in (
        ("maxPerCore", "conntrack-max-per-core", "int"),
        ("min", "conntrack-min", "int"),
        ("tcpEstablishedTimeout", "conntrack-tcp-timeout-established", "duration"),
        ("tcpCloseWaitTimeout", "conntrack-tcp-timeout-close-wait", "duration"),
        ("tcpBeLiberal", "conntrack-tcp-be-liberal", "bool"),
        ("udpTimeout", "conntrack-udp-timeout", "duration"),
        ("udpStreamTimeout", "conntrack-udp-timeout-stream", "duration"),
    )),
]
KNOWN_TOP = {"apiVersion", "kind", "mode", "hostnameOverride", "clusterCIDR", "nodePortAddresses",
             "clientConnection", "linux", "nftables", "iptables", "minSyncPeriod", "syncPeriod",
             "healthzBindAddress", "metricsBindAddress", "conntrack"}


def to_flags(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(flag → value, ignored field names) for a KubeProxyConfiguration document."""
    flags: dict[str, Any] = {}
    for path, flag, conv in FIELDS:
        if flag in flags:
            continue
        value = _get(doc, path)
        if value is None or value == "" or value == []:
            continue
        if conv == "list":
            value = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        elif conv == "duration":
            value = parse_duration(value)
        elif conv == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{path} must be true or false, got {value!r}")
        elif conv == "int":
            value = int(value)
        flags[flag] = value
    ignored = sorted(k for k in doc if k not in KNOWN_TOP)
    return flags, ignored


def from_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A KubeProxyConfiguration document for the effective settings (``--write-config-to``)."""
    def dur(seconds: float) -> str:
        return f"{seconds:g}s"

    mode = settings["proxy_mode"]
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION, "kind": KIND,
        "mode": mode,
        "hostnameOverride": settings.get("hostname_override") or "",
        "clusterCIDR": settings.get("cluster_cidr") or "",
        "nodePortAddresses": [c for c in (settings.get("nodeport_addresses") or "").split(",") if c],
        "clientConnection": {"kubeconfig": settings.get("kubeconfig") or ""},
        "healthzBindAddress": settings.get("healthz_bind_address", ""),
        "metricsBindAddress": settings.get("metrics_bind_address", ""),
    }
    section = "iptables" if mode == "iptables" else "nftables"
    doc[section] = {
        "masqueradeAll": bool(settings.get("masquerade_all")),
        "masqueradeBit": settings.get("iptables_masquerade_bit", 14),
    }
    if mode == "iptables":
        doc[section]["localhostNodePorts"] = bool(settings.get("iptables_localhost_nodeports"))
    if settings.get("min_sync_period") is not None:
        doc[section]["minSyncPeriod"] = dur(settings["min_sync_period"])
    if settings.get("sync_period") is not None:
        doc[section]["syncPeriod"] = dur(settings["sync_period"])
    if "conntrack_max_per_core" in settings:  # run's flags (render has none)
        doc["conntrack"] = {
            "maxPerCore": settings["conntrack_max_per_core"], "min": settings["conntrack_min"],
            "tcpEstablishedTimeout": dur(settings["conntrack_tcp_timeout_established"]),
            "tcpCloseWaitTimeout": dur(settings["conntrack_tcp_timeout_close_wait"]),
            "tcpBeLiberal": bool(settings["conntrack_tcp_be_liberal"]),
            "udpTimeout": dur(settings["conntrack_udp_timeout"]),
            "udpStreamTimeout": dur(settings["conntrack_udp_timeout_stream"]),
        }
    return doc
