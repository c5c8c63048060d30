"""An nft transaction: an ordered list of operations, rendered as one ``nft -f -`` script.

The kernel applies the whole script as one netlink batch: either every operation takes
effect, or none does. So a failed sync leaves the previous ruleset in place.

How the script is written matters at scale. Before running a script, nft 1.0.x fetches from the
kernel whatever it thinks the commands need. ``add rule``, ``add element``, and every ``delete``
make it fetch the whole table: about 0.5 s with 110k chains (10k services × 10 endpoints), and
that on every sync. Declarations do not: ``add chain T C { rule ; rule ; }`` and
``add map T M { type … ; elements = { … } ; }`` run in ~30 ms on the same table. So this module
writes chain contents as chain declarations and element additions as set declarations, and the
proxier defers deletions (see ``pyproxy.proxier.nft_diff``). A rule that names a set (``@set``)
only resolves if the set is in nft's cache, so such sets are re-declared in the same script.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

Verb = Literal["add", "delete", "flush"]
Kind = Literal["table", "chain", "rule", "set", "map", "element"]

# Names we generate are "[A-Za-z0-9_./-]+"; anything else would let text escape its field.
_NAME = re.compile(r"[A-Za-z0-9_./-]+")
_FORBIDDEN = re.compile(r"[;\n\r{}#]")
_RULE_BREAK = re.compile(r"[;\n\r]")
# Coalesce element operations on one set into commands of this many elements: faster to parse
# than one command each, and small enough for nft's command buffer.
ELEMENT_CHUNK = 1000


class TransactionError(ValueError):
    """An operation could not be added; the transaction will refuse to run."""


class Op(NamedTuple):
    """One operation. A tuple: a full sync at 10k services makes 240k of them, and a tuple is
    made in C (a frozen dataclass took a third of the full render)."""

    verb: Verb
    kind: Kind
    name: str = ""
    """Chain or set name (empty for the table)."""
    body: str = ""
    """Rule text, chain spec, set spec, element key."""
    value: str = ""
    """Element value for maps (``goto chain``), empty for plain sets."""
    rules: tuple[str, ...] = ()
    """For ``add chain``: rules to append, written inside the declaration."""


def _bad_rules(rules: tuple[str, ...]) -> bool:
    """An empty rule, or a ";" or line break in one (it would end the rule early and start
    another command)."""
    return any(not r or r.isspace() for r in rules) or _RULE_BREAK.search("".join(rules)) is not None


def is_map(spec: str) -> bool:
    """A set spec with ``type K : V`` declares a map."""
    return " : " in spec.split(";")[0]


class Transaction:
    """Operations on one table. ``add_*`` never raise; ``error`` holds the first problem.

    ``set_specs`` (set name → declaration body) lets element additions be written as set
    declarations, which nft runs without fetching the table first.
    """

    def __init__(self, *, family: str = "ip", table: str = "pyproxy",
                 set_specs: dict[str, str] | None = None) -> None:
        self.family = family
        self.table = table
        self.set_specs = set_specs or {}
        self.ops: list[Op] = []
        self.error: str | None = None
        self._good_names: set[str] = set()
        """Names already checked (a set takes thousands of element operations)."""

    def __len__(self) -> int:
        return len(self.ops)

    def _push(self, op: Op) -> None:
        if self.error is not None:
            return
        kind = op.kind
        name = op.name
        if kind != "table" and name not in self._good_names:
            if not _NAME.fullmatch(name):
                self.error = f"invalid {kind} name {name!r}"
                return
            self._good_names.add(name)
        if kind == "table":
            self.ops.append(op)
        elif kind == "element":  # most operations: checked first, and cheaply
            if not op.body or _FORBIDDEN.search(op.body) or (op.value and _FORBIDDEN.search(op.value)):
                self.error = f"invalid element {op.body!r} : {op.value!r} in {op.name!r}"
            else:
                self.ops.append(op)
        elif (kind == "chain" or kind == "rule") and _bad_rules(op.rules if kind == "chain" else (op.body,)):
            # A ";" or line break would end the rule early and start another command.
            self.error = f"invalid rule for chain {op.name!r}: {op.body or op.rules!r}"
        else:
            self.ops.append(op)

    # -- table ---------------------------------------------------------------------------
    def add_table(self, comment: str = "") -> None:
        self._push(Op("add", "table", body=comment))

    def delete_table(self) -> None:
        self._push(Op("delete", "table"))

    # -- chains --------------------------------------------------------------------------
    def add_chain(self, name: str, spec: str = "", rules: tuple[str, ...] = ()) -> None:
        """Create the chain if missing (a no-op when it exists with the same spec) and append
        ``rules`` to it."""
        self._push(Op("add", "chain", name, spec, rules=tuple(rules)))

    def flush_chain(self, name: str) -> None:
        self._push(Op("flush", "chain", name))

    def delete_chain(self, name: str) -> None:
        self._push(Op("delete", "chain", name))

    def add_rule(self, chain: str, rule: str) -> None:
        self._push(Op("add", "rule", chain, rule))

    # -- sets and maps -------------------------------------------------------------------
    def add_set(self, name: str, spec: str) -> None:
        """``spec`` with a ``:`` after the key type declares a map."""
        self._push(Op("add", "map" if is_map(spec) else "set", name, spec))

    def delete_set(self, name: str, spec: str) -> None:
        self._push(Op("delete", "map" if is_map(spec) else "set", name))

    def add_element(self, set_name: str, key: str, value: str = "") -> None:
        self._push(Op("add", "element", set_name, key, value))

    def add_elements(self, items: list[tuple[str, str, str]]) -> None:
        """``add_element`` for each (set, key, value), in order. One check for the whole run: a
        full sync at 10k services adds 230k elements, and checking each on its own was a fifth
        of the render. Should any fail, they go one by one, which names the first bad one."""
        if self.error is not None or not items:
            return
        names = {name for name, _, _ in items}
        keys = [key for _, key, _ in items]
        if (all(keys) and all(n in self._good_names or _NAME.fullmatch(n) for n in names)
                and _FORBIDDEN.search("\0".join(keys)) is None
                and _FORBIDDEN.search("\0".join([value for _, _, value in items])) is None):
            self._good_names.update(names)
            # tuple.__new__ directly: Op._make is a Python function around it (0.3 s a cold start)
            new = tuple.__new__
            self.ops.extend([new(Op, ("add", "element", name, key, value, ())) for name, key, value in items])
            return
        for name, key, value in items:
            self.add_element(name, key, value)

    def delete_element(self, set_name: str, key: str) -> None:
        self._push(Op("delete", "element", set_name, key))

    @property
    def has_deletes(self) -> bool:
        """True if nft will fetch the whole table for this script anyway (see module doc)."""
        return any(op.verb == "delete" for op in self.ops)

    # -- rendering -----------------------------------------------------------------------
    def render(self) -> str:
        """The ``nft -f`` script as text (see :meth:`render_bytes`)."""
        return self.render_bytes().decode()

    def render_bytes(self) -> bytes:
        """The ``nft -f`` script, one command per line (element runs coalesced).

        Written into one bytearray: at 10k services the script is ~40 MB, and a list of lines
        joined at the end would need twice that at its peak.
        """
        where = f"{self.family} {self.table}"
        buf = bytearray()
        put = buf.extend
        i = 0
        ops = self.ops
        while i < len(ops):
            op = ops[i]
            if op.kind == "element":
                # Gather a run of the same verb on the same set into one command.
                j = i
                items: list[str] = []
                while (
                    j < len(ops)
                    and len(items) < ELEMENT_CHUNK
                    and ops[j].kind == "element"
                    and ops[j].verb == op.verb
                    and ops[j].name == op.name
                ):
                    e = ops[j]
                    items.append(f"{e.body} : {e.value}" if e.value and op.verb == "add" else e.body)
                    j += 1
                spec = self.set_specs.get(op.name)
                if op.verb == "add" and spec:
                    kind = "map" if is_map(spec) else "set"
                    line = f"add {kind} {where} {op.name} {{ {spec} elements = {{ {', '.join(items)} }} ; }}"
                else:
                    line = f"{op.verb} element {where} {op.name} {{ {', '.join(items)} }}"
                i = j
            elif op.kind == "table":
                if op.verb == "add" and op.body:
                    line = f'add table {where} {{ comment "{op.body}" ; }}'
                else:
                    line = f"{op.verb} table {where}"
                i += 1
            elif op.kind == "chain":
                if op.verb == "add" and (op.body or op.rules):
                    inner = " ".join([op.body, *(f"{r} ;" for r in op.rules)]).strip()
                    line = f"add chain {where} {op.name} {{ {inner} }}"
                else:
                    line = f"{op.verb} chain {where} {op.name}"
                i += 1
            elif op.kind == "rule":
                line = f"add rule {where} {op.name} {op.body}"
                i += 1
            else:  # set or map
                if op.verb == "add":
                    line = f"add {op.kind} {where} {op.name} {{ {op.body} }}"
                else:
                    line = f"{op.verb} {op.kind} {where} {op.name}"
                i += 1
            put(line.encode())
            put(b"\n")
        return bytes(buf)
