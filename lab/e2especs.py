"""Kubernetes' own network e2e specs, run against pyproxy and upstream kube-proxy (issue 14).

    python3 -m lab.e2especs                                 # the quick subset, pyproxy nftables
    python3 -m lab.e2especs --full                          # every spec the lab can run (~1 h a proxy)
    python3 -m lab.e2especs --full --proxies pyproxy:nftables,pyproxy:iptables,kube-proxy:nftables,kube-proxy:iptables
    python3 -m lab.e2especs --focus 'session affinity'      # a regex of your own (with the usual skips)
    python3 -m lab.e2especs --table DIR1 --table DIR2       # one table from earlier runs' --out directories

For each proxy (and mode) a fresh real-node lab comes up (three nodes in three zones, two for
the quick subset: containerd and the real kubelet; ``lab.cluster``), with the e2e specs' images imported into every node (agnhost, pause,
busybox, distroless-iptables, regression-issue-74839, built here: ``lab/images.py``). pyproxy is installed by its Helm chart, as a user would;
upstream kube-proxy (built from the same Kubernetes version) runs as a process in each node's
network namespace, with the same cluster CIDRs and mode. Then upstream's ``e2e.test``
(``lab/build-e2e.sh``: the network specs of the same k8s.io/kubernetes) runs in the lab's
external namespace, with every image registry pointed at ``lab.local`` (a repo-list file).

Prints one table, a row per spec and a column per proxy (passed, failed, skipped), and the
failures' first lines; ``--out`` keeps each run's Ginkgo JSON report and logs. Exit status 1
when a spec passed for upstream and failed for pyproxy (in the same mode).

The specs chosen (``FOCUS``) are the kube-proxy ones: ``[sig-network] Services``, the granular
Service checks (both families), session affinity, NodePorts, traffic policies and
distribution, topology hints, conntrack, localhost NodePorts, kube-proxy's own endpoints.
``SKIPS`` lists what is left out and why (a cloud load balancer, SSH to nodes, DNS, features
outside kube-proxy).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lab.cluster import CLUSTER_CIDR, CLUSTER_CIDR6, REPO, ClusterLab, ns_run
from lab.images import COREDNS_VERSION, E2E_REGISTRY

FOCUS = [
    r"\[sig-network\] Services ",
    r"\[sig-network\] Networking Granular Checks: Services",
    r"\[sig-network\] \[Feature:IPv6DualStack\] Granular Checks: Services",
    r"\[sig-network\] \[Feature:IPv6DualStack\] should create service",
    r"\[sig-network\] \[Feature:IPv6DualStack\] should be able to reach pod on ipv4 and ipv6 ip",
    r"\[sig-network\] Conntrack",
    r"\[sig-network\] Traffic Distribution",
    r"\[sig-network\] Topology Hints",
    r"\[sig-network\] LocalhostNodePorts",
    r"\[sig-network\] KubeProxy",
    r"\[sig-network\] Networking should check kube-proxy urls",
]
"""The kube-proxy specs of ``[sig-network]`` (regexes on the full spec text)."""

SKIPS: list[tuple[str, str]] = [
    (r"\[Feature:LoadBalancer\]|Type LoadBalancer",
     "needs a cloud load balancer (the lab has none; LoadBalancer IPs are covered by our own tests)"),
    (r"\[Disruptive\]", "restarts the API server or the proxy over SSH to a node (the lab's nodes have no SSH)"),
    (r"SCTP", "needs the kernel's sctp module, which this machine cannot load (no /lib/modules)"),
    (r"should be able to up and down services|should work after the service has been recreated",
     "reads the nodes' iptables/nftables over SSH (e2essh)"),
    (r"\[Feature:PerformanceDNS\]|\[Feature:Networking-Performance\]", "performance specs, not behaviour"),
]
"""(regex, why): specs left out of every run, each with its reason (README, issue 14)."""

MODE_SKIPS: dict[str, list[tuple[str, str]]] = {
    "nftables": [(r"\[Feature:LocalhostNodePorts\]",
                  "nftables mode has no localhost NodePorts: pyproxy's none, upstream's only behind an "
                  "alpha feature gate (KubeProxyNFTablesLocalhostNodePorts), off here (both fail them)")],
}
"""(regex, why) left out in one mode only: what neither proxy does in that mode."""

QUICK = [
    r"Services should serve a basic endpoint from pods",
    r"Services should serve multiport endpoints from pods",
    r"Services should be able to create a functioning NodePort service",
    r"Services should have session affinity work for service with type clusterIP",
    r"Services should preserve source pod IP for traffic thru service cluster IP",
    r"Services should be rejected when no endpoints exist",
    r"Services should allow pods to hairpin back to themselves through services",
    r"Services should respect internalTrafficPolicy=Local Pod to Pod",
]
"""The subset ``scripts/test.sh`` runs (pyproxy, nftables): a few minutes, one of each kind."""

PROXIES = ("pyproxy:nftables", "pyproxy:iptables", "kube-proxy:nftables", "kube-proxy:iptables")


@dataclass
class Spec:
    name: str
    state: str
    """passed, failed, skipped (by the spec itself or by SKIPS), or what Ginkgo says."""
    seconds: float = 0.0
    failure: str = ""


@dataclass
class Run:
    proxy: str
    mode: str
    specs: dict[str, Spec] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""
    """Why the run could not complete (the lab, the install, e2e.test itself)."""

    @property
    def column(self) -> str:
        return f"{self.proxy} {self.mode}"


def e2e_bin() -> Path:
    proc = subprocess.run(["bash", str(REPO / "lab" / "build-e2e.sh")], capture_output=True, text=True, timeout=5400,
                          env={**os.environ, "COREDNS_VERSION": COREDNS_VERSION})
    if proc.returncode != 0:
        raise SystemExit(f"e2especs: lab/build-e2e.sh failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def repo_list(path: Path) -> Path:
    """Every registry of the e2e framework's image list, pointed at the lab's local names."""
    registries = {
        "promoterE2eRegistry": f"{E2E_REGISTRY}/e2e-test-images", "buildImageRegistry": f"{E2E_REGISTRY}/build-image",
        "invalidRegistry": "invalid.lab.local/invalid", "gcEtcdRegistry": E2E_REGISTRY, "gcRegistry": E2E_REGISTRY,
        "sigStorageRegistry": f"{E2E_REGISTRY}/sig-storage", "privateRegistry": f"{E2E_REGISTRY}/private",
        "dockerLibraryRegistry": f"{E2E_REGISTRY}/library", "cloudProviderGcpRegistry": f"{E2E_REGISTRY}/gcp",
    }
    path.write_text("".join(f"{k}: {v}\n" for k, v in registries.items()))
    return path


# -- the proxies ----------------------------------------------------------------------------

def kube_proxy_config(lab: ClusterLab, *, node: int, mode: str) -> str:
    """A KubeProxyConfiguration for upstream on ``node``: the chart's settings for pyproxy."""
    path = lab.path / f"kube-proxy-{node}.yaml"
    path.write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": lab.node_admin_kubeconfig},
        "hostnameOverride": lab.node_name(node), "mode": mode, "clusterCIDR": f"{CLUSTER_CIDR},{CLUSTER_CIDR6}",
        "healthzBindAddress": "0.0.0.0:10256", "metricsBindAddress": "0.0.0.0:10249",
        # nf_conntrack_max is the host's, read-only in a node's network namespace: left alone
        # (the chart is installed with config.conntrack.maxPerCore=0 too). The timeouts are the
        # namespace's own: both proxies set kube-proxy's defaults (the CLOSE_WAIT spec reads them).
        "conntrack": {"maxPerCore": 0, "min": 0},
    }, indent=1))
    return str(path)


@contextmanager
def proxy_running(lab: ClusterLab, *, proxy: str, mode: str) -> Iterator[None]:
    """pyproxy by its chart, or upstream kube-proxy as a process in every node's namespace."""
    if proxy == "pyproxy":
        from lab.workloads import install_chart

        extra = ("--set", "config.localhostNodePorts=true") if mode == "iptables" else ()
        install_chart(lab, mode=mode, extra=extra)
        yield
        return
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(1, lab.nodes + 1):
            with open(lab.path / f"kube-proxy-{i}.log", "ab") as log:
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", lab.node_ns(i), lab.bin("kube-proxy"),
                     "--config", kube_proxy_config(lab, node=i, mode=mode), "--v=1"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        for i in range(1, lab.nodes + 1):
            deadline = time.monotonic() + 60
            while ns_run(lab.node_ns(i), ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                          "http://127.0.0.1:10256/healthz"]).stdout.strip() != "200":
                if time.monotonic() > deadline or procs[i - 1].poll() is not None:
                    raise RuntimeError(f"kube-proxy on node {i} is not healthy: "
                                       f"{(lab.path / f'kube-proxy-{i}.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
                    p.wait()


# -- running the specs ------------------------------------------------------------------------

def skips(mode: str = "") -> list[tuple[str, str]]:
    return [*SKIPS, *MODE_SKIPS.get(mode, [])]


def skip_regex(mode: str = "") -> str:
    return "|".join(f"(?:{r})" for r, _ in skips(mode))


def run_specs(lab: ClusterLab, *, focus: list[str], mode: str, out: Path, timeout_minutes: int,
              log: Path) -> dict[str, Spec]:
    """Run e2e.test in the lab's external namespace; the specs' outcomes by name."""
    binary = e2e_bin() / "e2e.test"
    report = out / "report.json"
    argv = [
        str(binary), f"--kubeconfig={lab.node_admin_kubeconfig}", f"--kubectl-path={lab.bin('kubectl')}",
        "--provider=local", f"--ginkgo.focus={'|'.join(f'(?:{f})' for f in focus)}",
        f"--ginkgo.skip={skip_regex(mode)}", f"--ginkgo.json-report={report}", f"--ginkgo.timeout={timeout_minutes}m",
        "--ginkgo.no-color", "--ginkgo.v", f"--report-dir={out}", "--disable-log-dump",
        "--dump-logs-on-failure=false", "--e2e-verify-service-account=false",
        f"--kube-test-repo-list={repo_list(out / 'repo-list.yaml')}", f"--e2e-output-dir={out}",
    ]
    with open(log, "wb") as f:
        proc = subprocess.run(["ip", "netns", "exec", lab.ext_ns, *argv], stdout=f, stderr=subprocess.STDOUT,
                              cwd=out, timeout=timeout_minutes * 60 + 600, check=False)
    if not report.exists():
        raise RuntimeError(f"e2e.test wrote no report (exit {proc.returncode}): {log.read_text()[-3000:]}")
    return parse_report(json.loads(report.read_text()), focus=focus, mode=mode)


def spec_name(r: dict[str, object]) -> str:
    texts = [*(r.get("ContainerHierarchyTexts") or []), r.get("LeafNodeText") or ""]  # type: ignore[misc]
    return " ".join(str(t) for t in texts if t)


def parse_report(report: list[dict[str, object]], *, focus: list[str], mode: str = "") -> dict[str, Spec]:
    """A Ginkgo JSON report's specs that ``focus`` chose (the report lists every spec of the
    binary; set-up and tear-down nodes left out). A spec ``skips(mode)`` leaves out is "excluded"."""
    chosen = re.compile("|".join(f"(?:{f})" for f in focus))
    excluded = re.compile(skip_regex(mode))
    specs: dict[str, Spec] = {}
    for suite in report:
        for r in suite.get("SpecReports") or []:  # type: ignore[attr-defined]
            if r.get("LeafNodeType") != "It":
                continue
            name = spec_name(r)
            if not chosen.search(name):
                continue
            state = "excluded" if excluded.search(name) else str(r.get("State"))
            failure = ""
            if r.get("Failure"):
                failure = str(r["Failure"].get("Message", "")).strip().splitlines()[0][:300] \
                    if str(r["Failure"].get("Message", "")).strip() else ""
            seconds = float(r.get("RunTime") or 0) / 1e9
            specs[name] = Spec(name=name, state=state, seconds=seconds, failure=failure)
    return specs


QUICK_IMAGES = ("agnhost", "e2e-pause")
"""What the quick subset's pods run (lab/images.py names)."""
IMAGES = (*QUICK_IMAGES, "busybox", "distroless-iptables", "regression-issue-74839")
"""What every chosen spec's pods run: the conntrack specs' init container (busybox), their
invalid-state server, kube-proxy's CLOSE_WAIT spec's host exec pod (distroless-iptables)."""


def run_one(proxy: str, mode: str, *, focus: list[str], out: Path, timeout_minutes: int,
            images: tuple[str, ...] = IMAGES, nodes: int = 3, zones: int = 0) -> Run:
    run = Run(proxy=proxy, mode=mode)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    lab = ClusterLab.up(name=f"e2es{os.getpid()}", nodes=nodes, real_nodes=True, extra_images=images, dns=True,
                        zones=zones)
    try:
        with proxy_running(lab, proxy=proxy, mode=mode):
            run.specs = run_specs(lab, focus=focus, mode=mode, out=out, timeout_minutes=timeout_minutes,
                                  log=out / "e2e.log")
    except Exception as err:  # noqa: BLE001 - reported in the table, the other proxies still run
        run.error = f"{type(err).__name__}: {str(err)[:2000]}"
    finally:
        for name in (f"kube-proxy-{i}.log" for i in range(1, lab.nodes + 1)):
            if (lab.path / name).exists():
                (out / name).write_bytes((lab.path / name).read_bytes())
        lab.down()
    run.seconds = time.monotonic() - t0
    return run


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- the report -------------------------------------------------------------------------------

MARK = {"passed": "pass", "failed": "FAIL", "skipped": "skip", "pending": "skip", "excluded": "excluded", "timedout": "FAIL (timeout)",
        "panicked": "FAIL (panic)", "interrupted": "FAIL (interrupted)", "aborted": "FAIL (aborted)"}


def table(runs: list[Run]) -> str:
    names = sorted({n for r in runs for n in r.specs})
    head = "| spec | " + " | ".join(r.column for r in runs) + " |"
    lines = [head, "|---|" + "---|" * len(runs)]
    for n in names:
        cells = [MARK.get(r.specs[n].state, r.specs[n].state) if n in r.specs else "-" for r in runs]
        lines.append(f"| {n.replace('[sig-network] ', '')} | " + " | ".join(cells) + " |")
    totals = []
    for r in runs:
        counts: dict[str, int] = {}
        for s in r.specs.values():
            key = MARK.get(s.state, s.state).split()[0]
            counts[key] = counts.get(key, 0) + 1
        totals.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"; {r.seconds / 60:.0f} min"
                      + (f"; ERROR {r.error[:200]}" if r.error else ""))
    lines.append("| **total** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def regressions(runs: list[Run]) -> list[str]:
    """Specs that passed for upstream and failed for pyproxy in the same mode."""
    by = {(r.proxy, r.mode): r for r in runs}
    out = []
    for (proxy, mode), r in by.items():
        up = by.get(("kube-proxy", mode))
        if proxy != "pyproxy" or up is None:
            continue
        for name, spec in r.specs.items():
            other = up.specs.get(name)
            if spec.state not in ("passed", "skipped", "excluded") and other is not None and other.state == "passed":
                out.append(f"{mode}: {name}: {spec.failure}")
    return out


def save_runs(path: Path, runs: list[Run]) -> None:
    """``runs.json``: written after each proxy's run, so a run stopped later keeps the columns done."""
    path.write_text(json.dumps([{"proxy": r.proxy, "mode": r.mode, "seconds": r.seconds, "error": r.error,
                                 "specs": [s.__dict__ for s in r.specs.values()]} for r in runs], indent=1))


def load_runs(paths: list[Path]) -> list[Run]:
    """The runs saved in each ``runs.json`` (a file, or a directory holding one), oldest first:
    a column (proxy and mode) met again takes the later run's result for each spec that run
    holds (a focused rerun of the failures updates those rows only) and adds its minutes.
    Columns pair the proxies by mode: pyproxy nftables, kube-proxy nftables, pyproxy iptables..."""
    by: dict[tuple[str, str], Run] = {}
    for path in paths:
        file = path / "runs.json" if path.is_dir() else path
        for r in json.loads(file.read_text()):
            run = by.setdefault((r["proxy"], r["mode"]), Run(proxy=r["proxy"], mode=r["mode"]))
            run.specs.update({s["name"]: Spec(**s) for s in r["specs"]})
            run.seconds += float(r["seconds"])
            run.error = r.get("error", "")  # the latest run's: an earlier failure was retried
    return sorted(by.values(), key=lambda r: (r.mode != "nftables", r.mode, r.proxy != "pyproxy", r.proxy))


def report(runs: list[Run]) -> int:
    """Print the table, the failures, the skips and the regressions; the exit status."""
    print(table(runs))
    for r in runs:
        for s in r.specs.values():
            if s.state not in ("passed", "skipped", "excluded"):
                print(f"- {r.column}: {s.name}: {s.failure}")
    print("\nSkipped on purpose:\n" + "\n".join(f"- `{rx}`: {why}" for rx, why in SKIPS))
    for mode, mode_skips in MODE_SKIPS.items():
        print("\n".join(f"- in {mode} mode, `{rx}`: {why}" for rx, why in mode_skips))
    regress = regressions(runs)
    if regress:
        print("\nPassed for upstream, failed for pyproxy:\n" + "\n".join(f"- {x}" for x in regress))
    return 1 if regress or any(r.error for r in runs) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--proxies", default="pyproxy:nftables",
                   help=f"comma-separated PROXY:MODE of {', '.join(PROXIES)} (default: pyproxy:nftables)")
    p.add_argument("--full", action="store_true", help="every spec of FOCUS (default: the quick subset)")
    p.add_argument("--focus", action="append", default=[], help="a regex of your own (repeatable)")
    p.add_argument("--out", default="", help="directory for the reports and logs (default: a new one in /tmp)")
    p.add_argument("--timeout-minutes", type=int, default=240, help="for e2e.test, per proxy")
    p.add_argument("--nodes", type=int, default=0,
                   help="real nodes in each lab (default 3, one zone each, which the Traffic Distribution "
                        "and 'ETP changes' specs need; 2 for the quick subset)")
    p.add_argument("--zones", type=int, default=0,
                   help="zones the nodes are spread over, round robin (default: one per node); three "
                        "Traffic Distribution specs need 3 zones of 2 nodes: --nodes 6 --zones 3")
    p.add_argument("--table", action="append", default=[], metavar="DIR",
                   help="no run: print the table of earlier runs (a --out directory or its runs.json; "
                        "repeatable, oldest first: a later run's result of a spec replaces an earlier one's)")
    a = p.parse_args(argv)
    if a.table:
        missing = [t for t in a.table if not (Path(t) / "runs.json" if Path(t).is_dir() else Path(t)).is_file()]
        if missing:
            p.error(f"no runs.json in {', '.join(missing)}: give a directory an earlier --out wrote")
        return report(load_runs([Path(t) for t in a.table]))
    if os.geteuid() != 0:
        print("e2especs: needs root (the lab's namespaces, containerd and kubelets)", file=sys.stderr)
        return 2
    chosen = [x.strip() for x in a.proxies.split(",") if x.strip()]
    bad = [x for x in chosen if x not in PROXIES]
    if bad:
        p.error(f"unknown proxy {', '.join(bad)}: choose from {', '.join(PROXIES)}")
    focus = a.focus or (FOCUS if a.full else QUICK)
    out = Path(a.out or f"/tmp/e2especs-{time.strftime('%Y%m%d-%H%M%S')}")
    # A kill or a closed terminal unwinds like Ctrl-C, so the lab of the column running (its
    # namespaces, kubelets and containerds) is taken down on the way out.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    runs = []
    for item in chosen:
        proxy, mode = item.split(":")
        print(f"e2especs: {proxy} {mode}: lab up, proxy installed, e2e.test ...", file=sys.stderr, flush=True)
        run = run_one(proxy, mode, focus=focus, out=out / f"{proxy}-{mode}", timeout_minutes=a.timeout_minutes,
                      images=QUICK_IMAGES if focus is QUICK else IMAGES,
                      nodes=a.nodes or (2 if focus is QUICK else 3), zones=a.zones)
        print(f"e2especs: {proxy} {mode}: {sum(s.state == 'passed' for s in run.specs.values())} passed, "
              f"{sum(s.state == 'failed' for s in run.specs.values())} failed in {run.seconds / 60:.1f} min"
              + (f"; {run.error}" if run.error else ""), file=sys.stderr, flush=True)
        runs.append(run)
        save_runs(out / "runs.json", runs)
    return report(runs)


if __name__ == "__main__":
    sys.exit(main())
