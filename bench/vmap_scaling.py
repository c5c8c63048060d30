"""Why pyproxy does not use upstream's ``numgen random mod N vmap { … }``: load time by style.

    python -m bench.vmap_scaling --sizes 500,1000,2000,4000

Loads N services × E endpoints into a fresh namespace with ``nft -f`` in two styles that pick
a backend uniformly: upstream's anonymous verdict map per service, and pyproxy's cascade of
``numgen random mod (n-i) 0 goto`` rules. Prints seconds for each and their ratio. The
anonymous-map style is quadratic: the kernel scans every set of the table to name a new
anonymous set. Needs root and nft; sends no traffic.
"""

from __future__ import annotations

import argparse
import subprocess
import time

from bench.synthetic import endpoint_ip, service_ip
from lab.netns import NETNS_PREFIX


def script(n: int, e: int, *, style: str) -> str:
    out = ["add table ip vmapbench",
           "add map ip vmapbench service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }"]
    for i in range(n):
        svc = f"service-ns{i}/svc{i}/tcp/http"
        eps = []
        for j in range(e):
            ip = endpoint_ip(i, j)
            chain = f"endpoint-ns{i}/svc{i}/tcp/http__{ip}/80"
            out.append(f"add chain ip vmapbench {chain}")
            out.append(f"add rule ip vmapbench {chain} meta l4proto tcp dnat to {ip}:80")
            eps.append(chain)
        out.append(f"add chain ip vmapbench {svc}")
        if style == "vmap":
            vm = ", ".join(f"{k} : goto {c}" for k, c in enumerate(eps))
            out.append(f"add rule ip vmapbench {svc} numgen random mod {e} vmap {{ {vm} }}")
        else:
            for k, c in enumerate(eps):
                rule = f"numgen random mod {e - k} 0 goto {c}" if k < e - 1 else f"goto {c}"
                out.append(f"add rule ip vmapbench {svc} {rule}")
        out.append(f"add element ip vmapbench service-ips {{ {service_ip(i)} . tcp . 80 : goto {svc} }}")
    return "\n".join(out) + "\n"


def load_seconds(text: str, ns: str) -> float:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "ruleset"], check=True)
    t0 = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text, text=True, check=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,1000,2000,4000")
    parser.add_argument("--endpoints", type=int, default=10)
    args = parser.parse_args()
    import os

    ns = f"{NETNS_PREFIX}{os.getpid()}-vmap"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        print("| services | anonymous vmap (upstream) s | numgen cascade (pyproxy) s | ratio |")
        print("|---|---|---|---|")
        for n in (int(s) for s in args.sizes.split(",")):
            vmap = load_seconds(script(n, args.endpoints, style="vmap"), ns)
            cascade = load_seconds(script(n, args.endpoints, style="cascade"), ns)
            print(f"| {n:,} × {args.endpoints} | {vmap:.2f} | {cascade:.2f} | {vmap / cascade:.1f}× |", flush=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
