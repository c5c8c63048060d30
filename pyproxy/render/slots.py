"""Where each endpoint pool's random slots live: shared maps, a region of slots per pool.

A new connection to a Service port (without ClientIP affinity) picks its endpoint with one
lookup: ``numgen random mod SLOTS offset O`` draws a slot in the pool's region ``[O, O+SLOTS)``,
and an interval map from slots to ``address . port`` gives each endpoint an equal range of them.
So adding, removing or replacing an endpoint changes map elements only, never a rule.

Why pools share maps, and why not all in one (measured with nft 1.0.6 on kernel 6.18):

* A map per pool: the kernel finds a set by name with a walk over every set of the table,
  once per message that names one (``nft_set_lookup``), and creating a set walks them too; so
  10k pools load in ~10 s, most of it in that walk, and 44k pools would take minutes.
* One map for all: each element added to a map is checked against every rule bound to it,
  so loading is (rules naming the map) × (elements): 2,000 pools × 10 endpoints in one map
  took 7.2 s, 4,000 took 14 s, 10k ~220 s.
* Maps of at most :data:`MAP_POOLS` pools and about :data:`MAP_ELEMENTS` endpoints keep both
  products small: 10k pools × 10 endpoints load in ~3 s (400 maps).

Each slot map has a companion hash map, ``first-PROTO-N``, holding each of its pools' first
endpoint under the pool's offset: the lookup a rule falls back to when the slot map misses.
Kernel 6.18 searches an interval map through a sorted array it builds at the end of a commit,
after the generation switch that made the commit's rules live; a map created in that commit
(every map, when a full sync replaces the table) answers nothing until then, for a few
milliseconds at 10k Services. A hash map's elements are live with the generation switch, so
the first SYN of a connection opened in that window goes to the pool's first endpoint instead
of being dropped (which cost that client the 1 s SYN retransmission).

The allocator is the proxier's; the renderer only asks it where a pool's region is.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from pyproxy.model.objects import ServicePortName

SLOTS = 12_252_240
"""Slots per pool: lcm(1..18), so the split is exact for every pool of up to 18 endpoints and
for any count dividing it (20, 21, 24, 28, 30, 35, 36, 40, 42, 45, 48, ...); otherwise ranges
differ by one slot in ~10^5 or more (with 50 endpoints, 245,044 or 245,045 slots each: 4 parts
in a million, far below what a chi-square test of a million connections could see). The kernel
scales its 32-bit random number into the range (reciprocal_scale), so a range of k slots is
taken with probability k/SLOTS to within 2^-32, as ``numgen random mod n`` is for n endpoints."""

MAP_POOLS = 64
"""At most this many pools share a map (64 regions of SLOTS fit the 32-bit slot space 5 times
over)."""

MAP_ELEMENTS = 256
"""A map takes no new pool once its pools hold this many endpoints (a pool that alone has more
gets a map of its own): bounds the (rules × elements) cost of loading a map."""

MAP_PREFIX = "endpoints-"
FIRST_PREFIX = "first-"

_TRIES = 8
"""Open maps a pool is offered before it gets a new one (bounds the work of a placement)."""


def map_name(protocol: str, index: int) -> str:
    """The name of shared endpoint map ``index`` of ``protocol`` (short: the kernel compares
    set names). One family of maps per protocol: nft 1.0.6 cannot add a rule that uses an
    existing map typed ``th dport`` ("conflicting protocols specified: tcp vs. th"), so each
    map's data is typed ``tcp dport``, ``udp dport`` or ``sctp dport``."""
    return f"{MAP_PREFIX}{protocol}-{index}"


def first_map_name(protocol: str, index: int) -> str:
    """The name of the hash map beside slot map ``index``: each pool's offset → its first
    endpoint (see the module's docstring)."""
    return f"{FIRST_PREFIX}{protocol}-{index}"


@dataclass(frozen=True, slots=True)
class Region:
    """A pool's slots: ``[offset, offset + SLOTS)`` of map ``map`` of ``protocol``."""

    protocol: str
    map: int
    index: int
    """The region's place in its map (its offset is ``index × SLOTS``)."""

    @property
    def offset(self) -> int:
        return self.index * SLOTS

    @property
    def map_name(self) -> str:
        return map_name(self.protocol, self.map)

    @property
    def first_map_name(self) -> str:
        return first_map_name(self.protocol, self.map)


@lru_cache(maxsize=512)
def slot_ranges(count: int) -> tuple[tuple[int, int], ...]:
    """The inclusive slot range of each of ``count`` endpoints inside a region (the first
    endpoint gets the first range). Cached: every Service of a size asks the same."""
    return tuple((k * SLOTS // count, (k + 1) * SLOTS // count - 1) for k in range(count))


PoolKey = tuple[ServicePortName, bool]
"""A service port's pool: (the port, True for this node's endpoints under a Local policy)."""

Place = Callable[[bool, int], Region]
"""What a renderer asks for a pool of one service port: (local pool?, how many endpoints) →
where its slots are."""


class SlotAllocator:
    """Gives each pool a region, keeps it while the pool lives (so its rule never changes), and
    reuses freed regions. Deterministic: the same sequence of calls gives the same layout."""

    def __init__(self) -> None:
        self._where: dict[PoolKey, Region] = {}
        self._size: dict[PoolKey, int] = {}
        self._shelves: dict[str, _Shelf] = {}

    def maps(self) -> dict[str, int]:
        """How many maps of each protocol the regions given out so far need."""
        return {proto: len(shelf.pools) for proto, shelf in sorted(self._shelves.items())}

    def region(self, key: PoolKey) -> Region | None:
        return self._where.get(key)

    def place(self, key: PoolKey, size: int) -> Region:
        """The region of pool ``key`` with ``size`` endpoints: its own if it has one."""
        have = self._where.get(key)
        if have is not None:
            self._shelves[have.protocol].elements[have.map] += size - self._size[key]
            self._size[key] = size
            return have
        proto = key[0].protocol
        shelf = self._shelves.get(proto) or self._shelves.setdefault(proto, _Shelf())
        m, index = shelf.take(size)
        region = self._where[key] = Region(proto, m, index)
        self._size[key] = size
        return region

    def release(self, key: PoolKey) -> None:
        """Pool ``key`` is gone: its region may go to another pool."""
        region = self._where.pop(key, None)
        if region is not None:
            self._shelves[region.protocol].give_back(region.map, region.index, self._size.pop(key))


class _Shelf:
    """The maps of one protocol: pools and endpoints per map, and free regions."""

    def __init__(self) -> None:
        self.pools: list[int] = []
        """Pools per map."""
        self.elements: list[int] = []
        """Endpoints per map (as last placed)."""
        self._free: list[list[int]] = []
        """Free region indexes per map (heaps), below the map's high-water mark."""
        self._next: list[int] = []
        """The next never-used region index per map."""
        self._open: list[int] = []
        """A heap of the maps that may take another pool (lowest first): O(log maps) a pool."""
        self._listed: set[int] = set()
        """The maps in ``_open``."""

    def take(self, size: int) -> tuple[int, int]:
        """A region for a pool of ``size`` endpoints: (map, index)."""
        m = None
        tries = 0
        while self._open and tries < _TRIES:
            i = self._open[0]
            if self.pools[i] < MAP_POOLS and (self.pools[i] == 0 or self.elements[i] + size <= MAP_ELEMENTS):
                m = i
                break
            # Full, or too full for this pool: closed until one of its pools goes (then it is
            # offered again). Closing on a first refusal keeps a placement O(log maps).
            heapq.heappop(self._open)
            self._listed.discard(i)
            tries += 1
        if m is None:
            m = len(self.pools)
            self.pools.append(0)
            self.elements.append(0)
            self._free.append([])
            self._next.append(0)
            heapq.heappush(self._open, m)
            self._listed.add(m)
        free = self._free[m]
        if free:
            index = heapq.heappop(free)  # the lowest: a layout after churn stays compact
        else:
            index = self._next[m]
            self._next[m] += 1
        self.pools[m] += 1
        self.elements[m] += size
        return m, index

    def give_back(self, m: int, index: int, size: int) -> None:
        self.pools[m] -= 1
        self.elements[m] -= size
        heapq.heappush(self._free[m], index)
        if m not in self._listed:
            heapq.heappush(self._open, m)
            self._listed.add(m)
