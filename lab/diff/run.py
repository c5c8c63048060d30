"""Run seeds through both proxies, compare, shrink what differs, print a table.

::

    python3 -m lab.diff --seeds 1-20                 # these seeds, nftables mode
    python3 -m lab.diff --minutes 30 --mode iptables # as many seeds as fit in 30 minutes
    python3 -m lab.diff --seeds 7 --no-shrink        # one seed, report mismatches as found

Each mismatch is shrunk to a minimal cluster that still differs and written to ``--out`` as a
YAML file: the objects, the probe, both outcomes. Exit status 1 when a mismatch is not one of
the documented deviations (:data:`lab.diff.deviations.KNOWN`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab.cluster import ClusterLab
from lab.diff import gen
from lab.diff.deviations import explain
from lab.diff.probe import Outcome
from lab.diff.world import PROXIES, World, apply_cluster, probe_all, wait_synced

TRIES = 8
"""Attempts a probe makes at first; one whose outcomes differ is probed again from scratch,
:data:`MORE_TRIES` times on both sides, and only that counts, so that a random spread over
backends cannot fake a mismatch."""
MORE_TRIES = 40
SETTLE = 2.0
"""Seconds to wait before probing a mismatch again."""


@dataclass
class Mismatch:
    seed: int
    target: gen.Target
    upstream: Outcome
    pyproxy: Outcome
    reason: str = ""
    """A documented deviation's reason; empty: unexplained (a defect until shown otherwise)."""
    shrunk: gen.Cluster | None = None
    file: str = ""


@dataclass
class Tally:
    seeds: int = 0
    services: int = 0
    probes: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    seconds: float = 0.0


class Session:
    """A control plane and the two worlds, proxies running, for as many clusters as you like."""

    def __init__(self, *, mode: str, name: str = "") -> None:
        self.mode = mode
        self.lab = ClusterLab.up(name=name or f"difftest{os.getpid()}", nodes=0)
        self.worlds: list[World] = []
        try:
            for i, proxy in enumerate(PROXIES):
                self.worlds.append(World.create(self.lab, proxy=proxy, index=i))
            apply_cluster(self.lab, gen.Cluster(seed=0))
            t = time.time()
            for w in self.worlds:
                w.start(self.lab, mode=mode)
            wait_synced(self.worlds, t - 1, timeout=90)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for w in self.worlds:
            w.destroy()
        self.worlds.clear()
        self.lab.down()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def program(self, cluster: gen.Cluster) -> None:
        t = time.time()
        apply_cluster(self.lab, cluster)
        wait_synced(self.worlds, t)
        for w in self.worlds:
            w.flush_conntrack()

    def compare(self, cluster: gen.Cluster, *, only: set[str] | None = None) -> tuple[int, list[Mismatch]]:
        """Program ``cluster`` in both worlds and probe; returns (probes, mismatches)."""
        self.program(cluster)
        targets = [t for t in gen.targets(cluster) if only is None or t.key in only]
        up, py = probe_all(self.worlds, targets, tries=TRIES)
        differ = [i for i in range(len(targets)) if not up[i].same(py[i], affinity=targets[i].affinity)]
        if differ:
            # Again, from scratch, after a pause in which a straggling event (a slow watch on a
            # loaded machine) is synced too: only what differs now counts, so neither a random
            # spread nor a proxy caught mid-change fakes a mismatch.
            time.sleep(SETTLE)
            wait_synced(self.worlds, 0)  # nothing queued behind the last sync
            for w in self.worlds:
                w.flush_conntrack()
            again = [targets[i] for i in differ]
            up2, py2 = probe_all(self.worlds, again, tries=MORE_TRIES)
            for k, i in enumerate(differ):
                up[i], py[i] = up2[k], py2[k]
        out = []
        for i in differ:
            if not up[i].same(py[i], affinity=targets[i].affinity):
                out.append(Mismatch(seed=cluster.seed, target=targets[i], upstream=up[i], pyproxy=py[i]))
        return len(targets), out


# -- shrinking ---------------------------------------------------------------------------------

def _simpler(cluster: gen.Cluster) -> list[gen.Cluster]:
    """Clusters one step simpler than ``cluster``, biggest cuts first."""
    rep = dataclasses.replace
    out: list[gen.Cluster] = []
    svcs = cluster.services

    def with_svc(i: int, svc: gen.Svc) -> gen.Cluster:
        return rep(cluster, services=svcs[:i] + (svc,) + svcs[i + 1:])

    for i in range(len(svcs)):
        out.append(rep(cluster, services=svcs[:i] + svcs[i + 1:]))
    for i, s in enumerate(svcs):
        for j in range(len(s.slices)):
            out.append(with_svc(i, rep(s, slices=s.slices[:j] + s.slices[j + 1:])))
        if len(s.ports) > 1:
            for j, p in enumerate(s.ports):
                ports = s.ports[:j] + s.ports[j + 1:]
                names = {q.name for q in ports}
                slices = tuple(rep(sl, ports=tuple(sp for sp in sl.ports if sp.name in names)) for sl in s.slices)
                out.append(with_svc(i, rep(s, ports=ports, slices=slices)))
        for j, sl in enumerate(s.slices):
            for k in range(len(sl.endpoints)):
                sl2 = rep(sl, endpoints=sl.endpoints[:k] + sl.endpoints[k + 1:])
                out.append(with_svc(i, rep(s, slices=s.slices[:j] + (sl2,) + s.slices[j + 1:])))
    for i, s in enumerate(svcs):
        for change in ({"affinity_timeout": 0}, {"external_policy": "Cluster"}, {"internal_policy": "Cluster"},
                       {"traffic_distribution": ""}, {"external_ips": ()}, {"source_ranges": ()},
                       {"lb_ips": s.lb_ips[:1]}):
            simpler = rep(s, **change)
            if simpler != s:
                out.append(with_svc(i, simpler))
        if len(s.families) > 1:
            f = s.families[0]
            out.append(with_svc(i, rep(s, families=(f,), cluster_ips=s.cluster_ips[:1],
                                       lb_ips=tuple(x for x in s.lb_ips if (":" in x[0]) == (f == 6)),
                                       external_ips=tuple(x for x in s.external_ips if (":" in x) == (f == 6)),
                                       slices=tuple(sl for sl in s.slices if sl.family == f))))
        for j, sl in enumerate(s.slices):
            for k, ep in enumerate(sl.endpoints):
                plain = gen.Ep(pod=ep.pod)
                if ep != plain:
                    for change2 in ({"hint_zones": (), "hint_nodes": ()}, {"zone": None}, {"node": "node-1"},
                                    {"ready": True, "serving": None, "terminating": None}):
                        ep2 = rep(ep, **change2)
                        if ep2 != ep:
                            sl2 = rep(sl, endpoints=sl.endpoints[:k] + (ep2,) + sl.endpoints[k + 1:])
                            out.append(with_svc(i, rep(s, slices=s.slices[:j] + (sl2,) + s.slices[j + 1:])))
    if cluster.zone != "zone-a":
        out.append(rep(cluster, zone="zone-a"))
    return [c for c in out if not gen.ambiguous(c)]


def shrink(session: Session, cluster: gen.Cluster, target: gen.Target, *, budget: float) -> gen.Cluster:
    """Greedy: take the first simpler cluster whose probe of ``target`` still differs; repeat
    until none does or ``budget`` seconds are spent."""
    deadline = time.monotonic() + budget
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for candidate in _simpler(cluster):
            if time.monotonic() > deadline:
                break
            if target.key not in {t.key for t in gen.targets(candidate)}:
                continue
            _, found = session.compare(candidate, only={target.key})
            if found:
                cluster, improved = candidate, True
                break
    return cluster


def write_report(m: Mismatch, out: Path) -> str:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    cluster = m.shrunk or gen.generate(m.seed)
    doc = {
        "seed": m.seed,
        "probe": {"vantage": m.target.vantage, "target": m.target.key, "what": m.target.what,
                  "sources": list(m.target.sources)},
        "upstream": m.upstream.as_dict(), "pyproxy": m.pyproxy.as_dict(),
        "reason": m.reason or "unexplained",
        "node-1 zone": cluster.zone,
        "objects": gen.objects(cluster),
        "loadBalancer status": {s.name: gen.lb_status(s) for s in cluster.services if gen.lb_status(s)},
    }
    safe = m.target.key.replace(" ", "").replace(">", "").replace("[", "").replace("]", "").replace(":", "_")
    path = out / f"seed{m.seed}-{safe}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=120))
    return str(path)


def run(*, seeds: list[int] | None, minutes: float, mode: str, out: Path, shrink_budget: float,
        max_services: int = 6, log: Callable[[str], None] = print) -> Tally:
    tally = Tally()
    start = time.monotonic()
    with Session(mode=mode) as session:
        seed_iter = iter(seeds) if seeds is not None else _forever(int(time.time()) % 1_000_000)
        for seed in seed_iter:
            if seeds is None and time.monotonic() - start > minutes * 60:
                break
            cluster = gen.generate(seed, max_services=max_services)
            probes, found = session.compare(cluster)
            tally.seeds += 1
            tally.services += len(cluster.services)
            tally.probes += probes
            shrunk_for: set[str] = set()
            for m in found:
                m.reason = explain(m, cluster)
                # One shrink per Service a seed: its other mismatching probes most likely share
                # the cause, and each shrink costs minutes.
                if not m.reason and shrink_budget > 0 and m.target.service not in shrunk_for:
                    shrunk_for.add(m.target.service)
                    m.shrunk = shrink(session, cluster, m.target, budget=shrink_budget)
                    m.reason = explain(m, m.shrunk)
                m.file = write_report(m, out)
                tally.mismatches.append(m)
                log(f"seed {seed}: {m.target.key} ({m.target.what}): upstream {m.upstream.describe()} | "
                    f"pyproxy {m.pyproxy.describe()} -> {m.reason or 'UNEXPLAINED'} [{m.file}]")
            log(f"seed {seed}: {len(cluster.services)} services, {probes} probes, {len(found)} mismatches")
    tally.seconds = time.monotonic() - start
    return tally


def _forever(first: int):  # type: ignore[no-untyped-def]
    n = first
    while True:
        yield n
        n += 1


def table(tally: Tally, mode: str) -> str:
    by = Counter((m.target.what.split(" ", 1)[-1] if " " in m.target.what else m.target.what,
                  m.reason or "unexplained") for m in tally.mismatches)
    lines = [f"mode {mode}: {tally.seeds} seeds, {tally.services} services, {tally.probes} probes "
             f"(each tried {TRIES}+ times on each proxy), {len(tally.mismatches)} mismatches, "
             f"{tally.seconds:.0f} s", "",
             "| address kind | fate | mismatches |", "|---|---|---|"]
    lines += [f"| {k} | {r} | {n} |" for (k, r), n in sorted(by.items())] or ["| - | - | 0 |"]
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m lab.diff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", help="seeds to run: 1-20 or 3,5,8 (default: new seeds until --minutes)")
    p.add_argument("--minutes", type=float, default=10.0, help="without --seeds: run seeds for this long")
    p.add_argument("--mode", choices=("nftables", "iptables"), default="nftables")
    p.add_argument("--out", default="difftest-out", help="directory for the mismatch reports")
    p.add_argument("--max-services", type=int, default=6, help="services per generated cluster, at most")
    p.add_argument("--shrink-seconds", type=float, default=300.0,
                   help="time to spend shrinking each unexplained mismatch (0: do not shrink)")
    p.add_argument("--no-shrink", action="store_true", help="same as --shrink-seconds 0")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("lab.diff: needs root (network namespaces, a control plane); run it with sudo", file=sys.stderr)
        return 2
    # SIGTERM (a timeout, a kill) unwinds like Ctrl-C, so the worlds and the control plane
    # are taken down on the way out. Only in this process: pyroute2 forks helpers that inherit
    # the handler and are ended with SIGTERM, and a helper unwinding would tear the lab down.
    me = os.getpid()

    def on_term(*_: object) -> None:
        if os.getpid() != me:
            os._exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one (timeout's) must not cut the cleanup
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else None
    except ValueError:
        print(f"lab.diff: --seeds {args.seeds!r}: write a range (1-20) or a list (3,5,8)", file=sys.stderr)
        return 2
    tally = run(seeds=seeds, minutes=args.minutes, mode=args.mode, out=Path(args.out),
                shrink_budget=0 if args.no_shrink else args.shrink_seconds, max_services=args.max_services,
                log=lambda s: print(s, flush=True))
    print(table(tally, args.mode))
    print(json.dumps({"unexplained": sum(1 for m in tally.mismatches if not m.reason)}))
    return 1 if any(not m.reason for m in tally.mismatches) else 0
