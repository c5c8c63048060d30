"""Compare nft tables whatever the layout of their shared endpoint maps.

Where a pool's slots sit (which ``endpoints-PROTO-N`` map, which offset) depends on the order in
which pools came and went, so a table synced step by step and one rebuilt from scratch may place
the same pool differently. These helpers replace each rule's ``offset O map @M`` by the pool's
own elements (slot ranges relative to its region), and each fallback lookup ``numgen random mod 1
offset O map @first-PROTO-N`` by the endpoint it finds, and drop the maps themselves, so two
tables compare equal exactly when every rule reaches the same endpoints with the same shares.
Elements of a map that no rule reaches are returned as orphans: a leak the tests assert against.
"""

from __future__ import annotations

import re

from pyproxy.nft.executor import FakeTable
from pyproxy.render.slots import FIRST_PREFIX, MAP_PREFIX

_LOOKUP = re.compile(r"numgen random mod (\d+)(?: offset (\d+))? map @(" + MAP_PREFIX + r"[a-z]+-\d+)")
_FIRST = re.compile(r"numgen random mod 1(?: offset (\d+))? map @(" + FIRST_PREFIX + r"[a-z]+-\d+)")
_ELEMENT = re.compile(r"(\d+)-(\d+) : ([^,}]+)")
_FIRST_ELEMENT = re.compile(r"(\d+) : ([^,}]+)")
_OURS = (MAP_PREFIX, FIRST_PREFIX)

Maps = dict[str, dict[tuple[int, int], str]]
"""Map name → (lo, hi) → value; a first-endpoint map's elements are (offset, offset)."""


def _deref(rule: str, maps: Maps, used: set[tuple[str, int, int]]) -> str:
    def first(m: re.Match[str]) -> str:
        offset, name = int(m.group(1) or 0), m.group(2)
        value = maps.get(name, {}).get((offset, offset))
        if value is not None:
            used.add((name, offset, offset))
        return f"first {value}"

    rule = _FIRST.sub(first, rule)

    def sub(m: re.Match[str]) -> str:
        mod, offset, name = int(m.group(1)), int(m.group(2) or 0), m.group(3)
        pool = sorted((lo - offset, hi - offset, v) for (lo, hi), v in maps.get(name, {}).items()
                      if offset <= lo and hi < offset + mod)
        used.update((name, lo + offset, hi + offset) for lo, hi, _ in pool)
        return f"numgen random mod {mod} map {{ {', '.join(f'{lo}-{hi} : {v}' for lo, hi, v in pool)} }}"
    return _LOOKUP.sub(sub, rule)


def _orphans(maps: Maps, used: set[tuple[str, int, int]]) -> list[str]:
    return sorted(f"{name} {lo}-{hi} : {v}" for name, elems in maps.items() for (lo, hi), v in elems.items()
                  if (name, lo, hi) not in used)


def canonical_fake(table: FakeTable | None) -> tuple[dict[str, object], list[str]]:
    """A FakeNft table without its layout: (chains, specs, sets and elements), orphans."""
    if table is None:
        return {}, []
    maps: Maps = {}
    for name, elems in table.elements.items():
        if name.startswith(MAP_PREFIX):
            maps[name] = {tuple(int(x) for x in k.split("-")): v for k, v in elems.items()}  # type: ignore[misc]
        elif name.startswith(FIRST_PREFIX):
            maps[name] = {(int(k), int(k)): v for k, v in elems.items()}
    used: set[tuple[str, int, int]] = set()
    chains = {name: [_deref(r, maps, used) for r in rules] for name, rules in table.chains.items()}
    out = {
        "chains": chains,
        "chain_specs": dict(table.chain_specs),
        "sets": {k: v for k, v in table.sets.items() if not k.startswith(_OURS)},
        "elements": {k: v for k, v in table.elements.items() if not k.startswith(_OURS)},
    }
    return out, _orphans(maps, used)


def canonical_listing(text: str) -> tuple[list[str], list[str]]:
    """``nft list table`` output without its layout: sorted blocks (sets, maps, chains), orphans."""
    blocks: list[str] = []
    for line in text.splitlines()[1:-1]:  # inside "table ... {" and its "}"
        if line.startswith("\t") and not line.startswith("\t\t") and line.strip() not in ("}", ""):
            blocks.append(line)
        elif blocks:
            blocks[-1] += "\n" + line
    maps: Maps = {}
    rest: list[str] = []
    for block in blocks:
        head = block.strip().split("\n", 1)[0]
        m = re.match(r"map ((?:" + MAP_PREFIX + "|" + FIRST_PREFIX + r")[a-z]+-\d+) \{", head)
        if m:
            body = block.split("elements = {", 1)[1] if "elements = {" in block else ""
            if m.group(1).startswith(MAP_PREFIX):
                maps[m.group(1)] = {(int(lo), int(hi)): v.strip() for lo, hi, v in _ELEMENT.findall(body)}
            else:
                maps[m.group(1)] = {(int(k), int(k)): v.strip() for k, v in _FIRST_ELEMENT.findall(body)}
        else:
            rest.append(block)
    used: set[tuple[str, int, int]] = set()
    out = sorted(_deref(b.strip(), maps, used) for b in rest)
    return out, _orphans(maps, used)

