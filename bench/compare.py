"""All proxy modes side by side in one run: requests per second, latency, bulk throughput, CPU.

    python -m bench.compare                                  # 1 and 1,000 services, all modes
    python -m bench.compare --sizes 1,20 --requests 100 --bulk-seconds 2 --out /tmp/x   # smoke

For each mode (nftables, iptables, userspace) and each number of Services, one lab of network
namespaces (lab.netns) is programmed with N Services, the last one backed by three echo
pods. From a client pod:

* short HTTP requests over **new connections** (the bounded Python generator
  ``lab.load``, 16 in flight; ``--load wrk`` uses ``wrk -H "Connection: close"``):
  requests per second and latency p50/p99 — what a proxy costs per connection;
* one **bulk TCP stream** (256 MB of zeros from one pod): MB/s — what it costs per byte;
* **CPU seconds** pyproxy used meanwhile (the kernel modes only program rules; the userspace
  mode copies every byte itself).

Writes ``compare.md`` (the table), ``compare.json`` and PNG plots (matplotlib) to ``--out``
(default ``results/``). All traffic stays inside the lab's namespaces; every load is bounded in
requests and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.synthetic import cluster, service_ip
from lab.netns import Topology, ns_exec

MODES = ("nftables", "iptables", "userspace")
HTTP_PORT, BULK_PORT = 8081, 8082


def _objects(size: int, topo: Topology) -> list[dict[str, Any]]:
    objs = cluster(size, 3, target_ips=[p.ip for p in topo.pods[:3]], node_ip=topo.node_ip)
    target = objs[-1]
    target["ports"] = [{"name": "http", "port": HTTP_PORT, "protocol": "TCP"},
                       {"name": "bulk", "port": BULK_PORT, "protocol": "TCP"}]
    svc = objs[-2]
    svc["spec"]["ports"] = [{"name": "http", "port": 80, "protocol": "TCP"},
                            {"name": "bulk", "port": 81, "protocol": "TCP"}]
    return objs


def _wrk(client_ns: str, url: str, *, seconds: float, connections: int) -> dict[str, Any]:
    """wrk with ``Connection: close``: every request on a new connection, for ``seconds``."""
    import re

    proc = ns_exec(client_ns, ["wrk", "-t", "2", "-c", str(connections), "-d", f"{max(1, int(seconds))}s",
                               "--latency", "-H", "Connection: close", url], timeout=seconds + 60)
    text = proc.stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    reqs = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = (sum(int(x) for x in errs.groups()) if errs else 0) + (int(non2xx.group(1)) if non2xx else 0)
    if not rps:
        raise RuntimeError(f"wrk failed: {proc.stderr or text}")
    return {"requests": int(reqs.group(1)) if reqs else 0, "errors": errors, "rps": float(rps.group(1)),
            "p50_ms": ms("50"), "p99_ms": ms("99")}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(topo: Topology, mode: str, size: int, *, requests: int, concurrency: int,
            bulk_seconds: float, workdir: Path, load_seconds: float, use_wrk: bool) -> dict[str, Any]:
    path = workdir / f"cluster-{size}.yaml"
    path.write_text(yaml.safe_dump_all(_objects(size, topo)))
    flags = ["--source-file", str(path), "--hostname-override", "node-1", "--cluster-cidr",
             topo.cluster_cidr, "--proxy-mode", mode, "--v", "0"]
    assert topo.pyproxy("cleanup").returncode == 0
    proc = None
    program_cpu = 0.0
    load_cpu = 0.0
    if mode == "userspace":
        proc = subprocess.Popen(["ip", "netns", "exec", topo.node_ns, sys.executable, "-m", "pyproxy", "run",
                                 *flags], stderr=subprocess.DEVNULL)
    else:
        before = os.times()
        done = topo.pyproxy("run", "--once", *flags)
        after = os.times()
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        program_cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    target = service_ip(size - 1)
    client = topo.pod("pod3").ns
    try:
        deadline = time.monotonic() + 120
        while '"requests": 0' in ns_exec(client, [sys.executable, "-m", "lab.load", "--target",
                                                  f"{target}:80", "--requests", "1", "--concurrency", "1",
                                                  "--timeout", "1"]).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: the service never answered")
            time.sleep(0.2)
        cpu0 = _cpu_seconds(proc.pid) if proc else 0.0
        program_cpu = program_cpu or cpu0  # userspace: start-up and first sync
        if use_wrk:
            load = _wrk(client, f"http://{target}/", seconds=load_seconds, connections=concurrency)
        else:
            load = json.loads(ns_exec(client, [sys.executable, "-m", "lab.load", "--target",
                                               f"{target}:80", "--requests", str(requests), "--concurrency",
                                               str(concurrency), "--deadline", "60"], timeout=180).stdout)
        bulk = json.loads(ns_exec(client, [sys.executable, "-m", "lab.load", "--target", f"{target}:81",
                                           "--bulk", "--deadline", str(bulk_seconds)], timeout=180).stdout)
        if proc:
            load_cpu = _cpu_seconds(proc.pid) - cpu0
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=20)
        topo.pyproxy("cleanup")
        ns_exec(topo.node_ns, ["conntrack", "-F"])
    return {"mode": mode, "services": size, **{k: load[k] for k in ("requests", "errors", "rps", "p50_ms", "p99_ms")},
            "mb_per_s": bulk["mb_per_s"], "program_cpu_s": program_cpu, "cpu_s": load_cpu,
            "load": "wrk" if use_wrk else "python"}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("mode", "services", "requests", "errors", "req/s", "p50 ms", "p99 ms", "bulk MB/s",
            "pyproxy CPU s during the load", "pyproxy CPU s to program")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append(f"| {r['mode']} | {r['services']:,} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | "
                   f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mb_per_s']:.0f} | {r['cpu_s']:.2f} | "
                   f"{r['program_cpu_s']:.2f} |")
    return "\n".join(out)


def plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["services"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    get = {(r["mode"], r["services"]): r for r in rows}
    files = []
    for key, title, ylabel, name in (
        ("rps", "Short HTTP requests over new connections", "requests per second", "compare-rps.png"),
        ("p99_ms", "Request latency p99 (new connection each)", "milliseconds", "compare-latency-p99.png"),
        ("mb_per_s", "One bulk TCP stream", "MB/s", "compare-throughput.png"),
        ("cpu_s", "CPU pyproxy used during the load and the bulk stream", "CPU seconds", "compare-cpu.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(sizes)
        for k, size in enumerate(sizes):
            xs = [i + k * width for i in range(len(modes))]
            ys = [get[(m, size)][key] for m in modes]
            bars = ax.bar(xs, ys, width, label=f"{size:,} service{'s' if size > 1 else ''}")
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(modes))], modes)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,1000")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--requests", type=int, default=3000, help="Python load generator: requests")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk: seconds of load")
    parser.add_argument("--load", choices=("python", "wrk"), default="python",
                        help="the bounded Python generator (default), or wrk; with new connections at "
                        "high rates wrk's results swing with conntrack TIME_WAIT reuse in the lab")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bulk-seconds", type=float, default=20.0, help="cap on the bulk stream")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import shutil

    use_wrk = args.load == "wrk"
    if use_wrk and shutil.which("wrk") is None:
        raise SystemExit("bench.compare: wrk is not installed (apt-get install wrk) or use --load python")
    rows = []
    work = out / ".work"
    work.mkdir(exist_ok=True)
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            print(f"{mode} at {size} services ...", file=sys.stderr, flush=True)
            # A fresh lab for each row: in one shared lab, rows after an iptables-mode row
            # measured a third of the request rate (the Python client's and servers' sockets
            # from earlier rows; the compiled generator of bench.dataplane shows nftables flat
            # from 100 to 30k Services), which read as "1,000 Services halve the rate".
            with Topology.create(pods=4, client_sources=0, http_ports=(HTTP_PORT,),
                                 bulk_ports=(BULK_PORT,)) as topo:
                rows.append(run_one(topo, mode, size, requests=args.requests, concurrency=args.concurrency,
                                    bulk_seconds=args.bulk_seconds, workdir=work, load_seconds=args.seconds,
                                    use_wrk=use_wrk))
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    text = table(rows)
    (out / "compare.md").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    files = plots(rows, out)
    print(text)
    print("plots: " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
