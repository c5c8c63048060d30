"""The nftables proxier: one atomic ``nft -f -`` transaction per sync, diffs after the first."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from pyproxy import metrics
from pyproxy.config import ProxyConfig
from pyproxy.literals import IptablesBackend, Mode
from pyproxy.model.objects import NAME_ORDER, DesiredState, ServicePortName, ServicePortState
from pyproxy.nft.executor import NftError, NftExecutor
from pyproxy.nft.transaction import Transaction
from pyproxy.proxier.base import SyncFailed, SyncResult
from pyproxy.proxier.nft_diff import NeedsFullSync, Phases, full_transaction
from pyproxy.render import nftables as render
from pyproxy.render.fragments import NftFragment
from pyproxy.render.slots import Place, Region, SlotAllocator

log = logging.getLogger("pyproxy.nftables")

TABLE_COMMENT = "rules for pyproxy"
COLD_START_PARTS = 8
"""A cold start sends its chains in about this many ``nft -f`` parts (see
:meth:`NftProxier._cold_start_parts`)."""
COLD_START_MIN_PART = 1000
"""...of at least this many service ports each (an nft run costs a few milliseconds itself)."""
ELEMENT = "element"
"""Garbage kind of a shared set's element (``"set { key }"``) no service port holds any more."""


class NftProxier:
    """Programs table ``ip pyproxy``; keeps what it applied so later syncs send only diffs."""

    mode: Mode = "nftables"
    table = render.TABLE_NAME

    iptables_backend: IptablesBackend | None = None

    def __init__(self, *, config: ProxyConfig, executor: NftExecutor, gc_period: float = 60.0) -> None:
        self.config = config
        self.family = render.table_family(config.family)
        """``ip`` or ``ip6``: each family has a table of its own (dual-stack runs two proxiers)."""
        self.set_specs = render.sets_for(config.family)
        self.executor = executor
        self.gc_period = gc_period
        """Flushed chains and unused sets are deleted in the next sync that deletes anything
        anyway, or once the oldest has waited this long (seconds; 0: at once)."""
        self._garbage: dict[str, tuple[str, float]] = {}
        """Name → ("chain" or a set spec, when it became garbage): in the kernel, unused."""
        self._base: NftFragment | None = None
        self._refs: dict[tuple[str, str], int] = {}
        """How many service ports hold each element of a shared set (render.SHARED_SETS)."""
        self._applied: dict[ServicePortName, ServicePortState] = {}
        """What the kernel holds, as the inputs that rendered it. Fragments are not kept: the
        old fragment of a changed service is rendered again (cheap) to diff against, which keeps
        ~65 MB less in memory at 10k services."""
        self._generation: int | None = None
        """The generation of the state applied last (see DesiredState.changes)."""
        self._alloc = SlotAllocator()
        self._pools: dict[ServicePortName, dict[bool, Region]] = {}
        """Where the kernel holds each service port's pools (cluster: False, local: True)."""
        self.needs_full = True
        self.cold_start_part: int | None = None
        """Service ports per part of a cold start (None: :data:`COLD_START_PARTS` parts of at
        least :data:`COLD_START_MIN_PART`); tests make it small to load many parts."""

    def render_text(self, state: DesiredState) -> str:
        tx, _ = self._full_transaction(state, SlotAllocator(), {}, self._phases(full=True))
        if tx.error:
            # The script would stop where the bad operation was left out: never print half.
            raise SyncFailed(f"cannot render the ruleset: {tx.error}")
        return tx.render()

    def _phases(self, *, full: bool) -> Phases:
        """A diff that counts shared elements from nothing (a full sync) or from the kernel's."""
        return Phases(shared_sets=render.SHARED_SETS, refs={} if full else self._refs)

    def _full_transaction(self, state: DesiredState, alloc: SlotAllocator,
                          pools: dict[ServicePortName, dict[bool, Region]],
                          phases: Phases) -> tuple[Transaction, NftFragment]:
        """The whole table, and its base fragment: every service port in name order, its pools
        placed afresh by ``alloc`` (and recorded in ``pools``), then the base (which declares
        as many shared maps as the placing took). Fragments are made one at a time and dropped
        once diffed: at 10k services, holding them all cost ~25 MB at the sync's peak."""
        base: list[NftFragment] = []

        def fragments() -> Iterator[NftFragment]:
            for k in sorted(state.services, key=NAME_ORDER):
                yield self._render_placed(state.services[k], k, alloc, pools)
            base.append(self._render_base(state, maps=alloc.maps()))
            yield base[0]

        tx = full_transaction(fragments(), family=self.family, table=self.table, comment=TABLE_COMMENT,
                              set_specs=self.set_specs, phases=phases)
        return tx, base[0]

    def sync(self, state: DesiredState) -> SyncResult:
        t0 = time.perf_counter()
        full = self.needs_full
        changed = 0
        phases = self._phases(full=False)
        base: NftFragment | None = None
        if not full:
            try:
                changed = self._diff_services(state, phases)
                base = self._render_base(state, maps=self._alloc.maps())
                phases.diff(self._base, base)
                for set_name, spec in phases.declare_sets.items():
                    waiting = self._garbage.get(set_name)
                    if waiting is not None and waiting[0] != spec:
                        # "add set" keeps an existing set as it is: a set waiting for deletion
                        # cannot come back with another timeout in place.
                        raise NeedsFullSync(f"set {set_name} returns with another type or timeout")
            except NeedsFullSync as why:
                log.info("full sync needed: %s", why)
                full = True
        garbage: dict[str, tuple[str, float]] = {}
        cold = False
        try:
            if full:
                changed = len(state.services)
                phases = self._phases(full=True)
                # A fresh layout: the whole table is replaced, so every pool may move.
                self._alloc, self._pools = SlotAllocator(), {}
                cold = not self.executor.table_exists(self.family, self.table)
            if cold:
                # A cold start: no table, so nothing depends on it being built atomically. It
                # goes in parts, applied while the next is rendered (see _cold_start_parts);
                # the elements over netlink, which the kernel takes ~3x faster than nft parses
                # them (10k services, 200k elements: ~1 s against ~2.7 s).
                record = _ColdStart()
                self.executor.run_in_order(self._cold_start_parts(state, phases, record))
                assert record.base is not None  # the parts were all made
                base, operations = record.base, record.operations
                t1 = t0 + record.render_seconds
            else:
                if full:
                    # Over an existing table (a restart) one transaction keeps the old rules
                    # serving until the new ones are complete.
                    tx, base = self._full_transaction(state, self._alloc, self._pools, phases)
                else:
                    tx = Transaction(family=self.family, table=self.table, set_specs=self.set_specs)
                    phases.write(tx)
                    garbage = self._collect(phases, tx)
                operations = len(tx.ops)
                t1 = time.perf_counter()
                if tx.ops:
                    self.executor.run(tx)
        except NftError as err:
            metrics.NFT_SYNC_FAILURES.inc()
            # The kernel kept the old ruleset, but our model may now be wrong about it (or, on
            # a cold start, holds part of the new one): rebuild everything next time.
            self.needs_full = True
            raise SyncFailed(f"nft refused the ruleset (previous rules kept): {err}") from err
        t2 = time.perf_counter()
        self._base = base
        self._refs = phases.counted()
        self._applied = state.services
        self._generation = state.changes.generation if state.changes is not None else None
        self._garbage = garbage
        self.needs_full = False
        return SyncResult(
            full=full, operations=operations, changed_services=changed,
            render_seconds=t1 - t0, apply_seconds=t2 - t1,
        )

    def _cold_start_parts(self, state: DesiredState, phases: Phases, record: _ColdStart) -> Iterator[Transaction]:
        """A cold start's transactions, made as they are asked for: the table and its fixed
        chains and sets with the first service ports' chains, then those ports' endpoint data
        (:func:`~pyproxy.render.nftables.reached_through_dispatch`), the next ports' chains and
        data part after part, and last every element that makes a Service reachable (shared
        elements counted in ``phases``). The executor applies each part while the next is
        rendered: at 44k Services nft's work on the chains (~3.5 s of CPU) went after the whole
        render (~2 s), and at 10k the kernel's commit of the elements (~0.6 s) after it too;
        now both run beside it. Each part declares again the maps its rules name (nft resolves
        ``@map`` from the script). ``record`` gets the final base fragment, the seconds spent
        rendering (between the parts) and the number of operations."""
        record.started = time.perf_counter()
        alloc, pools = self._alloc, self._pools
        names = sorted(state.services, key=NAME_ORDER)
        size = self.cold_start_part or max(COLD_START_MIN_PART, -(-len(names) // COLD_START_PARTS))

        def part() -> Transaction:
            return Transaction(family=self.family, table=self.table, set_specs=self.set_specs)

        tx = part()
        tx.add_table()
        tx.delete_table()
        tx.add_table(TABLE_COMMENT)
        fixed = self._render_base(state, maps={})
        phases.diff(None, fixed)
        chunks = [names[at:at + size] for at in range(0, len(names), size)] or [[]]
        for i, chunk in enumerate(chunks):
            for k in chunk:
                phases.diff(None, self._render_placed(state.services[k], k, alloc, pools))
            if i < len(chunks) - 1:
                # The maps opened so far: their declarations, for the parts whose rules name them.
                phases.specs.update(self._render_base(state, maps=alloc.maps()).sets)
            else:
                # The last part declares every map (again, a no-op, for those made before).
                record.base = self._render_base(state, maps=alloc.maps())
                phases.diff(fixed, record.base)
            phases.write_chains(tx)
            yield record.made(tx)
            record.started = time.perf_counter()
            # This part's endpoint data (maps, hairpin pairs): sent while the next part is
            # rendered, and in the kernel's maps before any Service can reach them.
            tx = part()
            phases.write_elements(tx, only=render.reached_through_dispatch)
            yield record.made(tx)
            record.started = time.perf_counter()
            tx = part()
        # Then what makes the Services reachable, all at once.
        phases.write_elements(tx)
        phases.release()
        yield record.made(tx)

    def _diff_services(self, state: DesiredState, phases: Phases) -> int:
        """Queue the changes of every service port that differs from what the kernel holds;
        how many differ. Only the ports the builder says changed, when ``state`` follows the
        state applied last; otherwise a walk over all of them."""
        changes = state.changes
        if changes is not None and self._generation is not None and changes.since == self._generation:
            names: Iterable[ServicePortName] = changes.names
        else:
            names = {*state.services, *self._applied}
        changed = 0
        for name in names:
            old = self._applied.get(name)
            new = state.services.get(name)
            if old is new or (old is not None and old == new):
                continue
            held = self._pools.get(name, {})
            old_frag = None
            if old is not None:
                old_frag = self._render_service(old, place=_held(held))
            used: dict[bool, Region] = {}
            new_frag = None
            if new is not None:
                new_frag = self._render_service(new, place=_placing(self._alloc, name, used))
            for local in held.keys() - used.keys():
                self._alloc.release((name, local))
            if used:
                self._pools[name] = used
            else:
                self._pools.pop(name, None)
            if phases.diff(old_frag, new_frag):
                changed += 1
        return changed

    def _render_base(self, state: DesiredState, *, maps: Mapping[str, int]) -> NftFragment:
        """The fixed chains and maps, ``maps`` endpoint maps among them (the userspace mode adds
        its relay guard)."""
        return render.render_base(self.config, state, endpoint_maps=maps)

    def _render_placed(self, sps: ServicePortState, name: ServicePortName, alloc: SlotAllocator,
                       pools: dict[ServicePortName, dict[bool, Region]]) -> NftFragment:
        """A full sync's fragment of one service port: its pools placed afresh by ``alloc`` and
        recorded in ``pools``."""
        used: dict[bool, Region] = {}
        frag = self._render_service(sps, place=_placing(alloc, name, used))
        if used:
            pools[name] = used
        return frag

    def _render_service(self, sps: ServicePortState, *, place: Place) -> NftFragment:
        """One service port's fragment (the userspace mode renders redirects instead)."""
        return render.render_service(self.config, sps, place=place)

    def _collect(self, phases: Phases, tx: Transaction) -> dict[str, tuple[str, float]]:
        """Update the garbage list and, when due, append its deletion to ``tx``; return the
        garbage that remains in the kernel once ``tx`` is applied."""
        now = time.monotonic()
        garbage = dict(self._garbage)
        for name in phases.gone_chains:
            garbage.setdefault(name, ("chain", now))
        for name, spec in phases.gone_sets.items():
            garbage.setdefault(name, (spec, now))
        for set_name, key in phases.gone_shared:
            garbage.setdefault(f"{set_name} {{ {key} }}", (ELEMENT, now))
        # Wanted again (an endpoint came back): it is live, not garbage.
        for name, _ in phases.declare_chains:
            garbage.pop(name, None)
        for name in phases.declare_sets:
            garbage.pop(name, None)
        for set_name, key, _ in phases.add_elements:
            if set_name in phases.shared_sets:
                garbage.pop(f"{set_name} {{ {key} }}", None)
        if not garbage:
            return garbage
        oldest = min(t for _, t in garbage.values())
        if tx.has_deletes or now - oldest >= self.gc_period:
            for name, (kind, _) in garbage.items():
                if kind == ELEMENT:
                    set_name, _, key = name.partition(" { ")
                    tx.delete_element(set_name, key.removesuffix(" }"))
            chains = [n for n, (kind, _) in garbage.items() if kind == "chain"]
            for name in chains:
                tx.delete_chain(name)
            for name, (spec, _) in garbage.items():
                if spec not in ("chain", ELEMENT):
                    tx.delete_set(name, spec)
            return {}
        return garbage

    @property
    def garbage(self) -> list[str]:
        """Flushed chains, unused sets and unheld shared elements still in the kernel, awaiting
        deletion."""
        return sorted(self._garbage)

    def cleanup(self) -> bool:
        """Delete our table; True if it existed."""
        self.needs_full = True
        return self.executor.delete_table(self.family, self.table)


@dataclass
class _ColdStart:
    """What a cold start in parts leaves for the sync that started it."""

    base: NftFragment | None = None
    """The base fragment with every map, once the last part of chains is made."""
    render_seconds: float = 0.0
    """Time spent making the parts (not waiting for them to be applied)."""
    operations: int = 0
    started: float = 0.0
    """When the part being made was started."""

    def made(self, tx: Transaction) -> Transaction:
        """Count ``tx``, made since ``started``, and return it (the maker sets ``started``
        again when asked for the next part)."""
        self.render_seconds += time.perf_counter() - self.started
        self.operations += len(tx.ops)
        return tx


def _placing(alloc: SlotAllocator, name: ServicePortName, used: dict[bool, Region]) -> Place:
    """A ``place`` for the renderer that takes regions from ``alloc`` and notes them in ``used``."""
    def place(local: bool, size: int) -> Region:
        region = used[local] = alloc.place((name, local), size)
        return region
    return place


def _held(pools: dict[bool, Region]) -> Place:
    """A ``place`` that gives the regions a fragment had (to render it again, for a diff)."""
    def place(local: bool, size: int) -> Region:
        return pools[local]
    return place
