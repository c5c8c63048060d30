"""An nft transaction: an ordered list of operations, rendered as one ``nft -f -`` script.

The kernel applies the whole script as one netlink batch: either every operation takes
effect, or none does. So a failed sync leaves the previous ruleset in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Verb = Literal["add", "delete", "flush"]
Kind = Literal["table", "chain", "rule", "set", "map", "element"]

# Names we generate are "[A-Za-z0-9_./-]+"; anything else would let text escape its field.
_NAME = re.compile(r"^[A-Za-z0-9_./-]+$")
_FORBIDDEN = re.compile(r"[;\n\r{}#]")
# Coalesce element operations on one set into commands of this many elements: faster to parse
# than one command each, and small enough for nft's command buffer.
ELEMENT_CHUNK = 1000


class TransactionError(ValueError):
    """An operation could not be added; the transaction will refuse to run."""


@dataclass(frozen=True, slots=True)
class Op:
    verb: Verb
    kind: Kind
    name: str = ""
    """Chain or set name (empty for the table)."""
    body: str = ""
    """Rule text, chain spec, set spec, element key."""
    value: str = ""
    """Element value for maps (``goto chain``), empty for plain sets."""


class Transaction:
    """Operations on one table. ``add_*`` never raise; ``error`` holds the first problem."""

    def __init__(self, *, family: str = "ip", table: str = "pyproxy") -> None:
        self.family = family
        self.table = table
        self.ops: list[Op] = []
        self.error: str | None = None

    def __len__(self) -> int:
        return len(self.ops)

    def _push(self, op: Op) -> None:
        if self.error is not None:
            return
        if op.kind not in ("table", "element") and not _NAME.match(op.name):
            self.error = f"invalid {op.kind} name {op.name!r}"
        elif op.kind == "rule" and (not op.body.strip() or "\n" in op.body):
            self.error = f"invalid rule {op.body!r} for chain {op.name!r}"
        elif op.kind == "element" and (
            not _NAME.match(op.name) or not op.body or _FORBIDDEN.search(op.body + op.value)
        ):
            self.error = f"invalid element {op.body!r} : {op.value!r} in {op.name!r}"
        else:
            self.ops.append(op)

    # -- table ---------------------------------------------------------------------------
    def add_table(self, comment: str = "") -> None:
        self._push(Op("add", "table", body=comment))

    def delete_table(self) -> None:
        self._push(Op("delete", "table"))

    # -- chains --------------------------------------------------------------------------
    def add_chain(self, name: str, spec: str = "") -> None:
        """Create the chain if missing (a no-op when it exists with the same spec)."""
        self._push(Op("add", "chain", name, spec))

    def flush_chain(self, name: str) -> None:
        self._push(Op("flush", "chain", name))

    def delete_chain(self, name: str) -> None:
        self._push(Op("delete", "chain", name))

    def add_rule(self, chain: str, rule: str) -> None:
        self._push(Op("add", "rule", chain, rule))

    # -- sets and maps -------------------------------------------------------------------
    def add_set(self, name: str, spec: str) -> None:
        """``spec`` with a ``:`` after the key type declares a map."""
        self._push(Op("add", "map" if " : " in spec.split(";")[0] else "set", name, spec))

    def delete_set(self, name: str, spec: str) -> None:
        self._push(Op("delete", "map" if " : " in spec.split(";")[0] else "set", name))

    def add_element(self, set_name: str, key: str, value: str = "") -> None:
        self._push(Op("add", "element", set_name, key, value))

    def delete_element(self, set_name: str, key: str) -> None:
        self._push(Op("delete", "element", set_name, key))

    # -- rendering -----------------------------------------------------------------------
    def render(self) -> str:
        """The ``nft -f`` script, one command per line (element runs coalesced)."""
        where = f"{self.family} {self.table}"
        out: list[str] = []
        i = 0
        ops = self.ops
        while i < len(ops):
            op = ops[i]
            if op.kind == "element":
                # Gather a run of the same verb on the same set into one command.
                j = i
                items = []
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
                out.append(f"{op.verb} element {where} {op.name} {{ {', '.join(items)} }}")
                i = j
                continue
            if op.kind == "table":
                if op.verb == "add" and op.body:
                    out.append(f'add table {where} {{ comment "{op.body}" ; }}')
                else:
                    out.append(f"{op.verb} table {where}")
            elif op.kind == "chain":
                if op.verb == "add" and op.body:
                    out.append(f"add chain {where} {op.name} {{ {op.body} }}")
                else:
                    out.append(f"{op.verb} chain {where} {op.name}")
            elif op.kind == "rule":
                out.append(f"add rule {where} {op.name} {op.body}")
            else:  # set or map
                if op.verb == "add":
                    out.append(f"add {op.kind} {where} {op.name} {{ {op.body} }}")
                else:
                    out.append(f"{op.verb} {op.kind} {where} {op.name}")
            i += 1
        return "\n".join(out) + ("\n" if out else "")
