"""Executors for iptables: ``iptables-restore --noflush -w`` for the rules, ``iptables -C/-I``
for the few jumps from built-in chains, and an in-memory fake."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from typing import Protocol

from pyproxy.ipt.restore import TABLES, PayloadError, RestorePayload
from pyproxy.literals import Family, IptablesBackend
from pyproxy.runcmd import netns_prefix, run_captured

BACKENDS = ("nft", "legacy")
WAIT_SECONDS = "5"  # the xtables lock wait, as kube-proxy passes it


class IptablesError(RuntimeError):
    """iptables refused a change; nothing of that restore was applied."""


class IptExecutor(Protocol):
    backend: IptablesBackend

    def restore(self, payload: RestorePayload) -> None: ...

    def our_chains(self, table: str, prefix: str) -> set[str]: ...

    def ensure_jump(self, table: str, chain: str, args: tuple[str, ...]) -> None: ...

    def delete_jump(self, table: str, chain: str, args: tuple[str, ...]) -> bool: ...

    def holds_chains(self, prefix: str) -> bool:
        """Whether any table holds a chain named ``prefix``… (a jump needs its chain, so none
        also means no jump to one)."""


def _bin(backend: str, tool: str, family: Family = 4) -> str:
    base = "ip6tables" if family == 6 else "iptables"
    return f"{base}-{backend}{tool}" if tool else f"{base}-{backend}"


def detect_backend(*, netns: str | None = None) -> IptablesBackend:
    """Which iptables backend the host uses, as the iptables-wrapper script decides: the one
    that already holds more rules (kubelet and CNIs write some at boot); nft on a tie."""
    counts = {}
    for backend in BACKENDS:
        if shutil.which(_bin(backend, "-save")) is None:
            continue
        try:
            proc = subprocess.run([*netns_prefix(netns), _bin(backend, "-save")], capture_output=True,
                                  text=True, check=False)
        except OSError as err:
            raise IptablesError(f"cannot run {_bin(backend, '-save')}: {err}") from err
        counts[backend] = sum(1 for line in proc.stdout.splitlines() if line.startswith("-A "))
    if not counts:
        raise IptablesError(
            "no iptables-nft-save or iptables-legacy-save found; install the iptables package "
            "(apt-get install iptables) or use --proxy-mode nftables"
        )
    if "legacy" in counts and counts["legacy"] > counts.get("nft", -1):
        return "legacy"
    return "nft" if "nft" in counts else "legacy"


class IptablesCli:
    """Runs the real binaries of one backend (``iptables-nft-*`` or ``iptables-legacy-*``) for one
    family (``ip6tables-*`` for IPv6)."""

    def __init__(self, *, backend: str, netns: str | None = None, family: Family = 4) -> None:
        if backend not in BACKENDS:
            raise IptablesError(f"unknown iptables backend {backend!r}; use nft or legacy")
        self.backend: IptablesBackend = "nft" if backend == "nft" else "legacy"
        self.netns = netns
        self.family = family

    def _run(self, argv: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        if shutil.which(argv[0]) is None:
            raise IptablesError(
                f"{argv[0]}: command not found; install the iptables package (apt-get install iptables)"
            )
        try:
            proc = run_captured([*netns_prefix(self.netns), *argv], stdin=stdin)
        except OSError as err:  # fork or exec failed (no memory, too many processes...)
            raise IptablesError(f"cannot run {argv[0]}: {err}") from err
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                           proc.stderr.decode(errors="replace"))

    def restore(self, payload: RestorePayload) -> None:
        """Apply ``payload``: each table atomically, filter then nat (iptables-restore commits
        each table on its own, on both backends). When nat is refused, filter is already
        applied: the proxier puts it back (see ``IptProxier``)."""
        if not payload:
            return
        try:
            data = payload.render_bytes()
        except PayloadError as err:
            raise IptablesError(f"payload not sent: {err}") from None
        restore = [_bin(self.backend, "-restore", self.family), "--noflush", "-w", WAIT_SECONDS]
        proc = self._run(restore, data)
        if proc.returncode != 0:
            raise IptablesError(proc.stderr.strip() or f"iptables-restore exited {proc.returncode}")

    def our_chains(self, table: str, prefix: str) -> set[str]:
        proc = self._run([_bin(self.backend, "-save", self.family), "-t", table])
        if proc.returncode != 0:
            return set()  # table not loaded yet: nothing of ours in it
        return {
            line[1:].split()[0]
            for line in proc.stdout.splitlines()
            if line.startswith(":" + prefix)
        }

    def holds_chains(self, prefix: str) -> bool:
        # One save of every table: a start-up's cleanup of the other modes asks each backend
        # and family, and checking each jump on its own took ~40 processes (0.15-0.3 s).
        proc = self._run([_bin(self.backend, "-save", self.family)])
        if proc.returncode != 0:
            return True  # cannot tell: let the caller look chain by chain
        return any(line.startswith(":" + prefix) for line in proc.stdout.splitlines())

    def ensure_jump(self, table: str, chain: str, args: tuple[str, ...]) -> None:
        base = [_bin(self.backend, "", self.family), "-w", WAIT_SECONDS, "-t", table]
        if self._run([*base, "-C", chain, *args]).returncode == 0:
            return
        proc = self._run([*base, "-I", chain, "1", *args])
        if proc.returncode != 0:
            raise IptablesError(f"cannot insert jump in {table}/{chain}: {proc.stderr.strip()}")

    def delete_jump(self, table: str, chain: str, args: tuple[str, ...]) -> bool:
        base = [_bin(self.backend, "", self.family), "-w", WAIT_SECONDS, "-t", table]
        removed = False
        # Delete every copy: a crash between -C and -I of an older version could leave two.
        while self._run([*base, "-D", chain, *args]).returncode == 0:
            removed = True
        return removed


class FakeIptables:
    """In-memory iptables for unit tests: applies payloads all-or-nothing per call."""

    def __init__(self, backend: IptablesBackend = "nft", family: Family = 4) -> None:
        self.backend = backend
        self.family = family
        self.chains: dict[tuple[str, str], list[str]] = {}
        self.jumps: list[tuple[str, str, tuple[str, ...]]] = []
        self.payloads: list[RestorePayload] = []
        self.fail_next: str | None = None

    def restore(self, payload: RestorePayload) -> None:
        if self.fail_next is not None:
            msg, self.fail_next = self.fail_next, None
            raise IptablesError(msg)
        try:
            payload.render_bytes()  # what the real executor would refuse, this one refuses too
        except PayloadError as err:
            raise IptablesError(f"payload not sent: {err}") from None
        chains: dict[tuple[str, str], list[str]] = {k: list(v) for k, v in self.chains.items()}
        for key, rules in payload.rewrite.items():
            chains[key] = list(rules)
        for key in payload.delete:
            chains.pop(key, None)
        # The kernel refuses a jump to a chain that does not exist.
        for (table, chain), chain_rules in chains.items():
            for rule in chain_rules:
                words = shlex.split(rule)
                if "-j" in words:
                    target = words[words.index("-j") + 1]
                    if target.isupper() and "-" in target and (table, target) not in chains:
                        raise IptablesError(f"{table}/{chain}: jump to missing chain {target}")
        self.chains = chains
        self.payloads.append(payload)

    def our_chains(self, table: str, prefix: str) -> set[str]:
        return {c for (t, c) in self.chains if t == table and c.startswith(prefix)}

    def holds_chains(self, prefix: str) -> bool:
        return any(c.startswith(prefix) for (_, c) in self.chains) or any(
            args[-1].startswith(prefix) for _, _, args in self.jumps)

    def ensure_jump(self, table: str, chain: str, args: tuple[str, ...]) -> None:
        if (table, chain, args) not in self.jumps:
            self.jumps.insert(0, (table, chain, args))

    def delete_jump(self, table: str, chain: str, args: tuple[str, ...]) -> bool:
        if (table, chain, args) in self.jumps:
            self.jumps.remove((table, chain, args))
            return True
        return False


__all__ = ["TABLES", "FakeIptables", "IptablesCli", "IptablesError", "detect_backend"]
