"""The batch prober and what a probe's outcome is.

:func:`main` runs inside a vantage point's network namespace (``python3 -m lab.diff.probe``): it
reads a JSON list of probes on stdin, runs them concurrently (each one sequential tries, new
socket each, sources rotating), and prints one JSON object of results. Bounded: at most
``tries`` attempts a probe, ``--timeout`` each, and a probe whose first two attempts both fail
without an answer stops there (a dropped address would otherwise cost tries × timeout).

:class:`Outcome` is the comparable form: which backends answered, which client addresses they
saw, which errors came back, and whether each client source stuck to one backend (ClientIP
affinity picks one at random, so *which* one is not compared, only that it stuck).
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
    per_source: tuple[tuple[str, frozenset[str]], ...]
    """Client source → backends it reached."""
    seen: frozenset[str]
    """Client addresses the backends saw (the source, the node's, or a masquerade address)."""
    errors: frozenset[str]
    tries: int

    @property
    def pods(self) -> frozenset[str]:
        return frozenset().union(*(p for _, p in self.per_source)) if self.per_source else frozenset()

    @property
    def sticky(self) -> bool:
        """Every source kept to one backend over two tries or more (ClientIP affinity)."""
        return bool(self.per_source) and self.tries >= 2 * len(self.per_source) and all(
            len(p) == 1 for _, p in self.per_source)

    def same(self, other: Outcome) -> bool:
        if self.seen != other.seen or self.errors != other.errors:
            return False
        return self.pods == other.pods or (self.sticky and other.sticky)

    def merge(self, other: Outcome) -> Outcome:
        sources: dict[str, frozenset[str]] = dict(self.per_source)
        for s, p in other.per_source:
            sources[s] = sources.get(s, frozenset()) | p
        return Outcome(per_source=tuple(sorted(sources.items())), seen=self.seen | other.seen,
                       errors=self.errors | other.errors, tries=self.tries + other.tries)

    def describe(self) -> str:
        parts = []
        if self.per_source:
            pods = ",".join(sorted(self.pods))
            parts.append(f"answered by {{{pods}}}" + (" (sticky)" if self.sticky and len(self.pods) > 1 else ""))
            parts.append(f"saw {{{','.join(sorted(self.seen))}}}")
        if self.errors:
            parts.append(f"errors {{{','.join(sorted(self.errors))}}}")
        return "; ".join(parts) or "nothing"

    def as_dict(self) -> dict[str, Any]:
        return {"pods": sorted(self.pods), "seen": sorted(self.seen), "errors": sorted(self.errors),
                "sticky": self.sticky, "tries": self.tries}


def outcome(raw: dict[str, Any]) -> Outcome:
    per: dict[str, set[str]] = {}
    seen = set()
    for source, pod, ip in raw["answers"]:
        per.setdefault(source, set()).add(pod)
        seen.add(ip)
    return Outcome(per_source=tuple(sorted((s, frozenset(p)) for s, p in per.items())), seen=frozenset(seen),
                   errors=frozenset(raw["errors"]), tries=raw["tries"])


def _run_one(probe: dict[str, Any], timeout: float) -> dict[str, Any]:
    sources = probe.get("sources") or [None]
    answers: list[tuple[str, str, str]] = []
    errors: set[str] = set()
    tries = 0
    for i in range(probe["tries"]):
        source = sources[i % len(sources)]
        result = probe_once((probe["ip"], probe["port"]), proto=probe["protocol"].lower(), source=source,
                            timeout=timeout, reset_close=True)
        tries += 1
        if isinstance(result, tuple):
            answers.append((source or "-", result[0], result[1]))
        else:
            errors.add(result)
            if i == 1 and not answers:
                break
    return {"answers": answers, "errors": sorted(errors), "tries": tries}


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
