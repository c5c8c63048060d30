"""Side by side in one lab: pyproxy (nftables, iptables) and upstream kube-proxy (nftables,
iptables, with its defaults), each on its own node of one real cluster.

    python -m bench.latency                         # 1k services: startup, 200 changes; 10k: startup
    python -m bench.latency --sizes 100 --changes 20   # quick smoke run

Measures, per proxy:

* **network programming latency**: an EndpointSlice of a probe Service is flipped between two
  real pods (A, B); from just before the PATCH is sent until a new connection through the
  ClusterIP, made from the proxy's node, is answered by the new pod. p50/p99 over the changes;
* **startup**: from starting the proxy until the probe Service (created last, after N others)
  answers through it;
* **CPU seconds** and **peak RSS** of the proxy process over the whole run.

The Services are selector-less with hand-made EndpointSlices (10 endpoints each that nothing
contacts), so the API holds N realistic Services without N×10 pods. All traffic stays in the
lab's namespaces. Needs root and the upstream binaries (lab/build-k8s.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROXIES = (
    ("pyproxy", "nftables"),
    ("pyproxy", "iptables"),
    ("kube-proxy", "nftables"),
    ("kube-proxy", "iptables"),
)
ONLY: set[str] = set()
"""With --proxies: measure only these kind:mode pairs."""
NS = "bench"  # the namespace of the current size (set per size: no namespace controller runs)
TARGET = "probe"


# ---------------------------------------------------------------------------------- helpers
# run inside the control-plane namespace, where the API is at 127.0.0.1

async def _client(kubeconfig: str):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lab.kubelet import LabClient

    return await LabClient.from_config(kubeconfig=kubeconfig)


def _slice(name: str, ips: list[str], port: int) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-manual", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": name,
                                    "endpointslice.kubernetes.io/managed-by": "bench.pyproxy"}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


def _svc(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": {"ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}}


async def apiload(kubeconfig: str, count: int, endpoints: int, target_ip: str) -> None:
    """Create N services + slices (16 requests in flight), then the probe service last."""
    client = await _client(kubeconfig)
    sem = asyncio.Semaphore(16)

    async def post(path: str, body: dict[str, Any]) -> None:
        async with sem:
            for _ in range(5):
                code = await client.send("POST", path, body=body, content_type="application/json")
                if code in (201, 409):
                    return
                await asyncio.sleep(0.5)
            raise RuntimeError(f"POST {path}: HTTP {code}")

    async def one(i: int) -> None:
        name = f"s{i:05d}"
        await post(f"/api/v1/namespaces/{NS}/services", _svc(name))
        ips = [f"10.{200 + j}.{i // 250}.{1 + i % 250}" for j in range(endpoints)]
        await post(f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", _slice(name, ips, 8080))

    await asyncio.gather(*(one(i) for i in range(count)))
    await post(f"/api/v1/namespaces/{NS}/services", _svc(TARGET))
    await post(f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", _slice(TARGET, [target_ip], 8080))
    await client.close()


async def writer(kubeconfig: str) -> None:
    """Read pod IPs on stdin; point the probe slice at each; print the send time."""
    client = await _client(kubeconfig)
    loop = asyncio.get_running_loop()
    path = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/{TARGET}-manual"
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        ip = line.strip()
        body = {"endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}
        t0 = time.monotonic()
        code = await client.send("PATCH", path, body=body)
        print(json.dumps({"t0": t0, "code": code}), flush=True)
    await client.close()


def prober(target: str) -> None:
    """Read 'NAME [SECONDS]' lines; probe target until NAME answers (60 s at most by default);
    print when (monotonic), or null."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lab.client import probe_once

    host, _, port = target.rpartition(":")
    for line in sys.stdin:
        want, _, limit = line.strip().partition(" ")
        deadline = time.monotonic() + float(limit or 60)
        found = None
        while time.monotonic() < deadline:
            got = probe_once((host, int(port)), proto="tcp", source=None, timeout=0.3)
            if isinstance(got, tuple) and got[0] == want:
                found = time.monotonic()
                break
            time.sleep(0.002)
        print(json.dumps({"t": found}), flush=True)


# ---------------------------------------------------------------------------------- driver

def _proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MB) of a process (and its children's reaped time)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
    hwm = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return cpu, hwm


def _kube_proxy_config(lab: Any, i: int, mode: str) -> str:
    path = lab.path / f"kube-proxy-{i}.yaml"
    path.write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": lab.node_admin_kubeconfig},
        "hostnameOverride": lab.node_name(i), "mode": mode, "clusterCIDR": "10.244.0.0/16",
        "healthzBindAddress": "0.0.0.0:10256", "metricsBindAddress": "127.0.0.1:10249",
        # Global conntrack sysctls are read-only in a network namespace: leave them alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }))
    return str(path)


def _start_proxy(lab: Any, i: int, kind: str, mode: str) -> subprocess.Popen[bytes]:
    log = open(lab.path / f"{kind}-{mode}-{i}.log", "ab")  # noqa: SIM115
    if kind == "pyproxy":
        argv = [sys.executable, "-m", "pyproxy", "run", "--kubeconfig", lab.node_admin_kubeconfig,
                "--hostname-override", lab.node_name(i), "--cluster-cidr", "10.244.0.0/16",
                "--proxy-mode", mode, "--iptables-backend", "nft", "--v", "0"]
    else:
        argv = [lab.bin("kube-proxy"), "--config", _kube_proxy_config(lab, i, mode), "--v=0"]
    return subprocess.Popen(["ip", "netns", "exec", lab.node_ns(i), *argv], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _cleanup_node(lab: Any, i: int) -> None:
    from lab.cluster import ns_run

    # Removing 10k services' rules from iptables-nft takes minutes.
    ns_run(lab.node_ns(i), [sys.executable, "-m", "pyproxy", "cleanup"], timeout=3600)
    ns_run(lab.node_ns(i), [lab.bin("kube-proxy"), "--cleanup", "--v=0"], timeout=3600)


def run_size(lab: Any, size: int, changes: int, endpoints: int, previous: str | None) -> list[dict[str, Any]]:
    from lab.cluster import ns_run

    if previous:
        # The lab runs no namespace controller: empty the previous size's namespace by hand.
        for kind in ("services", "endpointslices", "pods"):
            ns_run(lab.cp_ns, [lab.bin("kubectl"), f"--kubeconfig={lab.admin_kubeconfig}", "delete", kind,
                               "--all", "-n", previous, "--wait=false"], timeout=1800)
    lab.kubectl("create", "namespace", NS)
    pods = []
    for name, node in (("pod-a", 1), ("pod-b", 2)):
        lab.kubectl_apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
                            "spec": {"nodeName": lab.node_name(node), "containers": [
                                {"name": "echo", "image": "lab/echo", "ports": [{"containerPort": 8080}]}]}}])
    for name in ("pod-a", "pod-b"):
        lab.pod_pid(NS, name)
        ip = ""
        for _ in range(100):
            ip = lab.kubectl("get", "pod", name, "-n", NS, "-o", "jsonpath={.status.podIP}").stdout.strip()
            if ip:
                break
            time.sleep(0.1)
        pods.append(ip)
    t_load = time.monotonic()
    load = ns_run(lab.cp_ns, [sys.executable, "-m", "bench.latency", "apiload", "--kubeconfig",
                              lab.admin_kubeconfig, "--count", str(size), "--endpoints", str(endpoints),
                              "--target-ip", pods[0], "--namespace", NS], timeout=3600,
                  cwd=str(Path(__file__).resolve().parents[1]))
    if load.returncode != 0:
        raise RuntimeError(f"apiload failed: {load.stderr[-2000:]}")
    print(f"  created {size} services in {time.monotonic() - t_load:.0f}s", file=sys.stderr, flush=True)
    cip = lab.kubectl("get", "svc", TARGET, "-n", NS, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
    rows = []
    procs = {}
    starts = {}
    for i, (kind, mode) in enumerate(PROXIES, start=1):
        _cleanup_node(lab, i)
    probers = {}
    for i, (kind, mode) in enumerate(PROXIES, start=1):
        if ONLY and f"{kind}:{mode}" not in ONLY:
            continue
        starts[i] = time.monotonic()
        procs[i] = _start_proxy(lab, i, kind, mode)
        probers[i] = subprocess.Popen(
            ["ip", "netns", "exec", lab.node_ns(i), sys.executable, "-m", "bench.latency", "prober",
             "--target", f"{cip}:80"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=str(Path(__file__).resolve().parents[1]))
        _RUNNING.extend((procs[i], probers[i]))
        probers[i].stdin.write("pod-a 1800\n")  # a first sync at 10k can take minutes
        probers[i].stdin.flush()
        found = json.loads(probers[i].stdout.readline())["t"]
        rows.append({"proxy": kind, "mode": mode, "services": size,
                     "startup_s": (found - starts[i]) if found else None})
        print(f"  {kind} {mode}: first sync after {rows[-1]['startup_s']}", file=sys.stderr, flush=True)
        if not changes:
            # Startup only: measure each proxy alone, so another's periodic resync of 10k
            # services does not steal the CPU from the one starting.
            cpu, rss = _proc_stats(procs[i].pid)
            rows[-1].update(cpu_s=cpu, peak_rss_mb=rss, changes=0, missed=0, p50_ms=None, p99_ms=None)
            probers[i].stdin.close()
            probers[i].wait(timeout=30)
            _stop(procs[i])
            _cleanup_node(lab, i)
    if not changes:
        return rows
    lat: dict[int, list[float]] = {i: [] for i in procs}
    if changes:
        writer_p = subprocess.Popen(["ip", "netns", "exec", lab.cp_ns, sys.executable, "-m", "bench.latency",
                                     "writer", "--kubeconfig", lab.admin_kubeconfig, "--namespace", NS],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    cwd=str(Path(__file__).resolve().parents[1]))
        names = {pods[0]: "pod-a", pods[1]: "pod-b"}
        current = pods[0]
        for k in range(changes):
            current = pods[1] if current == pods[0] else pods[0]
            for i in probers:
                probers[i].stdin.write(names[current] + "\n")
                probers[i].stdin.flush()
            writer_p.stdin.write(current + "\n")
            writer_p.stdin.flush()
            t0 = json.loads(writer_p.stdout.readline())["t0"]
            for i in probers:
                t = json.loads(probers[i].stdout.readline())["t"]
                if t is not None:
                    lat[i].append(t - t0)
            if (k + 1) % 50 == 0:
                print(f"  {k + 1}/{changes} changes", file=sys.stderr, flush=True)
        writer_p.stdin.close()
        writer_p.wait(timeout=30)
    for i, row in enumerate(rows, start=1):
        cpu, rss = _proc_stats(procs[i].pid)
        vals = sorted(lat[i])
        row.update(cpu_s=cpu, peak_rss_mb=rss, changes=len(vals), missed=changes - len(vals) if changes else 0,
                   p50_ms=statistics.median(vals) * 1000 if vals else None,
                   p99_ms=vals[min(len(vals) - 1, int(len(vals) * 0.99))] * 1000 if vals else None)
    for i in procs:
        probers[i].stdin.close()
        probers[i].wait(timeout=30)
        _stop(procs[i])
        _cleanup_node(lab, i)
    return rows


_RUNNING: list[subprocess.Popen[Any]] = []
"""Every proxy and prober started, so an interrupted run stops them all (see main)."""


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _fmt(rows: list[dict[str, Any]]) -> str:
    head = ("proxy", "mode", "services", "startup s", "changes", "latency p50 ms", "latency p99 ms",
            "CPU s", "peak RSS MB")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        out.append("| " + " | ".join([
            r["proxy"], r["mode"], f"{r['services']:,}", f(r["startup_s"], ".2f"),
            str(r["changes"]) + (f" ({r['missed']} missed)" if r.get("missed") else ""),
            f(r["p50_ms"], ".0f"), f(r["p99_ms"], ".0f"), f(r["cpu_s"], ".1f"), f(r["peak_rss_mb"], ".0f"),
        ]) + " |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("apiload")
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--target-ip", required=True)
    p.add_argument("--namespace", required=True)
    p = sub.add_parser("writer")
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--namespace", required=True)
    p = sub.add_parser("prober")
    p.add_argument("--target", required=True)
    parser.add_argument("--sizes", default="1000,10000", help="service counts; latency only at the first")
    parser.add_argument("--changes", type=int, default=200, help="EndpointSlice changes at the first size")
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--proxies", default="", help="only these, e.g. pyproxy:nftables,kube-proxy:nftables")
    args = parser.parse_args()
    global NS
    if args.cmd == "apiload":
        NS = args.namespace
        asyncio.run(apiload(args.kubeconfig, args.count, args.endpoints, args.target_ip))
        return 0
    if args.cmd == "writer":
        NS = args.namespace
        asyncio.run(writer(args.kubeconfig))
        return 0
    if args.cmd == "prober":
        prober(args.target)
        return 0
    from lab.cluster import ClusterLab

    ONLY.update(p for p in args.proxies.split(",") if p)
    lab = ClusterLab.up(name=f"bench{os.getpid()}", nodes=len(PROXIES))
    rows: list[dict[str, Any]] = []
    previous = None
    try:
        for k, size in enumerate(int(s) for s in args.sizes.split(",")):
            print(f"{size} services ...", file=sys.stderr, flush=True)
            NS = f"bench-{size}"
            rows += run_size(lab, size, args.changes if k == 0 else 0, args.endpoints, previous)
            previous = NS
            # Print as we go: a later size failing must not lose the earlier rows.
            print(_fmt(rows), file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        for proc in _RUNNING:
            _stop(proc)
        lab.down()
    print(_fmt(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
