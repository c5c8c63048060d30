"""Side by side in one lab, like for like: pyproxy (nftables, iptables) and upstream kube-proxy
(nftables, iptables), each on its own node of one real cluster, all with the same settings.

    python -m bench.latency                          # 1k services: startup + 200 isolated changes; 10k: startup
    python -m bench.latency --sizes 100 --changes 10 --proxies pyproxy:nftables,kube-proxy:nftables
    python -m bench.latency --sizes 1000 --cadence steady --rate 50    # batching under churn
    python -m bench.latency --sequential             # each proxy alone on the CPU, one after another
    python -m bench.latency --min-sync-period 1 --no-upstream-defaults

Every proxy gets the same settings: ``--min-sync-period`` (default 0.1 s, pyproxy's default;
kube-proxy's ``nftables.minSyncPeriod`` / ``iptables.minSyncPeriod``), sync period 30 s, the
lab's cluster CIDRs (IPv4 and IPv6), the same mode. Upstream kube-proxy at its own defaults
(``minSyncPeriod`` 1 s) is measured too, as an extra row labelled "(upstream defaults)", never
as the headline (``--no-upstream-defaults`` leaves it out).

Measures, per proxy:

* **network programming latency** of EndpointSlice changes sent on a fixed schedule that does
  not depend on the proxies (``--cadence``):

  - ``isolated``: one change every ``--interval`` seconds (default 2 s, longer than either
    rate limit), so each change is programmed alone: the reaction time;
  - ``steady --rate R``: R changes a second whatever the proxies do, so a proxy batches
    several changes per sync: what it costs under churn.

  The latency of change i for a proxy is from just before change i's PATCH is sent until a new
  connection through the ClusterIP, made on that proxy's node, is answered by the state of
  change i *or of a later one* (a proxy that batches i with later changes serves i when it
  serves the batch). p50/p99 over the changes;
* **startup**: from starting the proxy until the probe Service (created last, after N others)
  answers through it;
* **CPU seconds** and **peak RSS** of the proxy process over its whole run.

*Which change a proxy serves.* Flipping one endpoint between two pods A and B cannot tell
change i from change i-2: under steady churn a proxy that lags two changes behind would be
credited with the newest. Rotating through K pods only moves the problem to a lag of K changes
(50 changes a second against a 1 s rate limit is 50). So every change is made unique: change i
points the probe Service's one endpoint at pod-a or pod-b (alternately, so the endpoint's
address changes too, as in a pod replacement) **on port 20000+i**. Both pods run, beside their
echo on 8080, a bench echo that listens on every port 20000..20000+n and answers
``<pod>/<i>``. A probe's answer names the exact change the proxy serves; ids only grow, so
"serves change i or a later one" is ``id >= i``, however far behind a proxy is.

*Probing.* On each proxy's node a prober process opens a new TCP connection through the
ClusterIP every ``--probe-interval`` (5 ms) and reports when the answer changes; the probers
run concurrently and independently of the change writer, so neither the probing nor another
proxy's convergence spaces the changes.

*Load.* By default all proxies run at once and see the same changes at the same times ("all
proxies under the same load"); ``--sequential`` runs them one after another ("each proxy alone
on the CPU"). The header says which, and the machine (nproc, kernel, CPU model).

The Services are selector-less with hand-made EndpointSlices (10 endpoints each that nothing
contacts), so the API holds N realistic Services without N×10 pods. The backend pods run on a
node of their own without a proxy, so every proxy reaches them the same way. All traffic stays
in the lab's namespaces. Needs root and the upstream binaries (lab/build-k8s.sh, cached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROXIES = (
    ("pyproxy", "nftables"),
    ("pyproxy", "iptables"),
    ("kube-proxy", "nftables"),
    ("kube-proxy", "iptables"),
)
UPSTREAM_MIN_SYNC = 1.0
"""kube-proxy's default minSyncPeriod (v1alpha1 defaults.go), for the "(upstream defaults)" rows."""
SYNC_PERIOD = 30.0
"""Both proxies' default; set explicitly on the like-for-like rows."""
CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/32"
"""lab.cluster's CLUSTER_CIDR and CLUSTER_CIDR6, given to every proxy."""
BASE_PORT = 20000
"""Change i's endpoint port is BASE_PORT + i (the initial state is change 0)."""
NS = "bench"  # the namespace of the current size (set per size: no namespace controller runs)
TARGET = "probe"
PODS = ("pod-a", "pod-b")


# ---------------------------------------------------------------------------------- pure helpers

@dataclass(frozen=True)
class Run:
    """One proxy process of the benchmark, on its own node."""

    kind: str
    mode: str
    min_sync: float
    node: int
    upstream_defaults: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind} {self.mode}" + (" (upstream defaults)" if self.upstream_defaults else "")


def plan_runs(proxies: str, min_sync: float, upstream_defaults: bool) -> list[Run]:
    """The proxies to run, each mapped to the node it runs on (1..n, in order): the selected
    kind:mode pairs (all of PROXIES if ``proxies`` is empty) at ``min_sync``, then, with
    ``upstream_defaults``, every selected kube-proxy again at its default minSyncPeriod (unless
    that is ``min_sync`` already). Raises ValueError on an unknown pair."""
    known = {f"{k}:{m}": (k, m) for k, m in PROXIES}
    names = [p.strip() for p in proxies.split(",") if p.strip()] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown proxies {unknown}; choose from {', '.join(known)}")
    chosen = list(dict.fromkeys(known[n] for n in names))
    runs = [Run(kind, mode, min_sync, node=0) for kind, mode in chosen]
    if upstream_defaults and not math.isclose(min_sync, UPSTREAM_MIN_SYNC):
        runs += [Run(kind, mode, UPSTREAM_MIN_SYNC, node=0, upstream_defaults=True)
                 for kind, mode in chosen if kind == "kube-proxy"]
    return [Run(r.kind, r.mode, r.min_sync, node=i, upstream_defaults=r.upstream_defaults)
            for i, r in enumerate(runs, start=1)]


def go_duration(seconds: float) -> str:
    """A Go duration for a KubeProxyConfiguration. 0 becomes 1ns: v1alpha1 defaulting turns a
    minSyncPeriod of 0 into 1 s."""
    ns = round(seconds * 1e9)
    if ns <= 0:
        return "1ns"
    if ns % 1_000_000 == 0:
        return f"{ns // 1_000_000}ms"
    return f"{ns}ns"


def cadence_period(cadence: str, interval: float, rate: float) -> float:
    """Seconds between two changes."""
    if cadence == "isolated":
        if interval <= 0:
            raise ValueError("--interval must be > 0")
        return interval
    if cadence == "steady":
        if rate <= 0:
            raise ValueError("--rate must be > 0")
        return 1.0 / rate
    raise ValueError(f"unknown cadence {cadence!r}")


def change_offsets(count: int, period: float) -> list[float]:
    """When each of ``count`` changes is due, in seconds from the start: a fixed schedule, the
    same whatever the proxies do."""
    return [k * period for k in range(count)]


def change_body(i: int, pod_ips: list[str]) -> dict[str, Any]:
    """The merge patch of the probe EndpointSlice for change i: one endpoint, on a pod
    alternately, on port BASE_PORT + i (what makes the change identifiable)."""
    return {"ports": [{"name": "p", "port": BASE_PORT + i, "protocol": "TCP"}],
            "endpoints": [{"addresses": [pod_ips[i % len(pod_ips)]], "conditions": {"ready": True}}]}


def answer_id(answer: str) -> int | None:
    """The change id in a bench echo's answer ``<pod>/<i>``; None for anything else."""
    _, sep, tail = answer.rpartition("/")
    return int(tail) if sep and tail.isdigit() else None


def latencies(sent: list[tuple[int, float]], seen: list[tuple[float, int | None]]) -> dict[int, float | None]:
    """Per change id: seconds from its send time until the first observation of it or of a later
    change (``seen``: (time, id) in time order; None ids are failed probes), or None if never."""
    out: dict[int, float | None] = {}
    order = sorted(sent)
    k = 0
    best = -1
    for t, got in seen:
        if got is None or got <= best:
            continue
        best = got
        while k < len(order) and order[k][0] <= best:
            cid, t0 = order[k]
            out[cid] = max(0.0, t - t0)
            k += 1
    for cid, _ in order[k:]:
        out[cid] = None
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    vals = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(vals)))
    return vals[min(rank, len(vals)) - 1]


def cpu_model(cpuinfo: str) -> str:
    """The CPU model from /proc/cpuinfo text ("model name", or another architecture's field)."""
    for key in ("model name", "Model", "cpu model", "Processor", "cpu"):
        for line in cpuinfo.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return "unknown CPU"


def machine() -> str:
    try:
        model = cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        model = "unknown CPU"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpus} CPUs (nproc), kernel {os.uname().release}, {model}"


def header(*, sequential: bool, min_sync: float, upstream_defaults: bool, machine_text: str) -> list[str]:
    load = ("each proxy alone on the CPU (run one after another, --sequential)" if sequential
            else "all proxies under the same load (run concurrently, each on its own node)")
    extra = (f"; extra rows \"(upstream defaults)\": kube-proxy at its own defaults "
             f"(minSyncPeriod {UPSTREAM_MIN_SYNC:g} s)" if upstream_defaults else "")
    return [f"Mode: {load}.",
            f"Machine: {machine_text}.",
            f"Settings: min-sync-period {min_sync:g} s for every proxy, sync period {SYNC_PERIOD:g} s, "
            f"cluster CIDRs {CLUSTER_CIDRS}{extra}."]


def cadence_text(cadence: str, interval: float, rate: float, changes: int) -> str:
    if not changes:
        return "- (startup only)"
    if cadence == "isolated":
        return f"isolated, 1 per {interval:g} s ({changes} changes)"
    return f"steady, {rate:g}/s ({changes} changes)"


def _fmt(rows: list[dict[str, Any]]) -> str:
    head = ("services × endpoints", "proxy", "min-sync-period", "cadence", "startup s", "p50 ms", "p99 ms",
            "CPU s", "peak RSS MB")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        p99 = f(r["p99_ms"], ".0f")
        if r.get("missed"):
            p99 += f" ({r['missed']} missed)"
        out.append("| " + " | ".join([
            f"{r['services']:,} × {r['endpoints']}", r["proxy"], f"{r['min_sync_s']:g} s", r["cadence"],
            f(r["startup_s"], ".2f"), f(r["p50_ms"], ".0f"), p99, f(r["cpu_s"], ".1f"),
            f(r["peak_rss_mb"], ".0f"),
        ]) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- children
# apiload and writer run inside the control-plane namespace, where the API is at 127.0.0.1

async def _client(kubeconfig: str):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(REPO))
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


async def apiload(kubeconfig: str, count: int, endpoints: int, target_ip: str, target_port: int = 8080) -> None:
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
    await post(f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
               _slice(TARGET, [target_ip], target_port))
    await client.close()


async def writer(kubeconfig: str, pod_ips: list[str], first: int, count: int, period: float) -> None:
    """Send changes first..first+count-1 on a fixed schedule (one every ``period`` s), in order
    (one PATCH at a time, so the API applies them in order; a late one goes at once). Prints a
    JSON line per change: its id, the monotonic time just before it was sent, HTTP code, and
    how late it was on the schedule."""
    client = await _client(kubeconfig)
    path = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/{TARGET}-manual"
    await client.send("GET", path)  # connect and authenticate before the clock starts
    start = time.monotonic() + 0.2
    for k, offset in enumerate(change_offsets(count, period)):
        due = start + offset
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        i = first + k
        t0 = time.monotonic()
        code = await client.send("PATCH", path, body=change_body(i, pod_ips))
        print(json.dumps({"id": i, "t0": t0, "code": code, "late": max(0.0, t0 - due)}), flush=True)
    await client.close()


def prober(target: str, interval: float) -> None:
    """Probe target with a new TCP connection every ``interval`` s until stdin closes; print
    ``{"t": monotonic, "id": change id or null, "answer": ...}`` whenever the answer changes."""
    sys.path.insert(0, str(REPO))
    from lab.client import probe_once

    host, _, port = target.rpartition(":")
    done = threading.Event()

    def wait_eof() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=wait_eof, daemon=True).start()
    last: str | None = None
    while not done.is_set():
        got = probe_once((host, int(port)), proto="tcp", source=None, timeout=0.3, reset_close=True)
        now = time.monotonic()
        answer = got[0] if isinstance(got, tuple) else f"error:{got}"
        if answer != last:
            last = answer
            print(json.dumps({"t": now, "id": answer_id(answer), "answer": answer}), flush=True)
        done.wait(interval)


def echo(name: str, first_port: int, count: int) -> None:
    """Run inside a pod's network namespace: listen on ports first_port..first_port+count-1 and
    answer each connection ``<name>/<port - BASE_PORT> <client ip>``."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))

    async def serve() -> None:
        def handler(port: int):  # type: ignore[no-untyped-def]
            async def handle(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                peer = w.get_extra_info("peername")
                w.write(f"{name}/{port - BASE_PORT} {peer[0]}\n".encode())
                try:
                    await w.drain()
                except (ConnectionError, OSError):
                    pass
                finally:
                    w.close()
            return handle

        from lab.echo import serve_until_stopped

        servers = [await asyncio.start_server(handler(p), "0.0.0.0", p, reuse_address=True, backlog=512)
                   for p in range(first_port, first_port + count)]
        await serve_until_stopped(servers)

    asyncio.run(serve())


# ---------------------------------------------------------------------------------- driver

_RUNNING: list[subprocess.Popen[Any]] = []
"""Every proxy, prober and echo started, so an interrupted run stops them all (see main)."""


def _popen(argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
    proc = subprocess.Popen(argv, cwd=str(REPO), **kw)
    _RUNNING.append(proc)
    return proc


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _proc_stats(pid: int) -> tuple[float | None, float | None]:
    """(CPU seconds, peak RSS MB) of a live process (with its children's reaped time)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
        hwm = None
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
        return cpu, hwm
    except (OSError, IndexError, ValueError):
        return None, None


def _kube_proxy_config(lab: Any, run: Run) -> str:
    # The like-for-like rows set the rate limits as pyproxy has them; "(upstream defaults)"
    # leaves them out, so kube-proxy's own defaulting applies (minSyncPeriod 1 s, syncPeriod 30 s).
    limits = {} if run.upstream_defaults else {
        run.mode: {"minSyncPeriod": go_duration(run.min_sync), "syncPeriod": go_duration(SYNC_PERIOD)}}
    path = lab.path / f"kube-proxy-{run.node}.yaml"
    path.write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": lab.node_admin_kubeconfig},
        "hostnameOverride": lab.node_name(run.node), "mode": run.mode, "clusterCIDR": CLUSTER_CIDRS,
        **limits,
        "healthzBindAddress": "0.0.0.0:10256", "metricsBindAddress": "127.0.0.1:10249",
        # Global conntrack sysctls are read-only in a network namespace: leave them alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }))
    return str(path)


def _start_proxy(lab: Any, run: Run) -> subprocess.Popen[bytes]:
    log = open(lab.path / f"{run.kind}-{run.mode}-{run.node}.log", "ab")  # noqa: SIM115
    if run.kind == "pyproxy":
        argv = [sys.executable, "-m", "pyproxy", "run", "--kubeconfig", lab.node_admin_kubeconfig,
                "--hostname-override", lab.node_name(run.node), "--cluster-cidr", CLUSTER_CIDRS,
                "--proxy-mode", run.mode, "--iptables-backend", "nft", "--min-sync-period", f"{run.min_sync:g}",
                "--sync-period", f"{SYNC_PERIOD:g}", "--v", "0"]
    else:
        argv = [lab.bin("kube-proxy"), "--config", _kube_proxy_config(lab, run), "--v=0"]
    return _popen(["ip", "netns", "exec", lab.node_ns(run.node), *argv], stdout=log, stderr=subprocess.STDOUT,
                  start_new_session=True)


def _cleanup_node(lab: Any, node: int) -> None:
    from lab.cluster import ns_run

    # Removing 10k services' rules from iptables-nft takes minutes.
    ns_run(lab.node_ns(node), [sys.executable, "-m", "pyproxy", "cleanup"], timeout=3600, cwd=str(REPO))
    ns_run(lab.node_ns(node), [lab.bin("kube-proxy"), "--cleanup", "--v=0"], timeout=3600)


@dataclass
class _Session:
    """One running proxy, its prober on the same node, and what the prober reported."""

    run: Run
    proc: subprocess.Popen[Any]
    prober: subprocess.Popen[Any]
    started: float
    seen: list[tuple[float, int | None]] = field(default_factory=list)

    def read(self) -> None:  # in a thread: the prober's lines as they come
        assert self.prober.stdout is not None
        for line in self.prober.stdout:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            self.seen.append((d["t"], d["id"]))

    def first_answer(self) -> float | None:
        return next((t for t, i in list(self.seen) if i is not None), None)

    def newest(self) -> int:
        return max((i for _, i in list(self.seen) if i is not None), default=-1)


@dataclass
class Plan:
    """What every size's measurement shares."""

    runs: list[Run]
    backend_node: int
    endpoints: int
    cadence: str
    interval: float
    rate: float
    sequential: bool
    probe_interval: float
    settle: float


def _measure(lab: Any, plan: Plan, group: list[Run], size: int, changes: int, cip: str, pod_ips: list[str],
             next_id: int) -> list[dict[str, Any]]:
    """Start the group's proxies together, wait for each one's first answer, then send
    ``changes`` changes on the schedule (ids from ``next_id``) and collect the latencies."""
    sessions: list[_Session] = []
    for run in group:
        started = time.monotonic()
        proc = _start_proxy(lab, run)
        prober_p = _popen(["ip", "netns", "exec", lab.node_ns(run.node), sys.executable, "-m", "bench.latency",
                           "prober", "--target", f"{cip}:80", "--interval", str(plan.probe_interval)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        s = _Session(run, proc, prober_p, started)
        threading.Thread(target=s.read, daemon=True).start()
        sessions.append(s)
    rows = []
    deadline = time.monotonic() + 1800  # a first sync at 10k can take minutes
    pending = list(sessions)
    while pending and time.monotonic() < deadline:
        for s in list(pending):
            if s.first_answer() is not None or s.proc.poll() is not None:
                pending.remove(s)
                startup = s.first_answer()
                print(f"  {s.run.label} (node {s.run.node}): first answer after "
                      f"{'-' if startup is None else f'{startup - s.started:.2f}s'}", file=sys.stderr, flush=True)
        time.sleep(0.01)
    sent: list[tuple[int, float]] = []
    failed = 0
    if changes:
        period = cadence_period(plan.cadence, plan.interval, plan.rate)
        w = _popen(["ip", "netns", "exec", lab.cp_ns, sys.executable, "-m", "bench.latency", "writer",
                    "--kubeconfig", lab.admin_kubeconfig, "--namespace", NS, "--pods", ",".join(pod_ips),
                    "--first", str(next_id), "--count", str(changes), "--period", repr(period)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = w.communicate(timeout=changes * period + 300)
        if w.returncode != 0:
            raise RuntimeError(f"writer failed: {err[-2000:]}")
        late = 0.0
        for line in out.splitlines():
            d = json.loads(line)
            late = max(late, d["late"])
            if 200 <= d["code"] < 300:
                sent.append((d["id"], d["t0"]))
            else:
                failed += 1
        print(f"  sent {len(sent)} changes ({failed} failed), at most {late * 1000:.0f} ms behind the schedule",
              file=sys.stderr, flush=True)
        last = max((i for i, _ in sent), default=-1)
        settle_until = time.monotonic() + plan.settle
        while time.monotonic() < settle_until and any(s.newest() < last and s.proc.poll() is None
                                                      for s in sessions):
            time.sleep(0.05)
    for s in sessions:
        cpu, rss = _proc_stats(s.proc.pid)
        assert s.prober.stdin is not None
        s.prober.stdin.close()
        try:
            s.prober.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _stop(s.prober)
        first = s.first_answer()
        lat = latencies(sent, s.seen) if sent else {}
        vals = [v for v in lat.values() if v is not None]
        p50, p99 = percentile(vals, 50), percentile(vals, 99)
        rows.append({"services": size, "endpoints": plan.endpoints, "proxy": s.run.label, "kind": s.run.kind,
                     "mode": s.run.mode, "node": s.run.node, "upstream_defaults": s.run.upstream_defaults,
                     "min_sync_s": s.run.min_sync,
                     "cadence": cadence_text(plan.cadence, plan.interval, plan.rate, changes),
                     "changes": len(sent), "missed": len(sent) - len(vals), "failed_patches": failed,
                     "startup_s": (first - s.started) if first is not None else None,
                     "p50_ms": p50 * 1000 if p50 is not None else None,
                     "p99_ms": p99 * 1000 if p99 is not None else None,
                     "cpu_s": cpu, "peak_rss_mb": rss, "exited": s.proc.poll()})
    for s in sessions:
        _stop(s.proc)
        _cleanup_node(lab, s.run.node)
    return rows


def run_size(lab: Any, plan: Plan, size: int, changes: int, previous: str | None) -> list[dict[str, Any]]:
    from lab.cluster import ns_run

    if previous:
        # The lab runs no namespace controller: empty the previous size's namespace by hand.
        for kind in ("services", "endpointslices", "pods"):
            ns_run(lab.cp_ns, [lab.bin("kubectl"), f"--kubeconfig={lab.admin_kubeconfig}", "delete", kind,
                               "--all", "-n", previous, "--wait=false"], timeout=1800)
    lab.kubectl("create", "namespace", NS)
    groups = [[r] for r in plan.runs] if plan.sequential else [list(plan.runs)]
    ports = 1 + changes * len(groups)  # change ids 0 (the initial state) .. changes × groups
    pod_ips = []
    echoes = []
    for name in PODS:
        lab.kubectl_apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
                            "spec": {"nodeName": lab.node_name(plan.backend_node), "containers": [
                                {"name": "echo", "image": "lab/echo", "ports": [{"containerPort": 8080}]}]}}])
    try:
        for name in PODS:
            pid = lab.pod_pid(NS, name)
            ip = ""
            for _ in range(100):
                ip = lab.kubectl("get", "pod", name, "-n", NS, "-o", "jsonpath={.status.podIP}").stdout.strip()
                if ip:
                    break
                time.sleep(0.1)
            pod_ips.append(ip)
            e = _popen(["nsenter", "-t", str(pid), "-n", sys.executable, "-m", "bench.latency", "echo",
                        "--name", name, "--first-port", str(BASE_PORT), "--count", str(ports)],
                       stdout=subprocess.PIPE, text=True, start_new_session=True)
            echoes.append(e)
            assert e.stdout is not None
            if e.stdout.readline().strip() != "ready":
                raise RuntimeError(f"bench echo in {name} did not start")
        t_load = time.monotonic()
        load = ns_run(lab.cp_ns, [sys.executable, "-m", "bench.latency", "apiload", "--kubeconfig",
                                  lab.admin_kubeconfig, "--count", str(size), "--endpoints", str(plan.endpoints),
                                  "--target-ip", pod_ips[0], "--target-port", str(BASE_PORT), "--namespace", NS],
                      timeout=3600, cwd=str(REPO))
        if load.returncode != 0:
            raise RuntimeError(f"apiload failed: {load.stderr[-2000:]}")
        print(f"  created {size} services in {time.monotonic() - t_load:.0f}s", file=sys.stderr, flush=True)
        cip = lab.kubectl("get", "svc", TARGET, "-n", NS, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
        for run in plan.runs:
            _cleanup_node(lab, run.node)
        rows: list[dict[str, Any]] = []
        next_id = 1
        for group in groups:
            rows += _measure(lab, plan, group, size, changes, cip, pod_ips, next_id)
            next_id += changes
        return rows
    finally:
        for e in echoes:
            _stop(e)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("apiload")
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--target-ip", required=True)
    p.add_argument("--target-port", type=int, default=8080)
    p.add_argument("--namespace", required=True)
    p = sub.add_parser("writer")
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--pods", required=True, help="comma-separated pod IPs the changes alternate between")
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--period", type=float, required=True)
    p = sub.add_parser("prober")
    p.add_argument("--target", required=True)
    p.add_argument("--interval", type=float, default=0.005)
    p = sub.add_parser("echo")
    p.add_argument("--name", required=True)
    p.add_argument("--first-port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    parser.add_argument("--sizes", default="1000,10000", help="service counts; changes only at the first")
    parser.add_argument("--changes", type=int, default=200, help="EndpointSlice changes at the first size")
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--proxies", default="", help="only these, e.g. pyproxy:nftables,kube-proxy:nftables")
    parser.add_argument("--min-sync-period", type=float, default=0.1,
                        help="seconds; given to every proxy, pyproxy and kube-proxy alike (default 0.1)")
    parser.add_argument("--upstream-defaults", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each selected kube-proxy at its own defaults (minSyncPeriod 1 s), "
                             "as an extra row labelled '(upstream defaults)' (default on)")
    parser.add_argument("--cadence", choices=("isolated", "steady"), default="isolated",
                        help="isolated: one change every --interval s (reaction time); steady: --rate changes "
                             "a second (batching under churn)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between isolated changes (default 2)")
    parser.add_argument("--rate", type=float, default=5.0, help="changes a second with --cadence steady (default 5)")
    parser.add_argument("--sequential", action="store_true",
                        help="run the proxies one after another, each alone on the CPU (default: all at once, "
                             "under the same load)")
    parser.add_argument("--probe-interval", type=float, default=0.005,
                        help="seconds between two probe connections on each node (default 0.005)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="after the last change, wait at most this long for every proxy to serve it")
    parser.add_argument("--json", help="also write the header and rows here")
    args = parser.parse_args()
    global NS
    if args.cmd == "apiload":
        NS = args.namespace
        asyncio.run(apiload(args.kubeconfig, args.count, args.endpoints, args.target_ip, args.target_port))
        return 0
    if args.cmd == "writer":
        NS = args.namespace
        asyncio.run(writer(args.kubeconfig, args.pods.split(","), args.first, args.count, args.period))
        return 0
    if args.cmd == "prober":
        prober(args.target, args.interval)
        return 0
    if args.cmd == "echo":
        echo(args.name, args.first_port, args.count)
        return 0
    try:
        runs = plan_runs(args.proxies, args.min_sync_period, args.upstream_defaults)
        cadence_period(args.cadence, args.interval, args.rate)
    except ValueError as err:
        parser.error(str(err))
    if args.changes < 0 or BASE_PORT + 1 + args.changes * len(runs) > 65535:
        parser.error(f"--changes must be between 0 and {(65535 - BASE_PORT - 1) // len(runs)} with these proxies")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    from lab.cluster import ClusterLab

    plan = Plan(runs=runs, backend_node=len(runs) + 1, endpoints=args.endpoints, cadence=args.cadence,
                interval=args.interval, rate=args.rate, sequential=args.sequential,
                probe_interval=args.probe_interval, settle=args.settle)
    head = header(sequential=args.sequential, min_sync=args.min_sync_period,
                  upstream_defaults=any(r.upstream_defaults for r in runs), machine_text=machine())
    head.append("Nodes: " + ", ".join(f"{r.label} on node-{r.node}" for r in runs)
                + f"; backend pods on node-{plan.backend_node}.")
    print("\n".join(head), file=sys.stderr, flush=True)
    slowest = max(r.min_sync for r in runs)
    if args.cadence == "isolated" and args.changes and args.interval <= slowest:
        print(f"warning: --interval {args.interval:g} s is not longer than a min-sync-period ({slowest:g} s): "
              "the changes are not isolated", file=sys.stderr, flush=True)
    lab = ClusterLab.up(name=f"bench{os.getpid()}", nodes=len(runs) + 1)
    rows: list[dict[str, Any]] = []
    previous = None
    try:
        for k, size in enumerate(sizes):
            print(f"{size} services ...", file=sys.stderr, flush=True)
            NS = f"bench-{size}"
            rows += run_size(lab, plan, size, args.changes if k == 0 else 0, previous)
            previous = NS
            # Print as we go: a later size failing must not lose the earlier rows.
            print(_fmt(rows), file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    finally:
        for proc in reversed(_RUNNING):
            _stop(proc)
        lab.down()
    print("\n".join(head) + "\n")
    print(_fmt(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
