"""Core benchmark: render and apply time, one-endpoint change, peak RSS, connection latency,
and the user's own cold start (``pyproxy run --source-file F --once``).

    python -m bench.core                      # 1k and 10k services × 10 endpoints, both modes
    python -m bench.core --sizes 100 --samples 50   # a quick smoke run
    python -m bench.core --sizes 10000,5006x50,44000x1 --modes nftables
        # kubernetes#135639 (5,006 × 50) and #139513 (44k × 1): sizes where upstream takes minutes

A size is N (services, × --endpoints each) or NxE. "1-ep change" replaces one endpoint of one
service, --changes times: from the start of the sync (the model's build included) to the
kernel's commit; "path" says how the change reached the kernel (netlink: one batch of element
changes; nft: a script to nft -f).

Each (mode, size) runs in a child process (so its peak RSS is its own) against a fresh lab of
network namespaces; the parent prints one table. Needs root, nft and iptables. All traffic
stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.rows import RowFailed, child_row, save

MODES = ("nftables", "iptables")


def _one(mode: str, size: int, endpoints: int, samples: int, backend: str, changes: int) -> dict[str, Any]:
    from bench.synthetic import cluster
    from pyproxy.config import ProxyConfig
    from lab.netns import Topology
    from pyproxy.model.nodeports import nodeport_ips
    from pyproxy.model.state import StateBuilder

    out: dict[str, Any] = {"mode": mode, "size": size, "endpoints": endpoints}
    with Topology.create(pods=4, client_sources=0) as topo:
        targets = [p.ip for p in topo.pods[:3]]
        objects = cluster(size, endpoints, target_ips=targets)
        from pyproxy import gcpolicy

        t0 = time.perf_counter()
        builder = StateBuilder(node_name="node-1")
        with gcpolicy.paused(settle=True):  # as the daemon's runner parses a relist and builds a state
            builder.replace_all(objects)
            state = builder.build(nodeport_ips=nodeport_ips(node=builder.node, interface_ips=(), cidrs=()))
        out["model_s"] = time.perf_counter() - t0
        # Keep only what the change below needs: a daemon does not hold the listed objects.
        changed = copy.deepcopy(next(o for o in objects if o["metadata"]["name"] == "svc0-a"))
        del objects
        config = ProxyConfig(mode=mode, hostname="node-1", cluster_cidrs=(topo.cluster_cidr,))
        if mode == "nftables":
            from pyproxy.nft.executor import NftCli
            from pyproxy.proxier.nftables import NftProxier

            proxier: Any = NftProxier(config=config, executor=NftCli(netns=topo.node_ns))
        else:
            from pyproxy.ipt.executor import IptablesCli
            from pyproxy.proxier.iptables import IptProxier

            proxier = IptProxier(config=config, executor=IptablesCli(backend=backend, netns=topo.node_ns))
        with gcpolicy.paused():
            full = proxier.sync(state)
            gcpolicy.settle()  # as the daemon's runner does after a full sync
        out.update(full_render_s=full.render_seconds, full_apply_s=full.apply_seconds,
                   full_ops=full.operations)

        # One endpoint of one (non-target) service changes its address, --changes times.
        executor = proxier.executor
        paths_before = dict(getattr(executor, "paths", {}))
        took, ops = [], []
        for k in range(changes):
            changed["endpoints"][0]["addresses"] = [f"10.250.{k // 250}.{1 + k % 250}"]
            changed["metadata"]["resourceVersion"] = str(k + 1)
            builder.upsert(copy.deepcopy(changed))
            with gcpolicy.paused():  # as the runner builds and syncs
                t1 = time.perf_counter()
                state2 = builder.build(nodeport_ips=state.nodeport_ips)
                model2 = time.perf_counter() - t1
                part = proxier.sync(state2)
            took.append(model2 + part.render_seconds + part.apply_seconds)
            ops.append(part.operations)
        used = {k: v - paths_before.get(k, 0) for k, v in getattr(executor, "paths", {}).items()}
        out.update(change_ops=max(ops), change_s=statistics.median(took), change_max_s=max(took),
                   change_path="+".join(k for k, v in sorted(used.items()) if v) or "restore")
        noop = proxier.sync(state2)
        out["noop_ops"] = noop.operations

        probe = topo.probe(topo.pod("pod3").ns, f"{_target_ip(size)}:80", count=samples, timeout=2)
        if probe.errors:
            raise RuntimeError(f"latency probe failed: {probe.errors}")
        lat = sorted(probe.durations)
        out["lat_p50_ms"] = statistics.median(lat) * 1000
        out["lat_p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _target_ip(size: int) -> str:
    from bench.synthetic import service_ip

    return service_ip(size - 1)


def _once(mode: str, size: int, endpoints: int) -> dict[str, Any]:
    """``pyproxy run --source-file F --once`` in a fresh namespace, F as kubectl get -o json
    writes it: wall time and peak RSS of the command, as a user meets them."""
    import os
    import tempfile

    from bench.synthetic import cluster

    ns = f"pxt-once{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="pyproxy-once-") as tmp:
        path = os.path.join(tmp, "cluster.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"apiVersion": "v1", "kind": "List", "items": cluster(size, endpoints)}, fh)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            t0 = time.perf_counter()
            proc = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "pyproxy", "run", "--source-file", path,
                 "--once", "--proxy-mode", mode, "--hostname-override", "node-1", "--ip-families", "4",
                 "--cluster-cidr", "10.244.0.0/16"], capture_output=True, text=True, timeout=1800)
            wall = time.perf_counter() - t0
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pyproxy run --once failed: {proc.stderr[-2000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"once_s": wall, "once_rss_mb": rss}


def _fmt(rows: list[dict[str, Any]]) -> str:
    head = ("mode", "services", "render s", "apply s", "render/apply", "full ops",
            "1-ep change ops", "1-ep change s (p50 / max)", "path", "change/full", "no-op ops",
            "peak RSS MB", "run --once s", "--once RSS MB", "conn p50 ms", "conn p99 ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        full_s = r["full_render_s"] + r["full_apply_s"]
        lines.append("| " + " | ".join([
            r["mode"], f"{r['size']:,} × {r['endpoints']}", f"{r['full_render_s']:.2f}",
            f"{r['full_apply_s']:.2f}", f"{r['full_render_s'] / r['full_apply_s']:.2f}",
            f"{r['full_ops']:,}", f"{r['change_ops']:,}",
            f"{r['change_s'] * 1000:.1f} ms / {r['change_max_s'] * 1000:.1f} ms", r["change_path"],
            f"{100 * r['change_s'] / full_s:.2f}%", str(r["noop_ops"]), f"{r['peak_rss_mb']:.0f}",
            f"{r['once_s']:.2f}" if "once_s" in r else "-",
            f"{r['once_rss_mb']:.0f}" if "once_rss_mb" in r else "-",
            f"{r['lat_p50_ms']:.3f}", f"{r['lat_p99_ms']:.3f}",
        ]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000",
                        help="comma-separated service counts, each N or NxE (E endpoints each)")
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per service")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--iptables-backend", default="nft", choices=("nft", "legacy"))
    parser.add_argument("--samples", type=int, default=300, help="connections for the latency figure")
    parser.add_argument("--changes", type=int, default=20, help="one-endpoint changes to time")
    parser.add_argument("--no-once", action="store_true", help="skip timing pyproxy run --once")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        from pyproxy import gcpolicy

        gcpolicy.configure()  # as the product's command line does, before anything is built
        row = _one(args.one[0], int(args.one[1]), args.endpoints, args.samples,
                   args.iptables_backend, args.changes)
        if not args.no_once:
            row.update(_once(args.one[0], int(args.one[1]), args.endpoints))
        print(json.dumps(row))
        return 0
    rows = []
    for spec in args.sizes.split(","):
        size_text, _, eps_text = spec.partition("x")
        size, endpoints = int(size_text), int(eps_text or args.endpoints)
        for mode in args.modes.split(","):
            print(f"running {mode} at {size} services × {endpoints} ...", file=sys.stderr, flush=True)
            try:
                rows.append(child_row(["bench.core", "--one", mode, str(size), "--endpoints", str(endpoints),
                                       "--samples", str(args.samples), "--iptables-backend",
                                       args.iptables_backend, "--changes", str(args.changes),
                                       *(["--no-once"] if args.no_once else [])]))
            except RowFailed as err:
                print(err, file=sys.stderr)
                return 1
    print(_fmt(rows))
    save(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
