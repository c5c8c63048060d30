"""The batch prober and what a probe's outcome is.

:func:`main` runs inside a vantage point's network namespace (``python3 -m lab.diff.probe``): it
reads a JSON list of probes on stdin, runs them concurrently (each one sequential tries, new
socket each, sources rotating), and prints one JSON object of results. Bounded: at most
``tries`` attempts a probe, ``--timeout`` each, and a probe whose first two attempts both time
out stops there (a dropped address would otherwise cost tries × timeout).

:class:`Outcome` is the comparable form: which backends answered, which client addresses they
saw, which errors came back, and whether each client source stuck to one result (ClientIP
affinity picks an endpoint at random, so *which* one is not compared, only that it stuck).
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lab.client import probe_once


@dataclass(frozen=True)
class Outcome:
    per_source: tuple[tuple[str, frozenset[str], int], ...]
    """Client source → what its tries got (backend names, or ``!error``) and how many tries."""
    seen: tuple[tuple[str, frozenset[str]], ...]
    """Client source → the client addresses its backends saw (its own, the node's, a
    masquerade address)."""

    @property
    def pods(self) -> frozenset[str]:
        return frozenset(r for _, got, _ in self.per_source for r in got if not r.startswith("!"))

    @property
    def errors(self) -> frozenset[str]:
        return frozenset(r[1:] for _, got, _ in self.per_source for r in got if r.startswith("!"))

    @property
    def seen_ips(self) -> frozenset[str]:
        return frozenset().union(*(ips for _, ips in self.seen)) if self.seen else frozenset()

    @property
    def tries(self) -> int:
        return sum(n for _, _, n in self.per_source)

    @property
    def sticky(self) -> bool:
        """Every source got one and the same result on each of its two or more tries (ClientIP
        affinity: an endpoint that refuses sticks too)."""
        return bool(self.per_source) and all(len(got) == 1 and n >= 2 for _, got, n in self.per_source)

    def same(self, other: Outcome, *, affinity: bool = False) -> bool:
        """Equal sets of backends, errors and client addresses; for a Service with ClientIP
        affinity, both sides sticky instead, since each picked its endpoint at random."""
        # What the backends saw is compared source by source, where both sides reached one: a
        # source whose tries all met a refusing endpoint by chance has nothing to compare.
        mine, theirs = dict(self.seen), dict(other.seen)
        seen_same = all(mine[s] == theirs[s] for s in mine.keys() & theirs.keys())
        if affinity and self.sticky and other.sticky:
            return seen_same
        return seen_same and (self.pods, self.errors) == (other.pods, other.errors)

    def describe(self) -> str:
        parts = []
        if self.pods:
            parts.append(f"answered by {{{','.join(sorted(self.pods))}}}")
            parts.append(f"saw {{{','.join(sorted(self.seen_ips))}}}")
        if self.errors:
            parts.append(f"errors {{{','.join(sorted(self.errors))}}}")
        if self.sticky and len(self.per_source) > 0 and (len(self.pods) + len(self.errors)) > 1:
            parts.append("each source sticky")
        return "; ".join(parts) or "nothing"

    def as_dict(self) -> dict[str, Any]:
        return {"pods": sorted(self.pods), "seen": sorted(self.seen_ips), "errors": sorted(self.errors),
                "sticky": self.sticky, "tries": self.tries,
                "per source": {s: sorted(g) for s, g, _ in self.per_source}}


def outcome(raw: dict[str, Any]) -> Outcome:
    """From the prober's ``{"results": [[source, pod or "!error", seen ip or ""], ...]}``."""
    got: dict[str, tuple[set[str], list[int]]] = {}
    seen: dict[str, set[str]] = {}
    for source, result, ip in raw["results"]:
        g, n = got.setdefault(source, (set(), [0]))
        g.add(result)
        n[0] += 1
        if ip:
            seen.setdefault(source, set()).add(ip)
    return Outcome(per_source=tuple(sorted((s, frozenset(g), n[0]) for s, (g, n) in got.items())),
                   seen=tuple(sorted((s, frozenset(v)) for s, v in seen.items())))


def _run_one(probe: dict[str, Any], timeout: float) -> dict[str, Any]:
    sources = probe.get("sources") or [None]
    results: list[tuple[str, str, str]] = []
    for i in range(probe["tries"]):
        source = sources[i % len(sources)]
        result = probe_once((probe["ip"], probe["port"]), proto=probe["protocol"].lower(), source=source,
                            timeout=timeout, reset_close=True)
        if isinstance(result, tuple):
            results.append((source or "-", result[0], result[1]))
        else:
            results.append((source or "-", "!" + result, ""))
        # A dropped address costs the whole timeout on every try: two timeouts and nothing
        # else is a drop. Refusals are cheap and may be one endpoint of several: keep going.
        if i == 1 and all(r[1] == "!timeout" for r in results):
            break
    return {"results": results}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Longer than TCP's first SYN retransmission (1 s): upstream's IPv6 reject loses the first
    # SYN's ICMPv6 error and refuses the retransmitted one, which a shorter wait calls a drop.
    parser.add_argument("--timeout", type=float, default=2.5, help="seconds per attempt")
    parser.add_argument("--parallel", type=int, default=32)
    args = parser.parse_args()
    probes = json.load(sys.stdin)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda p: _run_one(p, args.timeout), probes))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
