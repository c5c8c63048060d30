"""Turn (old fragment, new fragment) pairs into one ordered nft transaction (pure).

Operations are emitted in phases across all fragments, so references always resolve inside
the single atomic transaction:

1. declare new sets and chains (rules and elements may then point at them), and re-declare
   sets that rewritten rules name (nft only resolves ``@set`` from its cache or the script);
2. delete map elements that are gone or changed (so they stop pointing at old chains);
3. rewrite changed chains (flush, then a declaration carrying the rules) and fill new ones;
4. add new and changed elements;
5. flush chains that are gone. They are *not* deleted here: a delete makes nft fetch the whole
   table first (see ``pyproxy.nft.transaction``), so the proxier deletes flushed chains and
   unused sets later, in a sync that pays that price anyway or once they are old enough.
   A flushed, unreferenced chain does nothing to packets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from operator import itemgetter

from pyproxy.nft.transaction import Transaction
from pyproxy.render.fragments import NftFragment

EMPTY = NftFragment()
_SET_REF = re.compile(r"@([A-Za-z0-9_./-]+)")


class NeedsFullSync(Exception):
    """A change the diff cannot express in place (a set or base chain changed its type)."""


class Phases:
    """Collects the operations of every fragment pair, then writes them phase by phase.

    Elements of ``shared_sets`` may be rendered by several fragments (two Services with the same
    pod in the hairpin set): ``refs`` counts the fragments that hold each one in the kernel, so
    an element is added when its first holder appears and deleted when its last one goes.
    ``ref_deltas`` is how this transaction changes the counts (applied by the caller once the
    transaction succeeded)."""

    def __init__(self, *, shared_sets: frozenset[str] = frozenset(),
                 refs: dict[tuple[str, str], int] | None = None) -> None:
        self.shared_sets = shared_sets
        self.refs = refs if refs is not None else {}
        self.ref_deltas: dict[tuple[str, str], int] = {}
        self.declare_sets: dict[str, str] = {}
        self.declare_chains: list[tuple[str, str]] = []
        self.del_elements: list[tuple[str, str]] = []
        self.rewrite: list[tuple[str, tuple[str, ...], bool]] = []
        self.add_elements: list[tuple[str, str, str]] = []
        self.gone_chains: list[str] = []
        self.gone_sets: dict[str, str] = {}
        self.gone_shared: list[tuple[str, str]] = []
        """Shared elements whose last holder went: left in the kernel for a later deletion (a
        delete makes nft read the whole table; a stale hairpin pair changes no packet's fate)."""
        self.named: set[str] = set()
        """Sets that rewritten rules name: re-declared in the script (their declarations may
        come from another fragment, such as the base's shared maps)."""
        self.specs: dict[str, str] = {}
        """The declaration of every set the new fragments hold: element additions to them are
        written as set declarations (which nft runs without reading the table first)."""

    def diff(self, old: NftFragment | None, new: NftFragment | None) -> bool:
        """Queue what turns ``old`` into ``new``; True if anything differs."""
        if old is None and new is not None:
            return self._add(new)
        old = old or EMPTY
        new = new or EMPTY
        before = self.size()
        self.specs.update(new.sets)
        for name, spec in new.sets.items():
            prev = old.sets.get(name)
            if prev is None:
                self.declare_sets[name] = spec
            elif prev != spec:
                raise NeedsFullSync(f"set {name} changed its type")
        for name, spec in old.sets.items():
            if name not in new.sets:
                self.gone_sets[name] = spec
        for name, rules in new.chains.items():
            spec = new.chain_specs.get(name, "")
            if name not in old.chains:
                self.declare_chains.append((name, spec))
                self.rewrite.append((name, rules, False))
            else:
                if old.chain_specs.get(name, "") != spec:
                    raise NeedsFullSync(f"chain {name} changed its hook")
                if old.chains[name] != rules:
                    self.rewrite.append((name, rules, True))
                else:
                    continue
            self.named.update(_SET_REF.findall(" ".join(rules)))
        for name in old.chains:
            if name not in new.chains:
                self.gone_chains.append(name)
        for key, value in new.elements.items():
            prev = old.elements.get(key)
            if key[0] in self.shared_sets:
                if prev is None and self._count(key, +1) == 1:
                    self.add_elements.append((key[0], key[1], value))
            elif prev is None:
                self.add_elements.append((key[0], key[1], value))
            elif prev != value:
                self.del_elements.append(key)
                self.add_elements.append((key[0], key[1], value))
        for key in old.elements:
            if key not in new.elements:
                if key[0] not in self.shared_sets:
                    self.del_elements.append(key)
                elif self._count(key, -1) == 0:
                    self.gone_shared.append(key)
        return self.size() != before

    def _add(self, new: NftFragment) -> bool:
        """:meth:`diff` from nothing (every fragment of a full sync, and a new service port's):
        the same queues, without the comparisons an old fragment needs."""
        before = self.size()
        self.specs.update(new.sets)
        self.declare_sets.update(new.sets)
        specs = new.chain_specs
        for name, rules in new.chains.items():
            self.declare_chains.append((name, specs.get(name, "")))
            self.rewrite.append((name, rules, False))
            self.named.update(_SET_REF.findall(" ".join(rules)))
        shared, add = self.shared_sets, self.add_elements.append
        deltas, refs = self.ref_deltas, self.refs
        for key, value in new.elements.items():
            if key[0] not in shared:
                add((key[0], key[1], value))
                continue
            # _count(key, +1) inline: a full sync counts 110k shared elements at 10k services.
            delta = deltas.get(key, 0) + 1
            deltas[key] = delta
            if (refs.get(key, 0) if refs else 0) + delta == 1:
                add((key[0], key[1], value))
        return self.size() != before

    def _count(self, key: tuple[str, str], step: int) -> int:
        """Change the number of holders of a shared element; the new number."""
        delta = self.ref_deltas.get(key, 0) + step
        self.ref_deltas[key] = delta
        return self.refs.get(key, 0) + delta

    def counted(self) -> dict[tuple[str, str], int]:
        """``refs`` with this transaction's changes applied (in place: call once it succeeded)."""
        for key, delta in self.ref_deltas.items():
            count = self.refs.get(key, 0) + delta
            if count > 0:
                self.refs[key] = count
            else:
                self.refs.pop(key, None)
        return self.refs

    def release(self) -> None:
        """Drop the queued operations once written (a full sync's 240k at 10k services): the
        shared elements' counts stay for :meth:`counted`."""
        self.declare_sets, self.declare_chains, self.rewrite = {}, [], []
        self.del_elements, self.add_elements, self.gone_chains = [], [], []
        self.gone_sets, self.gone_shared, self.specs, self.named = {}, [], {}, set()

    def size(self) -> int:
        return (
            len(self.declare_sets) + len(self.declare_chains) + len(self.del_elements)
            + len(self.rewrite) + len(self.add_elements) + len(self.gone_chains) + len(self.gone_sets)
            + len(self.gone_shared)
        )

    def write(self, tx: Transaction) -> None:
        tx.set_specs = {**self.specs, **tx.set_specs}
        self._declare(tx)
        # Grouped by set (stable order inside each): runs on one set coalesce into one command.
        for set_name, key in sorted(self.del_elements, key=itemgetter(0)):
            tx.delete_element(set_name, key)
        self._fill(tx)
        tx.add_elements(sorted(self.add_elements, key=itemgetter(0)))
        declared = {name for name, _ in self.declare_chains}
        for name in self.gone_chains:
            if name not in declared:  # gone from one fragment, wanted by another: keep it
                tx.flush_chain(name)

    def write_chains(self, tx: Transaction) -> None:
        """Only the sets and chains queued so far, then forget them; the elements stay queued
        for :meth:`write_elements`. For a cold start in parts, where nothing is ever deleted:
        each part declares again the sets its rules name, as :meth:`write` does."""
        tx.set_specs = {**self.specs, **tx.set_specs}
        self._declare(tx)
        self._fill(tx)
        self.declare_sets, self.declare_chains, self.rewrite, self.named = {}, [], [], set()

    def write_elements(self, tx: Transaction, *, only: Callable[[str], bool] | None = None) -> None:
        """The element additions queued (see :meth:`write_chains`), or only those of the sets
        ``only`` picks, which are then forgotten (the others stay queued)."""
        tx.set_specs = {**self.specs, **tx.set_specs}
        items = self.add_elements
        if only is not None:
            items = []
            rest: list[tuple[str, str, str]] = []
            for e in self.add_elements:
                (items if only(e[0]) else rest).append(e)
            self.add_elements = rest
        tx.add_elements(sorted(items, key=itemgetter(0)))

    def _declare(self, tx: Transaction) -> None:
        """Declare the new sets, the sets rewritten rules name, and the new chains (empty)."""
        for ref in sorted(self.named):
            if ref in self.specs:
                self.declare_sets.setdefault(ref, self.specs[ref])
        for name, spec in self.declare_sets.items():
            tx.add_set(name, spec)
        for name, spec in self.declare_chains:
            tx.add_chain(name, spec)

    def _fill(self, tx: Transaction) -> None:
        """Write the rules of new and changed chains (a changed one flushed first)."""
        for name, rules, existed in self.rewrite:
            if existed:
                tx.flush_chain(name)
            if rules:
                tx.add_chain(name, rules=rules)


def full_transaction(fragments: Iterable[NftFragment], *, family: str, table: str,
                     comment: str, set_specs: dict[str, str], phases: Phases | None = None) -> Transaction:
    """Replace the whole table in one transaction.

    ``add table`` then ``delete table`` then rebuild: the add makes the delete safe when the
    table is missing (nft 1.0.6 has no ``destroy``), and because it is one transaction, packets
    see the old ruleset until the new one is complete: a restart never drops traffic.
    """
    tx = Transaction(family=family, table=table, set_specs=set_specs)
    tx.add_table()
    tx.delete_table()
    tx.add_table(comment)
    phases = phases if phases is not None else Phases()
    for frag in fragments:
        phases.diff(None, frag)
    phases.write(tx)
    # What was written is in tx now; only the counts of shared elements are still needed.
    phases.release()
    return tx
