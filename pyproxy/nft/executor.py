"""Executors for nft transactions: the real ``nft`` binary, and an in-memory fake."""

from __future__ import annotations

import copy
import logging
import queue
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pyproxy import metrics
from pyproxy.nft.netlink import Message, NetlinkError, NetlinkSocket, Unsupported, messages
from pyproxy.nft.transaction import Op, Transaction
from pyproxy.runcmd import netns_prefix, run_captured


log = logging.getLogger("pyproxy.nft")


class NftError(RuntimeError):
    """``nft`` refused a transaction; nothing of it was applied."""


class NftExecutor(Protocol):
    def run(self, tx: Transaction) -> None:
        """Apply ``tx`` atomically or raise NftError and change nothing."""

    def run_in_order(self, parts: Iterable[Transaction]) -> None:
        """Apply ``parts`` one after the other, each atomically, stopping at the first that is
        refused (NftError). Not atomic as a whole: only for a table nothing uses yet. A
        generator's next part may be made while the previous one is applied."""

    def table_exists(self, family: str, table: str) -> bool: ...

    def delete_table(self, family: str, table: str) -> bool:
        """Delete a table if present; True if it was there."""


AHEAD = 4
"""Parts a cold start may have made and encoded beyond the one being applied (each holds
~1/8 of the chains or of the endpoint data)."""


class NftCli:
    """Runs ``nft -f -`` with the transaction on stdin, as knftables does; a transaction that
    only adds and deletes elements goes over netlink instead (``pyproxy.nft.netlink``)."""

    def __init__(self, *, netns: str | None = None, binary: str = "nft", netlink: bool = True) -> None:
        self.netns = netns
        self.binary = binary
        self.netlink = netlink
        """Send element-only transactions as one netlink batch (no nft process, no listing of
        the table first); off, or when the socket cannot be opened, everything uses nft."""
        self._sock: NetlinkSocket | None = None
        self.paths: dict[str, int] = {"nft": 0, "netlink": 0}
        """How many transactions each path applied."""

    def _nft(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        if shutil.which(self.binary) is None:
            raise NftError(
                f"{self.binary}: command not found; install the nftables package "
                "(apt-get install nftables) or use --proxy-mode iptables"
            )
        try:
            return run_captured([*netns_prefix(self.netns), self.binary, *args], stdin=stdin)
        except OSError as err:  # fork or exec failed (no memory, too many processes...)
            raise NftError(f"cannot run {self.binary}: {err}") from err

    def run(self, tx: Transaction) -> None:
        if tx.error:
            raise NftError(f"transaction not run: {tx.error}")
        if not tx.ops:
            return
        batch = self._encode(tx)
        if batch is not None and self._send(tx, batch):
            return
        self._run_nft(tx)

    def run_in_order(self, parts: Iterable[Transaction]) -> None:
        """As :meth:`NftExecutor.run_in_order`. The parts are applied in order by one thread,
        nft for chains and rules, netlink for elements, while this thread makes the next parts
        (a generator renders them) and encodes them, up to :data:`AHEAD` parts ahead: nft and
        the kernel's work on a batch run on the other CPU meanwhile (both wait outside the
        interpreter). A part goes to the kernel only once the previous one is in; after a
        refused one, no other is applied."""
        jobs: queue.Queue[tuple[Transaction, list[Message] | bytes] | None] = queue.Queue(maxsize=AHEAD)
        failed: list[BaseException] = []

        def apply() -> None:
            while (job := jobs.get()) is not None:
                if failed:
                    continue  # refused before: the rest is dropped
                tx, encoded = job
                try:
                    if isinstance(encoded, bytes):
                        self._run_nft(tx, script=encoded)
                    elif not self._send(tx, encoded):
                        self._run_nft(tx)
                except BaseException as err:  # noqa: BLE001 - raised on the caller's thread below
                    failed.append(err)

        applier = threading.Thread(target=apply, name="nft-apply")
        applier.start()
        try:
            for tx in parts:
                if failed:
                    break
                if tx.error:
                    raise NftError(f"transaction not run: {tx.error}")
                if tx.ops:
                    # Either way the Python work is done here: the applier only waits for nft or
                    # the kernel, so it never holds the interpreter the renderer needs.
                    batch = self._encode(tx)
                    jobs.put((tx, tx.render_bytes() if batch is None else batch))
        finally:
            jobs.put(None)
            applier.join()
        if failed:
            raise failed[0]

    def _run_nft(self, tx: Transaction, *, script: bytes | None = None) -> None:
        """``nft -f -`` of ``tx`` (its ``script``, when rendered already)."""
        proc = self._nft("-f", "-", stdin=tx.render_bytes() if script is None else script)
        if proc.returncode != 0:
            raise NftError(_first_lines(proc.stderr.decode(errors="replace")))
        self.paths["nft"] += 1
        metrics.NFT_TRANSACTIONS.labels(path="nft").inc()

    def _encode(self, tx: Transaction) -> list[Message] | None:
        """``tx`` as netlink messages, or None when it must go through nft (it changes more
        than elements, or holds something the codec does not encode, or netlink is off)."""
        if not self.netlink or any(op.kind != "element" for op in tx.ops):
            return None
        try:
            return messages(tx)
        except Unsupported as why:
            log.debug("nft -f for this transaction: %s", why)
            return None

    def _send(self, tx: Transaction, batch: list[Message]) -> bool:
        """Apply an encoded element-only ``tx`` over netlink: True if done, False to use nft
        instead (no socket); NftError if the kernel refused it (nothing applied)."""
        try:
            if self._sock is None:
                self._sock = NetlinkSocket(netns=self.netns)
        except OSError as err:
            log.warning("no netfilter netlink socket (%s): element changes go through nft", err)
            self.netlink = False
            return False
        try:
            self._sock.apply(family=tx.family, table=tx.table, batch=batch)
        except NetlinkError as err:
            # A fresh socket next time: after a lost answer its queue may hold stale acks.
            self._sock.close()
            self._sock = None
            raise NftError(f"the kernel refused the element changes: {err.strerror}") from err
        self.paths["netlink"] += 1
        metrics.NFT_TRANSACTIONS.labels(path="netlink").inc()
        return True

    def table_exists(self, family: str, table: str) -> bool:
        # "list tables" names the tables only: "list table" would print all of ours (seconds
        # at 10k services).
        proc = self._nft("list", "tables", family)
        if proc.returncode != 0:
            raise NftError(_first_lines(proc.stderr.decode(errors="replace")))
        return f"table {family} {table}" in proc.stdout.decode(errors="replace").splitlines()

    def delete_table(self, family: str, table: str) -> bool:
        if not self.table_exists(family, table):
            return False
        proc = self._nft("delete", "table", family, table)
        if proc.returncode != 0:
            raise NftError(_first_lines(proc.stderr.decode(errors="replace")))
        return True


def _first_lines(text: str, limit: int = 20) -> str:
    lines = text.strip().splitlines()
    more = f"\n... {len(lines) - limit} more lines" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


_REF = re.compile(r"(?:goto|jump) ([A-Za-z0-9_./-]+)")
_SETREF = re.compile(r"@([A-Za-z0-9_./-]+)")


@dataclass
class FakeTable:
    chains: dict[str, list[str]] = field(default_factory=dict)
    chain_specs: dict[str, str] = field(default_factory=dict)
    sets: dict[str, str] = field(default_factory=dict)
    elements: dict[str, dict[str, str]] = field(default_factory=dict)


class FakeNft:
    """In-memory nftables with the kernel's all-or-nothing semantics, for unit tests.

    It checks what the kernel checks that matters to us: objects must exist before use,
    elements are unique, a chain or set still referenced cannot be deleted, and a chain must
    be empty to be deleted.
    """

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], FakeTable] = {}
        self.transactions: list[Transaction] = []
        self.fail_next: str | None = None
        """Set to make the next ``run`` fail with this message (tests of failure handling)."""

    def table_exists(self, family: str, table: str) -> bool:
        return (family, table) in self.tables

    def delete_table(self, family: str, table: str) -> bool:
        return self.tables.pop((family, table), None) is not None

    def run(self, tx: Transaction) -> None:
        if tx.error:
            raise NftError(f"transaction not run: {tx.error}")
        if self.fail_next is not None:
            msg, self.fail_next = self.fail_next, None
            raise NftError(msg)
        tables = copy.deepcopy(self.tables)
        for op in tx.ops:
            self._apply(tables, (tx.family, tx.table), op)
        self.tables = tables
        self.transactions.append(tx)

    def run_in_order(self, parts: Iterable[Transaction]) -> None:
        for tx in parts:
            self.run(tx)

    @staticmethod
    def _refs(t: FakeTable) -> tuple[set[str], set[str]]:
        chains: set[str] = set()
        sets: set[str] = set()
        for rules in t.chains.values():
            for r in rules:
                chains.update(_REF.findall(r))
                sets.update(_SETREF.findall(r))
        for elems in t.elements.values():
            for v in elems.values():
                chains.update(_REF.findall(v))
        return chains, sets

    def _apply(self, tables: dict[tuple[str, str], FakeTable], key: tuple[str, str], op: Op) -> None:
        if op.kind == "table":
            if op.verb == "add":
                tables.setdefault(key, FakeTable())
            elif op.verb == "delete":
                if key not in tables:
                    raise NftError(f"No such file or directory: table {key}")
                del tables[key]
            return
        t = tables.get(key)
        if t is None:
            raise NftError(f"No such file or directory: table {key}")
        if op.kind == "chain":
            if op.verb == "add":
                t.chains.setdefault(op.name, [])
                if op.body:
                    t.chain_specs[op.name] = op.body
                for rule in op.rules:
                    self._check_refs(t, rule)
                    t.chains[op.name].append(rule)
            elif op.verb == "flush":
                self._need(op.name in t.chains, f"chain {op.name}")
                t.chains[op.name] = []
            else:
                self._need(op.name in t.chains, f"chain {op.name}")
                if t.chains[op.name] or op.name in self._refs(t)[0]:
                    raise NftError(f"Device or resource busy: delete chain {op.name}")
                del t.chains[op.name]
                t.chain_specs.pop(op.name, None)
        elif op.kind == "rule":
            self._need(op.name in t.chains, f"chain {op.name}")
            self._check_refs(t, op.body)
            t.chains[op.name].append(op.body)
        elif op.kind in ("set", "map"):
            if op.verb == "add":
                if op.name not in t.sets:
                    t.sets[op.name] = op.body
                    t.elements[op.name] = {}
            else:
                self._need(op.name in t.sets, f"set {op.name}")
                if op.name in self._refs(t)[1]:
                    raise NftError(f"Device or resource busy: delete set {op.name}")
                del t.sets[op.name]
                del t.elements[op.name]
        elif op.kind == "element":
            self._need(op.name in t.sets, f"set {op.name}")
            elems = t.elements[op.name]
            if op.verb == "add":
                if op.body in elems and elems[op.body] != op.value:
                    raise NftError(f"File exists: element {op.body} in {op.name}")
                for target in _REF.findall(op.value):
                    self._need(target in t.chains, f"chain {target}")
                elems[op.body] = op.value
            else:
                self._need(op.body in elems, f"element {op.body} in {op.name}")
                del elems[op.body]

    def _check_refs(self, t: FakeTable, rule: str) -> None:
        for target in _REF.findall(rule):
            self._need(target in t.chains, f"chain {target} (in rule {rule!r})")
        for name in _SETREF.findall(rule):
            self._need(name in t.sets, f"set {name} (in rule {rule!r})")

    @staticmethod
    def _need(ok: bool, what: str) -> None:
        if not ok:
            raise NftError(f"No such file or directory: {what}")

    def dump(self, family: str = "ip", table: str = "pyproxy") -> FakeTable | None:
        return self.tables.get((family, table))
