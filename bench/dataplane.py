"""Data plane: how long a new connection's first packet takes through the rules, as Services grow.

    python -m bench.dataplane                                  # 100, 1k, 10k, 30k; nftables and iptables
    python -m bench.dataplane --sizes 100,1000 --connections 2000   # a quick run

For each mode and each number of Services, a fresh lab of network namespaces (lab.netns) gets N
Services × ``--endpoints`` endpoints from pyproxy (the last Service, ``zz/target``, is backed by
three echo pods and sorts last: in iptables mode its rule is the last of the linear dispatch
chain, the worst case). From a client pod, a compiled generator (``bench/connect.c``, built
here with the machine's C compiler) opens ``--connections`` new TCP connections to the target's
ClusterIP, ``--inflight`` at a time, and times each ``connect()``: SYN out to SYN-ACK back, the
one packet of a connection that goes through the proxy's DNAT rules (conntrack handles the
rest). A Python client tops out near 3k connections a second and adds milliseconds of its own.

Prints one table: connections, errors, rate, p50/p90/p99/p99.9 in µs, and p99 against the
smallest size of the same mode. All traffic stays inside the lab's namespaces; every run is
bounded in connections and seconds. Needs root, nft, iptables and a C compiler.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.rows import RowFailed, child_row, save

SOURCE = Path(__file__).with_name("connect.c")
CACHE = Path(os.environ.get("PYPROXY_CACHE_DIR", "/var/cache/pyproxy")) / "bench"
MODES = ("nftables", "iptables")


def generator() -> Path:
    """The compiled generator, built once per version of its source (cached outside the tree)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = CACHE / f"connect-{digest}"
    if binary.exists():
        return binary
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise SystemExit("bench.dataplane: no C compiler (cc, gcc or clang); install gcc and retry")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(tmp), str(SOURCE)], check=True)
    tmp.replace(binary)
    return binary


def _one(mode: str, size: int, endpoints: int, connections: int, inflight: int, seconds: float,
         backend: str) -> dict[str, Any]:
    from bench.synthetic import cluster, service_ip
    from lab.netns import Topology, ns_exec
    from pyproxy.config import ProxyConfig
    from pyproxy.model.state import StateBuilder

    binary = generator()
    with Topology.create(pods=4, client_sources=0) as topo:
        builder = StateBuilder(node_name="node-1")
        builder.replace_all(cluster(size, endpoints, target_ips=[p.ip for p in topo.pods[:3]]))
        state = builder.build()
        config = ProxyConfig(mode=mode, hostname="node-1", cluster_cidrs=(topo.cluster_cidr,))
        if mode == "nftables":
            from pyproxy.nft.executor import NftCli
            from pyproxy.proxier.nftables import NftProxier

            proxier: Any = NftProxier(config=config, executor=NftCli(netns=topo.node_ns))
        else:
            from pyproxy.ipt.executor import IptablesCli
            from pyproxy.proxier.iptables import IptProxier

            proxier = IptProxier(config=config, executor=IptablesCli(backend=backend, netns=topo.node_ns))
        t0 = time.perf_counter()
        proxier.sync(state)
        programmed = time.perf_counter() - t0
        del state, builder
        target = f"{service_ip(size - 1)}"
        client = topo.pod("pod3").ns
        # The echo servers (Python, accepting and closing every connection) on the first CPU,
        # the generator (and the kernel's work for its packets, done on the sending CPU) on
        # the last: otherwise the servers' wake-ups preempt the generator and its p99 measures
        # the scheduler (4 ms outliers at every size).
        cpus = os.cpu_count() or 1
        pin = ["taskset", "-c", str(cpus - 1)] if cpus > 1 and shutil.which("taskset") else []
        if pin:
            for proc in topo.procs:
                subprocess.run(["taskset", "-a", "-p", "-c", "0", str(proc.pid)], check=False,
                               capture_output=True)
        # Warm up: neighbour entries, the echo servers' accept queues, the CPU's caches.
        ns_exec(client, [*pin, str(binary), target, "80", "500", "1", "10"], timeout=30)
        proc = ns_exec(client, [*pin, str(binary), target, "80", str(connections), str(inflight), str(seconds)],
                       timeout=seconds + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"connect generator failed: {proc.stderr}")
        out: dict[str, Any] = json.loads(proc.stdout)
        out.update(mode=mode, size=size, endpoints=endpoints, inflight=inflight, program_s=programmed)
        return out


def _fmt(rows: list[dict[str, Any]]) -> str:
    head = ("mode", "services × endpoints", "in flight", "connections", "errors", "conn/s",
            "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "p99 vs smallest")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base: dict[str, float] = {}
    for r in rows:
        base.setdefault(r["mode"], r["p99_us"])
        errors = r["refused"] + r["timeout"] + r["other"]
        lines.append("| " + " | ".join([
            r["mode"], f"{r['size']:,} × {r['endpoints']}", str(r["inflight"]), f"{r['connections']:,}",
            str(errors), f"{r['ok'] / r['seconds']:,.0f}", f"{r['p50_us']:.0f}", f"{r['p90_us']:.0f}",
            f"{r['p99_us']:.0f}", f"{r['p999_us']:.0f}", f"{r['p99_us'] / base[r['mode']]:.2f}×",
        ]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000,30000", help="comma-separated service counts")
    parser.add_argument("--endpoints", type=int, default=2, help="endpoints per (non-target) service")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--iptables-backend", default="nft", choices=("nft", "legacy"))
    parser.add_argument("--connections", type=int, default=50000, help="connections per measurement")
    parser.add_argument("--inflight", type=int, default=1,
                        help="connections in flight at once (1: each alone, so no queueing adds to its time)")
    parser.add_argument("--seconds", type=float, default=30.0, help="time limit per measurement")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = _one(args.one[0], int(args.one[1]), args.endpoints, args.connections, args.inflight,
                   args.seconds, args.iptables_backend)
        print(json.dumps(row))
        return 0
    generator()  # build it once, before the children
    rows = []
    for mode in args.modes.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            print(f"running {mode} at {size} services ...", file=sys.stderr, flush=True)
            try:
                rows.append(child_row(["bench.dataplane", "--one", mode, str(size), "--endpoints",
                                       str(args.endpoints), "--connections", str(args.connections),
                                       "--inflight", str(args.inflight), "--seconds", str(args.seconds),
                                       "--iptables-backend", args.iptables_backend]))
            except RowFailed as err:
                print(err, file=sys.stderr)
                return 1
    print(f"machine: {os.cpu_count()} CPUs, kernel {os.uname().release}; generator: bench/connect.c, "
          f"{args.inflight} in flight")
    print(_fmt(rows))
    save(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
