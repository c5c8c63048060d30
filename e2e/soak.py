"""Churn soak: many Services, a steady stream of EndpointSlice updates, and a client that keeps
connecting to a stable Service through pyproxy the whole time (hardening issue).

    python -m e2e.soak                               # 10k services, 100 updates/s for 60 s
    python -m e2e.soak --minutes 30                  # the long variant
    python -m e2e.soak --services 1000 --seconds 20  # a quick one

What it checks: no connection to the stable Service fails; once the churn stops, the rules in the
kernel equal a fresh full render of the same objects (``pyproxy run --once`` in a fresh
namespace, both listed as ``nft -j`` and compared element by element); pyproxy's RSS stays flat
(the curve is printed, one sample a second). ``e2e/test_soak.py`` runs it in the test suite.

Objects are selector-less Services with hand-written EndpointSlices of 10 endpoints (addresses
nothing contacts), created by ``bench.latency apiload``; the updates rotate one endpoint address of
a random slice. The stable Service has two real pods. All of it inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e.harness import answers, cluster_ip, pod, service, wait_for, wait_ready_endpoints
from lab.cluster import CLUSTER_CIDR, REPO, ClusterLab, ns_run

NS = "soak"


@dataclass
class SoakResult:
    services: int
    seconds: float
    updates_sent: int
    update_errors: int
    connections: int
    failed: dict[str, int]
    rss_mb: list[float] = field(default_factory=list)
    """pyproxy's RSS, one sample a second from the start of the churn."""
    converge_s: float = 0.0
    diff: list[str] = field(default_factory=list)
    """How the kernel's rules differ from a fresh full render (empty: equal)."""
    failures: list[tuple[float, str]] = field(default_factory=list)
    """When each failed connection happened (wall clock) and how it failed."""
    context: list[str] = field(default_factory=list)
    """pyproxy's log lines from around each failure, to say why it failed."""

    @property
    def rss_growth_mb(self) -> float:
        """RSS at the end minus RSS after the first tenth of the run (warm-up)."""
        if len(self.rss_mb) < 10:
            return 0.0
        return self.rss_mb[-1] - self.rss_mb[len(self.rss_mb) // 10]

    def table(self) -> str:
        rows = ["| services | seconds | updates sent (errors) | connections | failed | converged s | "
                "RSS start → end MB | rules = fresh render |", "|---|---|---|---|---|---|---|---|",
                f"| {self.services:,} | {self.seconds:.0f} | {self.updates_sent:,} ({self.update_errors}) | "
                f"{self.connections:,} | {sum(self.failed.values())} | {self.converge_s:.1f} | "
                f"{self.rss_mb[0] if self.rss_mb else 0:.0f} → {self.rss_mb[-1] if self.rss_mb else 0:.0f} | "
                f"{'yes' if not self.diff else 'NO'} |"]
        return "\n".join(rows)

    def curve(self, width: int = 60) -> str:
        """RSS over time as text: one row per stretch of the run."""
        if not self.rss_mb:
            return ""
        step = max(1, len(self.rss_mb) // 20)
        lo, hi = min(self.rss_mb), max(self.rss_mb)
        out = [f"pyproxy RSS over the churn ({lo:.0f}-{hi:.0f} MB):"]
        for k in range(0, len(self.rss_mb), step):
            v = self.rss_mb[k]
            bar = int((v - lo) / (hi - lo) * width) if hi > lo else 0
            out.append(f"  {k:5d}s {v:7.1f} MB |{'#' * bar}")
        return "\n".join(out)


# -- the churner: runs in the control-plane namespace -------------------------------------------

async def churn(kubeconfig: str, count: int, rate: float, seconds: float) -> dict[str, int]:
    """PATCH one random slice's endpoints ``rate`` times a second for ``seconds``."""
    sys.path.insert(0, str(REPO))
    from lab.kubelet import LabClient

    client = await LabClient.from_config(kubeconfig=kubeconfig)
    rng = random.Random(7)
    sent = errors = 0
    in_flight: set[asyncio.Task[None]] = set()
    sem = asyncio.Semaphore(32)

    async def one(i: int, k: int) -> None:
        nonlocal errors
        async with sem:
            ips = [f"10.{200 + j}.{i // 250}.{1 + i % 250}" for j in range(9)] + [f"10.199.{k % 250}.{1 + k // 250 % 250}"]
            body = {"endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}
            code = await client.send("PATCH", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/"
                                              f"s{i:05d}-manual", body=body)
            if code != 200:
                errors += 1

    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        due = t0 + sent / rate
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        task = asyncio.create_task(one(rng.randrange(count), sent))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        sent += 1
    await asyncio.gather(*in_flight)
    await client.close()
    return {"sent": sent, "errors": errors}


# -- the driver ----------------------------------------------------------------------------------

def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _normalised(ns: str) -> dict[str, Any]:
    """Table ``ip pyproxy`` as nft lists it, as sorted structures: chains that hold rules and
    their rules, sets and maps with their elements. Empty chains are left out: pyproxy deletes
    flushed chains lazily (a deletion makes nft fetch the whole table), and they are inert."""
    out = ns_run(ns, ["nft", "-j", "list", "table", "ip", "pyproxy"], timeout=600)
    assert out.returncode == 0, out.stderr
    chains: dict[str, list[str]] = {}
    sets: dict[str, list[str]] = {}
    for item in json.loads(out.stdout)["nftables"]:
        if "rule" in item:
            rule = item["rule"]
            chains.setdefault(rule["chain"], []).append(json.dumps(rule["expr"], sort_keys=True))
        elif "set" in item or "map" in item:
            s = item.get("set") or item.get("map")
            sets[s["name"]] = sorted(json.dumps(e, sort_keys=True) for e in s.get("elem", []))
    return {"chains": chains, "sets": sets}


def _diff(live: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    out = []
    for what in ("chains", "sets"):
        a, b = live[what], fresh[what]
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                out.append(f"{what[:-1]} {name}: live {len(a.get(name) or [])} items, fresh {len(b.get(name) or [])}")
    return out


def _log_around(path: Path, moments: list[float], *, within: float = 3.0) -> list[str]:
    """The log lines stamped within ``within`` seconds of any of ``moments`` (wall clock)."""
    from datetime import datetime

    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if any(abs(stamp - m) <= within for m in moments):
            out.append(line)
    return out[:200]


def _metrics(lab: ClusterLab) -> str:
    return ns_run(lab.node_ns(1), ["curl", "-s", "--max-time", "5", "http://127.0.0.1:10249/metrics"]).stdout


def _synced(lab: ClusterLab) -> bool:
    return any(line.startswith("kubeproxy_sync_proxy_rules_last_timestamp_seconds") and float(line.split()[-1]) > 0
               for line in _metrics(lab).splitlines())


def _pending(lab: ClusterLab) -> float:
    text = _metrics(lab)
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(("kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                                   "kubeproxy_sync_proxy_rules_service_changes_pending")))


def soak(lab: ClusterLab, *, services: int, rate: float, seconds: float, mode: str = "nftables",
         log: Any = sys.stderr) -> SoakResult:
    """Run the soak in ``lab`` (pyproxy on node 1). The objects stay in namespace ``soak``
    (deleting 10k Services one by one takes minutes; the lab is torn down after anyway)."""
    def say(msg: str) -> None:
        print(f"soak: {msg}", file=log, flush=True)

    lab.kubectl("create", "namespace", NS, check=False)
    stable = "stable"
    lab.kubectl_apply([service(stable, {"app": stable}, namespace=NS),
                       *(pod(f"{stable}-{k}", lab.node_name(1 + k % lab.nodes), labels={"app": stable}, namespace=NS)
                         for k in range(2))])
    wait_ready_endpoints(lab, stable, 2, namespace=NS)
    t = time.monotonic()
    load = ns_run(lab.cp_ns, [sys.executable, "-m", "bench.latency", "apiload", "--kubeconfig",
                              lab.admin_kubeconfig, "--count", str(services), "--endpoints", "10",
                              "--target-ip", "10.198.0.1", "--namespace", NS], timeout=3600, cwd=str(REPO))
    assert load.returncode == 0, load.stderr[-2000:]
    say(f"created {services} services in {time.monotonic() - t:.0f}s")
    plog = open(lab.path / "soak-pyproxy.log", "wb")  # noqa: SIM115
    proxy = subprocess.Popen(
        ["ip", "netns", "exec", lab.node_ns(1), sys.executable, "-m", "pyproxy", "run",
         "--kubeconfig", lab.node_admin_kubeconfig, "--hostname-override", lab.node_name(1),
         "--cluster-cidr", CLUSTER_CIDR, "--proxy-mode", mode, "--ip-families", "4", "--v", "1"],
        stdout=plog, stderr=subprocess.STDOUT, start_new_session=True)
    fresh_ns = f"pxtsoak-{uuid.uuid4().hex[:6]}"
    result: SoakResult | None = None
    try:
        cip = cluster_ip(lab, stable, namespace=NS)
        t = time.monotonic()
        # No traffic before the first sync: a SYN sent before the rules exist leaves a conntrack
        # entry that was never DNATed, and a later connection that happens to reuse its source
        # port within two minutes would follow that entry instead of the rules.
        wait_for("pyproxy's first sync", lambda: _synced(lab), timeout=600, interval=1)
        got = set(answers(lab, f"http://{cip}/", 4, node=1))
        assert got <= {f"{stable}-0", f"{stable}-1"}, got
        say(f"first sync after {time.monotonic() - t:.0f}s; churning {rate:.0f} updates/s for {seconds:.0f}s")
        client = subprocess.Popen(
            ["ip", "netns", "exec", lab.node_ns(1), sys.executable, "-m", "lab.client", "--target",
             f"{cip}:80", "--http", "--reset-close", "--count", "10000000", "--timeout", "2", "--deadline", str(seconds + 5)],
            stdout=subprocess.PIPE, text=True)
        churner = subprocess.Popen(
            ["ip", "netns", "exec", lab.cp_ns, sys.executable, "-m", "e2e.soak", "churn", "--kubeconfig",
             lab.admin_kubeconfig, "--count", str(services), "--rate", str(rate), "--seconds", str(seconds)],
            stdout=subprocess.PIPE, text=True, cwd=str(REPO))
        rss: list[float] = []
        while churner.poll() is None:
            rss.append(_rss_mb(proxy.pid))
            time.sleep(1)
        sent = json.loads(churner.stdout.read() or "{}")
        out, _ = client.communicate(timeout=120)
        got = json.loads(out)
        result = SoakResult(services=services, seconds=seconds, updates_sent=sent.get("sent", 0),
                            update_errors=sent.get("errors", 0), connections=len(got["answers"]),
                            # "deadline" counts the attempts the bounded client never made.
                            failed={k: v for k, v in got["errors"].items() if k != "deadline"}, rss_mb=rss)
        result.failures = [(got["started"] + t, word) for t, word in got.get("failures", [])]
        assert proxy.poll() is None, "pyproxy exited"
        t = time.monotonic()
        wait_for("pyproxy applied every change", lambda: _pending(lab) == 0, timeout=300, interval=1)
        time.sleep(2)  # a sync in flight
        result.converge_s = time.monotonic() - t
        say(f"converged {result.converge_s:.1f}s after the churn; comparing with a fresh render")
        dump = lab.path / "soak-objects.json"
        items = []
        for kind in ("services", "endpointslices"):
            items += json.loads(lab.kubectl("get", kind, "-A", "-o", "json").stdout)["items"]
            for item in items:
                item.setdefault("kind", "Service" if kind == "services" else "EndpointSlice")
        items.append(json.loads(lab.kubectl("get", "node", lab.node_name(1), "-o", "json").stdout))
        dump.write_text(json.dumps({"kind": "List", "items": items}))
        subprocess.run(["ip", "netns", "add", fresh_ns], check=True)
        once = ns_run(fresh_ns, [sys.executable, "-m", "pyproxy", "run", "--once", "--source-file", str(dump),
                                 "--hostname-override", lab.node_name(1), "--cluster-cidr", CLUSTER_CIDR,
                                 "--proxy-mode", "nftables", "--ip-families", "4"], timeout=900)
        assert once.returncode == 0, once.stderr[-2000:]
        result.diff = _diff(_normalised(lab.node_ns(1)), _normalised(fresh_ns)) if mode == "nftables" else []
        return result
    finally:
        if result is not None and result.failures:
            plog.flush()
            result.context = _log_around(lab.path / "soak-pyproxy.log", [t for t, _ in result.failures])
        subprocess.run(["ip", "netns", "del", fresh_ns], check=False, capture_output=True)
        if proxy.poll() is None:
            proxy.terminate()
            proxy.wait(timeout=30)
        ns_run(lab.node_ns(1), [sys.executable, "-m", "pyproxy", "cleanup"], timeout=900)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("churn", help="(internal) the update load, run in the control-plane namespace")
    c.add_argument("--kubeconfig", required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--rate", type=float, required=True)
    c.add_argument("--seconds", type=float, required=True)
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=100.0, help="EndpointSlice updates per second")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--minutes", type=float, default=0.0, help="overrides --seconds")
    p.add_argument("--mode", default="nftables", choices=("nftables", "iptables"))
    a = p.parse_args()
    if a.cmd == "churn":
        print(json.dumps(asyncio.run(churn(a.kubeconfig, a.count, a.rate, a.seconds))))
        return 0
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces)", file=sys.stderr)
        return 2
    seconds = a.minutes * 60 or a.seconds
    lab = ClusterLab.up(name=f"soak{os.getpid()}", nodes=2)
    try:
        result = soak(lab, services=a.services, rate=a.rate, seconds=seconds, mode=a.mode)
    finally:
        lab.down()
    print(result.table())
    print(result.curve())
    for line in result.diff[:20]:
        print("  differs:", line)
    ok = not result.diff and not result.failed and result.rss_growth_mb < 50
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
