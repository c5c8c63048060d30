"""Core benchmark: render and apply time, one-endpoint change, peak RSS, connection latency.

    python -m bench.core                      # 1k and 10k services × 10 endpoints, both modes
    python -m bench.core --sizes 100 --samples 50   # a quick smoke run

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

MODES = ("nftables", "iptables")


def _one(mode: str, size: int, endpoints: int, samples: int, backend: str) -> dict[str, Any]:
    from bench.synthetic import cluster
    from pyproxy.config import ProxyConfig
    from lab.netns import Topology
    from pyproxy.model.nodeports import nodeport_ips
    from pyproxy.model.state import StateBuilder

    out: dict[str, Any] = {"mode": mode, "size": size, "endpoints": endpoints}
    with Topology.create(pods=4, client_sources=0) as topo:
        targets = [p.ip for p in topo.pods[:3]]
        objects = cluster(size, endpoints, target_ips=targets)
        t0 = time.perf_counter()
        builder = StateBuilder(node_name="node-1")
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
        full = proxier.sync(state)
        out.update(full_render_s=full.render_seconds, full_apply_s=full.apply_seconds,
                   full_ops=full.operations)

        # One endpoint of one (non-target) service changes its address.
        changed["endpoints"][0]["addresses"] = ["10.250.250.250"]
        builder.upsert(changed)
        t1 = time.perf_counter()
        state2 = builder.build(nodeport_ips=state.nodeport_ips)
        model2 = time.perf_counter() - t1
        part = proxier.sync(state2)
        out.update(change_ops=part.operations, change_s=model2 + part.render_seconds + part.apply_seconds)
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


def _fmt(rows: list[dict[str, Any]]) -> str:
    head = ("mode", "services", "render s", "apply s", "render/apply", "full ops",
            "1-ep change ops", "1-ep change s", "change/full", "no-op ops", "peak RSS MB",
            "conn p50 ms", "conn p99 ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        full_s = r["full_render_s"] + r["full_apply_s"]
        lines.append("| " + " | ".join([
            r["mode"], f"{r['size']:,} × {r['endpoints']}", f"{r['full_render_s']:.2f}",
            f"{r['full_apply_s']:.2f}", f"{r['full_render_s'] / r['full_apply_s']:.2f}",
            f"{r['full_ops']:,}", f"{r['change_ops']:,}", f"{r['change_s']:.3f}",
            f"{100 * r['change_s'] / full_s:.2f}%", str(r["noop_ops"]), f"{r['peak_rss_mb']:.0f}",
            f"{r['lat_p50_ms']:.3f}", f"{r['lat_p99_ms']:.3f}",
        ]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated service counts")
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per service")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--iptables-backend", default="nft", choices=("nft", "legacy"))
    parser.add_argument("--samples", type=int, default=300, help="connections for the latency figure")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], int(args.one[1]), args.endpoints, args.samples,
                              args.iptables_backend)))
        return 0
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            print(f"running {mode} at {size} services ...", file=sys.stderr, flush=True)
            proc = subprocess.run(
                [sys.executable, "-m", "bench.core", "--one", mode, str(size), "--endpoints",
                 str(args.endpoints), "--samples", str(args.samples), "--iptables-backend",
                 args.iptables_backend],
                capture_output=True, text=True, timeout=1800,
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(_fmt(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
